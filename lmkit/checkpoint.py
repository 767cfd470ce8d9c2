"""Checkpoints: one component, `Checkpointer`, that `lmkit.trainer.LMTrainer` owns and calls.

- A checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-N/checkpoint-N``, fsynced, then renamed to
  ``OUTPUT_DIR/checkpoint-N``: a visible ``checkpoint-*`` folder is always complete, whatever kills the process.
  Rotation (``--save_total_limit``, keeping the newest and the best checkpoint) runs once, after the rename, and
  only ever deletes complete checkpoints: a ``checkpoint-N`` folder that is not one (a user's, another tool's) is
  left alone, with a warning.
- ``--resume_from_checkpoint auto`` picks the newest *complete* checkpoint (`complete_checkpoints`: trainer state
  readable, safetensors weights present and whole, the optimizer and scheduler state the Trainer resumes from
  present and readable), so folders written by other tools are judged the same way; a checkpoint is checked
  against the model before its weights are loaded (`check_checkpoint_matches_model`).
- The finished model is staged the same way and its files are moved into the output dir one by one, ``config.json``
  last (the file that marks an output dir as holding a finished model, see `FINISHED_MODEL_FILES`).
- Training data that can say where it stands (the `ResumableData` protocol: `lmkit.data.PackedStream` today, a data
  mixture later) writes its position into every checkpoint (``stream_position.json``); resuming jumps there
  instead of replaying the stream batch by batch, which would re-read and re-tokenize every document before it.
  Checkpoints without one resume by replay, with a warning.
- A failed write ends in one `LMKitError` naming the output dir, the cause (from the error's errno) and the last
  complete checkpoint; nothing half-written is left behind.

The weight-file names are written here once; `lmkit.runtime` and `lmkit.hub` read them from here.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)

# The weight files lmkit writes and loads (safetensors only), adapters, and the pickles it refuses to load.
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_PICKLE = "adapter_model.bin"
# Files whose presence means an output dir holds a finished model.
FINISHED_MODEL_FILES = ("config.json", *MODEL_WEIGHTS, "adapter_config.json")

STAGING_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
STREAM_POSITION = "stream_position.json"
# The optimizer / scheduler state `Trainer._save_optimizer_and_scheduler` writes, and the names under which FSDP
# (accelerate's save_fsdp_optimizer: optimizer.bin, or an optimizer_N/ folder) and DeepSpeed (global_stepN/) keep it.
OPTIMIZER_STATE = "optimizer.pt"
SCHEDULER_STATE = "scheduler.pt"
FSDP_OPTIMIZER_STATE = "optimizer.bin"
DEEPSPEED_STATE_PREFIX = "global_step"
# Errnos that mean "this storage cannot take the write": the run stops with a message instead of a traceback.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE}
)


@runtime_checkable
class ResumableData(Protocol):
    """Training data whose position travels with a checkpoint: found by these methods, whatever its type.

    A data loader reads ahead of training, so `state_dict` (after the last row yielded) is usually ahead of the
    rows trained on; `state_dict_after` gives the state after the first ``rows`` rows for a short while after they
    were yielded (None once it is forgotten). `load_state_dict` makes the next iteration start at a state.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def state_dict_after(self, rows: int) -> dict[str, Any] | None: ...


# ---------------------------------------------------------------------------------------------------------------
# Finding and validating checkpoints
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    prefix, _, step = path.name.rpartition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


