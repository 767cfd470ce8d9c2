"""Tokenize once: raw text -> a packed, sharded dataset on disk that every rank of every later run memory-maps.

`preprocess` runs the pretraining pipeline of `lmkit.data` (``load_sources``, ``build_lm_datasets`` for each source
and `lmkit.mixture.mix_blocks`: the same blocks as a run on the raw text, by construction) with
``--preprocessing_num_workers`` processes, streaming through Arrow files (`datasets.map` writes every batch to disk;
nothing holds the corpus in memory), and saves it with ``save_to_disk`` (shards of at most 500 MB, at least one
per worker). The output folder holds::

    dataset_dict.json  train/  validation/      the blocks: rows {"input_ids": block_size + 1 ids}
    tokenizer/                                  the tokenizer that made them
    manifest.json                               what was asked (sources, tokenizer, block size, split) and made

A mixture (``--datasets``) stores its training blocks mixed by weight, as a run on the raw text mixes them, and one
validation split per source, ``validation.NAME/``, so that a run reports ``eval_NAME_loss`` for each; the manifest's
``mix`` gives each source's blocks packed, blocks and tokens used and its realized share.

``--tokenized_dataset DIR`` loads it (`lmkit.data.load_tokenized_dataset`). The folder appears whole or not at
all: it is written to a staging folder beside it and renamed at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict

import lmkit
from lmkit.args import BUNDLED_CORPUS, DataArguments
from lmkit.data import (
    TOKENIZED_FORMAT,
    TOKENIZED_MANIFEST,
    TOKENIZED_TOKENIZER,
    build_lm_datasets,
    load_sources,
    load_tokenized_dataset,
    resolve_data_files,
    source_texts,
    tokenized_validation_split,
    tokenizer_hash,
)
from lmkit.errors import LMKitError
from lmkit.mixture import Source, log_mix, mix_blocks, parse_sources, probabilities
from lmkit.packing import row_length
from lmkit.pages import releasing_pages
from lmkit.sft import CHAT, PROMPT_COMPLETION, TEXT
from lmkit.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

_SHARD_BYTES = 500 * 10**6  # save_to_disk's default largest shard
# Manifest keys that describe the request: the same request on an existing folder is up to date.
REQUEST_KEYS = (
    "format", "rows", "settings", "sources", "validation", "seed", "tokenizer", "vocab_size", "block_size", "sample_by",
)  # fmt: skip


@dataclass
class PreprocessArguments:
    """recipes/preprocess.py's own flag: which recipe's data it writes."""

    recipe: str | None = field(
        default=None,
        metadata={"help": "pretrain | finetune | dpo: whose data to write (default: told from the flags, as "
                          "inspect_data does: a preference field means dpo, a fine-tuning one or "
                          "--model_name_or_path finetune)"},
    )  # fmt: skip


def describe_request(data_args: DataArguments, vocab_size: int | None, seed: int) -> dict[str, Any]:
    """The manifest's request part: sources (a list, one element per source, with its weight), validation, seed
    (of the hold-out and the mix), tokenizer and packing. Files are named with their size and modification time,
    so an edited file is new."""
    sources = [_describe_source(s, data_args) for s in parse_sources(data_args)]
    validation: dict[str, Any] = {"split": data_args.validation_split, "mode": data_args.split_mode}
    if data_args.validation_files is not None:
        val_files = resolve_data_files(data_args.validation_files, "--validation_files")
        validation = {"files": [_file_id(f) for f in val_files]}
    validation["max_eval_blocks"] = data_args.max_eval_blocks
    return {
        "format": TOKENIZED_FORMAT,
        "sources": sources,
        "validation": validation,
        "seed": seed,
        "tokenizer": data_args.tokenizer,
        "vocab_size": vocab_size,
        "block_size": data_args.block_size,
        "sample_by": data_args.sample_by,
    }


def _describe_source(source: Source, data_args: DataArguments) -> dict[str, Any]:
    if source.dataset_name is not None:
        name = source.dataset_name if source.implicit else source.name
        described = {"name": name, "dataset_name": source.dataset_name,
                     "dataset_config_name": source.dataset_config_name}  # fmt: skip
        if not source.implicit:
            described["split"] = source.split
    else:
        files = resolve_data_files(list(source.files or [str(BUNDLED_CORPUS)]), source.flag("files"))
        described = {"name": "train_files" if source.implicit else source.name, "files": [_file_id(f) for f in files]}
    described.update(text_column=source.text_column, weight=source.weight)
    if not source.implicit:  # the implicit source's is the request's sample_by
        described["sample_by"] = source.sample_by
    return described


def _file_id(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def preprocess(
    data_args: DataArguments, output_dir: str | Path, *, vocab_size: int | None = None, seed: int = 42,
    overwrite: bool = False,
) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """Write the tokenized, packed dataset of ``data_args`` to ``output_dir``; (written, manifest).

    An ``output_dir`` that already holds this request is left as it is (written: False); one that holds anything
    else is refused with an `LMKitError` naming it, unless ``overwrite``: then it is replaced once the new folder
    is complete.
    """
    if data_args.streaming:
        raise LMKitError("--streaming: preprocess writes the whole dataset; drop the flag")
    if data_args.tokenized_dataset is not None:
        raise LMKitError(
            "--tokenized_dataset: preprocess reads raw text (--train_files / --dataset_name / --datasets)"
        )
    out = Path(output_dir)
    request = describe_request(data_args, vocab_size, seed)
    if _holds_request(out, request, overwrite):
        return False, json.loads((out / TOKENIZED_MANIFEST).read_text(encoding="utf-8"))
    _remove_dead_stagings(out)

    # As recipes/pretrain.py on raw text: sources loaded, the tokenizer built on all of them, each source packed on
    # its own, the training blocks mixed by weight.
    sources = parse_sources(data_args)
    raws = load_sources(data_args, seed=seed)
    tokenizer = build_tokenizer(data_args.tokenizer, source_texts(raws), vocab_size)
    built = {s.name: build_lm_datasets(raws[s.name], tokenizer, data_args) for s in sources}
    train, counts = mix_blocks({name: parts["train"] for name, parts in built.items()}, sources, seed)
    block_len = row_length(data_args.block_size)
    log_mix(counts, sources, block_len)
    blocks = DatasetDict(train=train)
    for s in sources:
        blocks[tokenized_validation_split(s.name, len(sources))] = built[s.name]["validation"]
    manifest = {
        **request,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "splits": {
            split: {"blocks": len(ds), "tokens": len(ds) * block_len, "shards": None} for split, ds in blocks.items()
        },
        "mix": [
            {
                "name": described["name"],
                "weight_share": round(p, 6),
                "share": round(counts[s.name] / len(train), 6),
                "blocks_packed": len(built[s.name]["train"]),
                "blocks": counts[s.name],
                "tokens": counts[s.name] * block_len,
                "validation_blocks": len(built[s.name]["validation"]),
            }
            for s, p, described in zip(sources, probabilities(sources), request["sources"], strict=True)
        ],  # fmt: skip
        "lmkit_version": lmkit.__version__,
    }
    workers = data_args.preprocessing_num_workers
    shards = {split: _num_shards(len(ds), block_len, workers) for split, ds in blocks.items()}
    for split, n in shards.items():
        manifest["splits"][split]["shards"] = n
    _write(out, blocks, tokenizer, manifest, shards)
    return True, manifest


def _write(out: Path, splits: DatasetDict, tokenizer: Any, manifest: dict[str, Any], shards: dict[str, int]) -> None:
    """Write ``splits``, the tokenizer and the manifest to a staging folder beside ``out``, then put it in place."""
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # One process copies the rows: save_to_disk's num_proc starts a "spawn" pool whose workers import
        # everything again, seconds more than the copy itself. Still at least one shard per worker, for readers.
        # The copy reads each page of the blocks once; `releasing_pages` keeps them from piling up in this process.
        with releasing_pages(*(ds.data for ds in splits.values())):
            splits.save_to_disk(str(staging), num_shards=shards)
        tokenizer.save_pretrained(str(staging / TOKENIZED_TOKENIZER))
        (staging / TOKENIZED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Tokenized dataset %s: %s", out, json.dumps(manifest["splits"]))


def row_settings(tokenizer: Any, chat: bool, **flags: Any) -> dict[str, Any]:
    """What else decides SFT rows or preference pairs beyond the tokenizer: whether they were rendered with a chat
    template (and which: its hash), and the recipe's flags (``train_on_prompt`` and ``packing`` for SFT,
    ``max_length`` for pairs). A manifest records it; a recipe loading the rows must ask for the same."""
    template = tokenizer.chat_template if chat else None
    digest = hashlib.blake2b(template.encode(), digest_size=16).hexdigest() if template else None
    return {"chat": chat, "chat_template": digest, **flags}


def sft_rows_format(manifest: dict[str, Any] | None, data_format: str) -> str:
    """The SFT format of a run: ``data_format`` (`lmkit.sft.sft_format` of its files) without a tokenized dataset;
    with one, "text" for packed blocks, else chat or prompt/completion as its manifest's settings say."""
    if manifest is None:
        return data_format
    if manifest.get("rows") != "sft":
        return TEXT
    return CHAT if manifest["settings"]["chat"] else PROMPT_COMPLETION


