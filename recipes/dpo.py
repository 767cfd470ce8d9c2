"""Preference-tune a causal LM on (prompt, chosen, rejected) pairs: DPO, IPO, SimPO or ORPO.

    accelerate launch recipes/dpo.py --model_name_or_path outputs/sft --train_files prefs.jsonl
    accelerate launch recipes/dpo.py --config recipes/configs/dpo-lora.yaml --model_name_or_path path/to/any-causal-lm \
        --train_files prefs.jsonl
    accelerate launch recipes/dpo.py --model_name_or_path outputs/sft --train_files prefs.jsonl --loss_type simpo \
        --beta 2.0 --simpo_gamma 0.5          # reference-free: no reference pass

Rows are TRL's preference formats (see lmkit.dpo): {"prompt", "chosen", "rejected"} strings or message lists, or
{"chosen", "rejected"} whole conversations sharing the prompt. The reference (the starting model, the base under
--use_lora, or --ref_model_name_or_path) scores every pair once before training; its log-probs are cached on disk
and no second model stays in memory. Without --config this uses recipes/configs/dpo.yaml. --datasets (a YAML list,
see lmkit.mixture) mixes preference sources by weight; evaluation reports eval_<name>_loss per source.
"""

from __future__ import annotations

import gc
import logging
from functools import partial
from pathlib import Path

from transformers import set_seed

from lmkit.args import DataArguments, LMTrainingArguments, ModelArguments, fit_evaluation, nothing_held_out, parse_args
from lmkit.data import load_tokenized_dataset, read_tokenized_manifest
from lmkit.dpo import (
    PreferenceCollator,
    PreferenceTrainer,
    add_reference_logps_to_splits,
    build_preference_sources,
    cache_root,
    check_reference_tokenizer,
    is_conversational,
    load_preference_sources,
    mix_preference_sources,
    model_key,
)
from lmkit.dpo_args import PreferenceArguments, fit_preference_args
from lmkit.errors import LMKitError, main_entry
from lmkit.finetune import (
    LoadedModel,
    apply_lora,
    load_starting_point,
    load_tokenizer,
    merge_lora,
    prepare_model,
    resolve_starting_point,
)
from lmkit.finetune_args import FinetuneArguments
from lmkit.mixture import held_out_rows
from lmkit.perf import resolve_attn_implementation
from lmkit.preprocess import row_settings
from lmkit.runtime import model_size, prepare_run, train_and_save
from lmkit.sft import resolve_chat_template

logger = logging.getLogger("lmkit.dpo")
DEFAULT_DPO_CONFIG = Path(__file__).resolve().parent / "configs" / "dpo.yaml"


