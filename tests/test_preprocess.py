"""Tokenize once (recipes/preprocess.py, lmkit.preprocess) and ``--tokenized_dataset``; the main process tokenizes
first without a collective timeout (lmkit.distributed.main_process_first)."""

from __future__ import annotations

import itertools
import json
import runpy
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _accelerate import REPO, TINY_PRETRAIN, free_port, run
from datasets import load_from_disk
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import lmkit.data
from lmkit.args import DataArguments, ModelArguments
from lmkit.data import (
    build_lm_datasets,
    build_mixture,
    follow_manifest,
    load_raw_datasets,
    load_sources,
    load_tokenized_dataset,
    read_tokenized_manifest,
    source_texts,
    tokenizer_hash,
    use_tokenized_dataset,
)
from lmkit.errors import LMKitError
from lmkit.packing import DocumentStarts, cut_blocks, pack_document_batch
from lmkit.preprocess import preprocess
from lmkit.tokenizer import build_tokenizer

CORPUS = (REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30000]


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_main_process_tokenizes_longer_than_the_ddp_timeout(tmp_path):
    # Rank 0 tokenizes each split for 7 s (a slowed tokenizer) while every collective times out after 5 s (as
    # --ddp_timeout 5 does on GPUs; see _slow_tokenize.py): rank 1 waits for a marker file, not in a barrier. With
    # transformers' main_process_first (lmkit before it), rank 1's barrier fails after 5 s: "Timed out".
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    two = ("--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()))  # fmt: skip
    start = time.monotonic()
    code, out = run(
        "../tests/_slow_tokenize", str(REPO / "recipes" / "pretrain.py"), *TINY_PRETRAIN, "--train_files",
        str(corpus), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--max_steps",
        "2", "--ddp_timeout", "5", cwd=tmp_path, launcher_args=two, LMKIT_TEST_TOKENIZE_SLEEP="7",
        LMKIT_TEST_PG_TIMEOUT="5", timeout=400,
    )  # fmt: skip
    assert code == 0, out[-4000:]
    assert time.monotonic() - start > 14  # the two slowed splits really ran
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- preprocess: the blocks of build_lm_datasets, a manifest, a folder that appears whole ------------------------


def _data_args(tmp: Path, **kw) -> DataArguments:
    corpus = tmp / "c.txt"
    if not corpus.exists():
        corpus.write_text("to be or\n\nnot to be\n\nthat is\n\nthe question\n")
    kw = {"train_files": [str(corpus)], "tokenizer": "char", "block_size": 7, "validation_split": 0.25,
          "split_mode": "tail", "cache_dir": str(tmp / "cache"), **kw}  # fmt: skip
    return DataArguments(**kw)


# "to be or", EOS (11), "not to be", EOS, "that is", EOS in blocks of 8; validation: "the question" (one block)
TRAIN_BLOCKS = [[10, 7, 0, 2, 3, 0, 7, 8], [11, 6, 7, 10, 0, 10, 7, 0], [2, 3, 11, 10, 4, 1, 10, 0]]
VALIDATION_BLOCKS = [[10, 4, 3, 0, 13, 13, 3, 9]]


def test_preprocess_writes_the_blocks_of_build_lm_datasets(tmp_path):
    data_args = _data_args(tmp_path)
    written, manifest = preprocess(data_args, tmp_path / "out", seed=1)
    assert written
    on_disk = load_from_disk(str(tmp_path / "out"))
    assert list(on_disk["train"]["input_ids"]) == TRAIN_BLOCKS
    assert list(on_disk["validation"]["input_ids"]) == VALIDATION_BLOCKS
    raw = load_raw_datasets(data_args, seed=1)
    reference = build_lm_datasets(raw, build_tokenizer("char", (r["text"] for r in raw["train"])), data_args)
    assert list(reference["train"]["input_ids"]) == TRAIN_BLOCKS
    assert list(reference["validation"]["input_ids"]) == VALIDATION_BLOCKS

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    corpus = tmp_path / "c.txt"
    assert manifest["sources"] == [{
        "name": "train_files", "files": [{"path": str(corpus.resolve()), "bytes": 43,
                                          "mtime_ns": corpus.stat().st_mtime_ns}],
        "text_column": "text", "weight": 1.0,
    }]  # fmt: skip
    assert manifest["splits"] == {"train": {"blocks": 3, "tokens": 24, "shards": 1},
                                  "validation": {"blocks": 1, "tokens": 8, "shards": 1}}  # fmt: skip
    assert (manifest["block_size"], manifest["tokenizer"], manifest["lmkit_version"]) == (7, "char", "0.1.0")
    # the tokenizer beside the blocks is the one that made them
    splits, tokenizer = load_tokenized_dataset(DataArguments(tokenized_dataset=str(tmp_path / "out")))
    assert tokenizer_hash(tokenizer) == manifest["tokenizer_hash"]
    assert tokenizer.convert_ids_to_tokens(TRAIN_BLOCKS[0]) == list("to be or")
    assert list(splits["train"]["input_ids"]) == TRAIN_BLOCKS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "cache", "out"]  # no staging folder left


