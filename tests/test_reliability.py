"""lmkit.checkpoint + lmkit.reliability: exact resume, crash-safe checkpoints, SIGTERM/SIGINT, non-finite guard, output safety, secrets.

Most tests drive `LMTrainer` in-process on a 2-layer model over random token blocks (a run takes ~1 s); a process
"killed" mid-save is simulated by raising a `BaseException` that no clean-up code catches, which leaves the disk
exactly as SIGKILL would. The recipe itself (subprocesses, real signals) is covered at the end and in test_soak.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed

from lmkit import LMConfig, LMForCausalLM, checkpoint
from lmkit.args import LMTrainingArguments
from lmkit.collator import CausalLMCollator
from lmkit.errors import LMKitError
from lmkit.runtime import check_output_dir, resolve_resume_checkpoint
from lmkit.trainer import LMTrainer

REPO = Path(__file__).resolve().parent.parent
VOCAB = 64
N_BLOCKS = 96  # 96 blocks / (4 x 2 accumulation) = 12 optimizer steps per epoch


def blocks(n: int = N_BLOCKS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, 17), generator=g).tolist()


def map_dataset() -> Dataset:
    return Dataset.from_dict({"input_ids": blocks()})


def _stream(rows):
    yield from ({"input_ids": r} for r in rows)


def stream_dataset() -> IterableDataset:
    return IterableDataset.from_generator(_stream, gen_kwargs={"rows": blocks(400)})


def reliability_config(**overrides) -> LMConfig:
    """The shared tiny model with 2 query heads sharing 1 key/value head and 32 positions (17-token blocks)."""
    return tiny_config(VOCAB, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **overrides)


def make_trainer(out: Path, dataset=None, callbacks=(), eval_dataset=None, **overrides) -> LMTrainer:
    defaults = dict(
        output_dir=str(out), report_to="none", use_cpu=True, eval_strategy="no", disable_tqdm=True, seed=7,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=20, save_steps=5, logging_steps=1,
        learning_rate=3e-3, warmup_steps=3, save_total_limit=None, bf16=False, dataloader_num_workers=0,
    )  # fmt: skip
    args = LMTrainingArguments(**{**defaults, **overrides})
    set_seed(0)
    return LMTrainer(
        model=LMForCausalLM(reliability_config()),
        args=args,
        train_dataset=map_dataset() if dataset is None else dataset,
        eval_dataset=eval_dataset,
        data_collator=CausalLMCollator(pad_token_id=0),
        callbacks=list(callbacks),
    )


def losses(trainer: LMTrainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def weights(trainer: LMTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class SignalAt(TrainerCallback):
    """Sends ``signum`` to this process during optimizer step ``step`` (before its backward pass ends)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


_REFERENCE: dict[str, tuple] = {}


def reference(tmp_path_factory, kind: str = "map"):
    """One uninterrupted run per dataset kind, shared by the tests (losses per step, final weights)."""
    if kind not in _REFERENCE:
        out = tmp_path_factory.mktemp(f"ref-{kind}")
        trainer = make_trainer(out, stream_dataset() if kind == "stream" else None, save_strategy="no")
        trainer.train()
        _REFERENCE[kind] = (losses(trainer), weights(trainer))
    return _REFERENCE[kind]