def load_tokenized_finetune(
    data_args: DataArguments, tokenizer: Any, manifest: dict[str, Any], fmt: str, ft_args: Any
) -> dict[str, Any]:
    """recipes/finetune.py's splits from ``--tokenized_dataset`` (its ``manifest``): packed blocks, or SFT rows made
    with this run's chat template, ``--train_on_prompt`` and ``--packing`` (``fmt``: `sft_rows_format`)."""
    rows = manifest.get("rows")
    settings = row_settings(tokenizer, fmt == CHAT, train_on_prompt=ft_args.train_on_prompt, packing=ft_args.packing)
    datasets, _ = load_tokenized_dataset(data_args, tokenizer, rows=rows, settings=settings if rows else None)
    return datasets


def preprocess_rows(
    kind: str, data: Any, data_args: DataArguments, settings: dict[str, Any], output_dir: str | Path, *,
    seed: int = 42, overwrite: bool = False,
) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """Write the SFT rows (``kind`` "sft") or preference pairs ("preference") of a `lmkit.recipe_data.RecipeData`
    (``data``: exactly what recipes/finetune.py or dpo.py would train on) to ``output_dir``; (written, manifest).

    The splits are "train" (a mixture's rows already mixed) and "validation" or, for a mixture, "validation.NAME"
    per source; the manifest holds the request, the tokenizer hash and ``settings`` (`row_settings`). An
    ``output_dir`` holding this request is left alone; anything else is refused unless ``overwrite``.
    """
    out = Path(output_dir)
    request = {**describe_request(data_args, None, seed), "rows": kind, "settings": settings}
    if _holds_request(out, request, overwrite):
        return False, json.loads((out / TOKENIZED_MANIFEST).read_text(encoding="utf-8"))
    _remove_dead_stagings(out)
    names = [source["name"] for source in request["sources"]]
    splits = DatasetDict(train=data.datasets["train"])
    validation = data.datasets.get("validation")
    held = validation if isinstance(validation, dict) else {names[0]: validation} if validation is not None else {}
    for name, rows in held.items():
        splits[tokenized_validation_split(name, len(names))] = rows
    manifest = {
        **request,
        "tokenizer_hash": tokenizer_hash(data.tokenizer),
        "splits": {split: {"rows": len(ds), "shards": 1} for split, ds in splits.items()},
        "lmkit_version": lmkit.__version__,
    }
    _write(out, splits, data.tokenizer, manifest, dict.fromkeys(splits, 1))
    return True, manifest


