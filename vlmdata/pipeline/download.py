"""The download stage: a URL list in, image shards out (DESIGN.md, "download").

One asyncio event loop per process does all network I/O. Image checks run on threads, and the
decoding and resizing of ``--resize`` in worker processes: never on the loop. Several shards
are in flight at once, so a slow host at the end of one shard never stalls the run. Every row
is written the moment it finishes (see shards.py), which is what makes a killed run resume
without fetching finished work again.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import pyarrow as pa
from aiohttp.abc import AbstractResolver

from vlmdata.errors import UserError, require_at_least, require_finite
from vlmdata.pipeline.distributor import (
    Progress,
    default_download_processes,
    single_threaded_worker,
    usable_cpus,
)
from vlmdata.pipeline.fetch import (
    RETRYABLE_KINDS,
    FetchPolicy,
    FetchResult,
    RequestLimiter,
    fetch_with_deadline,
    open_session,
)
from vlmdata.pipeline.imageops import (
    ImageResult,
    SquareOptions,
    decoder_warnings_ignored,
    inspect_image,
    square_image,
)
from vlmdata.pipeline.ray_distributor import RayOptions, largest_node_cpus
from vlmdata.pipeline.runner import Stage, output_location, run_stage
from vlmdata.pipeline.shards import (
    FAILED_TO_DECODE,
    FAILED_TO_DOWNLOAD,
    RECORD_SCHEMA,
    STAGE_DATA_FILES,
    SUCCESS,
    ShardFiles,
    ShardWriter,
    reopen_for_retry,
    shard_name,
)
from vlmdata.pipeline.sources import Shard, UrlSource
from vlmdata.pipeline.stats import RunSummary
from vlmdata.pipeline.storage import InputCache, is_url


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
    # Download processes, each an event loop over whole shards.
    processes: int = field(default_factory=default_download_processes)
    max_pixels: int = 100_000_000  # larger images are refused before decoding
    resize: SquareOptions | None = None  # None: store the original bytes
    limit: int | None = None
    retry_failed: bool = False
    quiet: bool = False
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    ray: RayOptions | None = None  # --distributor ray: `processes` Ray workers, limits each
    resize_workers: int | None = None  # None: this process's share of the usable CPUs

    def __post_init__(self) -> None:
        require_at_least(1, shard_size=self.shard_size, concurrency=self.concurrency,
                         per_host=self.per_host, processes=self.processes,
                         max_pixels=self.max_pixels, max_bytes=self.fetch.max_bytes)  # fmt: skip
        require_at_least(0, retries=self.fetch.retries)
        require_finite("--timeout", self.fetch.timeout, 0, 24 * 3600)
        token = self.fetch.user_agent_token
        if token is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", token):
            raise UserError(
                f"--user-agent-token {token!r} must be one word of letters, digits, '.', '_' or "
                "'-' (it goes into the User-Agent header)"
            )

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
            "resize": asdict(self.resize) if self.resize else None,
        }


def run_download(config: DownloadConfig, resolver: AbstractResolver | None = None) -> RunSummary:
    """Download every URL of ``config.input`` into shards under ``config.output_dir``.

    Resumes an interrupted run; returns at once when the output is already complete.
    ``resolver`` replaces the system DNS resolver (the SSRF guard still applies); it must be
    picklable when ``config.processes`` > 1.
    """
    out, remote = output_location(config.output_dir, inputs=(config.input,))
    if remote is not None and config.retry_failed:
        raise UserError("--retry-failed rewrites finished shards in place and needs a local "
                        "OUTPUT_DIR; rerun it where the shards are on disk")  # fmt: skip
    input_text = str(InputCache(config.input).sync()) if is_url(config.input) else config.input
    source = UrlSource(
        input_text, config.url_col, config.caption_col, config.keep_cols,
        config.input_format, config.limit,
    )  # fmt: skip
    total = source.total_rows()
    planned = None
    if total is not None:
        planned = [shard_name(i) for i in range(math.ceil(total / config.shard_size))]
    given = Path(input_text)
    ray = config.ray
    if ray is not None:  # each Ray worker is one event loop with the whole limits
        in_flight = shards_in_flight(config.concurrency, config.shard_size)
        # With --resize a loop keeps ~4 cores busy (itself and its resize pool): Ray places
        # the workers by that, and a worker's pool is its own cores, not its node's.
        cpus = min(_CPUS_PER_RESIZING_LOOP, largest_node_cpus(ray.address)) if config.resize else 1
        ray = replace(ray, shards_per_worker=in_flight, cpus_per_worker=cpus)
        config = replace(config, processes=1, ray=None, resize_workers=max(1, cpus - 1))
    stage = Stage(
        name="download",
        output_dir=out,
        plan=config.plan(source),
        inputs=[*source.files, *([given] if given.is_dir() else [])],
        data_files=STAGE_DATA_FILES["download"],
        planned_shards=planned,
        unit="url",
        total_rows=total if total is not None else config.limit,  # a bar to --limit at most
        processes=config.processes,
        quiet=config.quiet,
        hint=(" No retryable failures are left." if config.retry_failed
              else " Use --retry-failed to re-attempt retryable failures."),
        reopen=_reopen_retryable_shards if config.retry_failed else None,
        remote=remote,
        ray=ray,
    )  # fmt: skip

    def shards(stage: Stage) -> Iterator[Shard]:
        # Finished shards come through the reader as empty tables, their rows unread.
        wanted = lambda i: not stage.is_complete(shard_name(i))  # noqa: E731
        return source.shards(config.shard_size, wanted=wanted)

    return run_stage(stage, shards, partial(download_shards, config, str(out), resolver))


def _reopen_retryable_shards(stage: Stage) -> int:
    """Reopen finished shards that hold retryable failures; return how many rows to retry."""
    total = 0
    names = stage.planned_shards or sorted(
        p.name.removesuffix(".stats.json") for p in stage.output_dir.glob("*.stats.json")
    )
    for name in names:
        stats = stage.complete_stats(name)
        if stats is None:
            continue  # unfinished shards are resumed anyway; strays are not shards
        if RETRYABLE_KINDS & set(stats.get("error_kind", {})):
            total += reopen_for_retry(stage.shard_files(name), set(RETRYABLE_KINDS))
    return total


def download_shards(
    config: DownloadConfig,
    out_dir: str,
    resolver: AbstractResolver | None,
    shards: Iterator[Shard],
    progress: Progress,
) -> None:
    """One process's share of the run: download ``shards`` on an event loop of its own."""
    with decoder_warnings_ignored():
        asyncio.run(ShardDownloader(config, Path(out_dir), resolver, progress).run(shards))