# -- 1 + 3: exact resume after SIGTERM / SIGINT ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, signum, stop_step",
    [("map", signal.SIGTERM, 13), ("map", signal.SIGINT, 7), ("stream", signal.SIGTERM, 11)],
)
def test_signal_checkpoints_and_resume_is_exact(tmp_path, tmp_path_factory, capfd, kind, signum, stop_step):
    # Step 13 is the first step of epoch 2 (12 steps per epoch) and not a save step: the checkpoint comes from the
    # signal. Losses and weights after resuming with `auto` equal the uninterrupted run's bit for bit.
    ref_losses, ref_weights = reference(tmp_path_factory, kind)
    data = (lambda: stream_dataset()) if kind == "stream" else (lambda: None)
    trainer = make_trainer(tmp_path, data(), callbacks=[SignalAt(stop_step, signum)])
    with pytest.raises(SystemExit) as exit_info:
        trainer.train()
    assert exit_info.value.code == 128 + signum
    message = capfd.readouterr().err.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(signum).name} at step {stop_step}/20" in message
    assert "--resume_from_checkpoint auto" in message
    assert (tmp_path / f"checkpoint-{stop_step}" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    args = trainer.args
    args.resume_from_checkpoint = "auto"
    resume_from = resolve_resume_checkpoint(args)
    assert resume_from == str(tmp_path / f"checkpoint-{stop_step}")
    resumed = make_trainer(tmp_path, data())
    resumed.train(resume_from_checkpoint=resume_from)
    assert losses(resumed) == ref_losses
    assert_same_weights(weights(resumed), ref_weights)


def grouped_rows() -> Dataset:
    """Rows of 3-17 tokens, for length-grouped batches."""
    lengths = torch.randint(3, 18, (N_BLOCKS,), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": [row[:n] for row, n in zip(blocks(), lengths, strict=True)]})


def test_group_by_length_resume_is_exact(tmp_path, tmp_path_factory):
    # Step 16 is mid-epoch 2: the resumed run must rebuild epoch 2's length-grouped order (drawn from the seed and
    # the epoch, `SeededLengthGroupedSampler`), not draw a new one from the RNG state restored at step 16.
    grouped = {"train_sampling_strategy": "group_by_length"}
    ref = make_trainer(tmp_path_factory.mktemp("ref-grouped"), grouped_rows(), save_strategy="no", **grouped)
    ref.train()
    trainer = make_trainer(tmp_path, grouped_rows(), callbacks=[SignalAt(16)], **grouped)
    with pytest.raises(SystemExit):
        trainer.train()
    resumed = make_trainer(tmp_path, grouped_rows(), **grouped)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-16"))
    assert losses(resumed) == losses(ref)
    assert_same_weights(weights(resumed), weights(ref))


class FailAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("a bug in a callback")


def test_a_run_that_raises_puts_the_signal_handlers_back(tmp_path):
    # `on_train_end` never runs when training raises; a handler left installed would turn the next Ctrl-C in
    # this process (a notebook, a test session) into a flag nothing reads.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError, match="a bug in a callback"):
        make_trainer(tmp_path, callbacks=[FailAt()], save_strategy="no").train()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_resume_from_every_checkpoint_path_is_exact(tmp_path, tmp_path_factory):
    # Resuming from an explicit path at several points (mid-epoch, epoch boundary, late) gives the same run.
    ref_losses, ref_weights = reference(tmp_path_factory)
    make_trainer(tmp_path / "run").train()
    for step in (5, 10, 15):
        out = tmp_path / f"from-{step}"
        resumed = make_trainer(out)
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{step}"))
        assert losses(resumed) == ref_losses, step
        assert_same_weights(weights(resumed), ref_weights)


def test_resume_skips_batches_without_reading_them(tmp_path):
    # Map-style data: the Trainer's skip_first_batches skips *indices* (accelerate's SkipBatchSampler), so resuming
    # at step k never loads the k x accumulation x batch rows it passes over.
    make_trainer(tmp_path / "run", max_steps=10).train()
    reads = []

    class Counting(Dataset):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    counting = Counting(map_dataset().data)
    resumed = make_trainer(tmp_path / "resumed", counting, max_steps=11)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-10"))
    n_rows = sum(len(k) if isinstance(k, list) else 1 for k in reads)
    # One optimizer step reads 2 micro-batches of 4 rows (plus one batch the loader prefetches), not the 80 rows
    # that come before it.
    assert n_rows <= 3 * 4


# -- 2: crash-safe checkpoints ---------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Ends the run after optimizer step ``step`` (a save step), as if the machine went away there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Killed(BaseException):
    """Stands in for SIGKILL: no `except Exception` clean-up runs, whatever was on disk stays there."""


WRITE_POINTS = [
    ("safetensors.torch", "save_file"),
    ("torch", "save"),
    ("transformers.trainer_callback.TrainerState", "save_to_json"),
    ("lmkit.checkpoint", "_fsync_tree"),
    ("lmkit.checkpoint.os", "rename"),
    ("lmkit.checkpoint", "rotate_checkpoints"),
]


def _kill_at(monkeypatch, n: int, after: bool) -> None:
    """Patch every write point of a save; the n-th call (counting all of them) dies before or after running."""
    calls = [0]
    import importlib

    for module_path, name in WRITE_POINTS:
        try:
            owner = importlib.import_module(module_path)
        except ModuleNotFoundError:
            module, _, cls = module_path.rpartition(".")
            owner = getattr(importlib.import_module(module), cls)
        real = getattr(owner, name)

        def wrapped(*a, _real=real, **kw):
            calls[0] += 1
            if calls[0] == n and not after:
                raise Killed
            result = _real(*a, **kw)
            if calls[0] == n and after:
                raise Killed
            return result

        monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("n", range(1, 12))
def test_kill_during_save_never_exposes_a_broken_checkpoint(tmp_path, tmp_path_factory, monkeypatch, n):
    # Die at the n-th write of the save at step 10 (before or after it; the save at step 5 went through), then
    # resume with `auto`: the newest visible checkpoint always loads, and the run ends exactly like the reference.
    ref_losses, ref_weights = reference(tmp_path_factory)
    make_trainer(tmp_path, callbacks=[StopAt(5)]).train()  # checkpoint-5, complete
    with monkeypatch.context() as m:
        _kill_at(m, (n + 1) // 2, after=n % 2 == 0)
        with pytest.raises(Killed):
            make_trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    visible = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    for name in visible:
        assert checkpoint.checkpoint_problem(tmp_path / name) is None, name
    args = LMTrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="auto", report_to="none")
    resume_from = resolve_resume_checkpoint(args)
    assert resume_from in (str(tmp_path / "checkpoint-5"), str(tmp_path / "checkpoint-10"))
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=resume_from)
    assert not list(tmp_path.glob(".tmp-*"))  # the stale staging folder was cleared
    assert losses(resumed) == ref_losses
    assert_same_weights(weights(resumed), ref_weights)


def test_auto_skips_incomplete_and_corrupted_checkpoints(tmp_path):
    make_trainer(tmp_path, max_steps=10).train()
    newest = tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-15").mkdir()  # e.g. written by a tool without staging, killed early
    (tmp_path / "checkpoint-15" / "model.safetensors").write_bytes(b"\0" * 10)
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])  # truncated
    args = LMTrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="auto", report_to="none")
    assert resolve_resume_checkpoint(args) == str(tmp_path / "checkpoint-5")
    args.resume_from_checkpoint = str(newest)
    with pytest.raises(LMKitError, match=r"checkpoint-10: model.safetensors is corrupted"):
        resolve_resume_checkpoint(args)


