"""lmkit.checkpoint.Checkpointer: data state found by protocol, write errors classified by errno, rotation once,
what a complete checkpoint holds, and rotation that deletes nothing else.

The whole-run behaviours (exact resume, kill -9 during a save, auto-resume skipping broken checkpoints) are in
test_reliability.py, test_streaming_resume.py and test_soak.py; these tests pin the component's own rules.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers.trainer
from conftest import cpu_args, tiny_model
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import lmkit.checkpoint
from lmkit.args import LMTrainingArguments
from lmkit.checkpoint import (
    STREAM_POSITION,
    ResumableData,
    check_checkpoint_matches_model,
    check_resume_checkpoint,
    checkpoint_problem,
    complete_checkpoints,
    write_errno,
)
from lmkit.collator import CausalLMCollator
from lmkit.errors import LMKitError
from lmkit.runtime import check_output_dir, resolve_resume_checkpoint
from lmkit.trainer import LMTrainer

VOCAB = 97
ROWS = [[(7 * i + j) % (VOCAB - 1) + 1 for j in range(9)] for i in range(64)]  # 64 rows of 9 tokens, no padding


class ToyStream(torch.utils.data.IterableDataset):
    """Rows of `ROWS` in order; its whole state is the index of the next row: ``{"next": n}``."""

    def __init__(self) -> None:
        self.start, self.loaded, self.first_rows = 0, [], []

    def __iter__(self):
        self.first_rows.append(self.start)
        for i in range(self.start, len(ROWS)):
            self.next = i + 1
            yield {"input_ids": ROWS[i]}

    def state_dict(self) -> dict[str, Any]:
        return {"next": getattr(self, "next", self.start)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)
        self.start = state["next"]

    def state_dict_after(self, rows: int) -> dict[str, Any] | None:
        return {"next": rows}  # every row is one of ROWS: the state after n rows is always known


class StateWithoutHistory(ToyStream):
    """`state_dict` / `load_state_dict` alone (as `datasets.IterableDataset`): its state is ahead of training."""

    state_dict_after = None


def make_trainer(
    out: Path, data: Any, eval_dataset: Any = None, model: torch.nn.Module | None = None, **overrides: Any
) -> LMTrainer:
    defaults = dict(
        per_device_train_batch_size=2, max_steps=6, save_strategy="steps", save_steps=2, learning_rate=1e-2, seed=3,
        logging_steps=1, dataloader_num_workers=0,
    )  # fmt: skip
    args = cpu_args(out, **{**defaults, **overrides})
    return LMTrainer(
        model=model if model is not None else tiny_model(seed=1),
        args=args,
        train_dataset=data,
        eval_dataset=eval_dataset,
        data_collator=CausalLMCollator(0),
    )


def losses(trainer: LMTrainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


# -- the data state protocol ---------------------------------------------------------------------------------


def test_data_state_is_found_by_its_methods_and_resumes_there(tmp_path):
    assert isinstance(ToyStream(), ResumableData) and not isinstance(StateWithoutHistory(), ResumableData)
    reference = make_trainer(tmp_path / "ref", ToyStream(), save_strategy="no")
    reference.train()

    make_trainer(tmp_path / "run", ToyStream()).train()
    # 2 rows per step: the state after the rows trained on, not after the rows the loader read ahead
    for step in (2, 4, 6):
        saved = json.loads((tmp_path / "run" / f"checkpoint-{step}" / STREAM_POSITION).read_text())
        assert saved == {"rows": 2 * step, "state": {"next": 2 * step}}

    data = ToyStream()
    resumed = make_trainer(tmp_path / "run", data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert data.loaded == [{"next": 8}] and data.first_rows == [8]  # no replay: iteration began at row 8
    assert losses(resumed) == losses(reference)
    assert resumed.args.ignore_data_skip is False  # set only while `train` ran


def test_data_without_a_trained_position_saves_none(tmp_path):
    make_trainer(tmp_path, StateWithoutHistory(), max_steps=2).train()
    assert not (tmp_path / "checkpoint-2" / STREAM_POSITION).exists()


# -- write errors, by errno ----------------------------------------------------------------------------------


def with_file_size_limit(check: Callable[[], None]) -> None:
    """Run `check` in a forked child whose files may not grow past 1024 bytes (EFBIG): a real failing write.

    Only the child carries the limit: set in pytest's own process it also fails pytest's writes whenever its output
    goes to a file (as in CI, where the report is a file already past 1 KiB) and the capture files of the test.
    The child's stdout/stderr go to /dev/null, which the limit does not cover; its failure comes back as text.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's pool does not survive a fork
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ ends the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            check()
            status = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        failure = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, failure


