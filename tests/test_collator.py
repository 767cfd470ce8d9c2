"""The collator is the one place where the label shift happens: exact tensors for short sequences."""

import pytest
import torch

from lmkit import LMConfig, LMForCausalLM
from lmkit.collator import CausalLMCollator, padded_width
from lmkit.dpo import PreferenceCollator


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
    rounded = CausalLMCollator(pad_token_id=9, pad_to_length=6, pad_to_multiple_of=4)  # a stream's width wins
    assert rounded([{"input_ids": list(range(7))}])["input_ids"].shape == (1, 6)


def test_pad_to_multiple_of_rounds_the_width_up():
    assert [padded_width(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert padded_width(5, None) == padded_width(5, 1) == 5
    collate = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8, 9]}])  # longest: 5 inputs -> 8
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 0, 0, 0]]
    assert batch["shift_labels"].tolist() == [[2, 3] + [-100] * 6, [5, 6, 7, 8, 9, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    one = collate([{"input_ids": [1, 2, 3, 4, 5]}])  # already a multiple: no padding, no mask
    assert one.keys() == {"input_ids", "labels", "shift_labels"} and one["input_ids"].tolist() == [[1, 2, 3, 4]]
    pairs = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
          "rejected_input_ids": [1, 4], "rejected_labels": [-100, 4]}]
    )  # fmt: skip
    assert pairs["input_ids"].tolist() == [[1, 2, 0, 0], [1, 0, 0, 0]]
    assert pairs["targets"].tolist() == [[2, 3, -100, -100], [4, -100, -100, -100]]
    assert pairs["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_the_rounded_padding_leaves_the_loss_unchanged():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    model = LMForCausalLM(config).eval()
    rows = [{"input_ids": [3, 9, 4, 7, 1, 5], "labels": [-100, -100, 4, 7, 1, 5]}, {"input_ids": [8, 2, 6, 11]}]
    with torch.no_grad():
        tight = model(**CausalLMCollator(pad_token_id=0)(rows)).loss  # width 5
        rounded = model(**CausalLMCollator(pad_token_id=0, pad_to_multiple_of=16)(rows)).loss  # width 16
    torch.testing.assert_close(rounded, tight, rtol=1e-6, atol=0)  # fp32: only the summation order may differ


def test_row_too_short_is_rejected():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        CausalLMCollator(pad_token_id=0)([{"input_ids": [1]}])
