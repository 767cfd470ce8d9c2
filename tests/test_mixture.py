"""Weighted mixtures (lmkit.mixture): the source spec, the realized mix, per-source evaluation and exact resume.

Sources here are literal: block ``[s * 10_000 + i]`` is block ``i`` of source ``s``, so a mixed sequence shows which
source and which block each row came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from test_streaming_resume import BATCH, StopAfter, losses, make_trainer

from lmkit.args import DataArguments, parse_args
from lmkit.checkpoint import STREAM_POSITION
from lmkit.data import build_mixture, load_sources, source_texts
from lmkit.errors import LMKitError
from lmkit.mixture import MixtureStream, Source, mix_blocks, parse_sources, source_choices
from lmkit.tokenizer import build_tokenizer

WEIGHTS = {"books": 0.7, "code": 0.3}
SOURCES = [Source(name=name, weight=w, files=("x.txt",)) for name, w in WEIGHTS.items()]


def literal_blocks(source: int, n: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[source * 10_000 + i] for i in range(n)]})


class ListStream:
    """A resumable block stream over a list (the `ResumableData` protocol), as `PackedStream` behaves."""

    def __init__(self, blocks: list[list[int]]):
        self.blocks, self.start, self.done = blocks, 0, 0

    def state_dict(self):
        return {"blocks": self.done}

    def load_state_dict(self, state):
        self.start = state["blocks"]

    def state_dict_after(self, n):
        return {"blocks": n} if n <= self.done else None

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.blocks)):
            self.done = i + 1
            yield {"input_ids": self.blocks[i]}


def list_streams(n: int = 2000) -> dict[str, ListStream]:
    return {s.name: ListStream([[i * 10_000 + b] for b in range(n)]) for i, s in enumerate(SOURCES)}


# -- spec ---------------------------------------------------------------------------------------------------------


def test_yaml_list_of_sources_and_plain_run_is_one_source(tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text(
        "datasets:\n"
        "  - {name: books, files: 'corpus/books/*.txt', weight: 0.7}\n"
        "  - {name: code, dataset_name: some/dataset, text_column: content, split: train, weight: 0.3}\n"
    )
    _, data_args, _ = parse_args(argv=["--config", str(config)])
    assert parse_sources(data_args) == [
        Source(name="books", weight=0.7, files=("corpus/books/*.txt",)),
        Source(name="code", weight=0.3, dataset_name="some/dataset", text_column="content"),
    ]
    cli = json.dumps([{"name": "a", "files": ["x.txt"], "weight": 2}])
    _, data_args, _ = parse_args(argv=["--datasets", cli])
    assert parse_sources(data_args) == [Source(name="a", weight=2.0, files=("x.txt",))]
    plain = DataArguments(train_files=["a.txt"], sample_by="line")
    assert parse_sources(plain) == [Source(name="train", files=("a.txt",), sample_by="line", implicit=True)]


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"name": "a", "files": "x", "weight": -1}], "--datasets a.weight must be a positive number, got -1"),
        ([{"name": "a", "files": "x", "weight": 0}, {"name": "b", "files": "x", "weight": 1}], "a.weight must be"),
        ([{"name": "a", "files": "x", "weight": "lots"}], "--datasets a.weight must be a positive number, got 'lots'"),
        ([{"name": "a", "files": "x", "weight": 0}, {"name": "b", "files": "y", "weight": 0.0}],
         "--datasets: the weights sum to zero (0, 0.0)"),
        ([{"name": "a", "weight": 1}], "--datasets a: give exactly one of files and dataset_name"),
        ([{"name": "a", "files": "x"}, {"name": "a", "files": "y"}], "--datasets a: two sources are named 'a'"),
        ([{"name": "a", "files": "x", "wieght": 1}], "--datasets a: unknown field(s) wieght"),
    ],
)  # fmt: skip
def test_bad_sources_name_the_source_and_field(entries, message):
    with pytest.raises(LMKitError) as err:
        DataArguments(datasets=[json.dumps(entries)])
    assert message in str(err.value)


def test_datasets_with_train_files_is_refused():
    with pytest.raises(LMKitError, match="--datasets cannot be combined with --train_files"):
        DataArguments(datasets=['{"name": "a", "files": "x"}'], train_files=["x"])


# -- the realized mix ---------------------------------------------------------------------------------------------


def test_map_style_mix_matches_the_weights():
    mixed, counts = mix_blocks({"books": literal_blocks(0, 1000), "code": literal_blocks(1, 1000)}, SOURCES, seed=0)
    rows = [r[0] for r in mixed["input_ids"]]
    assert [r // 10_000 for r in rows[:10]] == [1, 0, 0, 0, 1, 0, 1, 0, 1, 1]
    assert rows[:4] == [10_000, 0, 1, 2]  # each source's blocks in order, none repeated
    assert sum(r < 10_000 for r in rows[:1000]) == 700  # within ±2 points: exactly, for every 100 blocks
    # first_exhausted: books runs out first; nothing after it, every block at most once
    assert counts == {"books": 1000, "code": sum(r >= 10_000 for r in rows)} and len(set(rows)) == len(rows)
    assert rows[-1] == 999


def test_stream_mix_matches_the_weights_and_resumes_at_any_block():
    stream = MixtureStream(list_streams(), SOURCES, seed=0)
    every = [row["input_ids"][0] for row in stream]
    assert [r // 10_000 for r in every[:10]] == [1, 0, 0, 0, 1, 0, 1, 0, 1, 1]  # the order of the map-style mix
    assert sum(r < 10_000 for r in every[:1000]) == 700
    assert every.count(1999) == 1 and every[-1] == 1999  # stops when books ends
    for cut in (1, 37, 99, 100, 1024, 2500):
        rows = iter(stream)
        for _ in range(cut):
            next(rows)
        state = json.loads(json.dumps(stream.state_dict_after(cut)))
        fresh = MixtureStream(list_streams(), SOURCES, seed=0)
        fresh.load_state_dict(state)
        assert [row["input_ids"][0] for row in fresh] == every[cut:], cut


def test_every_prefix_stays_near_the_weights():
    weights = [0.5, 0.3, 0.15, 0.05]
    order = source_choices(weights, seed=3, start=0, count=10_000)
    for start in (0, 1, 99, 100, 137, 4321):  # any block's source without drawing the ones before
        assert (source_choices(weights, seed=3, start=start, count=500) == order[start : start + 500]).all()
    worst = max(abs(np.bincount(order[:n], minlength=4) / n - weights).max() for n in range(1000, 10_001))
    assert worst < 0.02  # i.i.d. draws (interleave_datasets) miss by 1.4 points (1 s.d.) at n = 1,000, p = 0.7


# -- recipes' data: per-source packing, evaluation, exact resume --------------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mix")
    paths = []
    for name, letters in (("books", "abcdefgh "), ("code", "(){};=xy ")):
        docs = ["".join(rng.choice(list(letters), size=rng.integers(4, 13))) for _ in range(800)]
        paths.append(root / f"{name}.txt")
        paths[-1].write_text("\n".join(docs) + "\n", encoding="utf-8")
    return paths[0], paths[1]


def mixture(corpora, tmp_path, streaming: bool):
    entries = [
        {"name": "books", "files": str(corpora[0]), "weight": 0.7, "sample_by": "line"},
        {"name": "code", "files": str(corpora[1]), "weight": 0.3, "sample_by": "line"},
    ]
    args = DataArguments(
        datasets=[json.dumps(entries)], block_size=16, streaming=streaming, validation_split=0.1, max_eval_blocks=4,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    raws = load_sources(args, seed=0)
    tokenizer = build_tokenizer("char", list(source_texts(raws)), vocab_size=None)
    return build_mixture(raws, tokenizer, args, seed=0), tokenizer


def test_eval_reports_each_source_and_the_overall_loss(corpora, tmp_path, caplog):
    with caplog.at_level("INFO", logger="lmkit.mixture"):
        data, tokenizer = mixture(corpora, tmp_path, streaming=False)
    assert set(data["validation"]) == {"books", "code"}
    assert any("Mixture of 2 sources: books" in r.getMessage() for r in caplog.records)
    trainer = make_trainer(tmp_path / "eval", data["train"], tokenizer, max_steps=1, save_strategy="no")
    trainer.eval_dataset = data["validation"]
    metrics = trainer.evaluate()
    books, code = metrics["eval_books_loss"], metrics["eval_code_loss"]
    assert books != code
    assert metrics["eval_loss"] == pytest.approx((books * 4 + code * 4) / 8, abs=0)
    single = trainer.evaluate(data["validation"]["books"])  # one eval set: stock keys only
    assert single["eval_loss"] == books and not any(k.startswith("eval_books") for k in single)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_is_exact_map_style_and_streaming(corpora, tmp_path, streaming):
    overrides = dict(max_steps=12, save_steps=6)
    data, tokenizer = mixture(corpora, tmp_path, streaming)
    ref = make_trainer(tmp_path / "ref", data["train"], tokenizer, save_strategy="no", **overrides)
    ref.train()
    data, _ = mixture(corpora, tmp_path, streaming)
    run = make_trainer(tmp_path / "run", data["train"], tokenizer, [StopAfter(6)], **overrides)
    run.train()
    checkpoint = tmp_path / "run" / "checkpoint-6"
    if streaming:
        position = json.loads((checkpoint / STREAM_POSITION).read_text())
        assert position["rows"] == position["state"]["blocks"] == 6 * BATCH
        assert sum(position["state"]["taken"]) == 6 * BATCH
        assert [s["blocks"] for s in position["state"]["sources"].values()] == position["state"]["taken"]
    data, _ = mixture(corpora, tmp_path, streaming)
    resumed = make_trainer(tmp_path / "run", data["train"], tokenizer, **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(losses(ref)) == 12
    assert losses(resumed) == losses(ref)  # steps 1-6 from the checkpoint's state, 7-12 trained after resuming