def checkpoint_problem(path: Path, optimizer_state: bool = True) -> str | None:
    """Why ``path`` is not a complete, loadable-looking checkpoint (None when it is). Reads headers only.

    ``optimizer_state=False`` accepts a checkpoint without optimizer and scheduler state (``--save_only_model``
    writes none: such a checkpoint holds weights, but training cannot resume from it).
    """
    if not path.is_dir():
        return "no such checkpoint directory"
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"incomplete checkpoint (no {TRAINER_STATE})"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({type(err).__name__})"
    weights = [name for name in (*MODEL_WEIGHTS, ADAPTER_WEIGHTS) if (path / name).is_file()]
    if not weights:
        if any((path / name).is_file() for name in (*PICKLE_WEIGHTS, ADAPTER_PICKLE)):
            return "the weights are a pickle (pytorch_model.bin); lmkit only loads safetensors"
        shards = ("pytorch_model_fsdp", DEEPSPEED_STATE_PREFIX)
        if not any(p.is_dir() and p.name.startswith(shards) for p in path.iterdir()):
            return "no model weights (model.safetensors)"
        # FSDP / DeepSpeed shards: their loaders check them
    for name in weights:
        if name.endswith(".safetensors") and (problem := safetensors_problem(path / name)):
            return f"{name} is corrupted ({problem})"
    if optimizer_state and (problem := _missing_resume_state(path)):
        return problem
    for file in sorted(path.iterdir()):
        if _is_resume_state(file.name) and file.is_file() and not _is_torch_file(file):
            return f"{file.name} is damaged (not a readable torch file)"
    return None


def _missing_resume_state(path: Path) -> str | None:
    # As `Trainer._load_optimizer_and_scheduler` (transformers 5) decides: under DeepSpeed the optimizer (and a
    # DeepSpeed scheduler) live in global_stepN/, which DeepSpeed's loader checks; otherwise the Trainer loads the
    # optimizer and the scheduler only when both are there, and silently starts both afresh (warmup included) when
    # either is missing.
    folders = [p.name for p in path.iterdir() if p.is_dir()]
    if any(name.startswith(DEEPSPEED_STATE_PREFIX) for name in folders):
        return None
    optimizer = (
        (path / OPTIMIZER_STATE).is_file()
        or (path / FSDP_OPTIMIZER_STATE).is_file()
        or any("optimizer" in name for name in folders)
    )
    if not optimizer:
        return f"incomplete checkpoint (no {OPTIMIZER_STATE}, the optimizer state)"
    if not (path / SCHEDULER_STATE).is_file():
        return f"incomplete checkpoint (no {SCHEDULER_STATE}, the learning-rate schedule's state)"
    return None


def _is_resume_state(name: str) -> bool:
    """The Trainer's torch.save files that a resume loads: optimizer, scheduler, grad scaler, RNG states."""
    return name in (OPTIMIZER_STATE, FSDP_OPTIMIZER_STATE, SCHEDULER_STATE, "scaler.pt") or (
        name.startswith("rng_state") and name.endswith(".pth")
    )


