"""The resize pool of `download --resize`: a crashing decoder costs its own image only."""

from __future__ import annotations

import asyncio

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
