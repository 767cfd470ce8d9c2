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
from rank 0; see lmkit.data.share_stream_across_ranks). --datasets (a YAML list, see lmkit.mixture) mixes sources
by weight, all raw text or all prompt/completion / chat files, and evaluation reports eval_<name>_loss per source.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from transformers import set_seed

from lmkit.args import (
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    check_block_size,
    explicit_fields,
    fit_evaluation,
    nothing_held_out,
    parse_args,
)
from lmkit.data import use_tokenized_dataset
from lmkit.distributed import main_process_first
from lmkit.errors import main_entry
from lmkit.finetune import (
    LoadedModel,
    default_sft_sampling,
    load_starting_point,
    load_tokenizer,
    merge_lora,
    prepare_model,
    sft_collator,
)
from lmkit.finetune_args import FinetuneArguments
from lmkit.mixture import held_out_rows
from lmkit.perf import resolve_attn_implementation
from lmkit.preprocess import load_tokenized_finetune, sft_rows_format
from lmkit.runtime import model_size, prepare_run, train_and_save
from lmkit.sft import CHAT, build_finetune_datasets, resolve_chat_template, sft_format

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
    tokenized = use_tokenized_dataset(data_args, explicit_fields(data_args))  # --block_size follows the dataset's
    spec, model_config = load_starting_point(model_args)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    checks = partial(check_block_size, data_args, args, max_positions, "the model's max_position_embeddings")
    model_report = LoadedModel.describe(model_args, spec, model_config)
    resume_from = prepare_run(args, model_report, data_args, ft_args, checks=checks)

    # -- tokenizer and data -----------------------------------------------------------------------------------
    tokenizer_spec = spec if data_args.tokenizer in ("train", "char") else data_args.tokenizer
    tokenizer, n_saved = load_tokenizer(tokenizer_spec, model_args.trust_remote_code)
    fmt = sft_rows_format(tokenized, sft_format(data_args))
    new_special: list[str] = []
    if fmt == CHAT:
        tokenizer.chat_template, new_special = resolve_chat_template(ft_args.chat_template, tokenizer)

    # -- model ------------------------------------------------------------------------------------------------
    set_seed(args.seed)  # weights drawn here (LoRA adapters, any the checkpoint lacks): the same flags, the same run
    model, _ = prepare_model(
        spec,
        tokenizer,
        n_saved,
        new_special,
        tokenizer_spec=tokenizer_spec,
        chat=fmt == CHAT,
        lora=ft_args if ft_args.use_lora else None,
        activation_checkpointing=args.activation_checkpointing,
        attn_implementation=resolve_attn_implementation(model_args.attn_implementation, args, data_args.block_size),
        trust_remote_code=model_args.trust_remote_code,
        load_in_4bit=ft_args.load_in_4bit,
    )

    # -- data -------------------------------------------------------------------------------------------------
    main_first = partial(main_process_first, args)
    if tokenized is not None:  # recipes/preprocess.py's blocks or SFT rows, made with this model's tokenizer
        datasets = load_tokenized_finetune(data_args, tokenizer, tokenized, fmt, ft_args)
    else:  # raw text continues pretraining (packed blocks); SFT rows carry loss masks. --datasets: mixed by weight
        datasets = build_finetune_datasets(
            data_args, tokenizer, fmt, train_on_prompt=ft_args.train_on_prompt, packing=ft_args.packing,
            seed=args.seed, main_process_first=main_first,
        )  # fmt: skip
    n_eval = held_out_rows(datasets["validation"])
    if n_eval == 0:
        datasets["validation"] = None
        fit_evaluation(args, nothing_held_out(data_args))
    default_sft_sampling(args, data_args, fmt, ft_args.packing)
    train_rows = "streamed" if data_args.streaming else f"{len(datasets['train']):,}"
    logger.info("model: %s; data: %s, %s train / %d eval rows", model_size(model), fmt, train_rows, n_eval)

    # -- train, save and evaluate -----------------------------------------------------------------------------
    trainer, metrics = train_and_save(
        model,
        args,
        datasets["train"],
        datasets["validation"],
        data_collator=sft_collator(tokenizer.pad_token_id, data_args, ft_args, fmt),
        tokenizer=tokenizer,
        resume_from=resume_from,
    )
    if ft_args.merge_lora and trainer.is_world_process_zero():
        merge_lora(spec, args.output_dir, trust_remote_code=model_args.trust_remote_code)
    return metrics


if __name__ == "__main__":
    main()
