"""The one place where the next-token label shift happens.

A sequence of L+1 tokens ``seq`` becomes inputs ``seq[:-1]`` and targets ``seq[1:]``. The targets go to the
model as ``shift_labels`` (already aligned with the input positions), so the model never shifts them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class CausalLMCollator:
    """Batch ``{"input_ids": [...L+1 tokens]}`` rows into ``input_ids`` / ``shift_labels`` (and a mask if padded).

    Rows may also carry ``labels`` (same length as ``input_ids``, with -100 on tokens that must not be learned,
    e.g. an SFT prompt) and ``position_ids`` (packed SFT examples restart positions per document). Rows of unequal
    length are right-padded: padded inputs get ``pad_token_id``, padded targets -100, and ``attention_mask`` is
    returned. Equal-length rows (packed pretraining blocks) get no mask, so attention takes the causal fast path.

    Args:
        pad_token_id: id written into padded input positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly shapes).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) - 1 for f in features]
        if min(lengths) < 1:
            raise ValueError("every row needs at least 2 tokens (one input, one target)")
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padded = any(n != width for n in lengths)

        batch_size = len(features)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        shift_labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        has_positions = "position_ids" in features[0]
        position_ids = torch.zeros((batch_size, width), dtype=torch.long) if has_positions else None
        for i, (row, n) in enumerate(zip(features, lengths, strict=True)):
            seq = torch.as_tensor(row["input_ids"], dtype=torch.long)
            targets = torch.as_tensor(row["labels"], dtype=torch.long) if "labels" in row else seq
            input_ids[i, :n] = seq[:-1]  # (n,)
            shift_labels[i, :n] = targets[1:]  # (n,) the token after each input position
            if position_ids is not None:
                position_ids[i, :n] = torch.as_tensor(row["position_ids"][:-1], dtype=torch.long)

        batch = {"input_ids": input_ids, "shift_labels": shift_labels}
        if padded:
            positions = torch.arange(width)
            batch["attention_mask"] = (positions[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
        if position_ids is not None:
            batch["position_ids"] = position_ids
        return batch
