"""Noticing when a shard is done, and publishing it when the output is an object store.

A stage's work function knows nothing of either: it writes a shard's files into its output
directory and its stats marker last. The process that runs the work (the parent, a pool
worker, a Ray actor) watches the markers of the shards it handed out; a shard whose marker is
complete is done, and for an object-store output it is published then (data files whole, the
marker last, see :mod:`vlmdata.pipeline.storage`) and its staged files freed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from vlmdata.pipeline.distributor import Progress, Shard, Work
from vlmdata.pipeline.shards import ShardFiles, complete_shard_stats
from vlmdata.pipeline.storage import InputCache, RemoteOutput

_POLL_S = 0.05


@dataclass(frozen=True)
class ShardSink:
    """Where a stage's work puts finished shards."""

    out: Path  # where the work writes: the output, or the staging of a remote one
    data_files: tuple[str, ...]
    remote: RemoteOutput | None = None
    plan: dict | None = None  # the run's plan: staging made for another plan is discarded
    input_cache: InputCache | None = None  # an input at a URL, fetched shard by shard

    def hand_out(
        self, shard: Shard, watcher: ShardWatcher, progress: Progress
    ) -> threading.Event | None:
        """Get ``shard`` ready for the work on this machine: None when it needs none (done
        and staged by a run that stopped before publishing it: published now), else fetch what
        the work reads of it from an input at a URL; the event set once it is done."""
        if (stats := self.done_stats(shard.name)) is not None:
            self.finish(shard.name)
            progress.skip(stats["rows"])
            return None
        data = getattr(shard, "tar", None) or getattr(shard, "h5", None)
        if self.input_cache is not None and data is not None:
            self.input_cache.fetch_shard(data)
        return watcher.expect(shard.name, data)

    def done_stats(self, name: str) -> dict | None:
        return complete_shard_stats(ShardFiles(self.out, name), self.data_files)

    def finish(self, name: str, data: Path | None = None) -> None:
        """Shard ``name`` is done: publish it, and give back the input shard ``data`` fetched
        for it from a URL."""
        if self.remote is not None:
            self.remote.publish_shard(name, self.data_files)
        if self.input_cache is not None and data is not None:
            self.input_cache.release_shard(data)


class ShardWatcher:
    """Sets an event per shard once it is done (and published), from a thread of its own."""

    def __init__(self, sink: ShardSink) -> None:
        self.sink = sink
        self.pending: dict[str, tuple[threading.Event, Path | None]] = {}
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vlmdata-shard-watch",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def expect(self, name: str, data: Path | None = None) -> threading.Event:
        """An event set once shard ``name`` (made from the input file ``data``) is done."""
        event = threading.Event()
        with self._lock:
            self.pending[name] = (event, data)
        return event

    def close(self) -> None:
        """Stop watching after a last look; raise a publishing failure."""
        self._stop.set()
        self._thread.join()
        self._sweep()
        if self.failure is not None:
            raise self.failure

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_S):
            self._sweep()

    def _sweep(self) -> None:
        with self._lock:
            names = list(self.pending)
        for name in names:
            if self.failure is not None or self.sink.done_stats(name) is None:
                continue
            event, data = self.pending[name]
            try:
                self.sink.finish(name, data)
            except BaseException as e:  # an upload refused: the run stops with it
                self.failure = e
                return
            with self._lock:
                del self.pending[name]
            event.set()


def finishing(work: Work, sink: ShardSink) -> Work:
    """``work`` that publishes each shard it finishes to ``sink``'s object store."""
    return partial(_run_finishing, work, sink)


def _run_finishing(work: Work, sink: ShardSink, shards: Iterator[Shard], progress: Progress
                   ) -> None:  # fmt: skip
    if sink.remote is not None:
        sink.remote.prepare_staging(sink.plan)
    watcher = ShardWatcher(sink)

    def handed_out() -> Iterator[Shard]:
        for shard in shards:
            if watcher.failure is not None:  # a refused upload: stop before staging more
                raise watcher.failure
            if sink.hand_out(shard, watcher, progress) is not None:
                yield shard

    try:
        work(handed_out(), progress)
    except BaseException:
        with contextlib.suppress(Exception):  # the work's own failure is the one to report
            watcher.close()
        raise
    watcher.close()
