"""Keeping long runs alive: crash-safe checkpoints, resume detection, preemption and non-finite guards.

- A checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-N/checkpoint-N``, fsynced, then renamed to
  ``OUTPUT_DIR/checkpoint-N``: a visible ``checkpoint-*`` folder is always complete, whatever kills the process.
  ``--resume_from_checkpoint auto`` also checks what it picks (trainer_state.json readable, safetensors weights
  present), so folders written by other tools are judged the same way.
- The finished model is staged the same way and its files are moved into the output dir one by one, ``config.json``
  last (the file that marks an output dir as holding a finished model).
- SIGTERM / SIGINT request a checkpoint at the next optimizer-step boundary; the run then exits with status
  128 + signal number and a one-line message saying how to resume. A second SIGINT stops at once.
- A streaming run (`lmkit.data.PackedStream`) writes its stream position into every checkpoint
  (``stream_position.json``); resuming jumps there instead of replaying the stream batch by batch, which would
  re-read and re-tokenize every document before it. Checkpoints without one resume by replay, with a warning.
- A step whose loss or gradient is NaN/Inf is skipped (gradients dropped, so the optimizer leaves the weights and
  its moments untouched) and counted in the logs as ``nonfinite_skipped``; ``--max_nonfinite_steps`` consecutive
  ones stop the run with a one-line message, before anything is saved.

`LMTrainer` wires these in with a few small overrides; recipes call `check_output_dir` and
`resolve_resume_checkpoint` (in `lmkit.runtime`), which use the scanning helpers here.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import math
import os
import shutil
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lmkit.data import PackedStream
from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
STREAM_POSITION = "stream_position.json"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
# Environment variables whose values must never be written anywhere (the secret scan in the tests uses them too).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY", "HUB_TOKEN")


# ---------------------------------------------------------------------------------------------------------------
# Scanning and validating checkpoints
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    prefix, _, step = path.name.rpartition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete, loadable-looking checkpoint (None when it is). Reads headers only."""
    if not path.is_dir():
        return "no such checkpoint directory"
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"incomplete checkpoint (no {TRAINER_STATE})"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({type(err).__name__})"
    weights = [name for name in SAFE_WEIGHTS if (path / name).is_file()]
    if not weights:
        if any((path / name).is_file() for name in PICKLE_WEIGHTS):
            return "the weights are a pickle (pytorch_model.bin); lmkit only loads safetensors"
        if not any(p.is_dir() and p.name.startswith(("pytorch_model_fsdp", "global_step")) for p in path.iterdir()):
            return "no model weights (model.safetensors)"
        return None  # FSDP / DeepSpeed shards: their loaders check them
    for name in weights:
        if name.endswith(".safetensors") and (problem := safetensors_problem(path / name)):
            return f"{name} is corrupted ({problem})"
    return None


def safetensors_problem(file: Path) -> str | None:
    """A cheap structural check of a safetensors file: header parses and every tensor lies inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return "truncated header"
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as err:
        return f"unreadable header: {type(err).__name__}"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{size} bytes on disk, the header describes {8 + n + end}"
    return None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape for the safetensors weights of a checkpoint folder (headers only, shards included)."""
    index = path / "model.safetensors.index.json"
    files = (
        sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [path / "model.safetensors"]
    )
    shapes = {}
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders of ``output_dir``, oldest step first; incomplete ones are logged and skipped."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = sorted((s, p) for p in out.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None)
    complete = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem:
            logger.warning("skipping %s: %s", path, problem)
        else:
            complete.append(path)
    return complete


def check_resume_checkpoint(path: str | Path) -> None:
    """Raise `LMKitError` naming ``--resume_from_checkpoint`` when ``path`` is not a complete checkpoint."""
    problem = checkpoint_problem(Path(path))
    if problem:
        raise LMKitError(f"--resume_from_checkpoint {path}: {problem}")


