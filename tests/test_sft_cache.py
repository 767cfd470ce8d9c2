"""SFT data on `datasets`: the rows are today's exact rows (literal tensors), and a second run reads the cache."""

import json
import logging

import pytest
from test_sft import tok, write_jsonl  # noqa: F401 (tok: the char tokenizer fixture with ChatML markers)

from lmkit.args import DataArguments
from lmkit.sft import build_sft_dataset, build_sft_datasets, tokenize_example

X = -100
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared

PROMPT_COMPLETION_ROWS = [
    {"prompt": "ab", "completion": "cd"},
    {"prompt": "hello there", "completion": "general kenobi"},  # 27 tokens: over block_size 8 + 1
    {"prompt": "q", "completion": "a"},
]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                  {"role": "assistant", "content": "d"}]},
]  # fmt: skip
#            <s>  u   s   e  r  \n  h   i  </s> \n <s>  a   s   s   i   s   t   a   n   t  \n  y   o  </s> \n EOS
HI_YO = [32, 23, 21, 7, 20, 0, 10, 11, 33, 0, 32, 3, 21, 21, 11, 21, 22, 3, 16, 22, 0, 27, 17, 33, 0, 29]
#            <s>  s   y   s   t  e   m  \n  s  </s> \n
MULTI = [32, 21, 27, 21, 22, 7, 15, 0, 21, 33, 0] + HI_YO[:6] + [3, 33, 0] + HI_YO[10:21] + [4, 33, 0] \
    + HI_YO[:6] + [5, 33, 0] + HI_YO[10:21] + [6, 33, 0, 29]  # fmt: skip
MULTI_LABELS = [X] * 31 + [4, 33, 0] + [X] * 20 + [6, 33, 0, 29]


def _args(path, **kwargs) -> DataArguments:
    return DataArguments(train_files=[str(path)], validation_split=0.0, **kwargs)


@pytest.fixture
def from_files(tmp_path, tok):  # noqa: F811
    """build_sft_datasets over ``rows`` written to a JSONL file, its datasets cache in tmp_path."""

    def build(rows, block_size, **kwargs):
        path = write_jsonl(tmp_path / "rows.jsonl", rows)
        args = _args(path, block_size=block_size, cache_dir=str(tmp_path / "cache"))
        splits = build_sft_datasets(args, tok, **kwargs)
        assert splits["validation"] is None
        return splits["train"].to_dict()

    return build


# -- today's rows, literally ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["list", "files"])
def test_prompt_completion_rows_and_drop_count(tok, from_files, caplog, source):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="lmkit.sft"):
        if source == "list":
            rows = build_sft_dataset(PROMPT_COMPLETION_ROWS, tok, block_size=8).to_dict()
        else:
            rows = from_files(PROMPT_COMPLETION_ROWS, 8)
    assert rows == {"input_ids": [[3, 4, 5, 6, 29], [19, 3, 29]], "labels": [[X, X, 5, 6, 29], [X, 3, 29]]}
    assert "train: dropped 1 of 3 examples longer than --block_size + 1 = 9 tokens" in caplog.messages
    assert "train: 2 examples -> 2 rows" in caplog.messages


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("source", ["list", "files"])
def test_packed_prompt_completion_rows(tok, from_files, caplog, source, train_on_prompt):  # noqa: F811
    kwargs = {"packing": True, "train_on_prompt": train_on_prompt}
    with caplog.at_level(logging.INFO, logger="lmkit.sft"):
        if source == "list":
            rows = build_sft_dataset(PROMPT_COMPLETION_ROWS, tok, block_size=8, **kwargs).to_dict()
        else:
            rows = from_files(PROMPT_COMPLETION_ROWS, 8, **kwargs)
    first = [X, 4] if train_on_prompt else [X, X]  # an example's first token is never a target once packed
    assert rows == {
        "input_ids": [[3, 4, 5, 6, 29, 19, 3, 29, 30]],
        "labels": [first + [5, 6, 29, X, 3, 29, X]],
        "position_ids": [[0, 1, 2, 3, 4, 0, 1, 2, 0]],
    }
    assert "train: 2 examples -> 1 rows (packed)" in caplog.messages


def test_chat_rows_literal(from_files, caplog):
    with caplog.at_level(logging.INFO, logger="lmkit.sft"):
        assert from_files(CHAT_ROWS, 40) == {"input_ids": [HI_YO], "labels": [[X] * 21 + HI_YO[21:]]}
    assert "train: dropped 1 of 2 examples longer than --block_size + 1 = 41 tokens" in caplog.messages
    assert len(MULTI) == 58 and len(MULTI_LABELS) == 58


def test_packed_chat_rows_literal(from_files):
    pad = 30
    rows = from_files(CHAT_ROWS, 64, packing=True)
    assert rows == {
        "input_ids": [HI_YO + [pad] * 39, MULTI + [pad] * 7],
        "labels": [[X] * 21 + HI_YO[21:] + [X] * 39, MULTI_LABELS + [X] * 7],
        "position_ids": [list(range(26)) + list(range(39)), list(range(58)) + list(range(7))],
    }


