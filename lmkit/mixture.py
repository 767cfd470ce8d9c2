"""Weighted data mixtures: the source spec (`Source`, read and checked from ``--datasets``) and the mixing.

A recipe YAML lists its sources; each has a name, a weight and its own format fields::

    datasets:
      - name: books
        files: corpus/books/*.txt
        weight: 0.7
      - name: code
        dataset_name: some/dataset   # or files; dataset_config_name / split / text_column / sample_by per source
        weight: 0.3

On the command line the same list is one JSON string (``--datasets '[{"name": "books", ...}, ...]'``). A plain
``--train_files`` / ``--dataset_name`` run is a mixture of one source (`parse_sources` makes it), so every run goes
through one code path: each source is loaded and packed on its own by `lmkit.data`, then mixed here by weight,
map-style with `mix_blocks`, streaming with `MixtureStream` (or `StreamMix` for streams without a position), all
in the order of `source_choices`.

This module sits below `lmkit.data` (which loads each source) and imports nothing of lmkit but its errors.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets

from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)

FIELDS = ("name", "weight", "files", "dataset_name", "dataset_config_name", "split", "text_column", "sample_by")
SAMPLE_BY = ("line", "paragraph", "document")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes part of a metric name: eval_<name>_loss
_CHUNK = 100  # blocks per shuffled chunk of the source order (source_choices): part of the order, keep it fixed
_POSITIONS_KEPT = 1 << 16  # as lmkit.data.PackedStream: far more blocks than any data loader reads ahead


@dataclass(frozen=True)
class Source:
    """One source of a mixture: where its documents come from, how they are read, and its weight.

    ``implicit``: the one source of a plain ``--train_files`` / ``--dataset_name`` run; its errors name those flags
    as before mixtures existed (`flag`). Otherwise they name ``--datasets NAME.FIELD``.
    """

    name: str
    weight: float = 1.0
    files: tuple[str, ...] | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    split: str = "train"
    text_column: str = "text"
    sample_by: str = "paragraph"
    implicit: bool = False

    def flag(self, key: str) -> str:
        """How error messages name this source's field ``key``."""
        if self.implicit:
            return "--train_files" if key == "files" else f"--{key}"
        return f"--datasets {self.name}.{key}"


def parse_sources(data_args: Any) -> list[Source]:
    """The sources of a run from `lmkit.args.DataArguments`: its ``--datasets`` entries, or one implicit source made
    of ``--train_files`` / ``--dataset_name`` (neither: the bundled corpus, resolved by `lmkit.data`).

    Raises `LMKitError`, one line naming the source and field, for: ``--datasets`` together with ``--train_files``
    or ``--dataset_name``; an entry that is not a mapping, has no name, a bad name or unknown fields; two sources
    with one name; neither or both of ``files`` and ``dataset_name``; a weight that is negative, zero or not a
    number; weights that sum to zero.
    """
    if data_args.datasets is None:
        return [
            Source(
                name="train",
                files=tuple(data_args.train_files) if data_args.train_files else None,
                dataset_name=data_args.dataset_name,
                dataset_config_name=data_args.dataset_config_name,
                text_column=data_args.text_column,
                sample_by=data_args.sample_by,
                implicit=True,
            )
        ]
    for flag in ("train_files", "dataset_name", "validation_files"):
        if getattr(data_args, flag) is not None:
            raise LMKitError(
                f"--datasets cannot be combined with --{flag}: list every source under --datasets "
                "(each holds out --validation_split of its documents)"
            )
    entries = _entries(data_args.datasets)
    weights = [e.get("weight", 1.0) if isinstance(e, dict) else 1.0 for e in entries]
    if all(_is_number(w) for w in weights) and math.fsum(weights) == 0:
        raise LMKitError(f"--datasets: the weights sum to zero ({', '.join(map(str, weights))}): give each source a "
                         "positive weight")  # fmt: skip
    sources: list[Source] = []
    for i, entry in enumerate(entries, 1):
        sources.append(_source(entry, i, {s.name for s in sources}))
    return sources


