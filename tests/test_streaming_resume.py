"""Streaming resume jumps to the saved stream position: exact, and without re-tokenizing what came before.

A tiny `LMTrainer` trains on `lmkit.data.PackedStream` built by `build_lm_datasets` from a one-document-per-line
corpus (random hold-out on, so `datasets`' filter state is part of the position). ``lmkit.data._tokenize_batch`` is
wrapped to count the documents tokenized; the count when the first resumed step starts is the cost of resuming.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from transformers import TrainerCallback, set_seed

import lmkit.data as data
from lmkit import LMForCausalLM
from lmkit.args import DataArguments, LMTrainingArguments
from lmkit.checkpoint import STREAM_POSITION
from lmkit.collator import CausalLMCollator
from lmkit.data import PackedStream, build_lm_datasets, load_raw_datasets
from lmkit.tokenizer import build_tokenizer
from lmkit.trainer import LMTrainer

BLOCK_SIZE = 16  # rows of 17 tokens
BATCH = 4
MAX_STEPS = 30
STOP = 24  # the interrupted run saves at 12 and 24 and stops after 24
READ_BATCH = 8  # documents per read/tokenize batch (default 1000): small, so the counts resolve to a few documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), size=rng.integers(4, 13))) for _ in range(1500)]
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer("char", [corpus.read_text(encoding="utf-8")], vocab_size=None)


@pytest.fixture
def tokenized(monkeypatch) -> list[int]:
    """Documents tokenized so far (one counter for the whole test)."""
    count = [0]
    real = data._tokenize_batch

    def counting(texts, tokenizer):
        count[0] += len(texts)
        return real(texts, tokenizer)

    monkeypatch.setattr(data, "_tokenize_batch", counting)
    monkeypatch.setattr(data, "_TOKENIZE_BATCH", READ_BATCH)
    return count


def stream(corpus: Path, tokenizer, tmp_path: Path) -> PackedStream:
    args = DataArguments(
        train_files=[str(corpus)], sample_by="line", block_size=BLOCK_SIZE, streaming=True, validation_split=0.1,
        max_eval_blocks=4, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    train = build_lm_datasets(load_raw_datasets(args, seed=0), tokenizer, args)["train"]
    assert isinstance(train, PackedStream)
    return train


def make_trainer(out: Path, dataset: PackedStream, tokenizer, callbacks=(), **overrides) -> LMTrainer:
    defaults = dict(
        output_dir=str(out), report_to="none", use_cpu=True, eval_strategy="no", disable_tqdm=True, seed=7,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=MAX_STEPS, save_steps=12,
        logging_steps=1, learning_rate=3e-3, warmup_steps=3, bf16=False, dataloader_num_workers=0,
    )  # fmt: skip
    set_seed(0)
    # Dropout on: the resumed run must also draw the same random numbers.
    config = tiny_config(
        64 * (len(tokenizer) // 64 + 1), num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.1,
    )  # fmt: skip
    return LMTrainer(
        model=LMForCausalLM(config),
        args=LMTrainingArguments(**{**defaults, **overrides}),
        train_dataset=dataset,
        data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=list(callbacks),
    )


def losses(trainer: LMTrainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def epochs(trainer: LMTrainer) -> dict[int, float]:
    return {e["step"]: e["epoch"] for e in trainer.state.log_history if "loss" in e}


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class CountAtFirstStep(TrainerCallback):
    """Documents tokenized when the first optimizer step of this run starts: what positioning the stream cost."""

    def __init__(self, counter: list[int]):
        self.counter, self.at_first_step = counter, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at_first_step is None:
            self.at_first_step = self.counter[0]


_REFERENCE: dict[int, tuple] = {}


def interrupted_run(tmp_path, corpus, tokenizer, tokenized, accumulation: int) -> tuple[dict, dict, int]:
    """The uninterrupted reference (losses, epochs), and a run stopped after step STOP (docs it tokenized)."""
    if accumulation not in _REFERENCE:
        ref = make_trainer(
            tmp_path / "ref", stream(corpus, tokenizer, tmp_path), tokenizer,
            gradient_accumulation_steps=accumulation, save_strategy="no",
        )  # fmt: skip
        ref.train()
        _REFERENCE[accumulation] = (losses(ref), epochs(ref))
    tokenized[0] = 0
    run = make_trainer(
        tmp_path / "run", stream(corpus, tokenizer, tmp_path), tokenizer, [StopAfter(STOP)],
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    run.train()
    return *_REFERENCE[accumulation], tokenized[0]


# With accumulation 2 under -m long: the default suite stays within 15 minutes on 2 cores
@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.long)])
def test_resume_jumps_to_the_saved_position_and_is_exact(tmp_path, corpus, tokenizer, tokenized, accumulation):
    ref_losses, ref_epochs, docs_before = interrupted_run(tmp_path, corpus, tokenizer, tokenized, accumulation)
    checkpoint = tmp_path / "run" / f"checkpoint-{STOP}"
    position = json.loads((checkpoint / STREAM_POSITION).read_text())
    rows = STOP * accumulation * BATCH  # rows trained on, not the rows the loader read ahead
    assert position["rows"] == position["state"]["blocks"] == rows

    tokenized[0] = 0
    counter = CountAtFirstStep(tokenized)
    resumed = make_trainer(
        tmp_path / "run", stream(corpus, tokenizer, tmp_path), tokenizer, [counter],
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed) == ref_losses
    assert epochs(resumed) == ref_epochs

    # Resuming tokenized the first step's rows, the batch the loader prefetches, and the rest of a read batch:
    # at most (accumulation + 1) x 4 rows x 17 tokens over documents of at least 5 tokens, plus 2 read batches.
    bound = (accumulation + 1) * BATCH * (BLOCK_SIZE + 1) // 5 + 2 * READ_BATCH
    print(f"accumulation {accumulation}: {docs_before} documents tokenized up to step {STOP}, "
          f"{counter.at_first_step} to resume there")  # fmt: skip
    assert counter.at_first_step <= bound < docs_before / 4


def test_checkpoint_without_position_resumes_by_replay(tmp_path, corpus, tokenizer, tokenized, caplog):
    # A checkpoint written before stream positions existed: the stock replay, still exact, and a warning.
    ref_losses, _, docs_before = interrupted_run(tmp_path, corpus, tokenizer, tokenized, 2)
    checkpoint = tmp_path / "run" / f"checkpoint-{STOP}"
    (checkpoint / STREAM_POSITION).unlink()

    tokenized[0] = 0
    counter = CountAtFirstStep(tokenized)
    resumed = make_trainer(
        tmp_path / "run", stream(corpus, tokenizer, tmp_path), tokenizer, [counter], gradient_accumulation_steps=2
    )
    with caplog.at_level(logging.WARNING, logger="lmkit.checkpoint"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed) == ref_losses
    assert any("saved no stream position" in r.getMessage() and "replaying" in r.getMessage() for r in caplog.records)
    assert counter.at_first_step >= docs_before * 0.9  # every document before the checkpoint, tokenized again


@pytest.mark.parametrize("hold_out", [True, False])
def test_position_restores_the_exact_continuation(tmp_path, corpus, tokenizer, tokenized, hold_out):
    # Any cut point (mid-document, mid-read-batch, at a batch end) continues with exactly the remaining blocks,
    # with and without `datasets`' filter (the random hold-out) in the document stream.
    args = DataArguments(
        train_files=[str(corpus)], sample_by="line", block_size=BLOCK_SIZE, streaming=True,
        validation_split=0.1 if hold_out else 0.0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    ds = build_lm_datasets(load_raw_datasets(args, seed=0), tokenizer, args)["train"]
    every = [row["input_ids"] for row in ds]
    for cut in (1, 2, 37, 250, len(every) - 1, len(every)):
        rows = iter(ds)
        for _ in range(cut):
            next(rows)
        position = ds.state_dict()
        assert position == ds.state_dict_after(cut) and position["blocks"] == cut
        ds.load_state_dict(json.loads(json.dumps(position)))  # as written to and read from a checkpoint
        assert [row["input_ids"] for row in ds] == every[cut:], cut
