"""One packer, one hold-out split: the exact blocks and held-out rows every data path produces.

Pinned with literal token lists on a literal corpus, so the map-style (Arrow) path, the streaming path, the
evaluation stream and SFT all stay byte-identical whoever changes the code under them.
"""

import json
from pathlib import Path

import pytest

import lmkit.data as data
from lmkit.args import DataArguments
from lmkit.data import PackedStream, build_lm_datasets, load_raw_datasets
from lmkit.evaluation import block_windows, token_stream
from lmkit.sft import build_sft_datasets, load_sft_rows
from lmkit.tokenizer import build_tokenizer

# Char tokenizer over "abc\n": "\n"=0 a=1 b=2 c=3, then <|endoftext|>=4.
EOS = 4
CORPUS = "ab\n\nba\n\ncab\n\nabc\n\nc"  # paragraphs: ab, ba, cab, abc, c
# a b EOS | b a EOS | c a b EOS | a b c EOS | c EOS -> 16 tokens
STREAM = [1, 2, EOS, 2, 1, EOS, 3, 1, 2, EOS, 1, 2, 3, EOS, 3, EOS]
BLOCKS_OF_5 = [[1, 2, EOS, 2, 1], [EOS, 3, 1, 2, EOS], [1, 2, 3, EOS, 3]]  # block_size 4; the last EOS dropped


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer("char", ["abc\n"], vocab_size=None)
    assert tokenizer.convert_tokens_to_ids(["\n", "a", "b", "c"]) == [0, 1, 2, 3]
    assert tokenizer.eos_token_id == EOS
    return tokenizer


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def lm_args(tmp_path: Path, corpus: Path, **kwargs) -> DataArguments:
    return DataArguments(
        train_files=[str(corpus)], validation_files=[str(corpus)], cache_dir=str(tmp_path / "cache"), **kwargs
    )


def blocks(ds) -> list[list[int]]:
    return [row["input_ids"] for row in ds]


# -- blocks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pack_batch", [1, 2, 10_000])
def test_map_style_blocks(tmp_path, corpus, tok, monkeypatch, pack_batch):
    monkeypatch.setattr(data, "_PACK_BATCH", pack_batch)  # blocks that straddle pack batches come out whole
    a = lm_args(tmp_path, corpus, block_size=4)
    lm = build_lm_datasets(load_raw_datasets(a, seed=0), tok, a)
    assert blocks(lm["train"]) == BLOCKS_OF_5
    assert blocks(lm["validation"]) == BLOCKS_OF_5


# Position after blocks 1, 2, 3 (tokens 5, 10, 15; documents start at tokens 0, 3, 6, 10, 14), as (documents,
# tokens) used up from the start of the read batch the block ends in: 1000 reads one batch; 2 reads [ab, ba],
# [cab, abc], [c]; 1 reads each document alone.
@pytest.mark.parametrize(
    ("read_batch", "positions"),
    [(1000, [(1, 2), (3, 0), (4, 1)]), (2, [(1, 2), (1, 0), (0, 1)]), (1, [(0, 2), (1, 0), (0, 1)])],
)
def test_streaming_blocks_and_positions(tmp_path, corpus, tok, monkeypatch, read_batch, positions):
    monkeypatch.setattr(data, "_TOKENIZE_BATCH", read_batch)  # tokens carried over from batch to batch
    a = lm_args(tmp_path, corpus, block_size=4, streaming=True, max_eval_blocks=2)
    lm = build_lm_datasets(load_raw_datasets(a, seed=0), tok, a)
    train = lm["train"]
    assert isinstance(train, PackedStream)
    assert blocks(train) == BLOCKS_OF_5
    assert blocks(lm["validation"]) == BLOCKS_OF_5[:2]
    after = [train.state_dict_after(n) for n in (1, 2, 3)]
    assert [(p["skip_docs"], p["skip_tokens"]) for p in after] == positions
    assert [p["blocks"] for p in after] == [1, 2, 3]


