"""Run a stage's shard worker over the shards to do: in this process, or in a pool of processes.

Shards are the unit of work and the output directory the only shared state, so a worker is a
plain function ``work(shards, progress)``. With one process it runs here; with N, each worker
process pulls shards from a bounded queue (memory stays flat) and reports per-row outcomes back
in batches, so the bar, the early warning and the summary live in the parent alone.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from vlmdata.pipeline.sources import Shard

_FLUSH_S = 0.2
_FLUSH_ROWS = 512


class Progress(Protocol):
    """Where a worker reports rows: finished by an earlier run (skip) or just now (record)."""

    def skip(self, rows: int) -> None: ...

    def record(self, status: str, error_kind: str | None, nbytes: int) -> None: ...


Work = Callable[[Iterator[Shard], Progress], None]


def distribute(work: Work, shards: Iterator[Shard], processes: int, progress: Progress) -> None:
    """Run ``work`` over ``shards`` with ``processes`` processes, reporting to ``progress``.

    ``work`` must be picklable (a module-level function or a partial of one) when
    ``processes`` > 1. Raises RuntimeError if a worker process dies.
    """
    if processes == 1:
        work(shards, progress)
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads
    todo: multiprocessing.Queue = ctx.Queue(maxsize=2 * processes)
    events: multiprocessing.Queue = ctx.Queue()
    workers = [
        ctx.Process(target=_worker_main, args=(work, todo, events), daemon=True)
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    feeder = _Feeder(shards, todo, processes, workers)
    feeder.start()
    try:
        while any(w.is_alive() for w in workers) or not events.empty():
            try:
                batch = events.get(timeout=0.1)
            except queue.Empty:
                continue
            for status, error_kind, nbytes in batch:
                if status == "skip":
                    progress.skip(nbytes)
                else:
                    progress.record(status, error_kind, nbytes)
    finally:
        feeder.stop.set()
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
        feeder.join()
    if feeder.error is not None:
        raise feeder.error
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"a worker process died (exit code {failed[0]}); rerun to resume")


class _Feeder(threading.Thread):
    """Reads shards in the parent and queues them; stops early if the workers are gone."""

    def __init__(self, shards: Iterator[Shard], todo, processes: int, workers: list) -> None:
        super().__init__(daemon=True)
        self.shards, self.todo, self.processes, self.workers = shards, todo, processes, workers
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for shard in self.shards:
                if not self._put(shard):
                    return
        except BaseException as e:  # a read error must reach the parent thread
            self.error = e
        for _ in range(self.processes):
            self._put(None)

    def _put(self, item: Shard | None) -> bool:
        while not self.stop.is_set() and any(w.is_alive() for w in self.workers):
            try:
                self.todo.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _EventSink:
    """A worker's Progress: buffers outcomes and sends them to the parent in batches."""

    def __init__(self, events) -> None:
        self.events = events
        self.buffer: list[tuple[str, str | None, int]] = []
        self.flushed = time.monotonic()

    def skip(self, rows: int) -> None:
        self.buffer.append(("skip", None, rows))
        self._maybe_flush()

    def record(self, status: str, error_kind: str | None, nbytes: int) -> None:
        self.buffer.append((status, error_kind, nbytes))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.buffer) >= _FLUSH_ROWS or time.monotonic() - self.flushed > _FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.events.put(self.buffer)
            self.buffer = []
        self.flushed = time.monotonic()


def _queued_shards(todo) -> Iterator[Shard]:
    while (shard := todo.get()) is not None:
        yield shard


def _worker_main(work: Work, todo, events) -> None:
    sink = _EventSink(events)
    try:
        work(_queued_shards(todo), sink)
    finally:
        sink.flush()