def test_preprocess_output_dir_up_to_date_refused_overwritten(tmp_path):
    out = tmp_path / "out"
    assert preprocess(_data_args(tmp_path), out, seed=1)[0]
    before = (out / "train" / "data-00000-of-00001.arrow").stat().st_mtime_ns
    assert preprocess(_data_args(tmp_path), out, seed=1) == (False, json.loads((out / "manifest.json").read_text()))
    with pytest.raises(LMKitError, match=f"--output_dir {out}: already holds another tokenized dataset "
                                         r"\(its block_size differs\); pass --overwrite_output_dir"):  # fmt: skip
        preprocess(_data_args(tmp_path, block_size=3), out, seed=1)
    assert (out / "train" / "data-00000-of-00001.arrow").stat().st_mtime_ns == before
    written, manifest = preprocess(_data_args(tmp_path, block_size=3), out, seed=1, overwrite=True)
    assert written and manifest["splits"]["train"]["blocks"] == 6
    assert json.loads((out / "manifest.json").read_text())["block_size"] == 3
    other = tmp_path / "run"
    other.mkdir()
    (other / "model.safetensors").write_text("precious")
    with pytest.raises(LMKitError, match="already holds files that are not a tokenized dataset"):
        preprocess(_data_args(tmp_path), other, seed=1)


def test_preprocess_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk gone"):
        preprocess(_data_args(tmp_path), tmp_path / "out", seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "cache"]


# -- --tokenized_dataset --------------------------------------------------------------------------------------


def test_pretrain_on_a_tokenized_dataset_reads_no_text(tmp_path, monkeypatch):
    preprocess(_data_args(tmp_path, block_size=4, validation_split=0.05), tmp_path / "tok", seed=1)
    (tmp_path / "c.txt").unlink()  # nothing left to read or tokenize

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(lmkit.data, "_tokenize_batch", no_tokenizing)
    pretrain = runpy.run_path(str(REPO / "recipes" / "pretrain.py"))
    metrics = pretrain["main"]([*TINY_PRETRAIN, "--block_size", "4", "--max_position_embeddings", "4", "--max_steps",
                                "2", "--tokenized_dataset", str(tmp_path / "tok"), "--output_dir",
                                str(tmp_path / "out"), "--use_cpu", "true", "--bf16", "false"])  # fmt: skip
    assert metrics["train_runtime"] > 0
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tokenizer_hash(saved) == json.loads((tmp_path / "tok" / "manifest.json").read_text())["tokenizer_hash"]


def test_tokenized_dataset_block_size_follows_the_manifest_unless_explicit(tmp_path):
    preprocess(_data_args(tmp_path), tmp_path / "tok", seed=1)
    data_args = DataArguments(tokenized_dataset=str(tmp_path / "tok"))  # block_size: the default 256
    use_tokenized_dataset(data_args, frozenset())
    assert data_args.block_size == 7
    with pytest.raises(LMKitError, match=r"--block_size 16: --tokenized_dataset .* was made with --block_size 7"):
        use_tokenized_dataset(DataArguments(tokenized_dataset=str(tmp_path / "tok"), block_size=16), {"block_size"})
    with pytest.raises(LMKitError, match="--tokenized_dataset is already tokenized: drop --train_files"):
        DataArguments(tokenized_dataset=str(tmp_path / "tok"), train_files=["x.txt"])
    with pytest.raises(LMKitError, match=r"manifest.json: missing \(not a folder written by recipes/preprocess.py\)"):
        read_tokenized_manifest(tmp_path)
    other = build_tokenizer("char", ["xyz"])
    with pytest.raises(LMKitError, match="tokenized with another tokenizer"):
        load_tokenized_dataset(DataArguments(tokenized_dataset=str(tmp_path / "tok")), tokenizer=other)