def probabilities(sources: list[Source]) -> list[float]:
    """Each source's weight divided by their sum: the share of blocks it is drawn for."""
    total = math.fsum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def _entries(value: Any) -> list[Any]:
    """``--datasets`` as a list of entries: YAML gives a list of mappings (each passed on as a JSON string), the
    command line one JSON string holding a list (or one mapping per string)."""
    items = value if isinstance(value, list | tuple) else [value]
    entries: list[Any] = []
    for item in items:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError as err:
                raise LMKitError(f"--datasets: not JSON ({err.msg} at column {err.colno}): {item[:80]}") from None
        entries.extend(item if isinstance(item, list) else [item])
    if not entries:
        raise LMKitError("--datasets is empty: give at least one source")
    return entries


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _source(entry: Any, i: int, taken: set[str]) -> Source:
    if not isinstance(entry, dict):
        raise LMKitError(
            f"--datasets entry {i}: expected a mapping (name, files or dataset_name, weight), got {entry!r}"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise LMKitError(f"--datasets entry {i}: name must be letters, digits, '_', '.' or '-', got {name!r}")
    where = f"--datasets {name}"
    if name in taken:
        raise LMKitError(f"{where}: two sources are named {name!r} (names must be unique)")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise LMKitError(f"{where}: unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
    weight = entry.get("weight", 1.0)
    if not _is_number(weight) or not math.isfinite(weight) or weight <= 0:
        raise LMKitError(f"{where}.weight must be a positive number, got {weight!r}")
    files, dataset_name = entry.get("files"), entry.get("dataset_name")
    if (files is None) == (dataset_name is None):
        raise LMKitError(f"{where}: give exactly one of files and dataset_name")
    if isinstance(files, str):
        files = [files]
    if files is not None and (not files or not all(isinstance(f, str) and f for f in files)):
        raise LMKitError(f"{where}.files must be a path, glob or list of them, got {entry['files']!r}")
    for key in ("dataset_name", "dataset_config_name", "split", "text_column"):
        if entry.get(key) is not None and not (isinstance(entry[key], str) and entry[key]):
            raise LMKitError(f"{where}.{key} must be a non-empty string, got {entry[key]!r}")
    sample_by = entry.get("sample_by", "paragraph")
    if sample_by not in SAMPLE_BY:
        raise LMKitError(f"{where}.sample_by must be one of {', '.join(SAMPLE_BY)}, got {sample_by!r}")
    return Source(
        name=name,
        weight=float(weight),
        files=tuple(files) if files is not None else None,
        dataset_name=dataset_name,
        dataset_config_name=entry.get("dataset_config_name"),
        split=entry.get("split") or "train",
        text_column=entry.get("text_column") or "text",
        sample_by=sample_by,
    )


# ---------------------------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------------------------


def source_choices(weights: list[float], seed: int, start: int, count: int) -> np.ndarray:
    """The source (an index into ``weights``) of blocks ``start`` .. ``start + count - 1`` of a mixture.

    Blocks come in chunks of about ``_CHUNK`` (100): chunk ``c`` holds, of source ``i``, the blocks that bring its
    count up to ``round((c + 1) * _CHUNK * p_i)`` (``p_i`` = weight / sum), in an order shuffled by
    ``np.random.default_rng([seed, c])``. So the mix is random within a chunk but never drifts: every prefix is
    within one chunk of the weights (over 1,000 blocks, 700 / 300 for weights 0.7 / 0.3 exactly). This is why
    lmkit does not draw each block independently as ``datasets.interleave_datasets(probabilities=...)`` does: that
    is a multinomial draw whose share over 1,000 blocks has a standard deviation of 1.4 points at p = 0.7, so one
    seed in six misses the weights by more than 2 points. The source of block ``n`` depends on ``seed`` and ``n``
    alone, so a resumed stream finds it without replaying the draws.
    """
    p = np.asarray(weights, dtype=np.float64) / math.fsum(weights)

    def ends(c: np.ndarray) -> np.ndarray:  # (len(c), sources): blocks of each source in chunks 0..c
        return np.floor((c[:, None] + 1) * _CHUNK * p[None, :] + 0.5).astype(np.int64)

    c = max(start // _CHUNK, 0)
    while c > 0 and ends(np.array([c - 1])).sum() > start:
        c -= 1
    while ends(np.array([c])).sum() <= start:
        c += 1
    first = c
    begin = int(ends(np.array([first - 1])).sum()) if first > 0 else 0
    chunks, have = [], begin
    while have < start + count:
        counts = ends(np.array([c]))[0] - (ends(np.array([c - 1]))[0] if c > 0 else 0)
        chunk = np.random.default_rng([seed, c]).permutation(np.repeat(np.arange(len(p)), counts))
        chunks.append(chunk)
        have += len(chunk)
        c += 1
    return np.concatenate(chunks)[start - begin : start - begin + count]


def mix_blocks(blocks: dict[str, Dataset], sources: list[Source], seed: int) -> tuple[Dataset, dict[str, int]]:
    """Mix each source's packed blocks by weight: (mixed blocks, blocks taken from each source).

    The order of sources is `source_choices`'; each source's blocks are taken in order. Stopping rule: the mixture
    ends when a source has no block left (``interleave_datasets``' "first_exhausted"). That keeps the realized mix
    at the weights and never repeats a block within an epoch; the other sources' blocks past that point are not
    used (epochs repeat the same mixed sequence, which the Trainer's sampler shuffles). Repeating the sources that
    run out first ("all_exhausted") would change the mix from the weights. The rows are picked with `datasets`
    (``concatenate_datasets(...).select(indices)``, what ``interleave_datasets`` does inside), so nothing is
    copied. One source is returned as it is.
    """
    if len(sources) == 1:
        (only,) = blocks.values()
        return only, {sources[0].name: len(only)}
    sizes = np.array([len(blocks[s.name]) for s in sources], dtype=np.int64)
    weights = [s.weight for s in sources]
    enough = int(min((sizes + 1) / (np.asarray(weights) / math.fsum(weights)))) + 2 * _CHUNK + len(sources)
    order = source_choices(weights, seed, 0, enough)
    one_hot = np.eye(len(sources), dtype=np.int64)[order]
    rank = np.cumsum(one_hot, axis=0)  # rank[n, i]: blocks of source i among the first n + 1
    taken = rank[np.arange(len(order)), order] - 1  # which block of its source row n is
    stop = int(np.argmax(taken >= sizes[order])) if (taken >= sizes[order]).any() else len(order)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    indices = offsets[order[:stop]] + taken[:stop]
    mixed = concatenate_datasets([blocks[s.name] for s in sources]).select(indices)
    counts = np.bincount(order[:stop], minlength=len(sources))
    return mixed, {s.name: int(n) for s, n in zip(sources, counts, strict=True)}


def held_out_rows(validation: Dataset | dict[str, Dataset] | None) -> int:
    """The rows of a recipe's validation data: one set, a mixture's ``{name: set}``, or None."""
    if isinstance(validation, dict):
        return sum(len(rows) for rows in validation.values())
    return len(validation) if validation is not None else 0


def log_mix(
    counts: dict[str, int], sources: list[Source], tokens: int | dict[str, int] | None, unit: str = "blocks"
) -> None:
    """Log the realized mix once: ``unit``s taken from each source and their share next to its weight's share.

    ``tokens``: the tokens in each of them (an int: every block holds that many), or each source's token count as
    a mapping, logged with its own share (`lmkit.sft` counts the target tokens of its rows), or None (not logged).
    """
    if len(sources) == 1:
        return
    total = sum(counts.values()) or 1
    total_tokens = (sum(tokens.values()) or 1) if isinstance(tokens, dict) else 1
    parts = []
    for s, p in zip(sources, probabilities(sources), strict=True):
        part = f"{s.name} {counts[s.name]:,} {unit}"
        if isinstance(tokens, int):
            part += f" / {counts[s.name] * tokens:,} tokens"
        part += f" ({100 * counts[s.name] / total:.1f}%, weight {100 * p:.1f}%"
        if isinstance(tokens, dict):
            part += f"; {tokens[s.name]:,} target tokens, {100 * tokens[s.name] / total_tokens:.1f}%"
        parts.append(part + ")")
    logger.info("Mixture of %d sources: %s", len(sources), "; ".join(parts))


def log_stream_mix(stream: StreamMix, unit: str = "blocks", tokens: int | None = None, n: int = 1000) -> None:
    """Log the mix of a stream's first ``n`` rows (`StreamMix.choices`: known without reading any source)."""
    first = np.bincount(stream.choices(0, n), minlength=len(stream.sources))
    logger.info("Streaming mixture; its first %s %s:", f"{n:,}", unit)
    log_mix({s.name: int(k) for s, k in zip(stream.sources, first, strict=True)}, stream.sources, tokens, unit)


class StreamMix(torch.utils.data.IterableDataset):
    """Rows from several streams (any iterables, one per source), each next row from a source chosen by weight
    (`source_choices`, seeded); the mixture ends when a source's stream ends (the stopping rule of `mix_blocks`).

    It keeps no position, so it is not `lmkit.checkpoint.ResumableData`: a resumed run replays it. Every pass
    draws the same sources in the same order, so the replay is exact when each source yields the same rows on every
    pass (`lmkit.sft.SFTStream`). For sources that keep a position, `MixtureStream` keeps the mixture's.
    """

    def __init__(self, streams: dict[str, Any], sources: list[Source], seed: int) -> None:
        self.streams, self.sources, self.seed = streams, sources, seed
        self.probabilities = probabilities(sources)

    def choices(self, start: int, count: int) -> np.ndarray:
        """The sources (indices into ``sources``) of rows ``start`` .. ``start + count - 1``."""
        return source_choices([s.weight for s in self.sources], self.seed, start, count)

    def __iter__(self) -> Iterator[Any]:
        for _, row in self._mixed([iter(self.streams[s.name]) for s in self.sources], 0):
            yield row

    def _mixed(self, iterators: list[Iterator[Any]], n: int) -> Iterator[tuple[int, Any]]:
        """(source index, row) for rows ``n``, ``n + 1``, ... of the mixture, read from each source's iterator."""
        while True:
            for i in self.choices(n, _CHUNK):
                row = next(iterators[i], None)
                if row is None:
                    return
                n += 1
                yield int(i), row


class MixtureStream(StreamMix):
    """A `StreamMix` of block streams that keep a position (`lmkit.data.PackedStream`, one per source): it keeps
    the mixture's, so a resumed run jumps there instead of replaying.

    `datasets.interleave_datasets` mixes `datasets` streams, but the blocks come from packers that carry tokens
    across read batches (their position is not a `datasets` state), so the streams are mixed here. The source of
    block ``n`` is a function of ``seed`` and ``n`` alone, so a position is the block count, the blocks taken from
    each source and each source's own position.

    Resumable like its sources (the `lmkit.checkpoint.ResumableData` protocol): ``state_dict`` is
    ``{"blocks": n, "taken": [blocks taken from each source], "sources": {name: that source's state}}``.
    """

    def __init__(self, streams: dict[str, Any], sources: list[Source], seed: int) -> None:
        super().__init__(streams, sources, seed)
        self._resume_from: dict[str, Any] | None = None
        self._positions: deque[tuple[int, tuple[int, ...]]] = deque(maxlen=_POSITIONS_KEPT)  # (blocks, per source)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last block yielded (or the one loaded, before iterating)."""
        if self._positions:
            return self._state(*self._positions[-1])
        return dict(self._resume_from) if self._resume_from else self._start()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration at ``state`` (from `state_dict` or `state_dict_after`)."""
        self._resume_from = dict(state)
        self._positions.clear()

    def state_dict_after(self, n_blocks: int) -> dict[str, Any] | None:
        """The position after the mixture's first ``n_blocks`` blocks, if this iteration yielded it recently."""
        for blocks, taken in reversed(self._positions):
            if blocks == n_blocks:
                return self._state(blocks, taken)
            if blocks < n_blocks:
                break
        return None

    def _start(self) -> dict[str, Any]:
        sources = {s.name: self.streams[s.name].state_dict() for s in self.sources}
        return {"blocks": 0, "taken": [0] * len(self.sources), "sources": sources}

    def _state(self, blocks: int, taken: tuple[int, ...]) -> dict[str, Any] | None:
        states = {s.name: self.streams[s.name].state_dict_after(k) for s, k in zip(self.sources, taken, strict=True)}
        if any(state is None for state in states.values()):
            return None
        return {"blocks": blocks, "taken": list(taken), "sources": states}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        start, self._resume_from = self._resume_from, None
        self._positions.clear()
        if start is not None:
            for s in self.sources:
                self.streams[s.name].load_state_dict(start["sources"][s.name])
        iterators = [iter(self.streams[s.name]) for s in self.sources]
        # blocks taken from each source since its stream's start: what its state_dict_after counts
        taken = list(start["taken"]) if start is not None else [0] * len(self.sources)
        n = start["blocks"] if start is not None else 0
        self._positions.append((n, tuple(taken)))
        for i, block in self._mixed(iterators, n):
            taken[i] += 1
            n += 1
            self._positions.append((n, tuple(taken)))
            yield block
