"""The resize pool of `download --resize`: a crashing decoder costs its own image only, and
each worker keeps to one core."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from conftest import die_on_poison
from vlmdata.pipeline.download import ImagePool


def test_a_worker_crash_costs_only_the_image_that_caused_it():
    async def run() -> list:
        pool = ImagePool(2)
        try:
            inputs = [b"a", b"bb", b"poison", b"ccc", b"dddd"]
            return await asyncio.gather(*(pool.run(die_on_poison, data) for data in inputs))
        finally:
            pool.shutdown()

    results = asyncio.run(run())
    assert results[:2] == [1, 2] and results[3:] == [3, 4]  # in flight, yet not lost
    assert results[2].error_kind == "decoder_crashed"


def compute_threads() -> int:
    """The threads of this process once numpy (and OpenBLAS with it) is loaded, leaving out
    the memory allocator's background thread (pyarrow's jemalloc), which computes nothing."""
    import numpy  # noqa: F401

    names = [path.read_text().strip() for path in Path("/proc/self/task").glob("*/comm")]
    return sum(name != "jemalloc_bg_thd" for name in names)


@pytest.mark.skipif(
    not Path("/proc/self/task").exists() or (os.cpu_count() or 1) < 2,
    reason="needs Linux /proc and several cores (OpenBLAS starts one thread per core)",
)
def test_a_worker_runs_one_compute_thread_whatever_the_core_count():
    async def run() -> int:
        pool = ImagePool(1)
        try:
            return await pool.run(compute_threads)
        finally:
            pool.shutdown()

    # One per worker: N workers on N cores, not N x N threads.
    assert asyncio.run(run()) == 1