def _num_shards(blocks: int, block_len: int, workers: int | None) -> int:
    """Shards of at most ``_SHARD_BYTES`` (int32 tokens), at least one per worker, never more than blocks."""
    return max(1, min(blocks, max(workers or 1, -(-blocks * block_len * 4 // _SHARD_BYTES))))


def _holds_request(out: Path, request: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` already holds this request; raises if it holds something else and not ``overwrite``."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise LMKitError(f"--output_dir {out}: exists and is not a directory")
    manifest_path = out / TOKENIZED_MANIFEST
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = {}
        differ = [key for key in REQUEST_KEYS if existing.get(key) != request.get(key)]
        if not differ:
            return True
        what = f"another tokenized dataset (its {', '.join(differ)} differ{'s' if len(differ) == 1 else ''})"
    elif any(out.iterdir()):
        what = "files that are not a tokenized dataset (no manifest.json)"
    else:
        return False
    if not overwrite:
        raise LMKitError(f"--output_dir {out}: already holds {what}; pass --overwrite_output_dir to replace it")
    return False


def _replace(out: Path, staging: Path) -> None:
    """Move the complete ``staging`` folder to ``out``; an old ``out`` goes only once the new one is in place."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _remove_dead_stagings(out: Path) -> None:
    """Staging folders a killed preprocess left beside ``out`` (their process is gone)."""
    for leftover in out.parent.glob(f".{out.name}.staging-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
