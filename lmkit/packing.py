"""The one packer: token ids -> training rows of ``block_size + 1`` tokens.

Every row holds ``row_length(block_size)`` = ``block_size + 1`` tokens: the collator shifts it into ``block_size``
inputs (``seq[:-1]``) and targets (``seq[1:]``). Rows are made in one of two ways:

- documents (pretraining, and evaluation scoring the same blocks): each document's tokens followed by EOS
  (`join_documents`), all concatenated, cut into rows of exactly that length (`cut_blocks`); a document may run
  across rows, and the tail that does not fill a last row is dropped. `pack_document_batch` does this for a
  `datasets.map` batch of an Arrow table, the streaming path (`lmkit.data.PackedStream`) with `cut_blocks` and a
  carried tail; both give the blocks of one global concatenation.
- examples (SFT): whole examples, which already end in EOS, placed in order into rows of that length without ever
  being split (`pack_examples`); the rest of each row, the last one included, is padding, and an example
  longer than a row is the caller's to drop. Splitting would teach an answer without its question, and dropping
  a last part-filled row would lose whole examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmkit.collator import IGNORE_INDEX


def row_length(block_size: int) -> int:
    """Tokens in a training row: ``block_size`` inputs plus the one more token the last input predicts."""
    return block_size + 1


# ---------------------------------------------------------------------------------------------------------------
# Documents: concatenate with EOS, cut into blocks
# ---------------------------------------------------------------------------------------------------------------


def join_documents(docs: Sequence[Sequence[int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets): each document followed by ``eos``, concatenated; document ``d`` is
    ``values[offsets[d]:offsets[d + 1]]``, its ``eos`` included. Arrays of int32, ready to become an Arrow list."""
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, docs), dtype=np.int32, count=len(docs)) + 1, out=offsets[1:])
    after = (eos,)
    values = np.fromiter(chain.from_iterable(chain(d, after) for d in docs), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets


_ENCODE_BATCH = 10_000  # texts per call to the Rust encoder: its Encoding objects live until the ids are joined


def tokenize_documents(texts: list[str], tokenizer: Any) -> pa.ListArray:
    """One list of token ids per text, EOS appended, built as Arrow arrays directly: handing `datasets` Python
    lists of ints would cost a second conversion per token. Texts are encoded `_ENCODE_BATCH` at a time, so a
    caller may pass many (larger Arrow record batches) without holding an ``Encoding`` for each."""
    steps = range(0, max(1, len(texts)), _ENCODE_BATCH)  # one (empty) part for no texts
    parts = [_tokenize_part(texts[i : i + _ENCODE_BATCH], tokenizer) for i in steps]
    return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)


def _tokenize_part(texts: list[str], tokenizer: Any) -> pa.ListArray:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust batch encoder without offsets: several times faster than __call__
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    values, offsets = join_documents(ids, tokenizer.eos_token_id)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def cut_blocks(tokens: np.ndarray, block_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, tail): as many whole rows of ``block_len`` as ``tokens`` fill, shape (n, block_len), and the
    tokens after them, which a stream carries into its next batch and the end of the data drops."""
    n = len(tokens) // block_len
    return tokens[: n * block_len].reshape(n, block_len), tokens[n * block_len :]


class DocumentStarts:
    """Where each document of a tokenized column (a chunked Arrow list column, memory-mapped) begins in the
    concatenation of all of them, without an array of one start per document: memory stays flat as the corpus
    grows. It keeps one row count and one token count per Arrow chunk (`datasets` writes a chunk per `map`
    batch) and reads a document's start from its chunk's offsets; small enough to send to `datasets.map` workers."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        rows, tokens = [0], [0]
        for chunk in column.chunks:
            offsets = chunk.offsets
            rows.append(rows[-1] + len(chunk))
            tokens.append(tokens[-1] + (offsets[len(chunk)].as_py() - offsets[0].as_py() if len(chunk) else 0))
        self.chunk_rows, self.chunk_tokens = np.array(rows, dtype=np.int64), np.array(tokens, dtype=np.int64)

    @property
    def total(self) -> int:
        """Tokens in all documents."""
        return int(self.chunk_tokens[-1])

    def between(self, column: pa.ChunkedArray, lo: int, hi: int) -> np.ndarray:
        """The starts of documents ``lo`` .. ``hi`` (both included; document ``len(column)`` starts at `total`)."""
        if lo >= len(column):
            return np.full(1, self.total, dtype=np.int64)
        c = int(np.searchsorted(self.chunk_rows, lo, side="right")) - 1  # the (non-empty) chunk holding ``lo``
        offsets = column.chunk(c).offsets
        first = int(self.chunk_tokens[c]) + offsets[lo - int(self.chunk_rows[c])].as_py() - offsets[0].as_py()
        hi = min(hi, len(column))
        lengths = pc.list_value_length(column.slice(lo, hi - lo)).to_numpy(zero_copy_only=False)
        starts = np.empty(hi - lo + 1, dtype=np.int64)
        starts[0] = first
        np.cumsum(lengths, out=starts[1:])
        starts[1:] += first
        return starts


