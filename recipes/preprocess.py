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

SFT rows and preference pairs are written the same way, with the fine-tuning or DPO recipe's flags (the recipe is
told from them, or --recipe finetune|dpo), exactly as that recipe would build them (lmkit.recipe_data):

    python recipes/preprocess.py --config recipes/configs/sft-full.yaml --model_name_or_path M \
        --train_files chats.jsonl --output_dir tokenized/sft
    accelerate launch recipes/finetune.py --config recipes/configs/sft-full.yaml --model_name_or_path M \
        --tokenized_dataset tokenized/sft

Run again with the same flags, it says the folder is up to date; an OUTPUT_DIR holding anything else is refused
unless --overwrite_output_dir.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from lmkit.args import explicit_fields, parse_args
from lmkit.errors import LMKitError, main_entry
from lmkit.preprocess import PreprocessArguments, preprocess, preprocess_rows, row_settings
from lmkit.recipe_data import GROUPS, dpo_data, finetune_data, which_recipe
from lmkit.runtime import configure_threads, setup_tool_logging
from lmkit.sft import TEXT, sft_format

logger = logging.getLogger("lmkit.preprocess")
RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "tiny.yaml"  # pretrain's default
PRESETS = {"finetune": "sft-full.yaml", "dpo": "dpo.yaml"}  # the recipes' own defaults


@main_entry
def main(argv: list[str] | None = None) -> dict:
    # -- setup: the flags of the recipe the data is for (--recipe, or told from the flags as inspect_data does) ---
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = which_recipe(argv)
    if recipe not in GROUPS:
        raise LMKitError(f"--recipe must be one of {', '.join(GROUPS)}, got {recipe!r}")
    default_config = DEFAULT_CONFIG if recipe == "pretrain" else RECIPES / "configs" / PRESETS[recipe]
    *groups, _ = parse_args((*GROUPS[recipe], PreprocessArguments), argv, default_config)
    model_args, data_args, args = groups[0], groups[1], groups[-1]
    if "output_dir" not in explicit_fields(args):  # a preset's output_dir is a training run's, never this folder
        raise LMKitError("--output_dir: say where the tokenized dataset goes")
    setup_tool_logging()
    configure_threads(args.num_threads, cpu=True)

    # -- tokenize (pack) and save -----------------------------------------------------------------------------
    if recipe == "pretrain" or (recipe == "finetune" and sft_format(data_args) == TEXT):
        written, manifest = preprocess(
            data_args, args.output_dir, vocab_size=model_args.vocab_size, seed=args.seed,
            overwrite=args.overwrite_output_dir,
        )  # fmt: skip
    else:  # SFT rows or preference pairs, exactly as the recipe builds them (lmkit.recipe_data)
        if data_args.streaming:
            raise LMKitError("--streaming: preprocess writes the whole dataset; drop the flag")
        if data_args.tokenized_dataset is not None:
            raise LMKitError("--tokenized_dataset: preprocess reads raw data (--train_files / --datasets)")
        ft_args = groups[2]
        if recipe == "finetune":
            data = finetune_data(*groups)
            settings = row_settings(data.tokenizer, data.chat, train_on_prompt=ft_args.train_on_prompt,
                                    packing=ft_args.packing)  # fmt: skip
        else:
            data = dpo_data(*groups)
            settings = row_settings(data.tokenizer, data.chat, max_length=groups[3].max_length)
        kind = "preference" if data.preference else "sft"
        written, manifest = preprocess_rows(
            kind, data, data_args, settings, args.output_dir, seed=args.seed, overwrite=args.overwrite_output_dir
        )
    state = "written" if written else "up to date (same sources, tokenizer and settings; nothing done)"
    print(f"{args.output_dir}: {state}; {json.dumps(manifest['splits'])}")
    return manifest


if __name__ == "__main__":
    main()