# -- packing without a start per document (memory flat as the corpus grows) ------------------------------------


def test_packing_reads_document_starts_from_the_arrow_chunks():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=rng.integers(1, 12)).astype(np.int32) for _ in range(200)]
    column = pa.array([d.tolist() for d in docs], pa.list_(pa.int32()))
    # chunks as datasets writes them, one empty, and sliced ones whose offsets do not start at 0
    cuts = [0, 13, 13, 90, 91, 160, 200]
    chunks = [column.slice(a, b - a) for a, b in itertools.pairwise(cuts)]
    tokens = pa.table({"input_ids": pa.chunked_array(chunks)})
    starts = DocumentStarts(tokens.column("input_ids"))
    lengths = np.array([len(d) for d in docs])
    assert starts.total == lengths.sum()
    assert starts.between(tokens.column("input_ids"), 37, 120).tolist() == np.cumsum([0, *lengths])[37:121].tolist()
    flat = np.concatenate(docs)
    for block_len in (1, 5, 16, 64):
        expected, _ = cut_blocks(flat, block_len)
        for batch in (1, 7, 50, 200):
            got = [pack_document_batch(None, list(range(i, min(i + batch, 200))), tokens, starts, block_len)
                   for i in range(0, 200, batch)]  # fmt: skip
            assert sum((t.column("input_ids").to_pylist() for t in got), []) == expected.tolist()


# -- mixtures: each source packed on its own, the training blocks mixed, validation per source ----------------


