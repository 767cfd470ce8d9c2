"""Text sources -> documents -> tokens -> packed blocks, on the `datasets` library.

``load_raw_datasets`` gives "train" and "validation" splits with one column, "text" (one document per row).
``build_lm_datasets`` tokenizes them, appends EOS to every document, concatenates everything and cuts it into
rows of exactly ``block_size + 1`` tokens (the collator shifts them into inputs and targets); only the tail that
does not fill a last block is dropped. Both the in-memory and the streaming path produce the same blocks, with the
one packer of `lmkit.packing`; row checks and the hold-out split are `lmkit.rows`'.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, List, Value
from transformers import PreTrainedTokenizerBase

from lmkit.args import BUNDLED_CORPUS, DataArguments
from lmkit.errors import LMKitError
from lmkit.mixture import MixtureStream, Source, log_mix, mix_blocks, parse_sources
from lmkit.packing import DocumentStarts, cut_blocks, pack_document_batch, row_length, tokenize_documents
from lmkit.pages import release_pages, releasing_pages
from lmkit.rows import (
    HOLD_OUT_CHUNK,
    check_hold_out,
    held_out_mask,
    hold_out_indices,
    is_held_out,
    json_rows,
    text_row_problem,
    utf8_problem,
)

logger = logging.getLogger(__name__)

# Extension -> `datasets` packaged builder. ".json" is read as JSON lines (a top-level JSON array also works).
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_BINARY_SNIFF = 8000  # bytes of a text or JSON file searched for a NUL byte, which no text holds (as git does)
STREAMING_EVAL_BLOCKS = 1024
_TOKENIZE_BATCH = 1000  # documents per tokenizer call (a stream), the fewest per `datasets.map` tokenizing batch
_PACK_BATCH = 10_000  # documents per packing batch: bounds memory, never changes the blocks
# Arrow record batches. Every process that opens an Arrow table holds ~1.6 KB per record batch of it (pyarrow's
# RecordBatch and ArrayData objects, `datasets`' list of batches), whether or not it reads the rows. `datasets` cuts
# what a builder or `filter` writes into record batches of 1,000 rows (ArrowWriter's default) and writes each
# `map` batch's output as one: with one-line documents that was ~1.6 KB per 1,000 documents for each of the
# document table, the two hold-out index mappings and the tokenized table (the main process held 64 MB more at 11M
# documents, 300 MB of text, than at 1.1M; a tokenizing worker 45 MB more). Larger record batches keep it flat;
# they never change the rows.
_LINES_PER_RECORD_BATCH = 100_000  # --sample_by line: rows per record batch of the document table (load_files)
_HOLD_OUT_BATCH = 10 * HOLD_OUT_CHUNK  # rows per hold-out `filter` batch and record batch of its index mapping
_MAP_BATCH_TEXT = 4 << 20  # bytes of text a `datasets.map` tokenizing batch aims at (see _tokenize_map_batch)
_CACHE_VERSION = "lmkit-data-1"  # bump when tokenize/pack output changes, to invalidate old caches
_TOKENS = Features({"input_ids": List(Value("int32"))})
# A streaming position: `datasets` state where a read batch begins (None: the stream's start), documents and tokens
# used up from there, and the number of blocks before it.
_STREAM_START: dict[str, Any] = {"docs": None, "skip_docs": 0, "skip_tokens": 0, "blocks": 0}
_POSITIONS_KEPT = 1 << 16  # recent positions kept: far more blocks than any data loader reads ahead

ContextFactory = Callable[[], contextlib.AbstractContextManager]


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def resolve_data_files(patterns: list[str], field: str) -> list[Path]:
    """Expand files, directories (recursively, supported extensions only) and globs into a sorted file list.

    ``field`` is the flag the patterns came from (e.g. ``"--train_files"``); every `LMKitError` names it and the
    offending path: a missing path, a glob or directory that matches nothing, an empty file, a text or JSON file
    that holds no text (only whitespace, or binary: `_text_file_problem`), an unsupported extension, or files of
    more than one format.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise LMKitError(f"{field} {pattern}: the glob matches no files")
            for match in matches:
                files.extend(_files_in_dir(Path(match), field) if Path(match).is_dir() else [Path(match)])
        elif path.is_dir():
            files.extend(_files_in_dir(path, field))
        elif path.is_file():
            files.append(path)
        else:
            raise LMKitError(f"{field} {pattern}: no such file or directory")
    resolved = list(dict.fromkeys(f.resolve() for f in files))
    for file in resolved:
        if file.suffix.lower() not in FORMATS:
            raise LMKitError(f"{field} {file}: unsupported file type (use {', '.join(FORMATS)})")
        if file.stat().st_size == 0:
            raise LMKitError(f"{field} {file}: the file is empty")
        if FORMATS[file.suffix.lower()] != "parquet" and (problem := _text_file_problem(file)):
            raise LMKitError(f"{field} {file}: {problem}")
    by_format: dict[str, Path] = {}
    for file in resolved:
        by_format.setdefault(FORMATS[file.suffix.lower()], file)
    if len(by_format) > 1:
        examples = ", ".join(f"{fmt} ({file})" for fmt, file in by_format.items())
        raise LMKitError(f"{field}: files of different formats cannot be mixed: {examples}")
    return resolved


