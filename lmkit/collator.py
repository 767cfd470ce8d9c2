"""The one place where the next-token label shift happens.

A sequence of L+1 tokens ``seq`` becomes inputs ``seq[:-1]`` and targets ``seq[1:]``. Every batch carries the
targets under both ``labels`` and ``shift_labels`` (one tensor, already aligned with the input positions), so no
model and no part of the Trainer shifts them again:

- lmkit's model uses ``shift_labels`` as given (it wins over ``labels``).
- transformers' own causal LMs (Llama's ``ForCausalLMLoss``) compute a loss only when ``labels`` is passed, and then
  use the ``shift_labels`` that arrive in their kwargs unshifted.
- The stock ``Trainer._get_num_items_in_batch`` (gradient-accumulation normalisation) counts only batches that have
  a ``labels`` key, and then counts ``shift_labels`` as they are, without dropping a first position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def padded_width(longest: int, multiple: int | None) -> int:
    """The width of a batch of variable-length rows: ``longest`` rounded up to a multiple of ``multiple`` (None or 1:
    unchanged).

    Every distinct (batch, width) shape costs a CPU run more than its padding: oneDNN builds and caches bf16 GEMM
    kernels per shape, so SFT batches grouped by length (about 200 widths over an epoch of 192 examples) ran at 1,093
    trained tok/s and grew the process to 1.9-2.4 GB over 8 epochs, against 1,632 tok/s and a flat 1.2 GB with widths
    rounded to 16 (4 x 256 model, bf16 on an AMX Xeon; benchmarks/README.md). fp32 kept a flat RSS either way.
    """
    if not multiple or multiple == 1:
        return longest
    return -(-longest // multiple) * multiple


@dataclass
class CausalLMCollator:
    """Batch ``{"input_ids": [...L+1 tokens]}`` rows into ``input_ids``, ``labels`` / ``shift_labels`` (the same
    targets, see the module docstring) and, when padded, ``attention_mask``.

    Rows may also carry ``labels`` (same length as ``input_ids``, with -100 on tokens that must not be learned,
    e.g. an SFT prompt or tokens an earlier evaluation window scored) and ``position_ids`` (packed SFT examples
    restart positions per document). Rows of unequal length are right-padded: padded inputs get ``pad_token_id``,
    padded targets -100, and ``attention_mask`` is returned. Equal-length rows (packed pretraining blocks) get no
    mask, so attention takes the causal fast path.

    Unpacked SFT batches vary in width; ``pad_to_multiple_of`` rounds it up (`padded_width`). Packed blocks already
    have the width ``--block_size`` gives them, and pretraining leaves it unset.

    Args:
        pad_token_id: id written into padded input positions.
        pad_to_length: pad every batch to exactly this many positions (rows hold at most ``pad_to_length + 1``
            tokens), always with an ``attention_mask``. Streamed SFT batches need it: accelerate's dispatcher
            concatenates the batches of all ranks, which must have one shape and the same keys (see
            `lmkit.data.share_stream_across_ranks`).
        pad_to_multiple_of: round every batch's width up to a multiple of this (`padded_width`); ignored under
            ``pad_to_length``.
    """

    pad_token_id: int
    pad_to_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) - 1 for f in features]
        if min(lengths) < 1:
            raise ValueError("every row needs at least 2 tokens (one input, one target)")
        width = max(lengths)
        if self.pad_to_length is not None:
            if width > self.pad_to_length:
                raise ValueError(f"a row of {width + 1} tokens does not fit pad_to_length {self.pad_to_length} + 1")
            width = self.pad_to_length
        else:
            width = padded_width(width, self.pad_to_multiple_of)

        batch_size = len(features)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        targets = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        has_positions = "position_ids" in features[0]
        position_ids = torch.zeros((batch_size, width), dtype=torch.long) if has_positions else None
        for i, (row, n) in enumerate(zip(features, lengths, strict=True)):
            seq = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(row["labels"], dtype=torch.long) if "labels" in row else seq
            input_ids[i, :n] = seq[:-1]  # (n,)
            targets[i, :n] = labels[1:]  # (n,) the token after each input position
            if position_ids is not None:
                position_ids[i, :n] = torch.as_tensor(row["position_ids"][:-1], dtype=torch.long)

        batch = {"input_ids": input_ids, "labels": targets, "shift_labels": targets}
        if self.pad_to_length is not None or any(n != width for n in lengths):
            positions = torch.arange(width)
            batch["attention_mask"] = (positions[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
        if position_ids is not None:
            batch["position_ids"] = position_ids
        return batch
