"""The download stage: a URL list in, image shards out (DESIGN.md, "download").

One asyncio event loop does all network I/O. Decode checks run in a process pool, never on the
loop. Several shards are in flight at once, so a slow host at the end of one shard never stalls
the run. Every row is written the moment it finishes (see shards.py), which is what makes a
killed run resume without fetching finished work again.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp.abc import AbstractResolver

from vlmdata.errors import UserError
from vlmdata.pipeline.fetch import (
    RETRYABLE_KINDS,
    FetchPolicy,
    FetchResult,
    RequestLimiter,
    fetch_with_deadline,
    open_session,
)
from vlmdata.pipeline.imageops import ImageInfo, inspect_image
from vlmdata.pipeline.shards import (
    FAILED_TO_DECODE,
    FAILED_TO_DOWNLOAD,
    RECORD_SCHEMA,
    SUCCESS,
    ShardFiles,
    ShardWriter,
    atomic_write_json,
    check_plan,
    exclusive_output,
    read_json,
    reopen_for_retry,
)
from vlmdata.pipeline.sources import Shard, UrlSource
from vlmdata.pipeline.stats import RunProgress, RunSummary, merge_stats


@dataclass
class DownloadConfig:
    """Everything `vlmdata download` takes; the CLI flags map one to one."""

    input: str
    output_dir: str
    url_col: str = "image_url"
    caption_col: str | None = "capsfusion"
    keep_cols: tuple[str, ...] = ()
    input_format: str | None = None
    shard_size: int = 10_000
    concurrency: int = 256  # requests in flight
    per_host: int = 16  # requests in flight to one host
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)  # decode workers
    max_pixels: int = 100_000_000  # larger images are refused before decoding
    limit: int | None = None
    retry_failed: bool = False
    quiet: bool = False
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self) -> None:
        for name in ("shard_size", "concurrency", "per_host", "processes", "max_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.fetch.timeout <= 0:
            raise UserError("--timeout must be a positive number of seconds")
        if self.fetch.retries < 0:
            raise UserError("--retries cannot be negative")
        if self.fetch.max_bytes < 1:
            raise UserError("--max-bytes must be at least 1")

    def plan(self, source: UrlSource) -> dict:
        """The input and the options that change what lands in the output."""
        return {
            "stage": "download",
            "input": source.fingerprint(),
            "shard_size": self.shard_size,
            "max_bytes": self.fetch.max_bytes,
            "max_pixels": self.max_pixels,
            "ignore_noai": self.fetch.ignore_noai,
            "allow_private_network": self.fetch.allow_private_network,
        }


def run_download(config: DownloadConfig, resolver: AbstractResolver | None = None) -> RunSummary:
    """Download every URL of ``config.input`` into shards under ``config.output_dir``.

    Resumes an interrupted run; returns at once when the output is already complete.
    ``resolver`` replaces the system DNS resolver (the SSRF guard still applies).
    """
    source = UrlSource(
        config.input, config.url_col, config.caption_col, config.keep_cols,
        config.input_format, config.limit,
    )  # fmt: skip
    out = Path(config.output_dir)
    with exclusive_output(out):
        check_plan(out, config.plan(source))
        root_stats = out / "stats.json"
        if not config.retry_failed and root_stats.exists() and read_json(root_stats)["complete"]:
            return RunSummary(str(out), read_json(root_stats), nothing_to_do=True)
        retried = _reopen_retryable_shards(out) if config.retry_failed else 0
        summary = asyncio.run(_DownloadRun(config, source, out, resolver).run())
    summary.retried = retried
    return summary


def _reopen_retryable_shards(out: Path) -> int:
    """Reopen finished shards that hold retryable failures; return how many rows to retry."""
    total = 0
    for stats_path in sorted(out.glob("*.stats.json")):
        if RETRYABLE_KINDS & set(read_json(stats_path)["error_kind"]):
            name = stats_path.name.removesuffix(".stats.json")
            total += reopen_for_retry(ShardFiles(out, name), set(RETRYABLE_KINDS))
    return total


class DecoderPool:
    """Worker processes for image checks, replaced if one dies (a decoder crash or OOM kill
    must cost one image, not the run)."""

    def __init__(self, processes: int) -> None:
        self._processes = processes
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn: forking a process that runs an event loop and resolver threads is unsafe.
        return ProcessPoolExecutor(self._processes, mp_context=multiprocessing.get_context("spawn"))

    async def inspect(self, data: bytes, max_pixels: int) -> ImageInfo:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, inspect_image, data, max_pixels)
            except BrokenProcessPool:
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._start()
        return ImageInfo(
            error_kind="decoder_crashed", error="the decoder process died on this image"
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _DownloadRun:
    """One run of the stage over the shards that are not finished yet."""

    def __init__(
        self,
        config: DownloadConfig,
        source: UrlSource,
        out: Path,
        resolver: AbstractResolver | None,
    ) -> None:
        self.config = config
        self.source = source
        self.out = out
        self.resolver = resolver
        self.shard_stats: dict[str, dict] = {}
        self.rows_this_run = 0

    async def run(self) -> RunSummary:
        config = self.config
        started = time.monotonic()
        self.progress = RunProgress(self.source.total_rows(), config.quiet)
        self.decoders = DecoderPool(config.processes)
        self.limiter = RequestLimiter(config.concurrency, config.per_host)
        # Rows started but not yet written: bounds the memory held by bodies and tasks.
        self.admission = asyncio.Semaphore(2 * config.concurrency)
        # Enough shards in flight to keep every request slot busy while one shard waits on
        # its slowest hosts.
        shard_slots = asyncio.Semaphore(
            max(4, math.ceil(2 * config.concurrency / config.shard_size) + 1)
        )
        try:
            async with open_session(config.fetch, config.concurrency, self.resolver) as session:
                self.session = session
                async with asyncio.TaskGroup() as shards_in_flight:
                    async for shard in self._shards():
                        files = ShardFiles(self.out, shard.name)
                        if files.done:
                            stats = read_json(files.stats)
                            self.shard_stats[shard.name] = stats
                            self.progress.skip(stats["rows"])
                            continue
                        await shard_slots.acquire()
                        task = shards_in_flight.create_task(self._process_shard(shard, files))
                        task.add_done_callback(lambda _: shard_slots.release())
        finally:
            self.decoders.shutdown()
            self.progress.close()
        totals = merge_stats([self.shard_stats[name] for name in sorted(self.shard_stats)])
        atomic_write_json(self.out / "stats.json", {**totals, "complete": True})
        return RunSummary(
            str(self.out), totals,
            elapsed_s=time.monotonic() - started,
            rows_this_run=self.rows_this_run,
            images_this_run=self.progress.status[SUCCESS],
            bytes_this_run=self.progress.bytes,
            this_run_status=dict(self.progress.status),
        )  # fmt: skip

    async def _shards(self):
        """The input's shards, read in a thread so parsing never blocks the event loop."""
        iterator = self.source.shards(
            self.config.shard_size,
            wanted=lambda index: not ShardFiles(self.out, f"{index:05d}").done,
        )
        while (shard := await asyncio.to_thread(next, iterator, None)) is not None:
            yield shard

    async def _process_shard(self, shard: Shard, files: ShardFiles) -> None:
        started = time.monotonic()
        writer = await asyncio.to_thread(ShardWriter, files)
        try:
            rows = shard.rows()
            todo = [row for row in rows if row["key"] not in writer.records]
            self.progress.skip(len(rows) - len(todo))
            self.rows_this_run += len(todo)
            # Duplicate URLs within a shard are fetched once and recorded for every row.
            by_url: dict[str | None, list[dict]] = {}
            for row in todo:
                by_url.setdefault(row["url"], []).append(row)
            async with asyncio.TaskGroup() as rows_in_flight:
                for url, group in by_url.items():
                    await self.admission.acquire()
                    rows_in_flight.create_task(self._download(url, group, writer))
            keys = [row["key"] for row in rows]
            stats = await asyncio.to_thread(
                writer.finish, keys, self.source.keep_schema, time.monotonic() - started
            )
        except BaseException:
            writer.close()
            raise
        self.shard_stats[shard.name] = stats

    async def _download(self, url: str | None, rows: list[dict], writer: ShardWriter) -> None:
        try:
            result = await fetch_with_deadline(self.session, url, self.config.fetch, self.limiter)
            info = (
                await self.decoders.inspect(result.body, self.config.max_pixels)
                if result.ok
                else None
            )
        except Exception as e:  # a bug must cost this URL, not the run; it shows in the stats
            result = FetchResult(error_kind="internal_error", error=f"{type(e).__name__}: {e}")
            info = None
        finally:
            self.admission.release()
        for row in rows:
            record = make_record(row, result, info)
            success = record["status"] == SUCCESS
            writer.add(
                record, result.body if success else None, info.extension if success else None
            )
            self.progress.record(record)


def make_record(row: dict, result: FetchResult, info: ImageInfo | None) -> dict:
    """The status row of one input row: what the parquet holds and KEY.json repeats."""
    record = dict.fromkeys(RECORD_SCHEMA.names)
    record.update(row)
    record.update(
        http_status=result.http_status,
        content_type=result.content_type,
        final_url=result.final_url,
        attempts=result.attempts,
        elapsed_s=round(result.elapsed_s, 4),
        bytes=len(result.body) if result.body is not None else None,
    )
    if not result.ok:
        record.update(status=FAILED_TO_DOWNLOAD, error_kind=result.error_kind, error=result.error)
    elif info is not None and not info.ok:
        record.update(status=FAILED_TO_DECODE, error_kind=info.error_kind, error=info.error)
    elif info is not None:
        record.update(
            status=SUCCESS, sha256=info.sha256, format=info.format,
            original_width=info.width, original_height=info.height,
            width=info.width, height=info.height,
        )  # fmt: skip
    return record