def test_disk_full_during_save_leaves_last_checkpoint(tmp_path, monkeypatch):
    make_trainer(tmp_path, max_steps=5).train()

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torch.save", full)
    with pytest.raises(LMKitError, match=r"could not write checkpoint-10 \(no space left on device\).*checkpoint-5"):
        make_trainer(tmp_path, max_steps=30).train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == ["checkpoint-5"]


# -- 4: non-finite loss / gradient ----------------------------------------------------------------------------


class Poison(TrainerCallback):
    """Makes one gradient element NaN during the backward of the given optimizer steps, as an overflow would."""

    def __init__(self, steps):
        self.steps, self.state = set(steps), None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        next(model.parameters()).register_hook(self.poison)

    def poison(self, grad):
        if self.state.global_step + 1 not in self.steps:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8, save_strategy="no")
    trainer.add_callback(Poison({3, 4, 6}))
    before = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            before[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    trainer.add_callback(Snapshot())
    trainer.train()
    for step in (3, 4, 6):  # a skipped step leaves the weights (and AdamW's moments) untouched
        assert_same_weights(before[step], before[step - 1])
    assert not all(torch.equal(before[5][k], before[4][k]) for k in before[5])
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())
    logged = [e["nonfinite_skipped"] for e in trainer.state.log_history if "loss" in e]
    assert logged == [0, 0, 1, 2, 2, 3, 3, 3]
    state = trainer.optimizer.state[next(trainer.model.parameters())]
    assert int(state["step"]) == 5  # 8 steps, 3 skipped


def test_nonfinite_loss_in_a_row_stops_with_message(tmp_path):
    make_trainer(tmp_path, max_steps=5).train()
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()}
    trainer = make_trainer(tmp_path, max_steps=30, max_nonfinite_steps=3)

    def nan_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        return LMTrainer.compute_loss(trainer, model, inputs, num_items_in_batch=num_items_in_batch) * float("nan")

    trainer.compute_loss = nan_loss
    with pytest.raises(
        LMKitError, match=r"stopped at step 8: 3 consecutive steps.*--max_nonfinite_steps 3.*checkpoint-5"
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()} == snapshot


# -- 5: output safety ------------------------------------------------------------------------------------------


