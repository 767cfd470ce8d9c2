"""Keeping long runs alive: SIGTERM / SIGINT checkpoint and exit, NaN/Inf steps are skipped.

- SIGTERM / SIGINT request a checkpoint at the next optimizer-step boundary; the run then exits with status
  128 + signal number and a one-line message saying how to resume. A second SIGINT stops at once.
- A step whose loss or gradient is NaN/Inf is skipped (gradients dropped, so the optimizer leaves the weights and
  its moments untouched) and counted in the logs as ``nonfinite_skipped``; ``--max_nonfinite_steps`` consecutive
  ones stop the run with a one-line message, before anything is saved.

Both are callbacks `LMTrainer` adds. Checkpoints themselves (staging, resume, stream position) are
`lmkit.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmkit.checkpoint import complete_checkpoints
from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)


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
            self.restore_signals()
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is not None:  # already stopping: keep the signal that asked first (Ctrl-C reaches the
            return  # launcher too, which then sends SIGTERM: the run still stops "by SIGINT", status 130)
        self.signum = signum
        logger.warning("%s received: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def restore_signals(self) -> None:
        """Put back the handlers `on_train_begin` replaced (a no-op when none are installed)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.signum = None
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
        self.restore_signals()
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
        self.restore_signals()


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
