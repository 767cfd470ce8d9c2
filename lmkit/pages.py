"""Give back the pages of memory-mapped Arrow files once they have been read.

`datasets` memory-maps its Arrow files, so every page a process reads stays in that process's resident set until
the mapping closes: reading a table once, start to end, leaves the whole file resident (a 1 GB corpus tokenized
in one process ends with > 1 GB of RSS even though the heap stays flat). The pages are clean copies of the file
that the kernel could drop, but RSS limits (cgroups, schedulers, ``ru_maxrss``) count them. Neither `datasets` nor
pyarrow offers a way to release them, so this module does it with ``madvise(MADV_DONTNEED)``: for a read-only
mapping of an ``.arrow`` file that only drops the process's page-table entries, and a later read faults the page
back from the page cache (or the file). Nothing else is ever advised: anonymous memory and other files' mappings
(a shared library's relocated pages are private copies) are left alone. Linux only; elsewhere these do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _arrow_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's read-only mappings of ``.arrow`` files, from ``/proc/self/maps``."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip().endswith(".arrow") and "w" not in parts[1]:
                start, end = parts[0].split("-")
                spans.append((int(start, 16), int(end, 16)))
    return spans


def _buffers(data: Any) -> Iterator[pa.Buffer]:
    """Every buffer under a Table, RecordBatch, ChunkedArray or Array (children of nested types included), or
    under a `datasets` table (which wraps a pyarrow Table as ``.table``)."""
    if data is None:  # e.g. a Dataset's ``_indices`` when it has no index mapping
        return
    if isinstance(getattr(data, "table", None), pa.Table):
        yield from _buffers(data.table)
    elif isinstance(data, (pa.Table, pa.RecordBatch)):
        for column in data.columns:
            yield from _buffers(column)
    elif isinstance(data, pa.ChunkedArray):
        for chunk in data.chunks:
            yield from _buffers(chunk)
    else:  # Array: buffers() lists its children's too, depth first
        yield from (b for b in data.buffers() if b is not None)


def release_pages(*tables: Any) -> int:
    """Drop this process's resident pages of the memory-mapped Arrow files under ``tables``; return the bytes
    advised. Data in memory (not a mapping of an ``.arrow`` file) is never touched. Safe at any time: a page read
    again is faulted back in."""
    return _advise(_mapped_ranges(tables))


def _mapped_ranges(tables: tuple[Any, ...]) -> list[tuple[int, int]]:
    """The page-aligned address ranges of ``tables``' buffers that lie in read-only mappings of ``.arrow`` files."""
    if _libc is None:
        return []
    spans = _arrow_mappings()
    ranges = set()
    if spans:
        for table in tables:
            for buf in _buffers(table):
                lo, hi = buf.address, buf.address + buf.size
                for start, end in spans:
                    if start <= lo < end:  # page-align outwards, within the mapping
                        ranges.add((max(start, lo - lo % _PAGE), min(end, -(-hi // _PAGE) * _PAGE)))
                        break
    merged: list[tuple[int, int]] = []  # a table's buffers lie nearly back to back: one range per file, mostly
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _advise(ranges: list[tuple[int, int]]) -> int:
    advised = 0
    for start, end in ranges:
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            advised += end - start
    return advised


@contextlib.contextmanager
def releasing_pages(*tables: Any, every: float = 0.02) -> Iterator[None]:
    """While the block runs, release ``tables``' pages every ``every`` seconds (see `release_pages`): for reads
    that lmkit does not drive itself, such as ``save_to_disk`` copying a table. The ranges are found once (the
    tables, so their mappings, live through the block), so each round is a few system calls."""
    ranges, stop = _mapped_ranges(tables), threading.Event()
    _advise(ranges)  # what was read before, opening the tables included (their record batches' headers)

    def loop() -> None:
        while not stop.wait(every):
            _advise(ranges)

    thread = threading.Thread(target=loop, name="lmkit-release-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _advise(ranges)
