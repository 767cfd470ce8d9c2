"""User-facing errors and the wrapper that turns them into a one-line message and a non-zero exit.

Under ``accelerate launch`` a plain non-zero exit is not enough: the launcher answers any failed child with its own
traceback (``CalledProcessError`` from the single-process launcher, ``ChildFailedError`` and a failure report from
torchrun's elastic agent), printed after the child's message. Both launchers end quietly on SIGTERM instead (accelerate
>= 1.16: the single-process launcher exits 143 after terminating its child, the elastic agent shuts its workers down and
exits 143), so a recipe that hit a user error asks its launcher to stop, and prints its one line when the launcher
terminates it in turn: that line is the last thing on the screen, with no traceback, and the exit status is non-zero.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmkit.launcher import accelerate_launcher_pid, live_siblings, stat_fields

logger = logging.getLogger(__name__)

# Exit status for every input error a user can fix (argparse uses 2 for usage errors too).
USER_ERROR_EXIT = 2
# The first accelerate release whose launchers (single-process and torchrun) exit without a traceback on SIGTERM.
QUIET_LAUNCHER_VERSION = (1, 16)
# How long a process waits for its launcher to terminate it before it prints and exits by itself.
LAUNCHER_GRACE_SECONDS = 20.0
# How long the reporting process waits, once terminated, for the other ranks to exit before it prints its line.
SIBLING_EXIT_SECONDS = 5.0


class LMKitError(Exception):
    """A problem with what the user gave us (a path, a file, a flag). The message names the field or file."""


class RelayedError(LMKitError):
    """Another process's `LMKitError`, raised again by a rank that waited on it (`lmkit.distributed.
    main_process_first`). That process reports it: this one leaves the report to it, so the process that failed
    first releases what it holds (the output dir it created) before the launcher stops everyone."""


# What a recipe holds until it ends (the output dir's lock): released before the error line, whatever the outcome.
_exit_callbacks: list[Callable[[], None]] = []


def call_on_recipe_exit(callback: Callable[[], None]) -> None:
    """Have `main_entry` call ``callback`` when the recipe returns or fails, before any error is reported."""
    _exit_callbacks.append(callback)


def _run_exit_callbacks() -> None:
    while _exit_callbacks:
        _exit_callbacks.pop()()


def main_entry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's ``main``: an `LMKitError` becomes ``lmkit: error: <message>`` on stderr, last, and a
    non-zero exit (2 when run directly; the launcher's 143 under ``accelerate launch``).

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            end_process_group()
            return result
        except LMKitError as err:
            _run_exit_callbacks()  # now: under a launcher the process ends in a signal handler (os._exit), not here
            message = " ".join(str(err).split())  # one line, whatever the message was built from
            exit_with_error(f"lmkit: error: {message}", relayed=isinstance(err, RelayedError))
        finally:
            _run_exit_callbacks()

    return wrapper


def end_process_group() -> None:
    """Destroy the default process group of a multi-process run that finished, while the interpreter is alive.

    Left to interpreter teardown, gloo's worker threads can still hold finished work whose tensors reference Python
    objects; destroying those then aborts the process ("terminate called without an active exception", SIGABRT,
    pytorch/pytorch#190489), and the launcher reports a run that had saved everything as failed. Only on success:
    after an error another rank may still be inside a collective, and the launcher stops every rank anyway.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_with_error(line: str, relayed: bool = False) -> None:
    """Print ``line`` as the last line of the run's output and exit non-zero; never returns. ``relayed``: the error
    is another process's (`RelayedError`), which reports it; this one reports only if that has not happened within
    `LAUNCHER_GRACE_SECONDS`."""
    sys.stdout.flush()
    launcher = accelerate_launcher_pid() if _accelerate_is_quiet_on_sigterm() else None
    if launcher is None:
        print(line, file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)

    # One process per launch reports (several ranks usually hit the same bad input); the others wait to be stopped.
    reporter = False

    def on_terminate(signum: int, frame: Any) -> None:
        if reporter:
            # The elastic agent logs "Sending process N closing signal SIGTERM" before it signals each rank: once
            # the other ranks are gone, it has nothing left to print, and this line stays the last one.
            deadline = time.monotonic() + SIBLING_EXIT_SECONDS
            while live_siblings() and time.monotonic() < deadline:
                time.sleep(0.02)
            print(line, file=sys.stderr, flush=True)
        os._exit(USER_ERROR_EXIT)

    signal.signal(signal.SIGTERM, on_terminate)
    if relayed:
        time.sleep(LAUNCHER_GRACE_SECONDS)  # the failing process reports, and the launcher terminates this one
    reporter = _claim_report(launcher)
    if reporter:
        os.kill(launcher, signal.SIGTERM)
    time.sleep(LAUNCHER_GRACE_SECONDS)  # the launcher terminates this process well before
    on_terminate(signal.SIGTERM, None)


def _accelerate_is_quiet_on_sigterm() -> bool:
    try:
        from importlib.metadata import version

        parts = version("accelerate").split(".")[:2]
        return tuple(int(p) for p in parts) >= QUIET_LAUNCHER_VERSION
    except Exception:  # not installed, or a version string we cannot read: keep the plain exit
        return False


def _claim_report(launcher: int) -> bool:
    """True for the first process of this launch to claim the report (an exclusive marker file per launcher)."""
    fields = stat_fields(launcher)
    started = fields[19] if len(fields) > 19 else "0"  # the launcher's start time: a reused pid gets a new marker
    marker = Path(tempfile.gettempdir()) / f"lmkit-error-{launcher}-{started}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return True  # no marker possible: report anyway (at worst one line per rank)
    return True