def pack_document_batch(
    batch: pa.Table, indices: list[int], tokens: pa.Table, starts: DocumentStarts, block_len: int
) -> pa.Table:
    """A `datasets.map` function (``batched=True, with_indices=True``) over tokenized documents: every block that
    *starts* in this batch's documents, read from the whole table ``tokens`` so it may run into later documents.

    ``starts`` (`DocumentStarts` of ``tokens``) says where each document begins in the concatenation. Batches are
    independent (so worker processes can pack them), and together they emit the blocks of one concatenation.
    """
    column = tokens.column("input_ids")
    first, end = indices[0], indices[-1] + 1
    n_blocks = starts.total // block_len
    # Every document holds at least its EOS, so the block_len documents after the batch hold its last block's end.
    doc_starts = starts.between(column, first, end + block_len)  # doc_starts[i]: start of document first + i
    b0 = -(-int(doc_starts[0]) // block_len)  # the first block starting at or after this batch's first token
    b1 = min(-(-int(doc_starts[end - first]) // block_len), n_blocks)
    if b1 <= b0:
        return _blocks_table(np.empty((0, block_len), dtype=np.int32))
    lo, hi = b0 * block_len, b1 * block_len
    d0 = first + int(np.searchsorted(doc_starts, lo, side="right")) - 1  # documents [d0, d1) hold tokens [lo, hi)
    d1 = first + int(np.searchsorted(doc_starts, hi, side="left"))
    flat = pc.list_flatten(column.slice(d0, d1 - d0)).to_numpy()
    offset = lo - int(doc_starts[d0 - first])
    return _blocks_table(cut_blocks(flat[offset : offset + hi - lo], block_len)[0])


def _blocks_table(blocks: np.ndarray) -> pa.Table:
    n, block_len = blocks.shape
    offsets = np.arange(0, (n + 1) * block_len, block_len, dtype=np.int32)
    values = pa.array(blocks.reshape(-1).astype(np.int32, copy=False))
    return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)})


# ---------------------------------------------------------------------------------------------------------------
# Examples: whole, never split
# ---------------------------------------------------------------------------------------------------------------


def pack_examples(
    examples: Iterable[dict[str, list[int]]], row_len: int, pad_token_id: int
) -> Iterator[dict[str, list[int]]]:
    """Greedily fill rows of exactly ``row_len`` tokens with whole examples, in order; pad the rest.

    Each example keeps its own ``position_ids`` (0, 1, ...), so attention (transformers finds the boundaries in
    position_ids when there is no attention_mask) and rotary positions never cross examples. The first token of
    each example is not a target (it would be predicted from the previous example), and padding forms its own run
    of positions with no targets. All rows have the same length, so the collator adds no attention_mask.
    """
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}

    def closed() -> dict[str, list[int]]:
        free = row_len - len(current["input_ids"])
        current["input_ids"] += [pad_token_id] * free
        current["labels"] += [IGNORE_INDEX] * free
        current["position_ids"] += list(range(free))
        return current

    for example in examples:
        n = len(example["input_ids"])
        if len(current["input_ids"]) + n > row_len:
            yield closed()
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        yield closed()