def test_save_total_limit_keeps_newest_and_best(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=20, save_total_limit=1, eval_strategy="steps", eval_steps=5,
        metric_for_best_model="loss", greater_is_better=True, eval_dataset=map_dataset().select(range(8)),
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert "checkpoint-20" in kept  # the newest survives the end-of-training clean-up
    assert best is not None and Path(best).name in kept and Path(best).parent == tmp_path
    assert Path(best).name != "checkpoint-20"  # highest eval loss: an early one, so both must be kept
    for name in kept:
        assert checkpoint.checkpoint_problem(tmp_path / name) is None


def test_finished_model_is_not_overwritten(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="no")
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "config.json").is_file() and not list(tmp_path.glob(".tmp-*"))
    for resume in (None, "auto"):  # auto with no checkpoint to continue would start over: refused too
        args = LMTrainingArguments(output_dir=str(tmp_path), report_to="none", resume_from_checkpoint=resume)
        with pytest.raises(LMKitError, match="already holds a finished model.*--overwrite_output_dir"):
            check_output_dir(args)
    args = LMTrainingArguments(output_dir=str(tmp_path), report_to="none", overwrite_output_dir=True)
    check_output_dir(args)


@pytest.mark.parametrize("name", ["README.md", "all_results.json", "merged"])
def test_a_users_file_under_a_name_the_run_writes_is_not_overwritten(tmp_path, name):
    """A dir holding the user's notes and a README.md (peft writes its model card there) or a metrics file (the
    Trainer merges into all_results.json, and crashed on an unreadable one after saving) is refused before the run
    starts; other files of the user's do not matter, and --overwrite_output_dir lets the run replace them."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / name).mkdir() if name == "merged" else (tmp_path / name).write_text("mine, not JSON")
    args = LMTrainingArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(LMKitError) as raised:
        check_output_dir(args)
    assert str(raised.value) == (
        f"--output_dir {tmp_path} holds {name}, which this run would overwrite; move it, pass --overwrite_output_dir "
        "to let the run replace it, or choose another --output_dir"
    )
    check_output_dir(LMTrainingArguments(output_dir=str(tmp_path), report_to="none", overwrite_output_dir=True))
    (tmp_path / name).rmdir() if name == "merged" else (tmp_path / name).unlink()
    check_output_dir(args)  # notes.txt alone: nothing the run writes


# -- 6: security -----------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates a directory: the stand-in for code a tampered checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_lmkit_never_calls_torch_load_without_weights_only():
    import ast

    for path in [*(REPO / "lmkit").rglob("*.py"), *(REPO / "recipes").glob("*.py")]:
        loads = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
        ]
        unsafe = [
            n.lineno
            for n in loads
            if not any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in n.keywords)
        ]
        assert unsafe == [], path


@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resuming_never_runs_code_pickled_into_a_checkpoint(tmp_path, state_file):
    # The Trainer's own loads of optimizer / scheduler / RNG state (transformers 5: weights_only=True) refuse a
    # pickled callable: the resume fails and the payload never runs.
    make_trainer(tmp_path / "out", max_steps=5).train()
    ckpt, marker = tmp_path / "out" / "checkpoint-5", tmp_path / "payload-ran"
    torch.save({"state": _RunsCode(marker)}, ckpt / state_file)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        make_trainer(tmp_path / "out", max_steps=10).train(resume_from_checkpoint=str(ckpt))
    assert not marker.exists()


def test_pickled_weights_are_refused(tmp_path):
    make_trainer(tmp_path, max_steps=5).train()
    ckpt = tmp_path / "checkpoint-5"
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    args = LMTrainingArguments(output_dir=str(tmp_path), report_to="none", resume_from_checkpoint=str(ckpt))
    with pytest.raises(LMKitError, match="pickle.*only loads safetensors"):
        resolve_resume_checkpoint(args)


def test_secrets_never_written(tmp_path):
    # A whole recipe run with a fake token in the environment and on the command line (--hub_token): not one
    # byte of it in any file the run writes (checkpoints, final model, trainer state, pickled args) or its logs.
    fake = "hf_FAKEsecretTOKEN1234567890abcdef"
    env = {**os.environ, "HF_TOKEN": fake, "HUGGING_FACE_HUB_TOKEN": fake, "OMP_NUM_THREADS": "1"}
    data = tmp_path / "corpus.txt"
    data.write_text((REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text()[:20000])
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "recipes" / "pretrain.py"), "--train_files", str(data), "--tokenizer", "char",
        "--block_size", "16", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--max_position_embeddings", "16", "--per_device_train_batch_size", "4", "--max_steps", "6",
        "--save_steps", "3", "--eval_strategy", "no", "--eval_on_start", "false", "--report_to", "tensorboard",
        "--sample_prompt", "", "--bf16", "false", "--output_dir", str(out), "--hub_token", fake,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written) and any("tfevents" in p.name for p in written)
    for path in written:
        assert fake.encode() not in path.read_bytes(), path
    assert fake.encode() not in proc.stdout + proc.stderr


# -- the recipe end to end: a real SIGTERM -----------------------------------------------------------------------


def test_recipe_sigterm_then_resume(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text((REPO / "lmkit" / "corpus" / "tinyshakespeare.txt").read_text()[:20000])
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "recipes" / "pretrain.py"), "--train_files", str(data), "--tokenizer", "char",
        "--block_size", "16", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--max_position_embeddings", "16", "--per_device_train_batch_size", "4", "--max_steps", "400",
        "--save_steps", "1000", "--logging_steps", "1", "--eval_strategy", "no", "--eval_on_start", "false",
        "--report_to", "none", "--sample_prompt", "", "--bf16", "false", "--output_dir", str(out),
        "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the printer callback writes one dict per logged step
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("lmkit: stopped by SIGTERM at step ") and "--resume_from_checkpoint auto" in message
    (ckpt,) = out.glob("checkpoint-*")
    assert checkpoint.checkpoint_problem(ckpt) is None
    assert not (out / "config.json").exists()  # no finished model: the run did not finish
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == checkpoint.checkpoint_step(ckpt) >= 1  # resuming it: test_soak.py


def test_trust_remote_code_is_off_unless_passed(tmp_path):
    from lmkit.args import ModelArguments, parse_args
    from lmkit.eval_args import CheckpointArguments
    from lmkit.finetune import load_config

    (ckpt,) = parse_args((CheckpointArguments,), argv=["--model", "x"])
    assert ckpt.trust_remote_code is False
    # A checkpoint that ships its own code: by default its code never runs, and loading it is a one-line error.
    folder, ran = tmp_path / "remote", tmp_path / "remote-code-ran"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "lmkit_remote_test", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"}}
        )
    )
    (folder / "configuration_remote.py").write_text(
        "from pathlib import Path\nfrom transformers import PretrainedConfig\n"
        f"Path({str(ran)!r}).touch()\n"
        "class RemoteConfig(PretrainedConfig):\n    model_type = 'lmkit_remote_test'\n"
    )
    (model_args,) = parse_args((ModelArguments,), argv=[])
    with pytest.raises(LMKitError, match="trust_remote_code"):
        load_config(str(folder), model_args.trust_remote_code)
    assert not ran.exists()
    (model_args,) = parse_args((ModelArguments,), argv=["--trust_remote_code", "true"])
    assert type(load_config(str(folder), model_args.trust_remote_code)).__name__ == "RemoteConfig" and ran.exists()


@pytest.mark.parametrize("grad_norm", [None, float("nan"), float("inf"), 1.5])
def test_guard_reads_the_grad_norm_or_scans_the_gradients(grad_norm):
    from types import SimpleNamespace

    from lmkit.reliability import NonFiniteGuard

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    model.bias.grad = torch.tensor([1.0, float("nan")])  # seen by the scan, not by a norm computed before it
    guard = NonFiniteGuard(max_consecutive=5)
    guard.observe_grad_norm(grad_norm)
    guard.on_pre_optimizer_step(SimpleNamespace(world_size=1), SimpleNamespace(global_step=0), None, model=model)
    skipped = grad_norm is None or grad_norm != 1.5
    assert guard.total == int(skipped)
    assert (model.weight.grad is None) == skipped


def test_the_first_stop_signal_names_the_stop_and_a_second_ctrl_c_stops_at_once():
    """Ctrl-C in a terminal reaches accelerate's launcher too, which then sends the run SIGTERM: the run still stops
    "by SIGINT" (status 130), and another Ctrl-C still stops it at once."""
    from lmkit.reliability import PreemptionCallback

    callback = PreemptionCallback()
    callback._handler(signal.SIGINT, None)
    callback._handler(signal.SIGTERM, None)  # the launcher's, after the Ctrl-C
    assert callback.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._handler(signal.SIGINT, None)
    terminated = PreemptionCallback()
    terminated._handler(signal.SIGTERM, None)
    terminated._handler(signal.SIGINT, None)  # a stop already asked for by SIGTERM: Ctrl-C adds nothing
    assert terminated.signum == signal.SIGTERM
