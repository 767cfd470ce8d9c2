"""lmkit.pages: the pages of memory-mapped Arrow files are given back after a read, and nothing else is touched."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset

from lmkit.data import _tokenize_table
from lmkit.pages import release_pages, releasing_pages
from lmkit.tokenizer import build_tokenizer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")

N = 8 * 2**20  # int32 values: a 32 MiB column


def resident_kb(path: str) -> int:
    """This process's resident KB of its mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header line
                inside = len(head) == 6 and head[5] == path
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def mapped(tmp_path: Path, values: np.ndarray) -> Dataset:
    Dataset.from_dict({"x": values}).save_to_disk(str(tmp_path / "ds"))
    return Dataset.load_from_disk(str(tmp_path / "ds"))


def test_release_gives_back_a_read_tables_pages_and_the_values_read_back_the_same(tmp_path):
    values = np.arange(N, dtype=np.int32)
    ds = mapped(tmp_path, values)
    (path,) = [f["filename"] for f in ds.cache_files]
    column = ds.data.column("x")
    assert int(pa.compute.sum(column).as_py()) == int(values.sum(dtype=np.int64))  # reads every page
    assert resident_kb(path) > 0.9 * N * 4 / 1024
    advised = release_pages(ds.data)
    assert advised >= N * 4
    assert resident_kb(path) < 0.05 * N * 4 / 1024
    # A released page is read back from the file: the same values.
    np.testing.assert_array_equal(column.to_numpy(), values)


def test_memory_that_is_not_a_mapped_arrow_file_is_never_touched():
    values = np.arange(N, dtype=np.int32) * 3
    table = pa.table({"x": values.copy()})  # heap memory: MADV_DONTNEED there would zero it
    assert release_pages(table, pa.array(values), None) == 0
    np.testing.assert_array_equal(table.column("x").to_numpy(), values)


def test_releasing_pages_stops_its_thread_and_leaves_nothing_resident(tmp_path):
    ds = mapped(tmp_path, np.arange(N, dtype=np.int32))
    (path,) = [f["filename"] for f in ds.cache_files]
    with releasing_pages(ds.data, every=0.01):
        total = sum(int(pa.compute.sum(batch.column("x")).as_py()) for batch in ds.data.to_batches())
    assert total == N * (N - 1) // 2
    assert not [t for t in threading.enumerate() if t.name == "lmkit-release-pages"]
    assert resident_kb(path) < 0.05 * N * 4 / 1024


def test_a_tokenized_batch_leaves_none_of_its_text_resident(tmp_path):
    docs = [f"document {i} " + "word " * (i % 50) for i in range(40_000)]
    tokenizer = build_tokenizer("char", docs[:100], vocab_size=None)
    ds = mapped(tmp_path, np.array(docs, dtype=object)).rename_column("x", "text")
    (path,) = [f["filename"] for f in ds.cache_files]
    table = ds.data.table
    table.column("text").to_pylist()  # the text's pages resident, as a worker's read leaves them
    assert resident_kb(path) > 1000
    tokens = _tokenize_table(table, tokenizer).column("input_ids")
    assert resident_kb(path) < 100
    expected = [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in docs[:3]]
    assert tokens.slice(0, 3).to_pylist() == expected