@main_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    # -- setup ------------------------------------------------------------------------------------------------
    groups = (ModelArguments, DataArguments, FinetuneArguments, PreferenceArguments, LMTrainingArguments)
    model_args, data_args, ft_args, pref_args, args = parse_args(groups, argv, DEFAULT_DPO_CONFIG)
    tokenized = read_tokenized_manifest(data_args.tokenized_dataset) if data_args.tokenized_dataset else None
    if ft_args.train_on_prompt:
        raise LMKitError("--train_on_prompt does not apply to preference tuning: only answers are scored")
    if ft_args.load_in_4bit:
        raise LMKitError("--load_in_4bit is not supported by recipes/dpo.py yet (use --use_lora)")
    spec, model_config = load_starting_point(model_args)
    ref_spec = resolve_starting_point(pref_args.ref_model_name_or_path) if pref_args.ref_model_name_or_path else None
    max_positions = getattr(model_config, "max_position_embeddings", None)
    checks = partial(fit_preference_args, pref_args, max_positions, "the model's max_position_embeddings")
    model_report = LoadedModel.describe(model_args, spec, model_config)
    resume_from = prepare_run(args, model_report, data_args, ft_args, pref_args, checks=checks)

    # -- tokenizer and data -----------------------------------------------------------------------------------
    tokenizer_spec = spec if data_args.tokenizer in ("train", "char") else data_args.tokenizer
    tokenizer, n_saved = load_tokenizer(tokenizer_spec, model_args.trust_remote_code)
    saved_vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < n_saved}
    if tokenized is None:  # {source: {"train", "validation"}}; --datasets: several
        rows = load_preference_sources(data_args, seed=args.seed)
        chat = any(is_conversational(splits["train"]) for splits in rows.values())
    else:  # recipes/preprocess.py's pairs: rendered with a chat template if its manifest says so
        chat = bool(tokenized.get("settings", {}).get("chat"))
    new_special: list[str] = []
    if chat:
        tokenizer.chat_template, new_special = resolve_chat_template(ft_args.chat_template, tokenizer)

    # -- model ------------------------------------------------------------------------------------------------
    # The policy and a --ref_model_name_or_path reference are built alike: the same tokens added the same way.
    build = partial(
        prepare_model,
        n_saved=n_saved,
        new_special=new_special,
        tokenizer_spec=tokenizer_spec,
        attn_implementation=resolve_attn_implementation(model_args.attn_implementation, args, pref_args.max_length),
        trust_remote_code=model_args.trust_remote_code,
    )
    set_seed(args.seed)  # weights drawn here (LoRA adapters): the same flags, the same run
    # No LoRA yet: under --use_lora the reference is this model before the adapter exists.
    model, new_ids = build(spec, tokenizer, chat=bool(new_special))
    cache_dir = cache_root(data_args)
    settings = {"cache_dir": cache_dir, "num_proc": data_args.preprocessing_num_workers}
    if tokenized is None:
        with args.main_process_first():  # rank 0 tokenizes into the cache, the others then read it
            datasets = build_preference_sources(rows, tokenizer, pref_args.max_length, **settings)
    else:  # one source: the pairs as preprocess wrote them, a mixture's already mixed
        pairs, _ = load_tokenized_dataset(
            data_args, tokenizer, rows="preference",
            settings=row_settings(tokenizer, chat, max_length=pref_args.max_length),
        )  # fmt: skip
        datasets = {"tokenized": {split: d for split, d in pairs.items() if d is not None}}
    collator = PreferenceCollator.from_args(tokenizer.pad_token_id, ft_args)

    # -- reference log-probs: one pass, cached; then only the policy stays in memory -----------------------------
    if pref_args.needs_reference:
        ref_model = model  # the starting model (under --use_lora: the base, before the adapter exists)
        if ref_spec is not None:
            ref_tokenizer, _ = load_tokenizer(ref_spec, model_args.trust_remote_code)
            check_reference_tokenizer(ref_tokenizer, saved_vocab, ref_spec)
            ref_model, _ = build(ref_spec, ref_tokenizer)
        key = model_key(ref_spec or spec, extra=f"{new_special}|{model_args.attn_implementation}")
        datasets = {
            name: add_reference_logps_to_splits(splits, ref_model, collator, args, key=key, cache_dir=cache_dir)
            for name, splits in datasets.items()
        }
        del ref_model
        gc.collect()
    # one source: its splits as they are
    datasets = datasets["tokenized"] if tokenized else mix_preference_sources(datasets, data_args, args.seed)

    if "validation" not in datasets:
        fit_evaluation(args, nothing_held_out(data_args))
    if ft_args.use_lora:
        model = apply_lora(
            model, ft_args, new_token_ids=new_ids, activation_checkpointing=args.activation_checkpointing
        )
    logger.info(
        "model: %s; loss %s (beta %g); %d train / %d eval pairs",
        model_size(model), pref_args.loss_type, pref_args.beta, len(datasets["train"]),
        held_out_rows(datasets.get("validation")),
    )  # fmt: skip

    # -- train, save and evaluate -----------------------------------------------------------------------------
    trainer, metrics = train_and_save(
        model, args, datasets["train"], datasets.get("validation"), collator, tokenizer, resume_from,
        trainer_class=PreferenceTrainer, preference_args=pref_args,
    )  # fmt: skip
    if ft_args.merge_lora and trainer.is_world_process_zero():
        merge_lora(spec, args.output_dir, trust_remote_code=model_args.trust_remote_code)
    return metrics


if __name__ == "__main__":
    main()
