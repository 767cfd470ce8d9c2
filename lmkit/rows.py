"""Reading, checking and holding out rows: the rules the pretraining, SFT and preference data share.

- `json_rows` reads a JSON-lines file (or one holding a single JSON array) as (where, row) pairs; a file that is
  not UTF-8 (`utf8_problem`) or not JSON raises `LMKitError` naming the flag, the file and the line (or byte offset).
- One check per kind of row, each returning what is wrong (``None``: nothing): `text_row_problem` (a pretraining
  document), `prompt_completion_problem` and `chat_problem` (SFT examples), and `messages_problem` for the
  messages of any conversation. Callers put the flag, file and line in front: ``"--train_files FILE:LINE: ..."``.
- The hold-out split: `hold_out_indices` / `held_out_mask` for rows in memory (a seeded permutation per chunk of
  10,000 rows, or the tail), `is_held_out` for
  a stream (a seeded hash of the row's text, as a stream has no length to count from).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.errors import LMKitError

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def is_json_array(file: Path) -> bool:
    """Whether ``file`` holds one JSON array (read whole) rather than JSON lines (read, or streamed, by line)."""
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            return f.read(1024).lstrip().startswith("[")
    except OSError:
        return False


def json_rows(file: Path, field: str) -> Iterator[tuple[str, Any]]:
    """(``"LINE"`` or ``"item N"``, parsed row) for a JSON-lines file or a file holding one JSON array.

    Blank lines are skipped. Invalid JSON or UTF-8 raises `LMKitError` naming ``field`` (the flag), the file and
    the line or byte offset.
    """
    try:
        with open(file, encoding="utf-8") as f:
            if is_json_array(file):
                for i, row in enumerate(json.load(f)):
                    yield f"item {i}", row
                return
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise LMKitError(f"{field} {file}:{lineno}: not valid JSON ({_json_error(err)})") from err
                    yield str(lineno), row
    except UnicodeDecodeError as err:
        raise LMKitError(utf8_problem(file, field) or f"{field} {file}: not UTF-8 text") from err
    except json.JSONDecodeError as err:
        raise LMKitError(f"{field} {file}:{err.lineno}: not valid JSON ({_json_error(err)})") from err


def _json_error(err: json.JSONDecodeError) -> str:
    """What `json` found wrong; a message that points at a place ("Invalid control character at") gets its column
    (the line is in the caller's ``FILE:LINE``)."""
    return f"{err.msg} column {err.colno}" if err.msg.endswith(" at") else err.msg


def utf8_problem(file: Path, field: str) -> str | None:
    """``"FIELD FILE: not UTF-8 text (invalid byte at offset N)"`` if ``file`` is not all UTF-8, else None: the one
    UTF-8 rule of every text, JSON and JSON-lines file lmkit reads (by row here, or through `datasets`)."""
    offset = utf8_error_offset(file)
    return None if offset is None else f"{field} {file}: not UTF-8 text (invalid byte at offset {offset})"


def utf8_error_offset(file: Path, chunk_size: int = 1 << 20) -> int | None:
    """The byte offset of the first invalid UTF-8 byte in ``file`` (read in chunks), or None if it is all UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    position = 0
    with open(file, "rb") as f:
        while chunk := f.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:  # err.object = bytes held over from the last chunk + this chunk
                return position + err.start - (len(err.object) - len(chunk))
            position += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:  # a multi-byte character cut off by the end of the file
        return position + err.start - len(err.object)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------------


def text_row_problem(row: Any, column: str) -> str | None:
    """A pretraining document: an object whose ``column`` is a string."""
    if not isinstance(row, dict):
        return f"expected a JSON object with a {column!r} field, got {type(row).__name__}"
    if column not in row:
        return f"no {column!r} field"
    if not isinstance(row[column], str):
        return f"{column!r} is {type(row[column]).__name__}, not a string"
    return None


def prompt_completion_problem(row: Any) -> str | None:
    """An SFT example ``{"prompt": str, "completion": str}``."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in ("prompt", "completion"):
        if key not in row:
            return f"no {key!r} field (every row needs 'prompt' and 'completion', as the first row has)"
        if not isinstance(row[key], str):
            return f"{key!r} is {type(row[key]).__name__}, not a string"
    return None


def chat_problem(row: Any) -> str | None:
    """An SFT conversation ``{"messages": [{"role", "content"}, ...]}`` with at least one assistant turn."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" not in row:
        return "no 'messages' field (every row needs 'messages', as the first row has)"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role', 'content'} objects"
    if (problem := messages_problem(messages)) is not None:
        return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no 'assistant' message: nothing to learn"
    return None


def messages_problem(messages: list[Any]) -> str | None:
    """The first message of a conversation that is not ``{"role": one of ROLES, "content": str}``."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {i} needs 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"message {i} has unknown role {message['role']!r} (roles: {', '.join(ROLES)})"
        if not isinstance(message["content"], str):
            return f"message {i}: 'content' is {type(message['content']).__name__}, not a string"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Holding out
# ---------------------------------------------------------------------------------------------------------------


HOLD_OUT_CHUNK = 10_000  # rows per hold-out draw: part of which rows are held out, keep it fixed


def hold_out_indices(
    n: int, fraction: float, seed: int, *, tail: bool = False, unit: str = "row", hint: str = "pass --validation_files"
) -> tuple[Sequence[int], Sequence[int]]:
    """(train, validation) indices of ``n`` rows, both ascending: the rows `held_out_mask` holds out, or with
    ``tail`` the last ``round(n * fraction)`` (at least one if ``fraction`` > 0).

    Both sides stay in corpus order, so neighbouring rows stay neighbours (inside a packed block, for documents).
    Holding out every row raises `LMKitError` (`check_hold_out`).
    """
    check_hold_out(n, fraction, unit, hint)
    if tail:  # ranges: `Dataset.select` takes a contiguous range without an indices mapping
        n_val = max(1, round(n * fraction)) if fraction > 0 else 0
        return range(n - n_val), range(n - n_val, n)
    held = held_out_mask(np.arange(n), n, fraction, seed)
    return np.flatnonzero(~held), np.flatnonzero(held)


def check_hold_out(n: int, fraction: float, unit: str = "row", hint: str = "pass --validation_files") -> None:
    """Raise `LMKitError` naming ``--validation_split``, counting ``unit``s and ending in ``hint`` when holding out
    ``fraction`` of ``n`` rows leaves no training row (in the first chunk, which holds at least one out)."""
    first = min(n, HOLD_OUT_CHUNK)
    if fraction > 0 and max(1, round(first * fraction)) >= first:
        raise LMKitError(
            f"--validation_split {fraction}: the training data has only {n} {unit}(s), too few to hold some out "
            f"({hint})"
        )


def held_out_mask(indices: np.ndarray, n: int, fraction: float, seed: int) -> np.ndarray:
    """Whether each of ``indices`` (rows of ``n``) is held out: rows come in chunks of `HOLD_OUT_CHUNK`; chunk ``c``
    holds out ``round(size * fraction)`` of its rows (chunk 0 at least one when ``fraction`` > 0), the first of a
    permutation seeded with ``seed`` (chunk 0) or ``[seed, c]``. So a corpus of up to 10,000 rows holds out
    ``round(n * fraction)`` rows of one seeded permutation, and a larger one the same share of every chunk, drawn
    from one chunk at a time: memory per chunk, never per corpus (a permutation of 30M documents is 240 MB).
    ``indices`` may be any batch, so `datasets.Dataset.filter` can split a memory-mapped corpus batch by batch."""
    indices = np.asarray(indices, dtype=np.int64)
    held = np.zeros(len(indices), dtype=bool)
    if fraction <= 0:
        return held
    chunks = indices // HOLD_OUT_CHUNK
    for c in np.unique(chunks):
        size = min(HOLD_OUT_CHUNK, n - int(c) * HOLD_OUT_CHUNK)
        k = round(size * fraction)
        k = max(1, k) if c == 0 else k
        positions = np.random.default_rng(seed if c == 0 else [seed, int(c)]).permutation(size)[:k]
        here = chunks == c
        held[here] = np.isin(indices[here] - int(c) * HOLD_OUT_CHUNK, positions)
    return held


def is_held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a streamed row belongs to the validation split: a seeded hash of its text falls below
    ``fraction``. Every rank and every pass over the stream agrees, with nothing counted or stored."""
    salt = seed.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "little") < int(fraction * 2**64)
