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
recipes/configs/sft-full.yaml.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmkit.args import DataArguments, LMTrainingArguments, ModelArguments, parse_args
from lmkit.data import build_lm_datasets, load_raw_datasets
from lmkit.distributed import validate_distributed
from lmkit.errors import LMKitError, main_entry
from lmkit.finetune import (
    LabelsCollator,
    add_stop_token,
    add_tokens,
    apply_lora,
    check_vocab,
    load_model,
    load_tokenizer,
    merge_lora,
    resolve_starting_point,
)
from lmkit.finetune_args import FinetuneArguments
from lmkit.perf import resolve_attn_implementation
from lmkit.runtime import (
    check_output_dir,
    log_startup,
    num_parameters,
    resolve_resume_checkpoint,
    save_and_evaluate,
    setup_logging,
)
from lmkit.sft import CHAT, TEXT, build_sft_dataset, end_of_turn_token, load_sft_rows, resolve_chat_template
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
    setup_logging(args)
    validate_distributed(args)
    log_startup(args, model_args, data_args, ft_args)
    spec = resolve_starting_point(model_args.model_name_or_path)
    check_output_dir(args)
    resume_from = resolve_resume_checkpoint(args)

    # -- tokenizer and data -----------------------------------------------------------------------------------
    tokenizer_spec = spec if data_args.tokenizer in ("train", "char") else data_args.tokenizer
    tokenizer, n_saved = load_tokenizer(tokenizer_spec, model_args.trust_remote_code)
    fmt, rows = load_sft_rows(data_args, seed=args.seed)
    new_special: list[str] = []
    if fmt == CHAT:
        tokenizer.chat_template, new_special = resolve_chat_template(ft_args.chat_template, tokenizer)

    # -- model ------------------------------------------------------------------------------------------------
    model = load_model(
        spec,
        attn_implementation=resolve_attn_implementation(model_args.attn_implementation, args, data_args.block_size),
        trust_remote_code=model_args.trust_remote_code,
        load_in_4bit=ft_args.load_in_4bit,
    )
    check_vocab(model, n_saved, tokenizer_spec)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and data_args.block_size > max_positions:
        raise LMKitError(
            f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings {max_positions}"
        )
    new_ids = add_tokens(model, tokenizer, n_saved, new_special)
    if fmt == CHAT:
        add_stop_token(model, end_of_turn_token(tokenizer))

    if fmt == TEXT:  # continued pretraining: the pretraining pipeline, packed blocks of --block_size + 1
        raw = load_raw_datasets(data_args, seed=args.seed, main_process_first=args.main_process_first)
        datasets = build_lm_datasets(raw, tokenizer, data_args, main_process_first=args.main_process_first)
    else:
        datasets = {
            split: build_sft_dataset(
                split_rows,
                tokenizer,
                data_args.block_size,
                train_on_prompt=ft_args.train_on_prompt,
                packing=ft_args.packing,
                split=split,
            )  # fmt: skip
            for split, split_rows in rows.items()
        }
    if ft_args.use_lora:
        model = apply_lora(
            model, ft_args, new_token_ids=new_ids, activation_checkpointing=args.activation_checkpointing
        )
    logger.info(
        "model: %s parameters; data: %s, %d train / %d eval rows",
        f"{num_parameters(model):,}", fmt, len(datasets["train"]), len(datasets["validation"]),
    )  # fmt: skip

    # -- train ------------------------------------------------------------------------------------------------
    trainer = LMTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=LabelsCollator(pad_token_id=tokenizer.pad_token_id),
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