def check_checkpoint_matches_model(path: str | Path, model: torch.nn.Module) -> None:
    """Raise `LMKitError` when the checkpoint at ``path`` holds another architecture or other tensor shapes."""
    path = Path(path)
    config_file = path / "config.json"
    config = getattr(model, "config", None)
    if config_file.is_file() and config is not None:
        try:
            saved = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise LMKitError(f"--resume_from_checkpoint {path}: config.json is not valid JSON ({err})") from err
        if saved.get("model_type") != config.model_type:
            raise LMKitError(
                f"--resume_from_checkpoint {path}: a {saved.get('model_type')!r} checkpoint, but this run builds a "
                f"{config.model_type!r} model"
            )
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        return  # adapters / FSDP / DeepSpeed shards are checked by their own loaders
    saved_shapes = safetensors_shapes(path)
    for name, tensor in model.state_dict().items():
        if name in saved_shapes and list(tensor.shape) != saved_shapes[name]:
            raise LMKitError(
                f"--resume_from_checkpoint {path}: tensor {name} has shape {saved_shapes[name]} in the checkpoint "
                f"but {list(tensor.shape)} in this model (the model flags differ from the checkpoint's config.json)"
            )
    missing = [n for n in model.state_dict() if n not in saved_shapes and not n.endswith("lm_head.weight")]
    if missing:
        raise LMKitError(
            f"--resume_from_checkpoint {path}: the checkpoint lacks {len(missing)} of this model's tensors "
            f"(first: {missing[0]}); it was saved from a different architecture"
        )


# ---------------------------------------------------------------------------------------------------------------
# Writing: staged, fsynced, renamed
# ---------------------------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_write_error(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    text = str(err).lower()  # torch.save / safetensors wrap the OSError in their own exception types
    return any(s in text for s in ("no space", "read-only", "permission denied", "write", "ioerror", "storagefull"))


def _write_error(what: str, where: Path, err: BaseException, latest: Path | None) -> LMKitError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "no space left" in str(err).lower():
        reason = "no space left on device"
    keep = f"the last complete checkpoint is {latest}" if latest else "no complete checkpoint exists yet"
    return LMKitError(
        f"--output_dir {where}: could not write {what} ({reason}); nothing half-written was left behind and {keep}"
    )


def scrub_training_args(file: Path, args: Any) -> None:
    """Rewrite the Trainer's ``training_args.bin`` without token fields (the stock file pickles them verbatim)."""
    if not file.is_file():
        return
    clean = copy.copy(args)
    for name in vars(args):
        if name.endswith("_token") and getattr(args, name):
            setattr(clean, name, None)
    torch.save(clean, file)