def _text_file_problem(file: Path, chunk_size: int = 1 << 20) -> str | None:
    """Why a text or JSON ``file`` holds no text, or None. Binary: a NUL byte in its first `_BINARY_SNIFF` bytes
    (`datasets` would even take a file of NULs for an empty tar archive). Blank: nothing but whitespace, read
    until the first other byte (at once, for a file of text)."""
    with open(file, "rb") as f:
        head = f.read(_BINARY_SNIFF)
        if (nul := head.find(b"\0")) >= 0:
            return f"a binary file, not text (NUL byte at offset {nul})"
        chunk = head
        while chunk:
            if chunk.strip():
                return None
            chunk = f.read(chunk_size)
    return "holds no text (only whitespace)"


def _files_in_dir(directory: Path, field: str) -> list[Path]:
    found = sorted(
        f
        for f in directory.rglob("*")
        if f.is_file() and f.suffix.lower() in FORMATS and not any(p.startswith(".") for p in f.parts)
    )
    if not found:
        raise LMKitError(f"{field} {directory}: the directory holds no {', '.join(FORMATS)} files")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Raw documents
# ---------------------------------------------------------------------------------------------------------------


def load_raw_datasets(
    data_args: DataArguments,
    seed: int,
    main_process_first: ContextFactory = contextlib.nullcontext,
    source: Source | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Load one source as splits "train" and "validation", each with a single "text" column (one document a row).

    ``source`` is a `lmkit.mixture.Source` (`load_sources` loads each of a mixture); None: the run's one source,
    from ``--dataset_name`` (hub or a local dataset folder), else ``--train_files`` (default: the bundled
    Shakespeare corpus). A source's own fields (files, dataset name, config, split, text column, sample_by) say
    how it is read; errors name them (`Source.flag`). Without ``--validation_files`` (or a hub "validation" split), ``--validation_split``
    of the documents is held out: ``random`` picks them with ``seed``, ``tail`` takes the last ones in corpus order.
    With ``--streaming`` the splits are `IterableDataset`s and ``random`` holds out each document with probability
    ``--validation_split`` by a seeded hash of its text (so every rank and every epoch agrees without a count).
    """
    if source is None:
        (source,) = parse_sources(data_args)  # a mixture's sources are loaded one by one (load_sources)
    with main_process_first():
        if source.dataset_name is not None:
            raw = _load_hub(source, data_args)
        else:
            field = source.flag("files")
            train_files = resolve_data_files(list(source.files or [str(BUNDLED_CORPUS)]), field)
            raw = {"train": load_files(train_files, field, data_args, source)}
        if data_args.validation_files is not None:
            val_files = resolve_data_files(data_args.validation_files, "--validation_files")
            raw["validation"] = load_files(val_files, "--validation_files", data_args)
        documents = None  # the table the random hold-out splits (rows drawn by `lmkit.rows.held_out_mask`)
        if "validation" not in raw:
            if data_args.split_mode == "random" and data_args.validation_split > 0:
                documents = raw["train"]
            raw["train"], raw["validation"] = _hold_out(raw["train"], data_args, seed)
    if data_args.streaming:
        return IterableDatasetDict(train=raw["train"], validation=raw["validation"])
    named = "" if source.implicit else f" ({source.name})"
    logger.info("Documents%s: %d train, %d validation", named, len(raw["train"]), len(raw["validation"]))
    splits = DatasetDict(train=raw["train"], validation=raw["validation"])
    if documents is not None:
        splits = HeldOutSplits(splits, documents=documents, fraction=data_args.validation_split, seed=seed)
    return splits


class HeldOutSplits(DatasetDict):
    """Splits "train" and "validation" that the random hold-out drew from one table of ``documents`` (contiguous,
    memory-mapped): `lmkit.rows.held_out_mask` with ``fraction`` and ``seed`` marks the validation rows.

    `build_lm_datasets` tokenizes such a split straight from ``documents``, in order, keeping the rows of the split:
    the same documents in the same order as reading the split through its index mapping (so the same blocks), for
    less CPU (reading through the index cost ~25% more per document). It does so only while a split is still the
    one drawn (same fingerprint); any other split, or a DatasetDict built from these, is tokenized as it is.
    """

    def __init__(self, splits: DatasetDict, documents: Dataset, fraction: float, seed: int) -> None:
        super().__init__(splits)
        self.documents, self.fraction, self.seed = documents, fraction, seed
        self.drawn = {split: ds._fingerprint for split, ds in splits.items()}

    def source_of(self, split: str) -> Dataset | None:
        """``documents`` if ``split`` is still the one drawn from it, else None."""
        current = self.get(split)
        return self.documents if current is not None and current._fingerprint == self.drawn[split] else None


def load_files(
    files: list[Path], field: str, data_args: DataArguments, source: Source | None = None
) -> Dataset | IterableDataset:
    """Load resolved files of one format as documents (a "text" column); errors name ``field`` and the file.

    The text column and ``sample_by`` are ``source``'s (default: ``--text_column`` / ``--sample_by``)."""
    builder = FORMATS[files[0].suffix.lower()]
    text_column = source.text_column if source is not None else data_args.text_column
    column_flag = source.flag("text_column") if source is not None else "--text_column"
    column = "text" if builder == "text" else text_column
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["sample_by"] = source.sample_by if source is not None else data_args.sample_by
        if kwargs["sample_by"] == "line" and not data_args.streaming:
            # The builder hands the writer tables of 10 MB of lines; cut them into record batches of 100,000 lines,
            # not 1,000 (see _LINES_PER_RECORD_BATCH). Only "line": the writer also gathers one-row tables (a file
            # of one document) until it has this many, which would hold whole files for "paragraph" or "document".
            kwargs["writer_batch_size"] = _LINES_PER_RECORD_BATCH
    elif builder == "parquet":
        kwargs["columns"] = [column]
    try:
        ds = datasets.load_dataset(
            builder,
            data_files={"train": [str(f) for f in files]},
            split="train",
            cache_dir=data_args.cache_dir,
            streaming=data_args.streaming,
            **kwargs,
        )
    except Exception as err:  # datasets wraps decode/parse errors without the file name; find the culprit
        problem = _diagnose(files, builder, column, field, column_flag)
        if problem is None and isinstance(err, ValueError) and "corresponds to no data" in str(err):
            problem = _no_documents(files, field)
        if problem is None:
            raise
        raise LMKitError(problem) from err
    if not data_args.streaming:  # (a stream is checked row by row while it is tokenized)
        table = ds.data
        bad = column not in ds.column_names or not pa.types.is_string(table.schema.field(column).type)
        # pyarrow's JSON reader keeps the bytes of a string as they are: check they are UTF-8 (`utf8_problem`)
        if bad or table.column(column).null_count or (builder == "json" and not _valid_utf8(table.column(column))):
            problem = _diagnose(files, builder, column, field, column_flag)
            raise LMKitError(problem or f"{field}: column {column!r} is missing or not text (see {column_flag})")
    ds = _text_column(ds, column, field, column_flag)
    if not data_args.streaming and len(ds) == 0:
        raise LMKitError(_no_documents(files, field))
    if not data_args.streaming:
        release_pages(ds.data)  # opening the table read each record batch's header (and its neighbours)
    return ds


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    """Whether every string of ``column`` (memory-mapped) is UTF-8, read one chunk at a time (its pages given back)."""
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            return False
        finally:
            release_pages(chunk)
    return True


def _no_documents(files: list[Path], field: str) -> str:
    return f"{field}: no documents in {', '.join(map(str, files))} (only blank lines?)"


def _text_column(
    ds: Dataset | IterableDataset, column: str, field: str, column_flag: str = "--text_column"
) -> Dataset | IterableDataset:
    names = ds.column_names
    if names is not None and column not in names:
        raise LMKitError(f"{column_flag} {column!r}: not a column of {field} (columns: {', '.join(names)})")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _diagnose(files: list[Path], builder: str, column: str, field: str, column_flag: str) -> str | None:
    """The first user-fixable problem in ``files`` as a one-line message, or None. Only run after a failure."""
    for file in files:
        if builder in ("text", "json") and (problem := utf8_problem(file, field)):
            return problem
        if builder == "json" and (problem := _json_problem(file, column, field)):
            return f"{problem} (see {column_flag})"
        if builder == "parquet":
            try:
                names = pq.read_schema(file).names
            except (OSError, pa.ArrowException) as err:
                return f"{field} {file}: not a readable parquet file ({err})"
            if column not in names:
                return f"{field} {file}: no column {column!r} (columns: {', '.join(names)}; see {column_flag})"
    return None


def _json_problem(file: Path, column: str, field: str) -> str | None:
    """``"FIELD FILE:WHERE: what is wrong"`` for the first row of a JSON file that is not JSON or not a document."""
    try:
        for where, row in json_rows(file, field):
            if (problem := text_row_problem(row, column)) is not None:
                return f"{field} {file}:{where}: {problem}"
    except LMKitError as err:
        return str(err)
    return None


def _load_hub(source: Source, data_args: DataArguments) -> dict[str, Dataset | IterableDataset]:
    name, field, split = source.dataset_name, source.flag("dataset_name"), source.split
    try:
        loaded = datasets.load_dataset(
            name, source.dataset_config_name, cache_dir=data_args.cache_dir, streaming=data_args.streaming
        )
    except (FileNotFoundError, ConnectionError, ValueError) as err:  # DatasetNotFoundError is a FileNotFoundError
        raise LMKitError(f"{field} {name}: could not load ({type(err).__name__}: {err})") from err
    if split not in loaded:
        raise LMKitError(f"{field} {name}: no {split!r} split (splits: {', '.join(loaded)})")
    column, column_flag = source.text_column, source.flag("text_column")
    raw = {"train": _text_column(loaded[split], column, field, column_flag)}
    if split == "train" and "validation" in loaded and data_args.validation_files is None:
        raw["validation"] = _text_column(loaded["validation"], column, field, column_flag)
    return raw


def _hold_out(train: Dataset | IterableDataset, data_args: DataArguments, seed: int) -> tuple[Any, Any]:
    fraction = data_args.validation_split
    if isinstance(train, IterableDataset):
        if data_args.split_mode == "tail":
            raise LMKitError(
                "--split_mode tail needs the corpus length, which a stream does not have: "
                "use --split_mode random or pass --validation_files"
            )
        keep = train.filter(_held_out, batched=True, input_columns="text", fn_kwargs={"seed": seed, "frac": fraction})
        held = train.filter(
            _held_out, batched=True, input_columns="text", fn_kwargs={"seed": seed, "frac": fraction, "invert": True}
        )
        return keep, held
    n, tail = len(train), data_args.split_mode == "tail"
    hint = "pass --validation_files, or --sample_by paragraph/line"
    if tail or fraction <= 0:  # ranges: slices of the table, no index at all
        keep, held = hold_out_indices(n, fraction, seed, tail=tail, unit="document", hint=hint)
        return train.select(keep), train.select(held)
    check_hold_out(n, fraction, unit="document", hint=hint)
    # `Dataset.select(indices)` turns an index array into a Python list (about 40 bytes a document: 1.3 GB for a
    # 1 GB corpus split by line). `filter` writes its index mapping batch by batch instead: memory stays flat. It
    # reads no text (no input column), so its batches can be large: one record batch each (_HOLD_OUT_BATCH).
    split = partial(
        train.filter, held_out_batch, with_indices=True, batched=True, batch_size=_HOLD_OUT_BATCH,
        writer_batch_size=_HOLD_OUT_BATCH, input_columns=[],
    )  # fmt: skip
    keep = split(fn_kwargs={"n": n, "fraction": fraction, "seed": seed, "keep": True}, desc="Holding out (train)")
    held = split(fn_kwargs={"n": n, "fraction": fraction, "seed": seed, "keep": False}, desc="Holding out")
    release_pages(keep._indices, held._indices)  # what opening the index mappings read
    return keep, held


def held_out_batch(indices: list[int], n: int, fraction: float, seed: int, keep: bool) -> np.ndarray:
    """A `Dataset.filter` batch: the rows `lmkit.rows.held_out_mask` keeps for training (``keep``) or holds out."""
    held = held_out_mask(np.asarray(indices), n, fraction, seed)
    return ~held if keep else held


def _held_out(texts: list[str], seed: int, frac: float, invert: bool = False) -> list[bool]:
    """For a stream: keep (train) or pick (validation, ``invert``) documents by a seeded hash of their text."""
    picked = [is_held_out(t, seed, frac) for t in texts]
    return picked if invert else [not p for p in picked]


# ---------------------------------------------------------------------------------------------------------------
# Tokenize and pack
# ---------------------------------------------------------------------------------------------------------------


def build_lm_datasets(
    raw: DatasetDict | IterableDatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    data_args: DataArguments,
    main_process_first: ContextFactory = contextlib.nullcontext,
) -> dict[str, Dataset | IterableDataset]:
    """Tokenize and pack ``raw`` into rows ``{"input_ids": list[int]}`` of exactly ``block_size + 1`` tokens.

    Documents are joined with the tokenizer's EOS after each one; the remainder that does not fill a last block
    is dropped. In memory, both steps are cached on disk next to the raw data, keyed by the input fingerprint, a
    hash of the tokenizer's JSON and ``block_size``: a second run with the same inputs loads the cache without
    tokenizing. ``main_process_first`` (e.g. ``training_args.main_process_first``) is entered around that work so
    rank 0 builds the cache and other ranks load it.

    With ``--streaming`` the train split is a `PackedStream` packed on the fly, the whole stream on every rank
    (see `share_stream_across_ranks`); validation becomes a finite `Dataset` of its first ``--max_eval_blocks``
    (default 1024) blocks, the same on every rank.
    """
    if tokenizer.eos_token_id is None:
        raise LMKitError("--tokenizer: the tokenizer has no EOS token to separate documents")
    block_len = row_length(data_args.block_size)
    if isinstance(raw["train"], IterableDataset):
        return _build_streaming(raw, tokenizer, data_args, block_len)
    token_hash = _tokenizer_hash(tokenizer)
    out = {}
    for split in ("train", "validation"):
        drawn = _drawn_from(raw, split)
        with main_process_first():
            out[split] = _tokenize_and_pack(raw[split], tokenizer, token_hash, block_len, data_args, split, drawn)
    n_raw_val = len(raw["validation"])
    if len(out["validation"]) == 0 and n_raw_val:
        raise LMKitError(
            f"the validation data ({n_raw_val} documents) is shorter than --block_size + 1 = {block_len} tokens: "
            "lower --block_size, or raise --validation_split / pass longer --validation_files"
        )
    if len(out["train"]) == 0:
        raise LMKitError(f"the training data is shorter than --block_size + 1 = {block_len} tokens")
    if data_args.max_eval_blocks is not None:
        out["validation"] = _first_blocks(out["validation"], data_args.max_eval_blocks)
    logger.info("Blocks of %d tokens: %d train, %d validation", block_len, len(out["train"]), len(out["validation"]))
    return out


def _drawn_from(raw: DatasetDict, split: str) -> dict[str, Any] | None:
    """How to read ``raw[split]`` from the contiguous documents it was held out of (`HeldOutSplits`), or None."""
    documents = raw.source_of(split) if isinstance(raw, HeldOutSplits) else None
    if documents is None:
        return None
    rule = {"n": len(documents), "fraction": raw.fraction, "seed": raw.seed, "keep": split == "train"}
    return {"documents": documents, "rule": rule}


def _tokenize_and_pack(
    ds: Dataset, tokenizer: Any, token_hash: str, block_len: int, data_args: DataArguments, split: str,
    drawn: dict[str, Any] | None = None,
) -> Dataset:  # fmt: skip
    """Tokenize ``ds`` (with ``drawn``, `_drawn_from`: its rows of the contiguous documents) and pack it."""
    if len(ds) == 0:  # nothing to hold out (--validation_split 0); map() would not even keep the schema
        return Dataset.from_dict({"input_ids": []}, features=_TOKENS)
    num_proc = data_args.preprocessing_num_workers
    read = ds if drawn is None else drawn["documents"]
    if num_proc is not None and num_proc > 1:
        num_proc = min(num_proc, max(1, len(read) // _TOKENIZE_BATCH))  # datasets refuses more shards than rows
    reuse = not data_args.overwrite_cache
    batch = _tokenize_map_batch(read)  # documents a batch, and a record batch of the tokenized table at most
    common = {
        "batched": True, "batch_size": batch, "writer_batch_size": batch, "remove_columns": read.column_names,
        "features": _TOKENS, "num_proc": num_proc, "load_from_cache_file": reuse, "desc": f"Tokenizing {split}",
    }  # fmt: skip
    if drawn is None:
        tokenized = ds.with_format("arrow").map(
            _tokenize_table, fn_kwargs={"tokenizer": tokenizer},
            new_fingerprint=_fingerprint(ds._fingerprint, token_hash, "tokenize"), **common,
        )  # fmt: skip
    else:  # the split's rows of the contiguous table: cheaper to read than through the split's index mapping
        rule = drawn["rule"]
        if not rule["keep"]:  # validation: a few of each batch's documents; batches as large as the hold-out's
            common["batch_size"] = common["writer_batch_size"] = _HOLD_OUT_BATCH
        tokenized = read.with_format("arrow").map(
            _tokenize_held_out_batch, with_indices=True, fn_kwargs={"tokenizer": tokenizer, **rule},
            new_fingerprint=_fingerprint(read._fingerprint, token_hash, "tokenize", json.dumps(rule, sort_keys=True)),
            **common,
        )  # fmt: skip
    # Packing reads straight from the tokenized Arrow table, so each batch emits every block that *starts* in its
    # documents, spilling into the next documents: the blocks are those of one global concatenation. It is a copy
    # of the tokens, cheaper than starting worker processes (and sending them the table): one process does it.
    # It reads every page of the tokenized table once: `releasing_pages` keeps them from piling up in this process,
    # as do the pages that opening the table touched (each record batch's header, with the kernel's fault-around).
    with releasing_pages(tokenized.data):
        starts = DocumentStarts(tokenized.data.column("input_ids"))
        packed = tokenized.with_format("arrow").map(
            pack_document_batch,
            batched=True,
            batch_size=_PACK_BATCH,
            with_indices=True,
            remove_columns=["input_ids"],
            features=_TOKENS,
            fn_kwargs={"tokens": tokenized.data, "starts": starts, "block_len": block_len},
            load_from_cache_file=reuse,
            new_fingerprint=_fingerprint(tokenized._fingerprint, str(block_len), "pack"),
            desc=f"Packing {split} into blocks of {block_len}",
        )
    release_pages(packed.data)  # opening the blocks read each record batch's header (and, so, its neighbours)
    return packed.with_format(None)


def _tokenize_map_batch(docs: Dataset) -> int:
    """Documents per `datasets.map` tokenizing batch of ``docs``: about `_MAP_BATCH_TEXT` bytes of text, from
    `_TOKENIZE_BATCH` to a hundred times that. Each batch becomes one record batch of the tokenized table, so short
    documents are read many to a batch. Small record batches cost memory in every process that opens the table:
    ~1.6 KB of objects each (see _LINES_PER_RECORD_BATCH), and opening a memory-mapped table reads each one's
    header, which the kernel faults in with its neighbours (64 KB): a table of 10,000 one-line documents a batch
    was 18% resident as soon as it was opened. The tokenizer is handed `lmkit.packing._ENCODE_BATCH` documents at
    a time, whatever the batch. The ids never change."""
    table = docs.data  # the whole table under an index mapping: its documents' average length is as good
    per_document = max(1.0, table.nbytes / max(1, table.num_rows))
    return int(min(100 * _TOKENIZE_BATCH, max(_TOKENIZE_BATCH, _MAP_BATCH_TEXT // per_document)))


def _tokenize_batch(texts: list[str | None], tokenizer: Any) -> pa.Table:
    """``{"input_ids": list<int32>}``, one row per text with EOS appended (a `datasets.map` function)."""
    if any(t is None for t in texts):
        raise LMKitError("a document has no text (a null or missing text field; see --text_column)")
    return pa.table({"input_ids": tokenize_documents(texts, tokenizer)})


def _tokenize_table(batch: pa.Table, tokenizer: Any, wanted: np.ndarray | None = None) -> pa.Table:
    """`_tokenize_batch` of an Arrow batch of documents (those ``wanted``, a mask, if given): a `datasets.map`
    function. The batch's pages of the memory-mapped document table are given back once its text is read
    (`lmkit.pages`): a tokenizing process reads each page once, and would otherwise end up holding its whole share
    of the corpus."""
    column = batch.column("text")
    texts = (column if wanted is None else column.filter(pa.array(wanted))).to_pylist()
    release_pages(batch)
    return _tokenize_batch(texts, tokenizer)


def _tokenize_held_out_batch(
    batch: pa.Table, indices: list[int], tokenizer: Any, n: int, fraction: float, seed: int, keep: bool
) -> pa.Table:
    """`_tokenize_table` of the documents of ``batch`` (rows ``indices`` of ``n``) that `held_out_batch` keeps
    for training (``keep``) or holds out, in order: a `datasets.map` function over the contiguous documents."""
    return _tokenize_table(batch, tokenizer, held_out_batch(indices, n, fraction, seed, keep))


def _tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # runtime settings a call can flip; they never change our ids
        state.pop("padding", None)
        payload = json.dumps(state, sort_keys=True)
    else:
        payload = datasets.fingerprint.Hasher.hash(tokenizer)
    return _fingerprint(payload, f"eos={tokenizer.eos_token_id}")


def _fingerprint(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (_CACHE_VERSION, *parts):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Mixtures: each source loaded and packed on its own, then mixed by weight (lmkit.mixture)
# ---------------------------------------------------------------------------------------------------------------


def load_sources(
    data_args: DataArguments, seed: int, main_process_first: ContextFactory = contextlib.nullcontext
) -> dict[str, DatasetDict | IterableDatasetDict]:
    """Every source of the run (`lmkit.mixture.parse_sources`: ``--datasets``, or the one of a plain run), loaded
    by `load_raw_datasets`, by name. Each holds out its own validation documents."""
    return {s.name: load_raw_datasets(data_args, seed, main_process_first, s) for s in parse_sources(data_args)}


def source_texts(raws: dict[str, DatasetDict | IterableDatasetDict]) -> Iterator[str]:
    """The training documents of all sources, one from each in turn (a tokenizer trained on a prefix sees all)."""
    iterators = [iter(raw["train"]) for raw in raws.values()]
    while iterators:
        for it in list(iterators):
            row = next(it, None)
            if row is None:
                iterators.remove(it)
            else:
                yield row["text"]


def build_mixture(
    raws: dict[str, DatasetDict | IterableDatasetDict],
    tokenizer: PreTrainedTokenizerBase,
    data_args: DataArguments,
    seed: int,
    main_process_first: ContextFactory = contextlib.nullcontext,
) -> dict[str, Any]:
    """Pack each source with `build_lm_datasets` and mix the training blocks by weight.

    "train": the blocks mixed by `lmkit.mixture.mix_blocks` (in memory; the realized mix is logged) or a
    `lmkit.mixture.MixtureStream` (``--streaming``; the mix of its first blocks is logged). "validation": with one
    source its blocks, exactly as before mixtures; with several, ``{name: that source's held-out blocks}`` (each up
    to ``--max_eval_blocks``), which `lmkit.trainer.LMTrainer.evaluate` reports as ``eval_loss`` over all of them
    and ``eval_<name>_loss`` per source.
    """
    sources = parse_sources(data_args)
    built = {s.name: build_lm_datasets(raws[s.name], tokenizer, data_args, main_process_first) for s in sources}
    if len(sources) == 1:
        return built[sources[0].name]
    train = {name: parts["train"] for name, parts in built.items()}
    block_len = row_length(data_args.block_size)
    if data_args.streaming:
        stream = MixtureStream(train, sources, seed)
        first = np.bincount(stream.choices(0, 1000), minlength=len(sources))
        logger.info("Streaming mixture; its first 1,000 blocks:")
        log_mix({s.name: int(n) for s, n in zip(sources, first, strict=True)}, sources, block_len)
        mixed = share_stream_across_ranks(stream)
    else:
        mixed, counts = mix_blocks(train, sources, seed)
        log_mix(counts, sources, block_len)
    return {"train": mixed, "validation": {name: parts["validation"] for name, parts in built.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


def share_stream_across_ranks(stream: torch.utils.data.IterableDataset) -> torch.utils.data.IterableDataset:
    """The one place lmkit decides how a training stream is shared among ranks: it does not split it.

    The Trainer's data loader (accelerate's ``prepare_data_loader``) already does: by default rank 0 alone reads
    an iterable dataset and sends every rank its slice of each global batch (``DataLoaderDispatcher``, as
    ``dispatch_batches`` defaults to True for iterable datasets), so 2 ranks x B rows per step are the rows one
    process takes 2B at a time; with ``--accelerator_config '{"dispatch_batches": false}'`` every rank reads the
    whole stream and keeps its own batches (``IterableDatasetShard``). A split here as well would hand each rank
    a slice of a slice and lose the rest. Every recipe passes its training stream through this function.
    """
    if not isinstance(stream, torch.utils.data.IterableDataset):
        raise TypeError(f"a training stream must be a torch IterableDataset, got {type(stream).__name__}")
    return stream


def _build_streaming(
    raw: IterableDatasetDict, tokenizer: Any, data_args: DataArguments, block_len: int
) -> dict[str, Dataset | IterableDataset]:
    train = share_stream_across_ranks(PackedStream(raw["train"], tokenizer, block_len))
    n_eval = data_args.max_eval_blocks or STREAMING_EVAL_BLOCKS
    val_blocks = [b["input_ids"] for b in islice(PackedStream(raw["validation"], tokenizer, block_len), n_eval)]
    no_validation_asked = data_args.validation_files is None and data_args.validation_split == 0
    if not val_blocks and not no_validation_asked:
        raise LMKitError(
            f"the validation data is shorter than --block_size + 1 = {block_len} tokens: "
            "lower --block_size, or raise --validation_split / pass longer --validation_files"
        )
    validation = Dataset.from_dict({"input_ids": val_blocks}, features=_TOKENS)
    logger.info("Streaming blocks of %d tokens; %d validation blocks", block_len, len(validation))
    return {"train": train, "validation": validation}


class PackedStream(torch.utils.data.IterableDataset):
    """A document stream tokenized and packed on the fly into rows ``{"input_ids": list[int]}`` of ``block_len``.

    Documents are read ``_TOKENIZE_BATCH`` at a time, EOS follows each one, and the tokens that do not fill a last
    block carry over to the next batch: the blocks are those of one global concatenation, as in memory.

    Resumable without replay: it follows `lmkit.checkpoint.ResumableData` (``state_dict`` / ``load_state_dict``, the
    protocol of `datasets.IterableDataset` and torchdata's ``StatefulDataLoader``, plus ``state_dict_after``).
    `datasets` can resume the document stream itself, but not a packing step that carries tokens across batches,
    so a position here is: the `datasets` state where the current read batch began, the documents of that batch
    already used up, and the tokens of the next document already used up. Restoring reads that one batch again
    (`datasets` re-reads from its own last checkpoint inside a shard, without tokenizing) and tokenizes only from
    the position on.

    ``state_dict_after(n)`` gives the position after the first ``n`` blocks of the stream for a short while after
    they were yielded: a data loader reads ahead, so a checkpoint asks for the count it has trained on.
    """

    def __init__(self, docs: IterableDataset, tokenizer: Any, block_len: int) -> None:
        self.docs, self.tokenizer, self.block_len = docs, tokenizer, block_len
        self._resume_from: dict[str, Any] | None = None
        self._positions: deque[dict[str, Any]] = deque(maxlen=_POSITIONS_KEPT)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last block yielded (or the one loaded, before iterating)."""
        if self._positions:
            return dict(self._positions[-1])
        return dict(self._resume_from or _STREAM_START)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration at ``state`` (from `state_dict` or `state_dict_after`)."""
        self._resume_from = dict(state)
        self._positions.clear()

    def state_dict_after(self, n_blocks: int) -> dict[str, Any] | None:
        """The position after the stream's first ``n_blocks`` blocks, if this iteration yielded it recently."""
        for position in reversed(self._positions):
            if position["blocks"] == n_blocks:
                return dict(position)
            if position["blocks"] < n_blocks:
                break
        return None

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id > 0:
            return  # one stream, one reader: like a single-shard `datasets` stream, other workers stop at once
        start, self._resume_from = self._resume_from or _STREAM_START, None
        self._positions.clear()
        self._positions.append(dict(start))
        base, skip_docs, skip_tokens = start["docs"], start["skip_docs"], start["skip_tokens"]
        n_blocks = start["blocks"]
        self.docs.load_state_dict(base)  # None: from the beginning
        block_len = self.block_len
        carry = np.empty(0, dtype=np.int32)
        for batch in self.docs.iter(batch_size=_TOKENIZE_BATCH):
            next_base = self.docs.state_dict()  # where the next read batch begins
            docs = _tokenize_batch(batch["text"][skip_docs:], self.tokenizer).column("input_ids").combine_chunks()
            # starts[d]: where document skip_docs + d of this batch begins after the carry (negative if partly used)
            starts = docs.offsets.to_numpy().astype(np.int64) + len(carry) - skip_tokens
            blocks, carry = cut_blocks(np.concatenate([carry, docs.values.to_numpy()[skip_tokens:]]), block_len)
            for j, block in enumerate(blocks):
                end = (j + 1) * block_len
                d = int(np.searchsorted(starts, end, side="right")) - 1
                n_blocks += 1
                self._positions.append(
                    {"docs": base, "skip_docs": skip_docs + d, "skip_tokens": end - int(starts[d]), "blocks": n_blocks}
                )
                yield {"input_ids": block.tolist()}
            base, skip_docs, skip_tokens = next_base, 0, 0


# ---------------------------------------------------------------------------------------------------------------
# Tokenized datasets: packed blocks written once by recipes/preprocess.py (lmkit.preprocess), loaded by every rank
# ---------------------------------------------------------------------------------------------------------------

TOKENIZED_MANIFEST = "manifest.json"
TOKENIZED_FORMAT = "lmkit-tokenized-1"
TOKENIZED_TOKENIZER = "tokenizer"  # the tokenizer's folder inside a tokenized dataset


def tokenizer_hash(tokenizer: Any) -> str:
    """The hash that keys the tokenize cache and a tokenized dataset's manifest: the same ids for the same text."""
    return _tokenizer_hash(tokenizer)


def read_tokenized_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a folder written by recipes/preprocess.py; `LMKitError` naming the folder or file if not."""
    path = Path(directory) / TOKENIZED_MANIFEST
    if not Path(directory).is_dir():
        raise LMKitError(f"--tokenized_dataset {directory}: no such directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LMKitError(
            f"--tokenized_dataset {path}: missing (not a folder written by recipes/preprocess.py)"
        ) from None
    except (OSError, ValueError) as err:
        raise LMKitError(f"--tokenized_dataset {path}: not readable JSON ({type(err).__name__}: {err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != TOKENIZED_FORMAT:
        raise LMKitError(f"--tokenized_dataset {path}: not a manifest of format {TOKENIZED_FORMAT!r}")
    return manifest


def use_tokenized_dataset(
    data_args: DataArguments, explicit: frozenset[str], names: tuple[str, ...] = ("block_size",)
) -> dict[str, Any] | None:
    """With ``--tokenized_dataset``: its manifest, and the data flags ``names`` (``--block_size``; pretraining's
    ``--tokenizer`` too) set to the ones it was made with (`follow_manifest`; ``explicit`` are the data fields the
    user set, `lmkit.args.explicit_fields`). Call it before the recipe's block-size checks."""
    if data_args.tokenized_dataset is None:
        return None
    manifest = read_tokenized_manifest(data_args.tokenized_dataset)
    follow_manifest(manifest, data_args.tokenized_dataset, data_args, names, explicit)
    return manifest


def follow_manifest(
    manifest: dict[str, Any], directory: str, group: Any, names: tuple[str, ...], explicit: frozenset[str]
) -> None:
    """Flags that shaped a tokenized dataset (``names`` of ``group``: ``--block_size``, pretraining's ``--tokenizer``
    and ``--vocab_size``) take the values its manifest records. One the user set (in ``explicit``) to another value
    raises `LMKitError`: the blocks cannot change without preprocessing again."""
    for name in names:
        value, made_with = getattr(group, name), manifest.get(name)
        if name in explicit and value != made_with:
            said = f"with --{name} {made_with} (pass that" if made_with is not None else f"without --{name} (drop it"
            raise LMKitError(
                f"--{name} {value}: --tokenized_dataset {directory} was made {said}, or preprocess again)"
            )
        setattr(group, name, made_with)


def tokenized_validation_split(source: str, n_sources: int) -> str:
    """The split of a tokenized dataset that holds ``source``'s validation blocks: "validation" for a single
    source, "validation.NAME" for each source of a mixture (evaluated on its own: ``eval_NAME_loss``)."""
    return "validation" if n_sources == 1 else f"validation.{source}"


def load_tokenized_dataset(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rows: str | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], PreTrainedTokenizerBase]:
    """(splits "train" / "validation", tokenizer) from ``--tokenized_dataset``, memory-mapped.

    ``rows`` is what the recipe trains on, as the manifest names it: None for packed text blocks, "sft" for SFT
    rows, "preference" for pairs (`lmkit.preprocess.preprocess_rows`); rows made with other ``settings``
    (`lmkit.preprocess.row_settings`) are refused, naming the flag. "validation" is as a run on the raw data gives
    it: one dataset (None when none was held out), or for a mixture ``{source name: its rows}``. Without
    ``tokenizer`` (pretraining) the dataset's own tokenizer is loaded; with one (fine-tuning: the model's, its chat
    markers added) its hash must be the manifest's. No raw data is read and nothing is tokenized.
    """
    directory = Path(data_args.tokenized_dataset)
    manifest = read_tokenized_manifest(directory)
    if manifest.get("rows") != rows:
        raise LMKitError(
            f"--tokenized_dataset {directory}: holds {_ROWS[manifest.get('rows')]}; this recipe trains on "
            f"{_ROWS[rows]} (preprocess with this recipe's flags)"
        )
    for key, wanted in (settings or {}).items():
        made = manifest["settings"].get(key)
        if made != wanted:
            what = f"{'another chat template' if key == 'chat_template' else f'--{key} {made}'}"
            raise LMKitError(
                f"--tokenized_dataset {directory}: made with {what}, this run asks for "
                f"{'its own' if key == 'chat_template' else wanted}; preprocess again with this run's flags"
            )
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZED_TOKENIZER))
    elif (theirs := _tokenizer_hash(tokenizer)) != manifest["tokenizer_hash"]:
        raise LMKitError(
            f"--tokenized_dataset {directory}: tokenized with another tokenizer (hash {manifest['tokenizer_hash']}) "
            f"than the model's (hash {theirs}); preprocess again with --tokenizer set to the model's"
        )
    loaded = datasets.load_from_disk(str(directory))
    names = [source["name"] for source in manifest["sources"]]
    validation = {
        name: loaded[split] for name in names if (split := tokenized_validation_split(name, len(names))) in loaded
    }
    if data_args.max_eval_blocks is not None and rows is None:
        validation = {name: _first_blocks(ds, data_args.max_eval_blocks) for name, ds in validation.items()}
    held = validation if len(names) > 1 else validation.get(names[0])
    out = {"train": loaded["train"], "validation": held}
    logger.info(
        "Tokenized dataset %s: %s, %d train, %s validation",
        directory, f"blocks of {row_length(manifest['block_size'])} tokens" if rows is None else _ROWS[rows],
        len(out["train"]),
        ", ".join(f"{len(ds)} {name}" if len(names) > 1 else str(len(ds)) for name, ds in validation.items()) or "no",
    )  # fmt: skip
    return out, tokenizer


_ROWS = {None: "packed text blocks", "sft": "SFT rows", "preference": "preference pairs"}  # manifest "rows"


def _first_blocks(ds: Dataset, n: int) -> Dataset:
    return ds.select(range(n)) if len(ds) > n else ds