@pytest.mark.parametrize("fast_render", [True, False])
def test_many_rows_equal_tokenize_example_in_two_processes(tmp_path, tok, monkeypatch, fast_render):  # noqa: F811
    """Batches, worker processes and the direct template render change nothing: every row is
    `tokenize_example`'s with every render through `apply_chat_template`, in file order."""
    import lmkit.sft

    abc = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"messages": [{"role": "system", "content": abc[i % 4]} for _ in range(i % 2)]
             + [{"role": "user", "content": abc[i % 9 : i % 9 + 3]},
                {"role": "assistant", "content": abc[i % 5 : i % 5 + 1 + i % 4]},
                {"role": "user", "content": abc[i % 3]}][: 2 + i % 2]}
            for i in range(2500)]  # fmt: skip
    real = lmkit.sft._fast_render
    monkeypatch.setattr(lmkit.sft, "_fast_render", lambda *args: None)
    expected = [tokenize_example(r, tok, train_on_prompt=True) for r in rows]
    if fast_render:
        monkeypatch.setattr(lmkit.sft, "_fast_render", real)
    assert (lmkit.sft._fast_render(tok, rows[0]["messages"]) is not None) == fast_render
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = _args(path, block_size=64, cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=2)
    assert build_sft_datasets(args, tok, train_on_prompt=True)["train"].to_list() == expected


# -- the cache ----------------------------------------------------------------------------------------------------


def test_second_run_reads_the_cache_and_any_key_change_retokenizes(tmp_path, tok, monkeypatch):  # noqa: F811
    import lmkit.sft

    calls = []
    real = lmkit.sft.tokenize_batch
    monkeypatch.setattr(lmkit.sft, "tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = write_jsonl(tmp_path / "rows.jsonl", PROMPT_COMPLETION_ROWS)
    args = _args(path, block_size=8, cache_dir=str(tmp_path / "cache"))
    first = build_sft_datasets(args, tok, packing=True)["train"]
    assert calls == [1]
    again = build_sft_datasets(args, tok, packing=True)["train"]
    assert calls == [1] and again.to_dict() == first.to_dict()  # no tokenizing: read from the cache
    assert again.cache_files == first.cache_files and str(tmp_path / "cache") in again.cache_files[0]["filename"]

    build_sft_datasets(args, tok, packing=True, train_on_prompt=True)
    assert len(calls) == 2  # another loss mask
    build_sft_datasets(_args(path, block_size=9, cache_dir=args.cache_dir), tok, packing=True)
    assert len(calls) == 3  # another block size
    other = tok.chat_template
    try:
        tok.chat_template = other + "{# another template #}"
        build_sft_datasets(args, tok, packing=True)
    finally:
        tok.chat_template = other
    assert len(calls) == 4  # another chat template
    path.write_text(path.read_text() + json.dumps({"prompt": "z", "completion": "y"}) + "\n")
    assert len(build_sft_datasets(args, tok)["train"]) == 3 and len(calls) == 5  # the file changed


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "q"}, r"--train_files .*rows.jsonl:2: no 'completion' field"),  # datasets fills in None
        ({"prompt": "q", "completion": 3}, r"--train_files .*rows.jsonl:2: 'completion' is int, not a string"),
    ],  # the second is a datasets parse error (a column of mixed types)
)
def test_a_bad_row_through_datasets_names_file_and_line(tmp_path, tok, bad, message):  # noqa: F811
    from lmkit.errors import LMKitError

    path = write_jsonl(tmp_path / "rows.jsonl", [PROMPT_COMPLETION_ROWS[0], bad])
    with pytest.raises(LMKitError, match=message):
        build_sft_datasets(_args(path, block_size=8, cache_dir=str(tmp_path / "cache")), tok)


def test_preference_pairs_are_cached_and_keyed_by_template_and_max_length(tmp_path, tok, monkeypatch):  # noqa: F811
    import lmkit.dpo

    calls = []
    real = lmkit.dpo.tokenize_pair
    monkeypatch.setattr(lmkit.dpo, "tokenize_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [{"prompt": "ab", "chosen": "c", "rejected": "dd"}, {"prompt": "q", "chosen": "x", "rejected": "yz"}]
    build = lmkit.dpo.build_preference_dataset
    first = build(rows, tok, 64, cache_dir=tmp_path)
    assert first.to_dict() == {
        "chosen_input_ids": [[3, 4, 5, 29], [19, 26, 29]],
        "chosen_labels": [[X, X, 5, 29], [X, 26, 29]],
        "rejected_input_ids": [[3, 4, 6, 6, 29], [19, 27, 28, 29]],
        "rejected_labels": [[X, X, 6, 6, 29], [X, 27, 28, 29]],
    }
    assert len(calls) == 2
    assert build(rows, tok, 64, cache_dir=tmp_path).to_dict() == first.to_dict() and len(calls) == 2  # cached
    build(rows, tok, 4, cache_dir=tmp_path)
    assert len(calls) == 4  # another --max_length
    other = tok.chat_template
    try:
        tok.chat_template = other + "{# another template #}"
        build(rows, tok, 64, cache_dir=tmp_path)
    finally:
        tok.chat_template = other
    assert len(calls) == 6  # another chat template
