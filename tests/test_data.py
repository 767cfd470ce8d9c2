"""Data pipeline: sources -> documents -> packed blocks of block_size + 1 tokens."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

import lmkit.data as data
from lmkit.args import BUNDLED_CORPUS, DataArguments
from lmkit.data import build_lm_datasets, load_raw_datasets, resolve_data_files
from lmkit.errors import LMKitError
from lmkit.packing import DocumentStarts
from lmkit.rows import HOLD_OUT_CHUNK, utf8_error_offset
from lmkit.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]

# A tiny char tokenizer over "abc\n": a=1 b=2 c=3 "\n"=0, then <|endoftext|>=4, <|pad|>=5, <|unk|>=6.
EOS = 4


@pytest.fixture(scope="module")
def char_tok():
    tokenizer = build_tokenizer("char", ["abc\n"], vocab_size=None)
    assert tokenizer.convert_tokens_to_ids(["\n", "a", "b", "c"]) == [0, 1, 2, 3]
    assert tokenizer.eos_token_id == EOS
    return tokenizer


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def args(tmp_path: Path, **kwargs) -> DataArguments:
    return DataArguments(cache_dir=str(tmp_path / "cache"), **kwargs)


def blocks(ds) -> list[list[int]]:
    return [row["input_ids"] for row in ds]


def train_texts(raw) -> list[str]:
    return list(raw["train"]["text"])


# -- exact blocks ---------------------------------------------------------------------------------------------


def test_blocks_are_exact_with_eos_between_documents_and_remainder_dropped(tmp_path, char_tok):
    train = write(tmp_path / "train.txt", "ab\n\nba\n\ncab")
    val = write(tmp_path / "val.txt", "abcab")
    a = args(tmp_path, train_files=[str(train)], validation_files=[str(val)], block_size=3)
    raw = load_raw_datasets(a, seed=0)
    assert train_texts(raw) == ["ab", "ba", "cab"]
    lm = build_lm_datasets(raw, char_tok, a)
    # a b EOS | b a EOS | c a b EOS -> 10 tokens, 2 blocks of 4; the last [b, EOS] is dropped
    assert blocks(lm["train"]) == [[1, 2, EOS, 2], [1, EOS, 3, 1]]
    assert blocks(lm["validation"]) == [[1, 2, 3, 1]]
    assert lm["train"].column_names == ["input_ids"]


def test_newlines_inside_documents_are_kept(tmp_path, char_tok):
    train = write(tmp_path / "train.txt", "a\nb\n\nc\n")
    a = args(tmp_path, train_files=[str(train)], validation_files=[str(train)], block_size=6)
    raw = load_raw_datasets(a, seed=0)
    assert train_texts(raw) == ["a\nb", "c\n"]
    assert blocks(build_lm_datasets(raw, char_tok, a)["train"]) == [[1, 0, 2, EOS, 3, 0, EOS]]


@pytest.mark.parametrize(
    ("sample_by", "expected"),
    [("line", ["a", "b", "", "c"]), ("paragraph", ["a\nb", "c\n"]), ("document", ["a\nb\n\nc\n"])],
)
def test_sample_by(tmp_path, sample_by, expected):
    train = write(tmp_path / "train.txt", "a\nb\n\nc\n")
    raw = load_raw_datasets(args(tmp_path, train_files=[str(train)], validation_split=0.0, sample_by=sample_by), 0)
    assert train_texts(raw) == expected


def test_packing_is_global_across_batches_and_workers(tmp_path, char_tok, monkeypatch):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abc\n"), size=rng.integers(1, 30))) for _ in range(300)]
    raw = DatasetDict(train=Dataset.from_dict({"text": docs}), validation=Dataset.from_dict({"text": docs[:50]}))
    a = args(tmp_path, block_size=16)
    ids = np.concatenate([char_tok(d)["input_ids"] + [EOS] for d in docs])
    n = len(ids) // 17
    expected = ids[: n * 17].reshape(n, 17).tolist()
    monkeypatch.setattr(data, "_TOKENIZE_BATCH", 7)
    monkeypatch.setattr(data, "_PACK_BATCH", 5)  # most blocks straddle two pack batches
    assert blocks(build_lm_datasets(raw, char_tok, a)["train"]) == expected


@pytest.mark.slow
def test_packing_with_worker_processes_gives_the_same_blocks(tmp_path, char_tok, monkeypatch):
    monkeypatch.setattr(data, "_TOKENIZE_BATCH", 100)
    monkeypatch.setattr(data, "_PACK_BATCH", 100)
    docs = [f"ab{'c' * (i % 13)}\n" for i in range(1000)]
    write(tmp_path / "train.txt", "\n\n".join(docs))
    one = args(tmp_path, train_files=[str(tmp_path / "train.txt")], block_size=32, split_mode="tail")
    two = args(tmp_path, train_files=[str(tmp_path / "train.txt")], block_size=32, split_mode="tail")
    two.preprocessing_num_workers = 2
    two.cache_dir = str(tmp_path / "cache2")
    expected = blocks(build_lm_datasets(load_raw_datasets(one, 0), char_tok, one)["train"])
    assert blocks(build_lm_datasets(load_raw_datasets(two, 0), char_tok, two)["train"]) == expected


def test_max_eval_blocks_keeps_the_first(tmp_path, char_tok):
    train = write(tmp_path / "train.txt", "abcabcabc\n\nabcabcabc")
    a = args(tmp_path, train_files=[str(train)], validation_files=[str(train)], block_size=3, max_eval_blocks=2)
    lm = build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    assert len(lm["train"]) == 5
    assert blocks(lm["validation"]) == blocks(lm["train"])[:2]


def test_validation_shorter_than_a_block_is_an_error(tmp_path, char_tok):
    train = write(tmp_path / "train.txt", "abcabcabc")
    val = write(tmp_path / "val.txt", "ab")
    a = args(tmp_path, train_files=[str(train)], validation_files=[str(val)], block_size=4)
    with pytest.raises(LMKitError, match=r"validation data .*shorter than --block_size \+ 1 = 5 tokens"):
        build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)


# -- sources ----------------------------------------------------------------------------------------------------


def test_default_is_the_bundled_corpus(tmp_path):
    assert BUNDLED_CORPUS == REPO / "lmkit" / "corpus" / "tinyshakespeare.txt"
    raw = load_raw_datasets(args(tmp_path), seed=0)
    assert raw["train"][0]["text"].startswith("First Citizen:\nBefore we proceed")
    n_docs = len(raw["train"]) + len(raw["validation"])
    assert n_docs == 7222
    assert len(raw["validation"]) == round(0.05 * n_docs)


def test_jsonl_with_custom_text_column(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "one\ntwo", "id": 1}, {"body": "three", "id": 2}])
    write_jsonl(tmp_path / "b.json", [{"body": "four", "id": 3}])
    a = args(tmp_path, train_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")], text_column="body")
    a.validation_split = 0.0
    raw = load_raw_datasets(a, 0)
    assert raw["train"].column_names == ["text"]
    assert train_texts(raw) == ["one\ntwo", "three", "four"]


def test_parquet(tmp_path):
    pq.write_table(pa.table({"text": ["x\ny", "z"], "score": [1.0, 2.0]}), tmp_path / "a.parquet")
    raw = load_raw_datasets(args(tmp_path, train_files=[str(tmp_path / "a.parquet")], validation_split=0.0), 0)
    assert raw["train"].column_names == ["text"]
    assert train_texts(raw) == ["x\ny", "z"]


def test_directory_is_recursive_and_glob_expands(tmp_path):
    write(tmp_path / "corpus" / "b.txt", "b1\n\nb2")
    write(tmp_path / "corpus" / "sub" / "a.txt", "a1")
    write(tmp_path / "corpus" / "README.md", "not data")  # a directory skips other files
    write(tmp_path / "corpus" / ".hidden" / "c.txt", "hidden")
    files = resolve_data_files([str(tmp_path / "corpus")], "--train_files")
    assert files == [tmp_path / "corpus" / "b.txt", tmp_path / "corpus" / "sub" / "a.txt"]
    assert resolve_data_files([str(tmp_path / "corpus" / "**" / "*.txt")], "--train_files") == files
    raw = load_raw_datasets(args(tmp_path, train_files=[str(tmp_path / "corpus")], validation_split=0.0), 0)
    assert train_texts(raw) == ["b1", "b2", "a1"]


def test_local_dataset_folder_as_dataset_name(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"content": f"doc {i}"} for i in range(5)])
    write_jsonl(tmp_path / "ds" / "validation.jsonl", [{"content": "held out"}])
    raw = load_raw_datasets(args(tmp_path, dataset_name=str(tmp_path / "ds"), text_column="content"), 0)
    assert len(raw["train"]) == 5
    assert list(raw["validation"]["text"]) == ["held out"]
    with pytest.raises(LMKitError, match=r"--text_column 'text': not a column .*content"):
        load_raw_datasets(args(tmp_path, dataset_name=str(tmp_path / "ds")), 0)


# -- splits -----------------------------------------------------------------------------------------------------


@pytest.fixture
def twenty_docs(tmp_path) -> Path:
    return write(tmp_path / "train.txt", "\n\n".join(f"p{i}" for i in range(20)))


def test_tail_split_holds_out_the_last_documents(tmp_path, twenty_docs):
    a = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.1, split_mode="tail")
    raw = load_raw_datasets(a, seed=0)
    assert list(raw["validation"]["text"]) == ["p18", "p19"]
    assert train_texts(raw) == [f"p{i}" for i in range(18)]


def test_random_split_is_seeded_disjoint_and_in_corpus_order(tmp_path, twenty_docs):
    a = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.2, split_mode="random")
    raw = load_raw_datasets(a, seed=0)
    train, val = train_texts(raw), list(raw["validation"]["text"])
    assert len(val) == 4
    assert sorted(train + val, key=lambda t: int(t[1:])) == [f"p{i}" for i in range(20)]
    assert train == sorted(train, key=lambda t: int(t[1:]))
    assert list(load_raw_datasets(a, seed=0)["validation"]["text"]) == val
    assert list(load_raw_datasets(a, seed=1)["validation"]["text"]) != val


@pytest.mark.parametrize("hold_out_batch", [HOLD_OUT_CHUNK, 15_000, data._HOLD_OUT_BATCH])
def test_random_split_of_a_large_corpus_is_the_chunked_rule(tmp_path, monkeypatch, hold_out_batch):
    # 25,000 one-line documents: three hold-out chunks; `filter` splits them batch by batch, no index list, in
    # batches of any size (10,000 was the batch before _HOLD_OUT_BATCH; 15,000 straddles the chunks).
    from lmkit.rows import hold_out_indices

    monkeypatch.setattr(data, "_HOLD_OUT_BATCH", hold_out_batch)
    lines = write(tmp_path / "lines.txt", "".join(f"d{i}\n" for i in range(25_000)))
    a = args(tmp_path, train_files=[str(lines)], validation_split=0.05, split_mode="random", sample_by="line")
    raw = load_raw_datasets(a, seed=5)
    keep, held = hold_out_indices(25_000, 0.05, seed=5)
    assert list(raw["validation"]["text"]) == [f"d{i}" for i in held]  # 1,250 documents, in corpus order
    assert list(raw["train"]["text"]) == [f"d{i}" for i in keep]


@pytest.mark.parametrize("workers", [None, 2])
def test_random_hold_out_is_tokenized_from_the_whole_table_into_the_same_blocks(tmp_path, char_tok, workers):
    # build_lm_datasets reads a random hold-out's splits from the contiguous documents (HeldOutSplits): the blocks
    # are those of the filtered splits read through their index mappings (three hold-out chunks, two workers).
    rng = np.random.default_rng(0)
    lines = write(tmp_path / "lines.txt", "".join("abc"[: rng.integers(1, 4)] + "\n" for _ in range(25_000)))
    a = args(tmp_path, train_files=[str(lines)], validation_split=0.05, sample_by="line", block_size=15,
             preprocessing_num_workers=workers)  # fmt: skip
    raw = load_raw_datasets(a, seed=5)
    assert isinstance(raw, data.HeldOutSplits) and raw.source_of("train") is raw.documents
    ours = build_lm_datasets(raw, char_tok, a)
    plain = DatasetDict(raw)  # the same splits without the rule: tokenized through their index mappings
    assert not isinstance(plain, data.HeldOutSplits)
    reference = build_lm_datasets(plain, char_tok, a)  # (another cache key: the filtered splits' fingerprints)
    for split in ("train", "validation"):
        assert len(ours[split]) > 0
        assert blocks(ours[split]) == blocks(reference[split]), split
    # a split replaced after the draw is tokenized as it is, not read from the documents
    raw["train"] = raw["train"].select(range(100))
    assert raw.source_of("train") is None and raw.source_of("validation") is raw.documents
    replaced = build_lm_datasets(raw, char_tok, a)["train"]
    assert blocks(replaced) == blocks(build_lm_datasets(DatasetDict(raw), char_tok, a)["train"])


def record_batches(table) -> int:
    return len(table.to_batches())


def test_large_record_batches_give_the_same_documents_splits_and_blocks(tmp_path, char_tok, monkeypatch):
    # Every process holding an Arrow table holds ~1.6 KB per record batch: one-line documents are written 100,000
    # to a record batch (the document table), hold-out index mappings a filter batch to one, and tokenized
    # documents about 4 MB of text a batch. Against smaller ones (the former 1,000-row record batches of documents,
    # filter batches of 10,000, 1,000 documents a tokenizing batch): the same splits and the same blocks.
    rng = np.random.default_rng(0)
    lines = write(tmp_path / "lines.txt", "".join("abc"[: rng.integers(1, 4)] + "\n" for _ in range(25_000)))

    def build(cache: str, workers: int | None) -> tuple:
        a = args(tmp_path, train_files=[str(lines)], validation_split=0.05, sample_by="line", block_size=15,
                 preprocessing_num_workers=workers)  # fmt: skip
        a.cache_dir = str(tmp_path / cache)
        raw = load_raw_datasets(a, seed=5)
        return raw, build_lm_datasets(raw, char_tok, a)

    tokenized_chunks = []  # record batches of the tokenized train and validation documents, as packing reads them
    monkeypatch.setattr(
        data, "DocumentStarts", lambda column: tokenized_chunks.append(column.num_chunks) or DocumentStarts(column)
    )
    with monkeypatch.context() as former:
        former.setattr(data, "_LINES_PER_RECORD_BATCH", 1000)
        former.setattr(data, "_HOLD_OUT_BATCH", HOLD_OUT_CHUNK)
        former.setattr(data, "_MAP_BATCH_TEXT", 0)  # _TOKENIZE_BATCH documents a batch
        old_raw, old = build("cache-former", None)
    raw, new = build("cache-now", 2)
    assert record_batches(old_raw.documents.data) == 25
    assert record_batches(raw.documents.data) == 1
    assert [record_batches(raw[s]._indices) for s in ("train", "validation")] == [1, 1]  # one filter batch
    assert [record_batches(old_raw[s]._indices) for s in ("train", "validation")] == [3, 3]
    # the documents tokenized from the 25,000 documents, before: training 1,000 a batch, validation a hold-out
    # chunk (10,000) a batch; now one batch in each of two workers' shards of 12,500, for either split
    assert tokenized_chunks == [25, 3, 2, 2]
    for split in ("train", "validation"):
        assert list(raw[split]["text"]) == list(old_raw[split]["text"]), split
        assert len(new[split]) > 0
        assert blocks(new[split]) == blocks(old[split]), split


def test_tokenize_map_batch_follows_document_length():
    short = Dataset.from_dict({"text": ["ab"] * 50})
    long = Dataset.from_dict({"text": ["x" * 20_000] * 50})
    middle = Dataset.from_dict({"text": ["x" * 300] * 50})
    assert data._tokenize_map_batch(short) == 100 * data._TOKENIZE_BATCH
    assert data._tokenize_map_batch(long) == data._TOKENIZE_BATCH
    assert data._TOKENIZE_BATCH < data._tokenize_map_batch(middle) < 100 * data._TOKENIZE_BATCH


def test_too_few_documents_to_hold_out(tmp_path):
    one = write(tmp_path / "one.txt", "just one paragraph")
    with pytest.raises(LMKitError, match=r"--validation_split 0.05: the training data has only 1 document"):
        load_raw_datasets(args(tmp_path, train_files=[str(one)]), 0)


# -- bad input --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(LMKitError, match=r"--train_files .*nope\.txt: no such file"):
        resolve_data_files([str(tmp_path / "nope.txt")], "--train_files")


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(LMKitError, match=r"--validation_files .*\*\.jsonl: the glob matches no files"):
        resolve_data_files([str(tmp_path / "*.jsonl")], "--validation_files")


def test_empty_file(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(LMKitError, match=r"--train_files .*empty\.txt: the file is empty"):
        resolve_data_files([str(tmp_path / "empty.txt")], "--train_files")


def test_unsupported_extension(tmp_path):
    write(tmp_path / "data.csv", "a,b")
    with pytest.raises(LMKitError, match=r"--train_files .*data\.csv: unsupported file type"):
        resolve_data_files([str(tmp_path / "data.csv")], "--train_files")


def test_mixed_formats(tmp_path):
    write(tmp_path / "a.txt", "x")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}])
    with pytest.raises(LMKitError, match=r"--train_files: files of different formats.*a\.txt.*b\.jsonl"):
        resolve_data_files([str(tmp_path)], "--train_files")


def test_directory_without_data_files(tmp_path):
    write(tmp_path / "d" / "notes.md", "x")
    with pytest.raises(LMKitError, match=r"--train_files .*d: the directory holds no"):
        resolve_data_files([str(tmp_path / "d")], "--train_files")


@pytest.mark.parametrize("content", ["\n\n\n\n", "   \n", " \t\n\n  \r\n" * 1000])
@pytest.mark.parametrize("name", ["blank.txt", "blank.jsonl"])
def test_a_file_of_only_whitespace_holds_no_text(tmp_path, name, content):
    blank = write(tmp_path / name, content)
    with pytest.raises(LMKitError) as err:
        load_raw_datasets(args(tmp_path, train_files=[str(blank)]), 0)
    assert str(err.value) == f"--train_files {blank}: holds no text (only whitespace)"


def test_whitespace_documents_beside_text_are_kept(tmp_path):
    text = write(tmp_path / "a.txt", "\n \n" * 5000 + "abc")  # the text starts past the first chunk read
    assert resolve_data_files([str(text)], "--train_files") == [text.resolve()]


@pytest.mark.parametrize("content", [b"\0" * 5000, b"\0", b"abc\n" * 100 + b"\0abc"])
def test_a_file_with_nul_bytes_is_binary(tmp_path, content):
    binary = write(tmp_path / "nul.txt", content)
    with pytest.raises(LMKitError) as err:
        load_raw_datasets(args(tmp_path, train_files=[str(binary)]), 0)
    offset = content.index(b"\0")
    assert str(err.value) == f"--train_files {binary}: a binary file, not text (NUL byte at offset {offset})"


def test_no_documents_names_the_files(tmp_path):
    empty = write(tmp_path / "rows.jsonl", "[]")
    with pytest.raises(LMKitError, match=r"--train_files: no documents in .*rows\.jsonl"):
        load_raw_datasets(args(tmp_path, train_files=[str(empty)]), 0)


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    bad = write(tmp_path / "latin1.txt", "caf\u00e9\n\nok".encode("latin-1"))
    with pytest.raises(LMKitError, match=r"--train_files .*latin1\.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        load_raw_datasets(args(tmp_path, train_files=[str(bad)]), 0)


def test_non_utf8_jsonl_names_file_and_byte_offset(tmp_path):
    # pyarrow's JSON reader loads the bytes as they are; the text was only decoded (and failed) when first read
    rows = b'{"text": "hello"}\n{"text": "world"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1")
    bad = write(tmp_path / "latin1.jsonl", rows)
    with pytest.raises(LMKitError) as err:
        load_raw_datasets(args(tmp_path, train_files=[str(bad)]), 0)
    assert rows.index(b"\xe9") == 49
    assert str(err.value) == f"--train_files {bad}: not UTF-8 text (invalid byte at offset 49)"


def test_a_json_message_that_points_at_a_place_says_its_column(tmp_path):
    bad = write(tmp_path / "rows.jsonl", '{"text": "a"}\n{"text": "a\tb"}\n')
    with pytest.raises(LMKitError) as err:
        load_raw_datasets(args(tmp_path, train_files=[str(bad)]), 0)
    assert str(err.value) == (
        f"--train_files {bad}:2: not valid JSON (Invalid control character at column 12) (see --text_column)"
    )
    unterminated = write(tmp_path / "rows.json", '[{"text": "a"},\n {"text": "b}]')
    with pytest.raises(LMKitError) as err:
        load_raw_datasets(args(tmp_path, train_files=[str(unterminated)]), 0)
    assert str(err.value) == (
        f"--train_files {unterminated}:2: not valid JSON (Unterminated string starting at column 11) "
        "(see --text_column)"
    )


def test_jsonl_row_without_text_field_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"text": "b"}, {"title": "no text"}, {"text": "d"}])
    with pytest.raises(LMKitError, match=r"--train_files .*rows\.jsonl:3: no 'text' field"):
        load_raw_datasets(args(tmp_path, train_files=[str(bad)]), 0)


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    bad = write(tmp_path / "rows.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(LMKitError, match=r"--validation_files .*rows\.jsonl:3: not valid JSON"):
        load_raw_datasets(args(tmp_path, validation_files=[str(bad)]), 0)


def test_jsonl_non_string_text_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(LMKitError, match=r"rows\.jsonl:2: 'text' is int, not a string"):
        load_raw_datasets(args(tmp_path, train_files=[str(bad)]), 0)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(LMKitError, match=r"--train_files .*a\.parquet: no column 'text' \(columns: body"):
        load_raw_datasets(args(tmp_path, train_files=[str(tmp_path / "a.parquet")]), 0)


# -- cache ------------------------------------------------------------------------------------------------------


def counting(monkeypatch, name: str) -> list[int]:
    calls = []
    original = getattr(data, name)

    def wrapper(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(data, name, wrapper)
    return calls


def test_second_run_loads_the_cache_without_tokenizing(tmp_path, twenty_docs, char_tok, monkeypatch):
    a = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.25, block_size=4)
    first = build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    tokenize_calls = counting(monkeypatch, "_tokenize_batch")
    pack_calls = counting(monkeypatch, "pack_document_batch")

    again = build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    assert tokenize_calls == [] and pack_calls == []
    assert again["train"].cache_files == first["train"].cache_files
    assert blocks(again["train"]) == blocks(first["train"])

    a.block_size = 5  # new blocks from the cached tokens
    build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    assert tokenize_calls == [] and pack_calls != []

    other_tok = build_tokenizer("char", ["abcp0123456789"], vocab_size=None)  # another tokenizer: re-tokenize
    build_lm_datasets(load_raw_datasets(a, 0), other_tok, a)
    assert tokenize_calls != []


def test_overwrite_cache_re_tokenizes(tmp_path, twenty_docs, char_tok, monkeypatch):
    a = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.25, block_size=4)
    build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    calls = counting(monkeypatch, "_tokenize_batch")
    a.overwrite_cache = True
    build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    assert calls != []


def test_main_process_first_wraps_the_work(tmp_path, twenty_docs, char_tok):
    entered = []

    class Guard:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    a = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.25, block_size=4)
    build_lm_datasets(load_raw_datasets(a, 0), char_tok, a, main_process_first=Guard)
    assert len(entered) == 2  # train and validation


# -- streaming --------------------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    paragraphs = ["".join(rng.choice(list("abc\n"), size=rng.integers(1, 40))).strip("\n") or "a" for _ in range(400)]
    return write(tmp_path / "train.txt", "\n\n".join(paragraphs)), write(tmp_path / "val.txt", "abc" * 100)


def test_streaming_yields_the_same_blocks(tmp_path, corpus, char_tok, monkeypatch):
    monkeypatch.setattr(data, "_TOKENIZE_BATCH", 64)  # several batches, so the carry between them is exercised
    train, val = corpus
    kwargs = {"train_files": [str(train)], "validation_files": [str(val)], "block_size": 16}
    a, s = args(tmp_path, **kwargs), args(tmp_path, streaming=True, max_eval_blocks=10, **kwargs)
    lm = build_lm_datasets(load_raw_datasets(a, 0), char_tok, a)
    streamed = build_lm_datasets(load_raw_datasets(s, 0), char_tok, s)
    assert blocks(streamed["train"]) == blocks(lm["train"])
    assert isinstance(streamed["validation"], Dataset)
    assert blocks(streamed["validation"]) == blocks(lm["validation"])[:10]


def test_a_stream_is_never_split_by_rank(tmp_path, corpus, char_tok, monkeypatch):
    # accelerate shares a stream among ranks (rank 0 reads, every rank gets its slice of each global batch), so
    # lmkit hands every rank the whole stream, whatever RANK / WORLD_SIZE say (see share_stream_across_ranks).
    train, val = corpus
    s = args(tmp_path, train_files=[str(train)], validation_files=[str(val)], block_size=16, streaming=True)
    raw = load_raw_datasets(s, 0)
    whole = blocks(build_lm_datasets(raw, char_tok, s)["train"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert blocks(build_lm_datasets(raw, char_tok, s)["train"]) == whole
    with pytest.raises(TypeError, match="must be a torch IterableDataset, got Dataset"):
        data.share_stream_across_ranks(Dataset.from_dict({"input_ids": [[1, 2]]}))


def test_streaming_random_hold_out_partitions_documents(tmp_path, twenty_docs):
    s = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.3, streaming=True)
    raw = load_raw_datasets(s, 0)
    train, val = [r["text"] for r in raw["train"]], [r["text"] for r in raw["validation"]]
    assert val and train
    assert sorted(train + val) == sorted(f"p{i}" for i in range(20))
    assert [r["text"] for r in load_raw_datasets(s, 0)["validation"]] == val


def test_streaming_tail_split_is_an_error(tmp_path, twenty_docs):
    s = args(tmp_path, train_files=[str(twenty_docs)], split_mode="tail", streaming=True)
    with pytest.raises(LMKitError, match="--split_mode tail"):
        load_raw_datasets(s, 0)


def test_no_validation_when_split_is_zero(tmp_path, twenty_docs, char_tok):
    a = args(tmp_path, train_files=[str(twenty_docs)], validation_split=0.0, block_size=4)
    raw = load_raw_datasets(a, 0)
    assert len(raw["train"]) == 20 and len(raw["validation"]) == 0
    lm = build_lm_datasets(raw, char_tok, a)
    assert len(lm["train"]) == (10 * 3 + 10 * 4) // 5  # "pN" + EOS, "pNN" + EOS
    assert len(lm["validation"]) == 0


def test_utf8_offset_is_exact_across_read_chunks(tmp_path):
    good = "é" * 10  # 2 bytes each: multi-byte characters straddle 3-byte chunks without being an error
    assert utf8_error_offset(write(tmp_path / "ok.txt", good), chunk_size=3) is None
    bad = write(tmp_path / "bad.txt", good.encode() + b"\xff" + b"tail")
    assert utf8_error_offset(bad, chunk_size=3) == 20
    truncated = write(tmp_path / "cut.txt", good.encode() + "é".encode()[:1])
    assert utf8_error_offset(truncated, chunk_size=3) == 20