def _is_torch_file(file: Path) -> bool:
    """A cheap structural check of a torch.save file (a zip archive): its central directory, at the end, reads."""
    try:
        with zipfile.ZipFile(file) as archive:
            return bool(archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


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
    index = path / MODEL_WEIGHTS[1]
    files = (
        sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [path / MODEL_WEIGHTS[0]]
    )
    shapes = {}
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def complete_checkpoints(output_dir: str | Path, log: bool = True) -> list[Path]:
    """Complete ``checkpoint-N`` folders of ``output_dir``, oldest step first; incomplete ones are skipped (and
    logged, unless ``log`` is False: a check whose caller logs the same scan later)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = sorted((s, p) for p in out.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None)
    complete = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem:
            if log:
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
    holds_adapter = (path / ADAPTER_WEIGHTS).is_file() and not any((path / n).is_file() for n in MODEL_WEIGHTS)
    if holds_adapter and getattr(model, "peft_config", None) is None:
        raise LMKitError(
            f"--resume_from_checkpoint {path}: the checkpoint holds a LoRA adapter ({ADAPTER_WEIGHTS}), not the "
            "full model this run trains, so it cannot resume from it (resume it with recipes/finetune.py "
            "--use_lora true)"
        )
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
    if not any((path / name).is_file() for name in MODEL_WEIGHTS):
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


def rotate_checkpoints(
    output_dir: str | Path,
    save_total_limit: int | None,
    newest: Path,
    best_model_checkpoint: str | None = None,
    optimizer_state: bool = True,
) -> list[tuple[Path, str]]:
    """Delete the oldest complete checkpoints of ``output_dir`` beyond ``save_total_limit``, never ``newest`` or the
    best one; returns the ``checkpoint-N`` folders left alone as not complete checkpoints, with why.

    Only what `checkpoint_problem` accepts is deleted: a folder named like a checkpoint that is not one (a user's
    own ``checkpoint-1``, another tool's half-written one) is not this component's to delete. Oldest is by mtime
    (a checkpoint of an abandoned timeline, resumed from an earlier one, goes first), then by step.
    """
    out = Path(output_dir)
    if not save_total_limit or save_total_limit <= 0 or not out.is_dir():
        return []
    complete, foreign = [], []
    for path in out.iterdir():
        if path.is_dir() and checkpoint_step(path) is not None:
            problem = checkpoint_problem(path, optimizer_state)
            if problem:
                foreign.append((path, problem))
            else:
                complete.append((path.stat().st_mtime, checkpoint_step(path), path))
    protected = {Path(newest)} | ({Path(best_model_checkpoint)} if best_model_checkpoint else set())
    keep = max(save_total_limit, len(protected & {path for _, _, path in complete}))
    remaining = len(complete)
    for _, _, path in sorted(complete):
        if remaining <= keep:
            break
        if path not in protected:
            shutil.rmtree(path, ignore_errors=True)
            remaining -= 1
    return sorted(foreign)


def remove_stale_staging(output_dir: str | Path) -> None:
    """Delete ``.tmp-*`` folders a killed run left in ``output_dir`` (never visible as checkpoints)."""
    out = Path(output_dir)
    if out.is_dir():
        for path in out.glob(f"{STAGING_PREFIX}*"):
            if path.is_dir():
                logger.info("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Write errors, by errno
# ---------------------------------------------------------------------------------------------------------------

# How Rust's std::io::Error prints its errno: safetensors raises SafetensorError("... (os error 28)"), no OSError.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_errno(err: BaseException, where: Path) -> int | None:
    """The errno behind a failed write into ``where`` (None when there is none: not a storage problem).

    Errors reach us three ways: an `OSError` (Python's own writes; also as the cause or context of a wrapper); a
    `safetensors` error that prints the errno as Rust does; a `torch.save` RuntimeError from its C++ writer, which
    keeps no errno at all. For those a probe write into ``where`` asks the storage again (call this before deleting
    anything the failed write left there, or a full disk may have room again).
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        if match := _RUST_OS_ERROR.search(str(seen)):
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return _probe_errno(where)


def _probe_errno(where: Path) -> int | None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmkit-write-probe-", dir=where)
    except OSError as err:
        return err.errno
    try:
        page = memoryview(b"\0" * 4096)  # one page: a full tmpfs or disk refuses it
        while page:  # a write that meets the limit is cut short; only the next one says why
            page = page[os.write(fd, page) :]
        os.fsync(fd)
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def _write_error(what: str, where: Path, code: int) -> LMKitError:
    reason = "no space left on device" if code == errno.ENOSPC else os.strerror(code)
    latest = complete_checkpoints(where)
    keep = f"the last complete checkpoint is {latest[-1]}" if latest else "no complete checkpoint exists yet"
    return LMKitError(
        f"--output_dir {where}: could not write {what} ({reason}); nothing half-written was left behind and {keep}"
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


def scrub_training_args(file: Path, args: Any, restore: dict[str, Any] | None = None) -> None:
    """Rewrite the Trainer's ``training_args.bin`` without token fields (the stock file pickles them verbatim),
    with the fields in ``restore`` set back to the values the user gave."""
    if not file.is_file():
        return
    clean = copy.copy(args)
    for name in vars(args):
        if name.endswith("_token") and getattr(args, name):
            setattr(clean, name, None)
    for name, value in (restore or {}).items():
        setattr(clean, name, value)
    torch.save(clean, file)


class Checkpointer(TrainerCallback):
    """Saves, publishes, rotates and resumes checkpoints for one trainer (see the module docstring).

    The trainer calls `save` for each checkpoint, `save_model` for the finished model and wraps each
    ``Trainer.train`` call in `training`; the callback hooks restore what replaying the data would have given.
    ``barrier`` waits for every process (``accelerator.wait_for_everyone``); ``load_rng_state(checkpoint)`` is the
    Trainer's own RNG restore, so every device's generators come back exactly as the stock resume sets them.
    """

    def __init__(
        self, args: TrainingArguments, barrier: Callable[[], None], load_rng_state: Callable[[str], None]
    ) -> None:
        self.args = args
        self._barrier = barrier
        self._load_rng_state = load_rng_state
        self._hidden: dict[str, Any] = {}  # fields of `args` set aside while `training` runs -> the user's values
        self._rng_checkpoint: str | None = None
        self._positioned = False
        self._left_alone: set[Path] = set()  # checkpoint-N folders rotation did not delete (warned once each)

    # -- the span of one Trainer.train call ------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self, checkpoint: str | None, data: Any, rows_per_step: int) -> Iterator[None]:
        """Run one ``Trainer.train`` inside this; ``checkpoint`` is the one it resumes from (None: a fresh start).

        Rotation is the checkpointer's alone: ``save_total_limit`` is set aside, since the Trainer would rotate a
        staging folder and, at the end of training (a limit of 1 and a best model), delete the newest checkpoint.
        When ``data`` resumes at the checkpoint's position, ``ignore_data_skip`` tells the Trainer not to replay it.
        """
        self._hidden = {"save_total_limit": self.args.save_total_limit, "ignore_data_skip": self.args.ignore_data_skip}
        self.args.save_total_limit = None
        if checkpoint is not None and not self.args.ignore_data_skip:
            self.args.ignore_data_skip = self._resume_data(checkpoint, data, rows_per_step)
        try:
            yield
        finally:
            for name, value in self._hidden.items():
                setattr(self.args, name, value)
            self._hidden = {}
            self._rng_checkpoint, self._positioned = None, False

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(
        self,
        state: TrainerState,
        run_dir: str,
        write: Callable[[str], None],
        data: Any = None,
        rows_per_step: int = 0,
    ) -> Path:
        """Write ``checkpoint-{state.global_step}`` into ``run_dir``: ``write(folder)`` runs the Trainer's save as if
        ``folder`` were the output dir; the result is fsynced, renamed into place, then older ones are rotated."""
        args = self.args
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        run = Path(run_dir)
        staging_root = run / f"{STAGING_PREFIX}{name}"
        staged, final = staging_root / name, run / name
        if args.should_save and staging_root.exists():
            shutil.rmtree(staging_root)
        self._barrier()
        best_before = state.best_model_checkpoint
        try:
            write(str(staging_root))
        except Exception as err:
            code = write_errno(err, staging_root if staging_root.is_dir() else run)
            if args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            if code in WRITE_ERRNOS:
                raise _write_error(name, run, code) from err
            raise
        self._barrier()
        if args.should_save:
            try:
                if state.best_model_checkpoint == str(staged):  # the Trainer recorded the staging path
                    state.best_model_checkpoint = str(final)
                    state.save_to_json(str(staged / TRAINER_STATE))
                elif state.best_model_checkpoint != best_before:
                    state.best_model_checkpoint = best_before
                scrub_training_args(staged / TRAINING_ARGS, args, self._hidden)
                self._save_data_position(staged, data, state.global_step * rows_per_step)
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
                raise _write_error(name, run, err.errno or errno.EIO) from err
            left_alone = rotate_checkpoints(
                output_dir=run,
                save_total_limit=self._hidden.get("save_total_limit", args.save_total_limit),
                newest=final,
                best_model_checkpoint=state.best_model_checkpoint,
                optimizer_state=not args.save_only_model,
            )
            for path, problem in left_alone:
                if path not in self._left_alone:
                    self._left_alone.add(path)
                    logger.warning("--save_total_limit: leaving %s alone: %s", path, problem)
        self._barrier()
        return final

    def save_model(self, write: Callable[[str], None], output_dir: str) -> None:
        """Save the finished model (``write(folder)``) into a staging folder, then move its files into
        ``output_dir``, config.json last: every file appears whole, and a crash part-way leaves no config.json, so
        the folder does not count as a finished model and the last checkpoint still resumes."""
        out = Path(output_dir)
        staging = out / f"{STAGING_PREFIX}model"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        try:
            write(str(staging))
            self._barrier()
            if not self.args.should_save:
                return
            scrub_training_args(staging / TRAINING_ARGS, self.args, self._hidden)
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
            code = write_errno(err, staging if staging.is_dir() else out)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if code in WRITE_ERRNOS:
                raise _write_error("the final model", out, code) from err
            raise

    # -- data position ---------------------------------------------------------------------------------------
    # Rows of the data behind a number of optimizer steps: with an iterable dataset every rank's rows come from the
    # one stream (dispatched from rank 0, or read whole and sliced per rank by accelerate), so
    # rows = steps x the total batch size.

    def _save_data_position(self, checkpoint: Path, data: Any, rows: int) -> None:
        if not isinstance(data, ResumableData):
            return
        if self.args.dataloader_num_workers > 0:
            # The data is read inside a worker process; its position never reaches this one.
            logger.warning("no stream position saved (--dataloader_num_workers > 0): resuming will replay the stream")
            return
        state = data.state_dict_after(rows)
        if state is None:  # e.g. the stream ran out and restarted: the row count no longer maps to a position
            logger.warning("no stream position saved at row %d: resuming will replay the stream", rows)
            return
        (checkpoint / STREAM_POSITION).write_text(json.dumps({"rows": rows, "state": state}), encoding="utf-8")

    def _resume_data(self, checkpoint: str, data: Any, rows_per_step: int) -> bool:
        """Position ``data`` at ``checkpoint``'s saved position; False (and a warning) when it must be replayed."""
        if not isinstance(data, torch.utils.data.IterableDataset):
            return False  # map-style data: the Trainer skips indices, reading nothing
        state_file, file = Path(checkpoint) / TRAINER_STATE, Path(checkpoint) / STREAM_POSITION
        step = json.loads(state_file.read_text(encoding="utf-8"))["global_step"] if state_file.is_file() else 0
        if step == 0:
            return False
        saved = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
        rows = step * rows_per_step
        if isinstance(data, ResumableData) and saved is not None and saved.get("rows") == rows:
            data.load_state_dict(saved["state"])
            self._rng_checkpoint, self._positioned = checkpoint, True
            logger.info("resuming the stream at its saved position (row %d)", rows)
            return True
        why = (
            f"{checkpoint} saved no stream position"
            if saved is None
            else f"{checkpoint}'s stream position is for row {saved.get('rows')}, this run is at row {rows} "
            "(the batch size changed?)"
        )
        if self.args.should_log:
            logger.warning(
                "%s: replaying the stream batch by batch up to step %d (re-reads every document before it)", why, step
            )
        return False

    # -- what skipping the data would have given -------------------------------------------------------------
    # transformers resumes iterable data only by fetching and discarding every batch before the checkpoint, then
    # restores the RNG state (after the loader's iterator drew its seed) and counts epochs from the batches it
    # skipped. Positioned data skips nothing, so these hooks put back the same RNG draws and epoch fraction.

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            remove_stale_staging(args.output_dir)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._rng_checkpoint is not None:  # the first batches are fetched: the stock resume reloads RNG here
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._positioned:  # the Trainer counted micro-batches from 0, not from the checkpoint's step
            accumulation = args.gradient_accumulation_steps
            state.epoch = state.global_step * accumulation / (state.max_steps * accumulation)
