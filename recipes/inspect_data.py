"""Show training rows as the model sees them: tokens, trained (loss) spans, document boundaries, positions.

    python recipes/inspect_data.py --rows 2                                   # pretraining blocks (tiny preset)
    python recipes/inspect_data.py --config recipes/configs/sft-full.yaml --model_name_or_path M \
        --train_files chats.jsonl --rows 3 --format table
    python recipes/inspect_data.py --config recipes/configs/dpo.yaml --model_name_or_path M \
        --train_files pairs.jsonl --rows 2 --format json

It takes the flags and YAML of the recipe it inspects and builds the data as that recipe does (lmkit.recipe_data),
then collates the first --rows rows of --split with the recipe's collator and prints them (lmkit.inspect):
--format text (one compact line per row), table (one line per position) or json (one object per row or pair).
--recipe pretrain|finetune|dpo (or recipe: in the YAML) says which recipe; without it, a preference field (--loss_type, --beta, ...) in
the flags or --config means dpo, else a fine-tuning field or --model_name_or_path means finetune, else pretrain.
Nothing is trained or written to --output_dir, and no accelerator is needed. The Trainer shuffles training rows:
these are the first in dataset order.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from itertools import islice
from pathlib import Path
from types import ModuleType
from typing import Any

from lmkit.args import parse_args
from lmkit.errors import LMKitError, main_entry
from lmkit.inspect import InspectArguments, pair_views, render_pairs, render_rows, row_views
from lmkit.recipe_data import GROUPS, dpo_data, finetune_data, pretrain_data, which_recipe

RECIPES = Path(__file__).resolve().parent


def _recipe(name: str) -> ModuleType:
    """A training recipe's module, for its constants (imported by path: recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lmkit_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_rows(dataset: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of a map-style dataset or a stream; of a mixture's {source: blocks}, source by source."""
    if isinstance(dataset, dict):
        return list(islice((row for part in dataset.values() for row in first_rows(part, n)), n))
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(islice(iter(dataset), n))


@main_entry
def main(argv: list[str] | None = None) -> str:
    # -- setup: logs to stderr, so stdout carries the rows alone (--format json stays machine-readable) ----------
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    import datasets

    datasets.disable_progress_bars()
    argv = list(sys.argv[1:] if argv is None else argv)
    name = which_recipe(argv)
    if name not in GROUPS:
        raise LMKitError(f"--recipe must be one of {', '.join(GROUPS)}, got {name!r}")
    recipe = _recipe(name)
    default_config = {"pretrain": "DEFAULT_CONFIG", "finetune": "DEFAULT_SFT_CONFIG", "dpo": "DEFAULT_DPO_CONFIG"}
    *groups, show = parse_args((*GROUPS[name], InspectArguments), argv, getattr(recipe, default_config[name]))

    # -- data, as the recipe builds it --------------------------------------------------------------------------
    if name == "pretrain":
        data = pretrain_data(*groups, tokenizer_docs=recipe.STREAMING_TOKENIZER_DOCS)
    elif name == "finetune":
        data = finetune_data(*groups)
    else:
        data = dpo_data(*groups)
    dataset = data.datasets.get(show.split)
    rows = first_rows(dataset, show.rows) if dataset is not None else []
    if not rows:
        raise LMKitError(f"--split {show.split}: this run has no {show.split} rows")

    # -- collate and show -----------------------------------------------------------------------------------------
    batch = data.collator(rows)
    if data.preference:
        text = render_pairs(pair_views(batch, data.tokenizer), show.format)
    else:
        text = render_rows(row_views(batch, data.tokenizer, data.eos_separates), show.format)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
