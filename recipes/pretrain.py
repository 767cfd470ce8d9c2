"""Pretrain a causal LM from scratch.

    accelerate launch recipes/pretrain.py                                    # tiny preset, bundled Shakespeare
    accelerate launch recipes/pretrain.py --config recipes/configs/gpt2-small.yaml --train_files 'corpus/*.txt'
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/pretrain.py --config ...

Any field of ModelArguments, DataArguments or TrainingArguments can be set in the YAML or on the command line
(the command line wins). Output: model, tokenizer, trainer_state.json and TensorBoard logs in --output_dir.
"""

from __future__ import annotations

import logging
from functools import partial
from itertools import islice
from pathlib import Path

from transformers import set_seed

from lmkit import LMConfig, LMForCausalLM
from lmkit.args import (
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    check_block_size,
    explicit_fields,
    parse_args,
)
from lmkit.collator import CausalLMCollator
from lmkit.data import (
    build_mixture,
    follow_manifest,
    load_sources,
    load_tokenized_dataset,
    source_texts,
    use_tokenized_dataset,
)
from lmkit.distributed import main_process_first
from lmkit.errors import main_entry
from lmkit.generation import sample_saved_model
from lmkit.perf import planned_training_flops, resolve_attn_implementation, resolve_torch_compile
from lmkit.runtime import model_size, prepare_run, tokens_per_step, train_and_save
from lmkit.tokenizer import build_tokenizer, model_vocab_size

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
    # --block_size, --tokenizer and --vocab_size follow a tokenized dataset's: it was made with them
    manifest = use_tokenized_dataset(data_args, explicit_fields(data_args), ("block_size", "tokenizer"))
    if manifest is not None:
        follow_manifest(
            manifest, data_args.tokenized_dataset, model_args, ("vocab_size",), explicit_fields(model_args)
        )
    limit = "the model's --max_position_embeddings"
    checks = partial(check_block_size, data_args, args, model_args.max_position_embeddings, limit)
    resume_from = prepare_run(args, model_args, data_args, checks=checks)

    # -- data and tokenizer -----------------------------------------------------------------------------------
    if data_args.tokenized_dataset is not None:  # tokenized once by recipes/preprocess.py: nothing to do here
        datasets, tokenizer = load_tokenized_dataset(data_args)
    else:
        with main_process_first(args, desc="load corpus"):
            raws = load_sources(data_args, seed=args.seed)  # one per --datasets source (one for --train_files)
        with main_process_first(args, desc="tokenizer"):
            texts = source_texts(raws)
            if data_args.streaming:  # a stream may be endless: train the tokenizer on its first documents only
                texts = islice(texts, STREAMING_TOKENIZER_DOCS)
            tokenizer = build_tokenizer(data_args.tokenizer, texts, model_args.vocab_size)
        datasets = build_mixture(
            raws, tokenizer, data_args, args.seed, main_process_first=partial(main_process_first, args)
        )
    vocab_size = model_vocab_size(tokenizer, model_args.vocab_size, data_args.tokenizer)

    # -- model ------------------------------------------------------------------------------------------------
    config = LMConfig(
        **model_args.config_kwargs(),
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    planned = planned_training_flops(args, datasets["train"], config, data_args.block_size)
    logger.info(resolve_torch_compile(args, planned))  # --torch_compile auto: by the run's length
    config._attn_implementation = resolve_attn_implementation(
        model_args.attn_implementation, args, data_args.block_size
    )
    set_seed(args.seed)  # the initial weights: the same flags give the same run
    # Built whole on every rank, from the seed, so every mode starts from the same weights as one process
    # (zero.Init via `_from_config` draws other initial values). Fine while one copy fits in CPU memory.
    model = LMForCausalLM(config)
    logger.info(
        "model: %s, %s attention; %s tokens per optimizer step; %d train / %d eval blocks",
        model_size(model, without_embeddings=True),
        config._attn_implementation,
        f"{tokens_per_step(args, data_args.block_size):,}",
        len(datasets["train"]) if hasattr(datasets["train"], "__len__") else -1,
        sum(map(len, v.values())) if isinstance(v := datasets["validation"], dict) else len(v),
    )

    # -- train, save and evaluate -----------------------------------------------------------------------------
    collator = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)
    trainer, metrics = train_and_save(
        model, args, datasets["train"], datasets["validation"], collator, tokenizer, resume_from
    )
    if args.sample_prompt and trainer.is_world_process_zero():
        sample = sample_saved_model(args.output_dir, args.sample_prompt, args.sample_max_new_tokens)
        print(f"\n----- sample -----\n{sample}\n------------------")
    return metrics


if __name__ == "__main__":
    main()