def remove_stale_staging(output_dir: str | Path) -> None:
    """Delete ``.tmp-*`` folders a killed run left in ``output_dir`` (never visible as checkpoints)."""
    out = Path(output_dir)
    if out.is_dir():
        for path in out.glob(f"{STAGING_PREFIX}*"):
            if path.is_dir():
                logger.info("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint_atomically(trainer: Any, save: Callable[[], None], run_dir: str) -> None:
    """Run the Trainer's ``_save_checkpoint`` (``save``) into a staging folder, then publish it by rename.

    ``trainer._checkpoint_staging`` redirects the Trainer's run dir while ``save`` runs (see
    ``LMTrainer._get_output_dir``); the stock rotation then only sees the staging folder, so it runs here instead,
    after the new checkpoint is visible: it keeps the newest and the best checkpoint.
    """
    args = trainer.args
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    run = Path(run_dir)
    staging_root = run / f"{STAGING_PREFIX}{name}"
    staged, final = staging_root / name, run / name
    if args.should_save and staging_root.exists():
        shutil.rmtree(staging_root)
    trainer.accelerator.wait_for_everyone()
    best_before = trainer.state.best_model_checkpoint
    trainer._checkpoint_staging = str(staging_root)
    try:
        save()
    except Exception as err:
        trainer._checkpoint_staging = None
        if args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        if _is_write_error(err):
            latest = complete_checkpoints(run)
            raise _write_error(name, run, err, latest[-1] if latest else None) from err
        raise
    finally:
        trainer._checkpoint_staging = None
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        try:
            if trainer.state.best_model_checkpoint == str(staged):  # the Trainer recorded the staging path
                trainer.state.best_model_checkpoint = str(final)
                trainer.state.save_to_json(str(staged / TRAINER_STATE))
            elif trainer.state.best_model_checkpoint != best_before:
                trainer.state.best_model_checkpoint = best_before
            scrub_training_args(staged / TRAINING_ARGS, args)
            save_stream_position(trainer, staged)
            _fsync_tree(staged)
            if final.exists():  # a checkpoint of an abandoned timeline (resumed from an earlier one): replace it
                old = run / f"{STAGING_PREFIX}old-{name}"
                os.rename(final, old)
                os.rename(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staged, final)
            _fsync_dir(run)
            staging_root.rmdir()
        except OSError as err:
            shutil.rmtree(staging_root, ignore_errors=True)
            latest = complete_checkpoints(run)
            raise _write_error(name, run, err, latest[-1] if latest else None) from err
        rotate_checkpoints(
            output_dir=str(run),
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )
    trainer.accelerator.wait_for_everyone()


def save_model_atomically(trainer: Any, save: Callable[[str], None], output_dir: str) -> None:
    """Save the finished model into a staging folder, then move its files into ``output_dir``, config.json last.

    Every file appears whole; a crash part-way leaves no config.json, so the folder does not count as a finished
    model and the last checkpoint still resumes.
    """
    out = Path(output_dir)
    staging = out / f"{STAGING_PREFIX}model"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        save(str(staging))
        trainer.accelerator.wait_for_everyone()
        if not trainer.args.should_save:
            return
        scrub_training_args(staging / TRAINING_ARGS, trainer.args)
        _fsync_tree(staging)
        (out / "config.json").unlink(missing_ok=True)  # the model is replaced: it is unfinished until the end
        names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
        for name in names:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        _fsync_dir(out)
        staging.rmdir()
    except Exception as err:
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if _is_write_error(err):
            latest = complete_checkpoints(out)
            raise _write_error("the final model", out, err, latest[-1] if latest else None) from err
        raise


# ---------------------------------------------------------------------------------------------------------------
# Streaming position
# ---------------------------------------------------------------------------------------------------------------


def _blocks_trained(trainer: Any, global_step: int) -> int:
    # Rows of the stream behind `global_step` optimizer steps: with an iterable dataset every rank's rows come from
    # the one stream (dispatched from rank 0, or read whole and sliced per rank by accelerate).
    return global_step * trainer.get_total_train_batch_size(trainer.args)


def save_stream_position(trainer: Any, checkpoint: Path) -> None:
    """Write where the training stream stands (after the rows trained on so far) into ``checkpoint``."""
    dataset = trainer.train_dataset
    if not isinstance(dataset, PackedStream):
        return
    if trainer.args.dataloader_num_workers > 0:
        # The stream is read inside a worker process; its position never reaches this one.
        logger.warning("no stream position saved (--dataloader_num_workers > 0): resuming will replay the stream")
        return
    position = dataset.position_after(_blocks_trained(trainer, trainer.state.global_step))
    if position is None:  # e.g. the stream ran out and restarted: the block count no longer maps to a position
        logger.warning(
            "no stream position saved at step %d: resuming will replay the stream", trainer.state.global_step
        )
        return
    (checkpoint / STREAM_POSITION).write_text(json.dumps(position), encoding="utf-8")


class StreamResume(TrainerCallback):
    """Resume a `lmkit.data.PackedStream` at the position saved in the checkpoint, instead of replaying it.

    transformers 5.24 resumes an iterable dataset only by fetching and discarding every batch before the
    checkpoint (``skip_first_batches``), and saves no data-loader state. `LMTrainer._init_training_state` calls
    `restore`; when it positions the stream, the Trainer is told there is nothing to skip, and this callback puts
    back the two things that skipping would have given: the RNG state restored after the data loader's iterator
    drew its seed (as the stock resume does; dropout sees the same draws), and the epoch fraction.
    """

    def __init__(self) -> None:
        self._rng_checkpoint: str | None = None
        self._steps_in_epoch = 0
        self._trainer: Any = None

    def restore(self, trainer: Any, checkpoint: str) -> bool:
        """Position the training stream at ``checkpoint``'s saved position; False (and a warning) to replay."""
        dataset = trainer.train_dataset
        if not isinstance(dataset, torch.utils.data.IterableDataset):
            return False
        step = trainer.state.global_step
        file = Path(checkpoint) / STREAM_POSITION
        position = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
        expected = _blocks_trained(trainer, step)
        if isinstance(dataset, PackedStream) and position is not None and position.get("blocks") == expected:
            dataset.load_state_dict(position)
            self._trainer, self._rng_checkpoint = trainer, checkpoint
            self._steps_in_epoch = trainer.state.max_steps * trainer.args.gradient_accumulation_steps
            logger.info("resuming the stream at its saved position (block %d)", expected)
            return True
        why = (
            f"{checkpoint} saved no stream position"
            if position is None
            else f"{checkpoint}'s stream position is for block {position.get('blocks')}, this run is at block "
            f"{expected} (the batch size changed?)"
        )
        if trainer.args.should_log:
            logger.warning(
                "%s: replaying the stream batch by batch up to step %d (re-reads every document before it)", why, step
            )
        return False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._rng_checkpoint is not None:  # the first batches are fetched: the stock resume reloads RNG here
            self._trainer._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._steps_in_epoch:  # the Trainer counted micro-batches from 0, not from the checkpoint's step
            state.epoch = state.global_step * args.gradient_accumulation_steps / self._steps_in_epoch

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._rng_checkpoint, self._steps_in_epoch, self._trainer = None, 0, None


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


def _any_rank(flag: bool, args: Any) -> bool:
    """True when ``flag`` is set on any process (a no-op without torch.distributed)."""
    if args.world_size <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=args.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


class PreemptionCallback(TrainerCallback):
    """SIGTERM / SIGINT: checkpoint at the next optimizer-step boundary, then exit 128 + signum with a message."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum
        logger.warning("%s received: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.signum = None
        if args.should_save:
            remove_stale_staging(args.output_dir)
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _any_rank(self.signum is not None, args):
            self.signum = self.signum or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period before SIGKILL is for saving

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.signum is None:
            return
        self._restore()
        name = signal.Signals(self.signum).name
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_log:
            print(
                f"lmkit: stopped by {name} at step {state.global_step}/{state.max_steps}; checkpoint saved to "
                f"{checkpoint}. Resume with the same command plus --resume_from_checkpoint auto",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + self.signum)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restore()


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer steps whose loss or gradients are NaN/Inf; stop after ``max_consecutive`` in a row.

    ``observe_loss`` is fed every micro-batch loss (by ``LMTrainer.training_step``), ``observe_grad_norm`` the
    Trainer's total gradient norm (by ``LMTrainer._get_grad_norm``): one NaN/Inf anywhere makes that norm NaN/Inf,
    so a step costs one float check instead of a pass over every gradient. Without a norm (the callback used on
    its own) the gradients are scanned. A skipped step drops the gradients (``grad = None``), so AdamW neither
    moves the weights nor updates its moments or step count.
    """

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._bad_loss = False
        self._grad_norm: float | None = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        if not self._bad_loss and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def observe_grad_norm(self, grad_norm: Any) -> None:
        self._grad_norm = None if grad_norm is None else float(grad_norm)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A resumed run continues the count the logs already hold.
        self.total = next((e["nonfinite_skipped"] for e in reversed(state.log_history) if "nonfinite_skipped" in e), 0)
        self.consecutive = 0
        self._bad_loss = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._grad_norm is not None:
            finite_grads = math.isfinite(self._grad_norm)
        else:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite_grads = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
        finite = not self._bad_loss and finite_grads
        self._bad_loss, self._grad_norm = False, None
        if not _any_rank(not finite, args):
            self.consecutive = 0
            return
        for p in model.parameters():
            p.grad = None
        self.total += 1
        self.consecutive += 1
        step = state.global_step + 1
        logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.consecutive)
        if self.consecutive >= self.max_consecutive:
            latest = complete_checkpoints(args.output_dir)
            keep = f"the last good checkpoint is {latest[-1]}" if latest else "no checkpoint was saved"
            raise LMKitError(
                f"training stopped at step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient (--max_nonfinite_steps {self.max_consecutive}); {keep}. Lower --learning_rate or check "
                "the data, then resume"
            )

    def log_entries(self) -> dict[str, int]:
        return {"nonfinite_skipped": self.total}


@contextlib.contextmanager
def no_end_of_training_rotation(args: Any) -> Iterator[None]:
    """Hide ``save_total_limit`` from the Trainer's end-of-training clean-up, which (with a limit of 1 and a best
    model) deletes the newest checkpoint; rotation while saving keeps the newest and the best."""
    limit = args.save_total_limit
    args.save_total_limit = None
    try:
        yield
    finally:
        args.save_total_limit = limit
