"""lmkit.rows: the JSON reader, the row checks and the hold-out split that pretraining, SFT and DPO data share."""

import json

import numpy as np
import pytest

from lmkit.args import DataArguments
from lmkit.data import load_raw_datasets
from lmkit.errors import LMKitError
from lmkit.rows import (
    chat_problem,
    hold_out_indices,
    is_held_out,
    json_rows,
    messages_problem,
    prompt_completion_problem,
)
from lmkit.sft import PROMPT_COMPLETION, read_sft_rows


def test_json_lines_and_json_array_rows_say_where_they_are(tmp_path):
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"a": 1}\n\n  \n[2]\n', encoding="utf-8")
    assert list(json_rows(lines, "--train_files")) == [("1", {"a": 1}), ("4", [2])]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"a": 1}, "x"]), encoding="utf-8")
    assert list(json_rows(array, "--train_files")) == [("item 0", {"a": 1}), ("item 1", "x")]


def test_bad_json_and_bad_utf8_name_flag_file_and_place(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(LMKitError, match=r"^--validation_files .*bad\.jsonl:2: not valid JSON \(Expecting value\)$"):
        list(json_rows(bad, "--validation_files"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(
        LMKitError, match=r"^--train_files .*latin\.jsonl: not UTF-8 text \(invalid byte at offset 10\)$"
    ):
        list(json_rows(latin, "--train_files"))


def test_one_check_per_row_kind():
    assert prompt_completion_problem({"prompt": "p", "completion": "c"}) is None
    assert prompt_completion_problem(["p"]) == "expected a JSON object, got list"
    assert prompt_completion_problem({"prompt": 1, "completion": "c"}) == "'prompt' is int, not a string"
    assert chat_problem({"messages": [{"role": "assistant", "content": "a"}]}) is None
    assert chat_problem({"messages": []}) == "'messages' must be a non-empty list of {'role', 'content'} objects"
    assert chat_problem({"messages": [{"role": "user", "content": 3}]}) == "message 0: 'content' is int, not a string"
    bot = [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]
    assert messages_problem(bot) == "message 1 has unknown role 'bot' (roles: system, user, assistant)"
    assert messages_problem(bot[:1]) is None  # any conversation (a DPO prompt too); chat_problem wants an answer
    assert chat_problem({"messages": bot[:1]}) == "no 'assistant' message: nothing to learn"


def test_a_bad_item_of_a_json_array_is_named_alike_in_pretraining_and_sft(tmp_path):
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps([{"text": "a"}, {"body": "b"}]), encoding="utf-8")
    with pytest.raises(
        LMKitError, match=r"^--train_files .*docs\.json:item 1: no 'text' field \(see --text_column\)$"
    ):
        load_raw_datasets(DataArguments(train_files=[str(docs)], cache_dir=str(tmp_path / "cache")), seed=0)
    examples = tmp_path / "sft.json"
    examples.write_text(json.dumps([{"prompt": "p", "completion": "c"}, {"prompt": "p"}]), encoding="utf-8")
    with pytest.raises(LMKitError, match=r"^--train_files .*sft\.json:item 1: no 'completion' field"):
        read_sft_rows([examples], PROMPT_COMPLETION, "--train_files")


def test_hold_out_indices():
    train, validation = hold_out_indices(10, 0.2, seed=0)  # default_rng(0).permutation(10) starts 4, 6
    assert (list(train), list(validation)) == ([0, 1, 2, 3, 5, 7, 8, 9], [4, 6])
    assert hold_out_indices(10, 0.2, seed=0, tail=True) == (range(8), range(8, 10))
    assert list(hold_out_indices(10, 0.01, seed=0)[1]) == [4]  # a fraction above 0 holds out at least one row
    assert list(hold_out_indices(10, 0.0, seed=0)[1]) == []
    with pytest.raises(LMKitError, match=r"^--validation_split 0.5: the training data has only 1 example\(s\), too few "
                                         r"to hold some out \(pass --validation_files\)$"):  # fmt: skip
        hold_out_indices(1, 0.5, seed=0, unit="example")


def test_is_held_out_is_a_seeded_hash_of_the_text():
    held = [i for i in range(20) if is_held_out(f"p{i}", seed=0, fraction=0.3)]
    assert held == [2, 4, 7, 10, 15, 16]
    assert [i for i in range(20) if is_held_out(f"p{i}", seed=1, fraction=0.3)] != held
    assert not any(is_held_out(f"p{i}", seed=0, fraction=0.0) for i in range(20))


def test_held_out_mask_draws_chunk_by_chunk_and_any_batching_agrees():
    from lmkit.rows import HOLD_OUT_CHUNK, held_out_mask

    n = 2 * HOLD_OUT_CHUNK + 5_000
    whole = held_out_mask(np.arange(n), n, 0.05, seed=3)
    assert whole.sum() == 500 + 500 + 250  # the same share of every chunk, the last one partial
    for c, size in enumerate((HOLD_OUT_CHUNK, HOLD_OUT_CHUNK, 5_000)):
        k = round(size * 0.05)
        rng = np.random.default_rng(3 if c == 0 else [3, c])
        expected = np.sort(rng.permutation(size)[:k]) + c * HOLD_OUT_CHUNK
        assert (
            np.flatnonzero(whole[c * HOLD_OUT_CHUNK : c * HOLD_OUT_CHUNK + size]).tolist()
            == (expected - c * HOLD_OUT_CHUNK).tolist()
        )
    batches = [held_out_mask(np.arange(s, min(s + 777, n)), n, 0.05, seed=3) for s in range(0, n, 777)]
    assert np.array_equal(np.concatenate(batches), whole)  # a `Dataset.filter` batch of any size agrees
    train, validation = hold_out_indices(n, 0.05, seed=3)
    assert np.array_equal(validation, np.flatnonzero(whole)) and len(train) + len(validation) == n
    assert held_out_mask(np.arange(9), 9, 0.01, seed=0).sum() == 1  # chunk 0 holds out at least one row