def test_errno_of_oserrors_and_their_wrappers(tmp_path):
    assert write_errno(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as err:
            raise RuntimeError("saving failed") from err
    except RuntimeError as wrapped:
        assert write_errno(wrapped, tmp_path) == errno.EDQUOT
    assert write_errno(ValueError("not a storage problem"), tmp_path) is None  # the probe write succeeds
    assert list(tmp_path.iterdir()) == []  # and leaves nothing behind


def test_errno_of_real_failed_writes(tmp_path):
    with_file_size_limit(lambda: check_errno_of_real_failed_writes(tmp_path))


def check_errno_of_real_failed_writes(tmp_path: Path) -> None:
    big = {"w": torch.zeros(1024)}  # 4 KiB of data
    with pytest.raises(Exception) as safetensors_error:  # SafetensorError("... (os error 27)"), no OSError
        save_file(big, tmp_path / "w.safetensors")
    assert not isinstance(safetensors_error.value, OSError)
    assert write_errno(safetensors_error.value, tmp_path) == errno.EFBIG
    with pytest.raises(RuntimeError) as torch_error:  # torch.save's C++ writer keeps no errno: the probe finds it
        torch.save(big, tmp_path / "w.pt")
    assert write_errno(torch_error.value, tmp_path) == errno.EFBIG


def test_real_failed_write_ends_in_one_message(tmp_path):
    with_file_size_limit(lambda: check_real_failed_write_ends_in_one_message(tmp_path))


def check_real_failed_write_ends_in_one_message(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, Dataset.from_dict({"input_ids": ROWS}), max_steps=2)
    with pytest.raises(LMKitError, match=r"could not write checkpoint-2 \(File too large\).*no complete checkpoint"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == []


def test_torch_save_without_errno_on_a_full_disk(tmp_path, monkeypatch):
    make_trainer(tmp_path, Dataset.from_dict({"input_ids": ROWS}), max_steps=2).train()

    def full_disk(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # as torch 2

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torch.save", full_disk)
    monkeypatch.setattr("lmkit.checkpoint.os.write", no_space)  # the probe write sees the full disk
    with pytest.raises(LMKitError, match=r"could not write checkpoint-4 \(no space left on device\).*checkpoint-2$"):
        make_trainer(tmp_path, Dataset.from_dict({"input_ids": ROWS}), max_steps=4).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2")
        )


# -- rotation ------------------------------------------------------------------------------------------------


def test_rotation_runs_once_per_save_and_keeps_newest_and_best(tmp_path, monkeypatch):
    calls: dict[str, list] = {"stock": [], "lmkit": []}
    for name, owner in (("stock", transformers.trainer), ("lmkit", lmkit.checkpoint)):
        real = owner.rotate_checkpoints

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name].append(kw["save_total_limit"])
            return _real(*a, **kw)

        monkeypatch.setattr(owner, "rotate_checkpoints", counted)
    trainer = make_trainer(
        tmp_path, Dataset.from_dict({"input_ids": ROWS}), max_steps=8, save_total_limit=1, eval_strategy="steps",
        eval_steps=2, metric_for_best_model="loss", greater_is_better=True,
        eval_dataset=Dataset.from_dict({"input_ids": ROWS[:8]}),
    )  # fmt: skip
    trainer.train()
    assert calls == {"stock": [None] * 4, "lmkit": [1] * 4}  # the Trainer's own rotation does nothing
    # the highest eval loss is the first one's: best and newest both stay, the end of training deletes neither
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert trainer.args.save_total_limit == 1  # given back after `train`, and as the user gave it in the checkpoint
    saved_args = torch.load(tmp_path / "checkpoint-8" / "training_args.bin", weights_only=False)
    assert saved_args.save_total_limit == 1


def test_rotation_never_deletes_a_folder_that_is_not_a_checkpoint(tmp_path, caplog):
    foreign = tmp_path / "checkpoint-1"  # the user's own folder, named like a checkpoint
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        make_trainer(tmp_path, Dataset.from_dict({"input_ids": ROWS}), max_steps=6, save_total_limit=1).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-6"]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"
    # said once, not at each of the three saves
    assert [m for m in caplog.messages if "--save_total_limit" in m] == [
        f"--save_total_limit: leaving {foreign} alone: incomplete checkpoint (no trainer_state.json)"
    ]


def test_rotation_of_model_only_checkpoints(tmp_path):
    # --save_only_model writes no optimizer state: not resumable, but these are the run's own checkpoints to rotate
    make_trainer(tmp_path, Dataset.from_dict({"input_ids": ROWS}), save_only_model=True, save_total_limit=1).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert not (tmp_path / "checkpoint-6" / "optimizer.pt").exists()


# -- what a complete checkpoint holds ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("run")
    make_trainer(out, Dataset.from_dict({"input_ids": ROWS}), max_steps=4).train()
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


@pytest.mark.parametrize(
    "state_file, why",
    [
        ("optimizer.pt", "incomplete checkpoint (no optimizer.pt, the optimizer state)"),
        ("scheduler.pt", "incomplete checkpoint (no scheduler.pt, the learning-rate schedule's state)"),
    ],
)
def test_checkpoint_without_optimizer_or_scheduler_state_is_incomplete(run_dir, tmp_path, caplog, state_file, why):
    # The Trainer would resume it with a fresh optimizer and schedule (warmup again): a silently different run.
    out = copy_run(run_dir, tmp_path)
    (out / "checkpoint-4" / state_file).unlink()
    args = LMTrainingArguments(output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-4"), report_to="none")
    with pytest.raises(LMKitError) as err:
        resolve_resume_checkpoint(args)
    assert str(err.value) == f"--resume_from_checkpoint {out / 'checkpoint-4'}: {why}"

    args.resume_from_checkpoint = "auto"
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        check_output_dir(args)  # a recipe's order (prepare_run): the dir, then the resume; one line between them
        assert resolve_resume_checkpoint(args) == str(out / "checkpoint-2")
    assert caplog.messages == [f"skipping {out / 'checkpoint-4'}: {why}"]
    resumed = make_trainer(out, Dataset.from_dict({"input_ids": ROWS}), max_steps=4)
    with caplog.at_level(logging.INFO, logger="lmkit"):
        resumed.train(resume_from_checkpoint=True)  # the Trainer's own pick skips it too
    # steps 1-2 come from checkpoint-2's history, 3-4 are trained again: the same losses, schedule and optimizer
    reference = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert losses(resumed) == {e["step"]: e["loss"] for e in reference if "loss" in e}
    rates = [e["learning_rate"] for e in resumed.state.log_history if "loss" in e]
    assert rates == pytest.approx([0, 0.01, 0.0075, 0.0025])  # one warmup, then the decay: no restart at step 3


@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_damaged_resume_state_is_one_line_and_auto_skips_it(run_dir, tmp_path, state_file):
    out = copy_run(run_dir, tmp_path)
    os.truncate(out / "checkpoint-4" / state_file, 1000)  # a copy cut short
    with pytest.raises(LMKitError) as err:
        check_resume_checkpoint(out / "checkpoint-4")
    assert str(err.value) == (
        f"--resume_from_checkpoint {out / 'checkpoint-4'}: {state_file} is damaged (not a readable torch file)"
    )
    assert complete_checkpoints(out) == [out / "checkpoint-2"]


def test_optimizer_state_where_fsdp_deepspeed_and_save_only_model_keep_it(run_dir, tmp_path):
    # As Trainer._load_optimizer_and_scheduler looks for it (transformers 5); the shard folders' loaders check them
    ckpt = copy_run(run_dir, tmp_path) / "checkpoint-4"
    (ckpt / "optimizer.pt").rename(ckpt / "optimizer.bin")  # FSDP, FULL_STATE_DICT
    assert checkpoint_problem(ckpt) is None
    (ckpt / "optimizer.bin").unlink()
    (ckpt / "optimizer_0").mkdir()  # FSDP, SHARDED_STATE_DICT
    assert checkpoint_problem(ckpt) is None
    (ckpt / "scheduler.pt").unlink()
    assert checkpoint_problem(ckpt) == "incomplete checkpoint (no scheduler.pt, the learning-rate schedule's state)"
    shutil.rmtree(ckpt / "optimizer_0")
    assert checkpoint_problem(ckpt, optimizer_state=False) is None  # --save_only_model: weights only
    (ckpt / "global_step4").mkdir()  # DeepSpeed: optimizer and (its own) scheduler in there
    (ckpt / "model.safetensors").unlink()  # ZeRO-3 without consolidated weights
    assert checkpoint_problem(ckpt) is None


def test_full_model_run_refuses_a_lora_adapter_checkpoint(tmp_path):
    data = Dataset.from_dict({"input_ids": ROWS})
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora = get_peft_model(tiny_model(seed=1), config)
    make_trainer(tmp_path / "lora", data, model=lora, max_steps=2).train()
    ckpt = tmp_path / "lora" / "checkpoint-2"
    assert checkpoint_problem(ckpt) is None and (ckpt / "adapter_model.safetensors").is_file()
    check_checkpoint_matches_model(ckpt, lora)  # the adapter's own run resumes it
    with pytest.raises(LMKitError) as err:
        make_trainer(tmp_path / "full", data, max_steps=4).train(resume_from_checkpoint=str(ckpt))
    assert str(err.value) == (
        f"--resume_from_checkpoint {ckpt}: the checkpoint holds a LoRA adapter (adapter_model.safetensors), not the "
        "full model this run trains, so it cannot resume from it (resume it with recipes/finetune.py --use_lora true)"
    )
    assert not (tmp_path / "full").exists() or not list((tmp_path / "full").glob("checkpoint-*"))
