"""Tokenize once: write a pretraining corpus as packed blocks that every rank of a later run loads as it is.

    python recipes/preprocess.py --config recipes/configs/gpt2-small.yaml --output_dir tokenized/web \
        --train_files 'corpus/*.txt' --preprocessing_num_workers 8
    accelerate launch recipes/pretrain.py --config recipes/configs/gpt2-small.yaml --tokenized_dataset tokenized/web

It takes pretrain's flags and YAML (the data flags matter: sources, --tokenizer, --vocab_size, --block_size, the
validation split and --seed) and writes OUTPUT_DIR: the blocks (Arrow shards), the tokenizer and manifest.json
(see lmkit.preprocess). A mixture (--datasets) is written mixed by weight, with one validation split per source:

    python recipes/preprocess.py --config recipes/configs/gpt2-small.yaml --output_dir tokenized/mix \
        --datasets '[{"name": "books", "files": "books/", "weight": 0.7},
                     {"name": "code", "files": "code/", "weight": 0.3}]'

Run again with the same flags, it says the folder is up to date; an OUTPUT_DIR holding anything else is refused
unless --overwrite_output_dir.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmkit.args import DataArguments, LMTrainingArguments, ModelArguments, explicit_fields, parse_args
from lmkit.errors import LMKitError, main_entry
from lmkit.preprocess import preprocess
from lmkit.runtime import configure_threads, setup_tool_logging

logger = logging.getLogger("lmkit.preprocess")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"  # pretrain's default


@main_entry
def main(argv: list[str] | None = None) -> dict:
    # -- setup ------------------------------------------------------------------------------------------------
    model_args: ModelArguments
    data_args: DataArguments
    args: LMTrainingArguments
    model_args, data_args, args = parse_args(argv=argv, default_config=DEFAULT_CONFIG)
    if "output_dir" not in explicit_fields(args):  # a preset's output_dir is a training run's, never this folder
        raise LMKitError("--output_dir: say where the tokenized dataset goes")
    setup_tool_logging()
    configure_threads(args.num_threads, cpu=True)

    # -- tokenize, pack and save ------------------------------------------------------------------------------
    written, manifest = preprocess(
        data_args, args.output_dir, vocab_size=model_args.vocab_size, seed=args.seed,
        overwrite=args.overwrite_output_dir,
    )  # fmt: skip
    state = "written" if written else "up to date (same sources, tokenizer and block size; nothing done)"
    print(f"{args.output_dir}: {state}; {json.dumps(manifest['splits'])}")
    return manifest


if __name__ == "__main__":
    main()
