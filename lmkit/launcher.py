"""What a recipe can learn about the ``accelerate launch`` process that started it.

Both of accelerate's launch paths leave the launcher as this process's parent: the single-process launcher runs the
script as its child, and torchrun's elastic agent (several processes, DeepSpeed, FSDP) runs inside the launcher.
The launcher's own command line and environment are what the user typed, before accelerate filled in its defaults
(it exports ``OMP_NUM_THREADS=1`` to the child unless told otherwise). Linux only (``/proc``); elsewhere nothing is
known and callers fall back to plain behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

# Environment variables through which MPI launchers give a process its place in the world (accelerate's MULTI_CPU).
MPI_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


def accelerate_launcher_pid() -> int | None:
    """The pid of the ``accelerate launch`` process that started this one, or None."""
    parent = os.getppid()
    argv = _cmdline(parent)
    words = [Path(a).name for a in argv[:3]]  # [python] accelerate launch | accelerate-launch | python -m ...launch
    if ("accelerate" in words and "launch" in argv) or {"accelerate-launch", "accelerate.commands.launch"} & set(
        words
    ):
        return parent
    return None


def user_set_threads() -> int | None:
    """The CPU thread count the user chose outside lmkit (``OMP_NUM_THREADS``, or accelerate's
    ``--num_cpu_threads_per_process``), or None when the value in this process's environment is only a default."""
    value = os.environ.get("OMP_NUM_THREADS")
    if not value:
        return None
    launcher = accelerate_launcher_pid()
    if launcher is not None:
        # accelerate sets OMP_NUM_THREADS for its child whatever the user did: it counts only if the user asked.
        asked = "OMP_NUM_THREADS" in _environ(launcher) or any(
            a.startswith("--num_cpu_threads_per_process") for a in _cmdline(launcher)
        )
        if not asked:
            return None
    try:
        return max(1, int(value))
    except ValueError:
        return None


def local_processes() -> int:
    """How many processes of this run share the machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 for a lone process)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which taskset and container cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def came_up_alone() -> bool:
    """True when a multi-process launch left this process alone in a world of size 1: accelerate's launcher set a
    rendezvous address (``MASTER_ADDR``) for several processes, but neither torchrun (``WORLD_SIZE``) nor an MPI
    launcher gave the process a place among them. ``accelerate launch --cpu`` with a multi-machine config does this:
    each machine then trains and saves a model of its own."""
    if "MASTER_ADDR" not in os.environ or accelerate_launcher_pid() is None:
        return False
    return "WORLD_SIZE" not in os.environ and not any(v in os.environ for v in MPI_WORLD_SIZE_VARS)


def live_siblings() -> list[int]:
    """Other live processes started by this process's parent (the other ranks under torchrun's elastic agent).

    Exited ones that the parent has not reaped yet (zombies) do not count."""
    parent, me, siblings = os.getppid(), os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        fields = stat_fields(int(entry.name))
        if fields and int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            siblings.append(int(entry.name))
    return siblings


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name, from the state on (``[0]`` state, ``[1]`` ppid,
    ``[19]`` start time); empty when the process is gone or /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces or ")"
    except (OSError, IndexError):
        return []


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _environ(pid: int) -> set[str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return set()
    return {entry.split(b"=", 1)[0].decode(errors="replace") for entry in raw.split(b"\0") if entry}
