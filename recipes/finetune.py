"""Fine-tune a causal LM from a checkpoint: continued pretraining, or SFT on prompt/completion or chat data.

    accelerate launch recipes/finetune.py --model_name_or_path outputs/pretrain --train_files data/instructions.jsonl
    accelerate launch recipes/finetune.py --config recipes/configs/sft-lora.yaml --model_name_or_path path/to/any-causal-lm
    accelerate launch recipes/finetune.py --config recipes/configs/sft-lora.yaml --model_name_or_path M \
        --train_files chats.jsonl --load_in_4bit            # QLoRA: CUDA GPU + bitsandbytes only

The files decide the task (see lmkit.sft): raw text continues pretraining; {"prompt", "completion"} rows and
{"messages": [...]} chats train on the answers only (--train_on_prompt for everything), rendered with the
tokenizer's chat template or --chat_template FILE (default: lmkit/templates/chatml.jinja). Examples over
--block_size + 1 tokens are dropped (the log counts them). --use_lora trains adapters (saved in --output_dir),
--merge_lora also writes base + adapter as a full model to OUTPUT_DIR/merged. Without --config this uses
recipes/configs/sft-full.yaml; its values that do not fit the model (a --block_size over its positions) follow the
model, while the same values given on the command line or in your --config are errors. --streaming true
--max_steps N reads, tokenizes and packs text or JSON-lines examples as training goes (every rank's share comes
from rank 0; see lmkit.data.share_stream_across_ranks).
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import set_seed

from lmkit.args import (
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    check_streaming,
    fit_block_size,
    fit_evaluation,
    parse_args,
)
from lmkit.collator import CausalLMCollator
from lmkit.data import build_lm_datasets, load_raw_datasets
from lmkit.errors import main_entry
from lmkit.finetune import (
    LoadedModel,
    add_stop_token,
    add_tokens,
    apply_lora,
    check_vocab,
    load_config,
    load_model,
    load_tokenizer,
    merge_lora,
    resolve_starting_point,
)
from lmkit.finetune_args import FinetuneArguments
from lmkit.perf import resolve_attn_implementation
from lmkit.runtime import num_parameters, prepare_run, save_and_evaluate
from lmkit.sft import CHAT, TEXT, build_sft_datasets, end_of_turn_token, resolve_chat_template, sft_format
from lmkit.trainer import LMTrainer

logger = logging.getLogger("lmkit.finetune")
DEFAULT_SFT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft-full.yaml"


@main_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    # -- setup ------------------------------------------------------------------------------------------------
    model_args: ModelArguments
    data_args: DataArguments
    ft_args: FinetuneArguments
    args: LMTrainingArguments
    model_args, data_args, ft_args, args = parse_args(
        (ModelArguments, DataArguments, FinetuneArguments, LMTrainingArguments), argv, DEFAULT_SFT_CONFIG
    )
    spec = resolve_starting_point(model_args.model_name_or_path)
    model_config = load_config(spec, model_args.trust_remote_code)

    def checks() -> None:  # before the start-up report: it shows the fitted values, and an error is the last line
        check_streaming(data_args, args)
        max_positions = getattr(model_config, "max_position_embeddings", None)
        fit_block_size(data_args, max_positions, "the model's max_position_embeddings")

    model_report = LoadedModel.describe(model_args, spec, model_config)
    resume_from = prepare_run(args, model_report, data_args, ft_args, checks=checks)

    # -- tokenizer and data -----------------------------------------------------------------------------------
    tokenizer_spec = spec if data_args.tokenizer in ("train", "char") else data_args.tokenizer
    tokenizer, n_saved = load_tokenizer(tokenizer_spec, model_args.trust_remote_code)
    fmt = sft_format(data_args)
    new_special: list[str] = []
    if fmt == CHAT:
        tokenizer.chat_template, new_special = resolve_chat_template(ft_args.chat_template, tokenizer)

    # -- model ------------------------------------------------------------------------------------------------
    set_seed(args.seed)  # weights drawn here (LoRA adapters, any the checkpoint lacks): the same flags, the same run
    model = load_model(
        spec,
        attn_implementation=resolve_attn_implementation(model_args.attn_implementation, args, data_args.block_size),
        trust_remote_code=model_args.trust_remote_code,
        load_in_4bit=ft_args.load_in_4bit,
    )
    check_vocab(model, n_saved, tokenizer_spec)
    new_ids = add_tokens(model, tokenizer, n_saved, new_special)
    if fmt == CHAT:
        add_stop_token(model, end_of_turn_token(tokenizer))

    if fmt == TEXT:  # continued pretraining: the pretraining pipeline, packed blocks of --block_size + 1
        raw = load_raw_datasets(data_args, seed=args.seed, main_process_first=args.main_process_first)
        datasets = build_lm_datasets(raw, tokenizer, data_args, main_process_first=args.main_process_first)
    else:
        datasets = build_sft_datasets(
            data_args, tokenizer, train_on_prompt=ft_args.train_on_prompt, packing=ft_args.packing, seed=args.seed
        )
    if datasets["validation"] is None or len(datasets["validation"]) == 0:
        datasets["validation"] = None
        fit_evaluation(args, f"--validation_split {data_args.validation_split} holds out no validation data")
    if ft_args.use_lora:
        model = apply_lora(
            model, ft_args, new_token_ids=new_ids, activation_checkpointing=args.activation_checkpointing
        )
    train_rows = "streamed" if data_args.streaming else f"{len(datasets['train']):,}"
    logger.info(
        "model: %s parameters; data: %s, %s train / %d eval rows",
        f"{num_parameters(model):,}", fmt, train_rows, len(datasets["validation"] or []),
    )  # fmt: skip

    # -- train ------------------------------------------------------------------------------------------------
    # A stream of unpacked SFT examples pads every batch to --block_size (see CausalLMCollator.pad_to_length).
    stream_width = data_args.block_size if data_args.streaming and fmt != TEXT and not ft_args.packing else None
    trainer = LMTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id, pad_to_length=stream_width),
        processing_class=tokenizer,
    )
    train_result = trainer.train(resume_from_checkpoint=resume_from)

    # -- save and evaluate ------------------------------------------------------------------------------------
    metrics = save_and_evaluate(trainer, train_result)
    if ft_args.merge_lora and trainer.is_world_process_zero():
        merge_lora(
            spec,
            args.output_dir,
            str(Path(args.output_dir) / "merged"),
            trust_remote_code=model_args.trust_remote_code,
        )
    return metrics


if __name__ == "__main__":
    main()
