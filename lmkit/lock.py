"""One output dir, one run: an exclusive lock on ``--output_dir`` for as long as a training run lives.

The lock is an advisory ``flock`` on ``OUTPUT_DIR/.lmkit-run.lock``, held by the run's global rank 0 (so the machines
of one multi-node run that share a filesystem take it once). The kernel drops a flock when its process dies, however
it dies, so a lock file left by a killed run is recognised as stale by simply succeeding to lock it again; the file
itself only says who held it, for the message a second run prints. Linux NFS clients map flock to POSIX byte-range
locks, so the lock also holds across machines on a shared filesystem.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from lmkit.errors import LMKitError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lmkit-run.lock"


class OutputDirLock:
    """``acquire()`` takes the lock or raises `LMKitError` naming the dir and the run that holds it; ``release()``
    (also at interpreter exit, by the kernel) gives it back and removes what the lock itself created."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self._created_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read_holder(fd))
                os.close(fd)
                self._remove_created_dir()
                raise LMKitError(
                    f"--output_dir {self.dir} is in use by another run ({holder}); wait for it to finish, stop it, "
                    "or choose another --output_dir"
                ) from None
            # A releasing run unlinks the file after unlocking: if this fd locked that old inode, open the new one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            logger.warning("--output_dir %s: took over a stale lock (%s ended without releasing it)", self.dir,
                           _describe(stale))  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                self.dir.rmdir()  # only if the run left nothing in it
            except OSError:
                pass

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": _shorten(" ".join(sys.argv)),
    }


def _shorten(command: str, limit: int = 2000) -> str:
    # A holder record must stay whole within what `_read_holder` reads: a launcher can pass very long arguments.
    return command if len(command) <= limit else command[:limit] + " ..."


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)