def test_streaming_resumes_at_a_position(tmp_path, corpus, tok):
    a = lm_args(tmp_path, corpus, block_size=4, streaming=True)
    train = build_lm_datasets(load_raw_datasets(a, seed=0), tok, a)["train"]
    first = iter(train)
    assert next(first) == {"input_ids": BLOCKS_OF_5[0]}
    position = train.state_dict()
    train.load_state_dict(position)
    assert blocks(train) == BLOCKS_OF_5[1:]


def test_evaluation_stream_is_the_training_concatenation(tok):
    stream = token_stream(["ab", "ba", "cab", "abc", "c"], tok)
    assert stream.ids == STREAM
    assert stream.nbytes == [1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 0]
    assert [stream.ids[w.start : w.end] for w in block_windows(len(stream), context=4)] == BLOCKS_OF_5


# -- hold-out split -------------------------------------------------------------------------------------------


@pytest.fixture
def twenty(tmp_path) -> Path:
    path = tmp_path / "twenty.txt"
    path.write_text("\n\n".join(f"p{i}" for i in range(20)), encoding="utf-8")
    return path


def test_random_hold_out_in_memory(tmp_path, twenty):
    a = DataArguments(train_files=[str(twenty)], validation_split=0.2, cache_dir=str(tmp_path / "cache"))
    raw = load_raw_datasets(a, seed=0)
    assert list(raw["validation"]["text"]) == ["p2", "p4", "p6", "p19"]
    assert list(raw["train"]["text"]) == [f"p{i}" for i in range(20) if i not in (2, 4, 6, 19)]


def test_random_hold_out_streaming(tmp_path, twenty):
    a = DataArguments(
        train_files=[str(twenty)], validation_split=0.3, streaming=True, cache_dir=str(tmp_path / "cache")
    )
    raw = load_raw_datasets(a, seed=0)
    assert [r["text"] for r in raw["validation"]] == ["p2", "p4", "p7", "p10", "p15", "p16"]
    assert [r["text"] for r in raw["train"]] == [f"p{i}" for i in range(20) if i not in (2, 4, 7, 10, 15, 16)]


def sft_file(tmp_path: Path) -> Path:
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_random_hold_out_in_memory(tmp_path):
    a = DataArguments(train_files=[str(sft_file(tmp_path))], validation_split=0.2)
    _, rows = load_sft_rows(a, seed=0)
    assert [r["prompt"] for r in rows["validation"]] == ["q4", "q6"]
    assert [r["prompt"] for r in rows["train"]] == [f"q{i}" for i in range(10) if i not in (4, 6)]


def test_sft_random_hold_out_streaming(tmp_path):
    tok = build_tokenizer("char", ["aq0123456789"], vocab_size=None)
    a = DataArguments(train_files=[str(sft_file(tmp_path))], validation_split=0.3, streaming=True, block_size=16)
    splits = build_sft_datasets(a, tok, seed=0)
    decode = lambda rows: [tok.decode(r["input_ids"], skip_special_tokens=True) for r in rows]  # noqa: E731
    assert decode(splits["validation"]) == ["q0a0", "q4a4"]
    assert decode(splits["train"]) == [f"q{i}a{i}" for i in range(10) if i not in (0, 4)]


def test_documents_are_encoded_a_part_at_a_time_with_the_same_ids(tok, monkeypatch):
    import lmkit.packing as packing

    texts = ["ab", "ba", "cab", "", "abc", "c", "a"]
    literal = [[1, 2, 4], [2, 1, 4], [3, 1, 2, 4], [4], [1, 2, 3, 4], [3, 4], [1, 4]]
    monkeypatch.setattr(packing, "_ENCODE_BATCH", 3)
    calls = []
    encode = tok.backend_tokenizer.encode_batch_fast
    monkeypatch.setattr(
        tok.backend_tokenizer,
        "encode_batch_fast",
        lambda t, **kw: calls.append(len(t)) or encode(t, **kw),
        raising=False,
    )
    assert packing.tokenize_documents(texts, tok).to_pylist() == literal
    assert calls == [3, 3, 1]
    assert packing.tokenize_documents([], tok).to_pylist() == []
