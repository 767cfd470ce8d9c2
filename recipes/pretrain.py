"""Pretrain a causal LM from scratch.

    accelerate launch recipes/pretrain.py                                    # tiny preset, bundled Shakespeare
    accelerate launch recipes/pretrain.py --config recipes/configs/gpt2-small.yaml --train_files 'corpus/*.txt'
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/pretrain.py --config ...

Any field of ModelArguments, DataArguments or TrainingArguments can be set in the YAML or on the command line
(the command line wins). Output: model, tokenizer, trainer_state.json and TensorBoard logs in --output_dir.
"""

from __future__ import annotations

import logging
import math
from itertools import islice
from pathlib import Path

import torch
from transformers import set_seed

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import (
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    check_streaming,
    fit_block_size,
    parse_args,
)
from lmkit.collator import CausalLMCollator
from lmkit.data import build_lm_datasets, load_raw_datasets
from lmkit.errors import LMKitError, main_entry
from lmkit.perf import resolve_attn_implementation
from lmkit.runtime import num_parameters, prepare_run, save_and_evaluate
from lmkit.tokenizer import build_tokenizer
from lmkit.trainer import LMTrainer

logger = logging.getLogger("lmkit.pretrain")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
STREAMING_TOKENIZER_DOCS = 100_000


@main_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    # -- setup ------------------------------------------------------------------------------------------------
    model_args: ModelArguments
    data_args: DataArguments
    args: LMTrainingArguments
    model_args, data_args, args = parse_args(argv=argv, default_config=DEFAULT_CONFIG)

    def checks() -> None:  # before the start-up report: it shows the fitted values, and an error is the last line
        check_streaming(data_args, args)
        fit_block_size(data_args, model_args.max_position_embeddings, "the model's --max_position_embeddings")

    resume_from = prepare_run(args, model_args, data_args, checks=checks)

    # -- data and tokenizer -----------------------------------------------------------------------------------
    with args.main_process_first(desc="load corpus"):
        raw = load_raw_datasets(data_args, seed=args.seed)
    with args.main_process_first(desc="tokenizer"):
        texts = (row["text"] for row in raw["train"])
        if data_args.streaming:  # a stream may be endless: train the tokenizer on its first documents only
            texts = islice(texts, STREAMING_TOKENIZER_DOCS)
        tokenizer = build_tokenizer(data_args.tokenizer, texts, model_args.vocab_size)
    vocab_size = model_args.vocab_size or 64 * math.ceil(len(tokenizer) / 64)
    if len(tokenizer) > vocab_size:
        raise LMKitError(
            f"--tokenizer {data_args.tokenizer} has {len(tokenizer)} tokens, more than the model's "
            f"--vocab_size {vocab_size}"
        )
    datasets = build_lm_datasets(raw, tokenizer, data_args, main_process_first=args.main_process_first)

    # -- model ------------------------------------------------------------------------------------------------
    config = LMConfig(
        **model_args.config_kwargs(),
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = resolve_attn_implementation(
        model_args.attn_implementation, args, data_args.block_size
    )
    set_seed(args.seed)  # the initial weights: the same flags give the same run
    # Built whole on every rank, from the seed, so every mode starts from the same weights as one process
    # (zero.Init via `_from_config` draws other initial values). Fine while one copy fits in CPU memory.
    model = LMForCausalLM(config)
    tokens_per_step = (
        args.per_device_train_batch_size * data_args.block_size * args.gradient_accumulation_steps * args.world_size
    )
    logger.info(
        "model: %s parameters (%s without embeddings), %s attention; %s tokens per optimizer step; "
        "%d train / %d eval blocks",
        f"{num_parameters(model):,}",
        f"{num_parameters(model, exclude_embeddings=True):,}",
        config._attn_implementation,
        f"{tokens_per_step:,}",
        len(datasets["train"]) if hasattr(datasets["train"], "__len__") else -1,
        len(datasets["validation"]),
    )

    # -- train ------------------------------------------------------------------------------------------------
    trainer = LMTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    train_result = trainer.train(resume_from_checkpoint=resume_from)

    # -- save and evaluate ------------------------------------------------------------------------------------
    metrics = save_and_evaluate(trainer, train_result)

    if args.sample_prompt and trainer.is_world_process_zero():
        print_sample(args.output_dir, tokenizer, args.sample_prompt, args.sample_max_new_tokens)
    return metrics


def print_sample(model_dir: str, tokenizer, prompt: str, max_new_tokens: int) -> None:
    # Reload what was saved: a consolidated model even after ZeRO-3 / FSDP, and a check that the save loads.
    model = LMForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=50, temperature=0.8)
    print("\n----- sample -----\n" + tokenizer.decode(out[0], skip_special_tokens=True) + "\n------------------")


if __name__ == "__main__":
    main()