_CPUS_PER_RESIZING_LOOP = 4  # see default_download_processes


def shards_in_flight(concurrency: int, shard_size: int) -> int:
    """Shards one event loop downloads at once: enough to keep every request slot busy while
    one shard waits on its slowest hosts."""
    return max(4, math.ceil(2 * concurrency / shard_size) + 1)


class ShardDownloader:
    """Downloads shards on one event loop, several shards in flight at once.

    The loop only does network I/O. Checking and hashing a body and appending it to the tar
    run on a few threads (Pillow's header parse, hashlib and file writes release the GIL or
    are short); a process pool would cost more in pickling 200 KB bodies than the check itself.
    With ``--resize`` the squares are made in worker processes (decoding and resampling are
    ~7 ms of CPU an image, ~4x what the loop spends on it) and appended on the same threads.
    """

    def __init__(
        self,
        config: DownloadConfig,
        out: Path,
        resolver: AbstractResolver | None,
        progress: Progress,
    ) -> None:
        self.config = config
        self.out = out
        self.resolver = resolver
        self.progress = progress
        # Each of N processes takes 1/N of the global limits.
        self.concurrency = math.ceil(config.concurrency / config.processes)
        self.per_host = math.ceil(config.per_host / config.processes)

    async def run(self, shards: Iterator[Shard]) -> None:
        self.limiter = RequestLimiter(self.concurrency, self.per_host)
        # Rows started but not yet written. Bodies that arrived wait for their check inside
        # this bound, so a SIGKILL loses at most --concurrency finished downloads (and memory
        # held by bodies and tasks stays bounded).
        self.admission = asyncio.Semaphore(self.concurrency)
        self.image_threads = ThreadPoolExecutor(_IMAGE_THREADS, thread_name_prefix="vlmdata-image")
        # Decoding and resizing is real CPU work: worker processes, sized to this process's
        # share of the CPUs the run may use.
        workers = self.config.resize_workers or max(1, usable_cpus() // self.config.processes)
        self.resize_pool = ImagePool(workers) if self.config.resize else None
        shard_slots = asyncio.Semaphore(shards_in_flight(self.concurrency, self.config.shard_size))
        try:
            async with (
                open_session(self.config.fetch, self.concurrency, self.resolver) as self.session,
                asyncio.TaskGroup() as shard_tasks,
            ):
                # The shard iterator parses input or waits on a queue: keep it off the loop.
                while (shard := await asyncio.to_thread(next, shards, None)) is not None:
                    await shard_slots.acquire()
                    task = shard_tasks.create_task(self._process_shard(shard))
                    task.add_done_callback(lambda _: shard_slots.release())
        finally:
            self.image_threads.shutdown(wait=True)
            if self.resize_pool:
                self.resize_pool.shutdown()

    async def _process_shard(self, shard: Shard) -> None:
        started = time.monotonic()
        writer = await asyncio.to_thread(ShardWriter, ShardFiles(self.out, shard.name))
        try:
            rows = shard.rows()
            todo = [row for row in rows if row["key"] not in writer.records]
            if len(todo) < len(rows):
                self.progress.skip(len(rows) - len(todo))  # recovered from an interrupted run
            # Duplicate URLs within a shard are fetched once and recorded for every row.
            by_url: dict[str | None, list[dict]] = {}
            for row in todo:
                by_url.setdefault(row["url"], []).append(row)
            async with asyncio.TaskGroup() as row_tasks:
                for url, group in by_url.items():
                    await self.admission.acquire()
                    row_tasks.create_task(self._download(url, group, writer))
            kept = list(shard.table.schema)[2:]  # the input columns after url and caption
            keys = [row["key"] for row in rows]
            duration = time.monotonic() - started
            schema = pa.schema([*RECORD_SCHEMA, *kept])
            await asyncio.to_thread(writer.finish, keys, schema, duration, rows)
        except BaseException:
            writer.close()
            raise

    async def _download(self, url: str | None, rows: list[dict], writer: ShardWriter) -> None:
        try:
            try:
                result = await fetch_with_deadline(
                    self.session, url, self.config.fetch, self.limiter
                )
            except Exception as e:  # a network-stack surprise costs this URL, not the run
                result = FetchResult(error_kind="internal_error", error=f"{type(e).__name__}: {e}")
            if result.ok:
                records = await self._store(rows, result, writer)
            else:  # a failure is one journal line: cheaper here than a thread hop
                records = write_records(rows, result, None, writer)
        finally:
            self.admission.release()
        for record in records:
            success = record["status"] == SUCCESS
            self.progress.record(
                record["status"], record["error_kind"], record["bytes"] if success else 0
            )

    async def _store(
        self, rows: list[dict], result: FetchResult, writer: ShardWriter
    ) -> list[dict]:
        """Check (or square) a fetched body off the loop, then record it for its rows."""
        max_pixels = self.config.max_pixels
        if self.resize_pool is None:  # check, hash and append ~200 KB: one thread hop
            return await asyncio.get_running_loop().run_in_executor(
                self.image_threads, check_and_write, rows, result, writer, max_pixels
            )
        image = await self.resize_pool.run(
            square_image, result.body, self.config.resize, max_pixels
        )
        # Off the loop too: a write that waits on the disk must not stall every connection.
        return await asyncio.get_running_loop().run_in_executor(
            self.image_threads, write_records, rows, result, image, writer
        )


_IMAGE_THREADS = 2


class ImagePool:
    """Worker processes for image work, replaced if one dies (a decoder crash or an OOM kill
    must cost one image, not the run, and not the other images in flight when it happened)."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool = self._start(workers)
        # Images caught in a pool's death are retried alone; a few at a time.
        self._isolation = asyncio.Semaphore(workers)

    @staticmethod
    def _start(workers: int) -> ProcessPoolExecutor:
        # spawn: forking a process that runs an event loop and threads is unsafe. Each worker
        # keeps one core busy: one compute thread, whatever numpy would start.
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=single_threaded_worker,
        )  # fmt: skip

    async def run(self, fn: Callable[..., ImageResult], *args: object) -> ImageResult:
        """``fn(*args)`` in a worker process, quiet about bad files."""
        loop = asyncio.get_running_loop()
        pool = self._pool
        call = (_quietly, fn, *args)
        try:
            return await loop.run_in_executor(pool, *call)
        except BrokenProcessPool:
            if self._pool is pool:  # the first image to notice replaces the pool
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start(self._workers)
        # This image was in flight when a worker died: it, or another one, crashed it. Alone
        # in a process of its own, an innocent image succeeds and only the culprit is lost.
        async with self._isolation:
            alone = self._start(1)
            try:
                return await loop.run_in_executor(alone, *call)
            except BrokenProcessPool:
                return ImageResult(
                    status=FAILED_TO_DECODE, error_kind="decoder_crashed",
                    error="the image worker process died on this image",
                )  # fmt: skip
            finally:
                alone.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _quietly(fn: Callable[..., ImageResult], *args: object) -> ImageResult:
    """``fn(*args)`` without Pillow's warnings about bad files: every image gets a status row."""
    with decoder_warnings_ignored():
        return fn(*args)


def check_and_write(
    rows: list[dict], result: FetchResult, writer: ShardWriter, max_pixels: int
) -> list[dict]:
    """Check a fetched body (stored as is) and record it for every row that asked for it."""
    return write_records(rows, result, inspect_image(result.body, max_pixels), writer)


def write_records(
    rows: list[dict], result: FetchResult, image: ImageResult | None, writer: ShardWriter
) -> list[dict]:
    """Record one fetch outcome for every row that asked for its URL; return the records."""
    stored = None
    if image is not None and image.ok:
        stored = image.data if image.data is not None else result.body
    records = []
    for row in rows:
        record = make_record(row, result, image, stored)
        if stored is not None:
            writer.add(record, stored, image.extension)
        else:
            writer.add(record)
        records.append(record)
    return records


def make_record(
    row: dict, result: FetchResult, image: ImageResult | None, stored: bytes | None
) -> dict:
    """The status row of one input row: what the parquet holds and KEY.json repeats."""
    record = dict.fromkeys(RECORD_SCHEMA.names)
    record.update(row)
    record.update(
        http_status=result.http_status,
        content_type=result.content_type,
        final_url=result.final_url,
        attempts=result.attempts,
        elapsed_s=round(result.elapsed_s, 4),
    )
    if not result.ok or image is None:
        record.update(status=FAILED_TO_DOWNLOAD, error_kind=result.error_kind, error=result.error)
        return record
    record.update(
        image.record_fields(),
        # what is stored for a success, what arrived otherwise
        bytes=len(stored) if stored is not None else len(result.body or b""),
    )
    return record