def test_a_preprocessed_mixture_trains_on_the_blocks_of_the_raw_text_mixture(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for name, letters, weight in (("books", "abcdefgh ", 0.7), ("code", "(){};=xy ", 0.3)):
        docs = ["".join(rng.choice(list(letters), size=rng.integers(4, 13))) for _ in range(300)]
        (tmp_path / f"{name}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
        entries.append({"name": name, "files": str(tmp_path / f"{name}.txt"), "weight": weight, "sample_by": "line"})
    flags = [*TINY_PRETRAIN, "--datasets", json.dumps(entries), "--validation_split", "0.1", "--max_eval_blocks", "6",
             "--seed", "3", "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--use_cpu", "true",
             "--bf16", "false"]  # fmt: skip
    recipe = runpy.run_path(str(REPO / "recipes" / "preprocess.py"))
    manifest = recipe["main"]([*flags, "--output_dir", str(tmp_path / "tok"), "--cache_dir", str(tmp_path / "c1")])

    # the raw-text run's blocks, as recipes/pretrain.py builds them
    data_args = DataArguments(datasets=[json.dumps(entries)], tokenizer="char", block_size=16, validation_split=0.1,
                              max_eval_blocks=6, cache_dir=str(tmp_path / "c2"))  # fmt: skip
    raws = load_sources(data_args, seed=3)
    raw = build_mixture(raws, build_tokenizer("char", source_texts(raws)), data_args, seed=3)
    tokenized, _ = load_tokenized_dataset(DataArguments(tokenized_dataset=str(tmp_path / "tok")))
    assert list(tokenized["train"]["input_ids"]) == list(raw["train"]["input_ids"])
    assert set(tokenized["validation"]) == set(raw["validation"]) == {"books", "code"}
    for name in ("books", "code"):
        assert list(tokenized["validation"][name]["input_ids"]) == list(raw["validation"][name]["input_ids"])

    assert [(s["name"], s["weight"], s["sample_by"]) for s in manifest["sources"]] == [
        ("books", 0.7, "line"), ("code", 0.3, "line")]  # fmt: skip
    assert manifest["sources"][0]["files"][0]["path"] == str((tmp_path / "books.txt").resolve())
    n_train = len(raw["train"])
    assert manifest["splits"] == {
        "train": {"blocks": n_train, "tokens": n_train * 17, "shards": 1},
        "validation.books": {"blocks": 6, "tokens": 102, "shards": 1},
        "validation.code": {"blocks": 6, "tokens": 102, "shards": 1},
    }
    # books (70% of the blocks, about as many packed as code) runs out first: the mixture ends there
    assert [(m["name"], m["blocks_packed"], m["blocks"], m["tokens"], m["weight_share"]) for m in manifest["mix"]] == [
        ("books", 145, 145, 145 * 17, 0.7), ("code", 143, 64, 64 * 17, 0.3)]  # fmt: skip
    assert [m["share"] for m in manifest["mix"]] == [round(145 / 209, 6), round(64 / 209, 6)] and n_train == 209

    # and a run on it reports each source's loss, as the raw-text run does, with the same values
    pretrain = runpy.run_path(str(REPO / "recipes" / "pretrain.py"))
    on_tokens = pretrain["main"](
        [
            *flags[: flags.index("--datasets")],
            *flags[flags.index("--max_eval_blocks") :],
            "--tokenized_dataset",
            str(tmp_path / "tok"),
            "--output_dir",
            str(tmp_path / "a"),
        ]
    )
    on_text = pretrain["main"]([*flags, "--cache_dir", str(tmp_path / "c3"), "--output_dir", str(tmp_path / "b")])
    evals = {k: v for k, v in on_text.items() if k.startswith("eval_") and k.endswith("_loss")}
    assert set(evals) == {"eval_loss", "eval_books_loss", "eval_code_loss"}
    assert {k: on_tokens[k] for k in evals} == evals


# -- SFT rows and preference pairs: preprocess with the recipe's flags, train on them as on the files ----------------

RUN = ["--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true", "--max_steps", "3",
       "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
       "--validation_split", "0.2", "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from _tiny_checkpoint import make_checkpoint

    path = tmp_path_factory.mktemp("pre-rows") / "base"
    make_checkpoint(path, run_files=False)
    return path


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("recipe", ["finetune", "dpo"])
def test_rows_preprocessed_once_train_as_the_files_do(tmp_path, base, recipe):
    words = ["abc", "bad", "cafe", "dge", "fed", "gab", "ace", "bead", "cab", "deaf"] * 3
    if recipe == "finetune":  # chat rows: the template's markers are added to the tokenizer first
        rows = [{"messages": [{"role": "user", "content": f"r {w}"}, {"role": "assistant", "content": w[::-1]}]}
                for w in words]  # fmt: skip
        flags = ["--config", str(REPO / "recipes" / "configs" / "sft-full.yaml"), "--block_size", "48"]
    else:
        rows = [{"prompt": f"r {w}\n", "chosen": w[::-1], "rejected": w} for w in words]
        flags = ["--config", str(REPO / "recipes" / "configs" / "dpo.yaml"), "--max_length", "48"]
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    common = [*flags, "--model_name_or_path", str(base), "--cache_dir", str(tmp_path / "cache"), *RUN]
    manifest = runpy.run_path(str(REPO / "recipes" / "preprocess.py"))["main"](
        [*common, "--train_files", str(data), "--output_dir", str(tmp_path / "tok")]
    )
    kind = "sft" if recipe == "finetune" else "preference"
    assert manifest["rows"] == kind and manifest["splits"]["train"]["rows"] == 24  # 30 rows, 6 held out
    assert manifest["splits"]["validation"]["rows"] == 6
    main = runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"))["main"]
    main([*common, "--train_files", str(data), "--output_dir", str(tmp_path / "from-files")])
    main([*common, "--tokenized_dataset", str(tmp_path / "tok"), "--output_dir", str(tmp_path / "from-tokens")])
    files, tokens = _losses(tmp_path / "from-files"), _losses(tmp_path / "from-tokens")
    assert len(files) == 3 and tokens == files  # the same rows, the same order: the same losses, bit for bit


def test_rows_made_with_other_settings_or_for_another_recipe_are_one_line(tmp_path, base, capsys):
    rows = [{"prompt": f"q{w}:", "completion": w} for w in "abcdefgh" * 3]
    data = _write_jsonl(tmp_path / "pc.jsonl", rows)
    common = ["--config", str(REPO / "recipes" / "configs" / "sft-full.yaml"), "--model_name_or_path", str(base),
              "--block_size", "32", "--cache_dir", str(tmp_path / "cache"), *RUN]  # fmt: skip
    runpy.run_path(str(REPO / "recipes" / "preprocess.py"))["main"](
        [*common, "--train_files", str(data), "--output_dir", str(tmp_path / "tok")]
    )
    tok = tmp_path / "tok"
    finetune = runpy.run_path(str(REPO / "recipes" / "finetune.py"))["main"]
    dpo = runpy.run_path(str(REPO / "recipes" / "dpo.py"))["main"]
    dpo_flags = ["--config", str(REPO / "recipes" / "configs" / "dpo.yaml"), "--model_name_or_path", str(base), *RUN]
    cases = [
        (finetune, [*common, "--packing", "true"],
         f"--tokenized_dataset {tok}: made with --packing False, this run asks for True; preprocess again with this "
         "run's flags"),
        (dpo, dpo_flags,
         f"--tokenized_dataset {tok}: holds SFT rows; this recipe trains on preference pairs (preprocess with this "
         "recipe's flags)"),
    ]  # fmt: skip
    for i, (main, flags, message) in enumerate(cases):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([*flags, "--tokenized_dataset", str(tok), "--output_dir", str(tmp_path / f"o{i}")])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"lmkit: error: {message}"
        assert not (tmp_path / f"o{i}" / "model.safetensors").exists()


def test_pretrain_takes_the_tokenizer_flags_of_a_tokenized_dataset(tmp_path, capsys):
    """--tokenizer and --vocab_size shaped the dataset: a preset's values follow its manifest (the model's rows are
    the dataset's vocabulary, not the preset's 2048), the same values pass, other ones are one line."""
    data_args = _data_args(tmp_path, block_size=4, validation_split=0.05)
    preprocess(data_args, tmp_path / "tok", seed=1)
    made = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    pretrain = runpy.run_path(str(REPO / "recipes" / "pretrain.py"))
    common = [*TINY_PRETRAIN, "--block_size", "4", "--max_position_embeddings", "4", "--max_steps", "1", "--tokenized_dataset",
              str(tmp_path / "tok"), "--use_cpu", "true", "--bf16", "false"]  # fmt: skip
    assert made["tokenizer"] == "char" and "--tokenizer" in common  # TINY_PRETRAIN's: the same one
    pretrain["main"]([*common, "--output_dir", str(tmp_path / "out")])  # the tiny preset says vocab_size 2048
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tokens = len(AutoTokenizer.from_pretrained(str(tmp_path / "out")))
    assert config["vocab_size"] == 64 * -(-tokens // 64) < 2048
    for flag, value, said in (("--tokenizer", "train", "with --tokenizer char (pass that"),
                              ("--vocab_size", "4096", "without --vocab_size (drop it")):  # fmt: skip
        with pytest.raises(SystemExit):
            pretrain["main"]([*common, flag, value, "--output_dir", str(tmp_path / flag)])
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"lmkit: error: {flag} {value}: --tokenized_dataset {tmp_path / 'tok'} was made {said}, or preprocess again)"
        )
        assert not (tmp_path / flag).exists()

    def follow(manifest, directory, group, name):
        follow_manifest(manifest, directory, group, (name,), frozenset({name}))

    assert made["vocab_size"] is None  # a character tokenizer has no trained size
    with pytest.raises(LMKitError) as raised:
        follow(made, "tok", ModelArguments(vocab_size=4096), "vocab_size")
    assert (
        str(raised.value)
        == "--vocab_size 4096: --tokenized_dataset tok was made without --vocab_size (drop it, or preprocess again)"
    )
    with pytest.raises(LMKitError) as raised:
        follow({**made, "vocab_size": 2048}, "tok", ModelArguments(vocab_size=4096), "vocab_size")
    assert (
        str(raised.value)
        == "--vocab_size 4096: --tokenized_dataset tok was made with --vocab_size 2048 (pass that, or preprocess again)"
    )
    follow({**made, "vocab_size": 2048}, "tok", ModelArguments(vocab_size=2048), "vocab_size")  # the same: passes
