"""The collator is the one place where the label shift happens: exact tensors for short sequences."""

import pytest
import torch

from lmkit.collator import CausalLMCollator


def test_one_sequence_shifts_inputs_and_targets():
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7, 8, 9]}])
    assert batch.keys() == {"input_ids", "labels", "shift_labels"}  # equal lengths: the causal fast path, no mask
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert batch["shift_labels"].tolist() == [[6, 7, 8, 9]]
    # `labels` carries the same targets (for the stock Trainer's token count and stock models' loss), not seq.
    assert batch["labels"].tolist() == [[6, 7, 8, 9]]


def test_ragged_rows_are_right_padded_and_masked():
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}])
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 2, 0, 0], [4, 5, 6, 7]]))
    torch.testing.assert_close(batch["shift_labels"], torch.tensor([[2, 3, -100, -100], [5, 6, 7, 8]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[2, 3, -100, -100], [5, 6, 7, 8]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_masked_labels_shift_with_the_inputs():
    # An SFT row: the prompt (10, 11) is not learned; the targets are the shifted labels.
    row = {"input_ids": [10, 11, 12, 13, 14], "labels": [-100, -100, 12, 13, 14]}
    batch = CausalLMCollator(pad_token_id=0)([row])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13]]
    assert batch["shift_labels"].tolist() == batch["labels"].tolist() == [[-100, 12, 13, 14]]


def test_position_ids_follow_the_inputs():
    row = {"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 0, 1, 2]}
    batch = CausalLMCollator(pad_token_id=0)([row, {"input_ids": [6, 7, 8], "position_ids": [0, 1, 2]}])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert batch["shift_labels"].tolist() == [[2, 3, 4, 5], [7, 8, -100, -100]]


def test_pad_to_length_gives_one_shape_with_a_mask():
    collate = CausalLMCollator(pad_token_id=9, pad_to_length=6)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9, 9, 9]]
    assert batch["labels"].tolist() == batch["shift_labels"].tolist() == [[2, 3, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]
    full = collate([{"input_ids": [1, 2, 3, 4, 5, 6, 7]}])  # exactly pad_to_length + 1 tokens: still masked
    assert full["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert full["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="does not fit pad_to_length 6"):
        collate([{"input_ids": list(range(8))}])


def test_row_too_short_is_rejected():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        CausalLMCollator(pad_token_id=0)([{"input_ids": [1]}])
