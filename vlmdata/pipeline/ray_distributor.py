"""Run a stage's shard worker on a Ray cluster (``--distributor ray``).

Each Ray worker is an actor that runs the stage's own work function, exactly as a local worker
process does: built once (an encoder loads its model once), fed shard after shard. Every shard
is one actor task, ``run(shard)``, which returns when the shard is done (its stats marker
complete, and published when the output is an object store), so the output files are the
local run's. Ray does the rest: placing actors by their CPUs and GPUs, restarting an actor
that died and retrying its shards (``--max-shard-retries``), moving shards and reports through
its object store. Rows reported by the workers reach one progress bar here through a Ray queue.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmdata.errors import MachineFailure, UserError
from vlmdata.pipeline.distributor import (
    BatchedProgress,
    Progress,
    Shard,
    Work,
    WorkerError,
    WorkerFailure,
    report_rows,
)
from vlmdata.pipeline.finishing import ShardSink, ShardWatcher

_POLL_S = 0.2
_CONNECT_S = 5.0  # how long an unreachable cluster address may take to refuse


@dataclass(frozen=True)
class RayOptions:
    """How a stage runs on Ray."""

    address: str | None = None  # None: RAY_ADDRESS, else a running cluster, else a local one
    workers: int | None = None  # actors; None: as many as the cluster's CPUs or GPUs fit
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_shard_retries: int = 3
    shards_per_worker: int = 2  # handed to an actor at once: the next waits while one runs

    def __post_init__(self) -> None:
        if self.gpus_per_worker < 0 or not math.isfinite(self.gpus_per_worker):
            raise UserError("--gpus-per-worker must be 0 or more (fractions share a GPU)")
        if self.max_shard_retries < 0:
            raise UserError("--max-shard-retries must be 0 or more")
        if self.workers is not None and self.workers < 1:
            raise UserError("the number of Ray workers must be at least 1")


def import_ray() -> Any:
    """The ``ray`` module, or one line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "--distributor ray needs Ray; pip install 'vlmdata[ray]' (or use --distributor local)"
        ) from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, or the one ``ray start`` runs on
    this machine), else start a local one for this process (stopped when it exits). Never
    another process's private Ray instance: its workers would lack this one's environment.
    Ray once initialised in this process (by an earlier stage, or by a caller) is used."""
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    given = address or os.environ.get("RAY_ADDRESS")
    address = given if given and given != "auto" else _started_cluster()
    if address is None:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **quiet)
        return
    _check_reachable(address, named=given is not None)
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as e:
        raise UserError(f"cannot join the Ray cluster at {address} ({e}); check "
                        "--ray-address or RAY_ADDRESS") from None  # fmt: skip


def _started_cluster() -> str | None:
    """The address ``ray start`` recorded on this machine, when that cluster still answers."""
    record = Path(os.environ.get("RAY_TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip()
    except OSError:
        return None
    try:
        _check_reachable(address, named=False)
    except UserError:
        return None  # a record left by a cluster that has stopped
    return address or None


def _check_reachable(address: str, named: bool) -> None:
    """Refuse an address nobody answers at, in seconds (ray.init would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=_CONNECT_S).close()
    except (OSError, ValueError) as e:
        where = "--ray-address or RAY_ADDRESS" if named else "the cluster `ray start` began"
        raise UserError(f"cannot reach the Ray cluster at {address} ({e}); check {where} "
                        "(host:6379, or ray://host:10001)") from None  # fmt: skip


def on_cluster(fn: Callable[..., Any], *args: Any, gpus: float = 0.0) -> Any:
    """``fn(*args)`` run once on a cluster worker with ``gpus`` GPUs (what ``auto`` means
    there, when the driver has no GPU)."""
    ray = import_ray()
    return ray.get(ray.remote(num_cpus=0, num_gpus=gpus)(fn).remote(*args))


def largest_node_cpus(address: str | None) -> float:
    """The CPUs of the cluster's largest live node (joining it first)."""
    ray = import_ray()
    connect(address)
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def worker_count(options: RayOptions) -> int:
    """Join the cluster and count the actors to start: as many as the cluster's GPUs (or CPUs)
    fit, at most as many as asked; one line when the cluster cannot place one."""
    ray = import_ray()
    largest = largest_node_cpus(options.address)
    if largest < options.cpus_per_worker:
        raise UserError(  # Ray would wait for such a node forever
            f"a Ray worker here needs {options.cpus_per_worker:g} CPUs but the largest node of "
            f"the cluster has {largest:g}; lower --workers (encode: a worker takes 1 + --workers)"
        )
    resources = ray.cluster_resources()
    if options.gpus_per_worker > 0:
        gpus = resources.get("GPU", 0)
        if gpus < options.gpus_per_worker:
            raise UserError(
                f"--gpus-per-worker {options.gpus_per_worker:g} but the Ray cluster has "
                f"{gpus:g} GPUs; add GPU nodes, lower it, or pass --gpus-per-worker 0"
            )
        fit = int(gpus // options.gpus_per_worker)
    else:
        fit = int(resources.get("CPU", 1) // max(options.cpus_per_worker, 1e-9))
    # Never more than fit now: a worker Ray cannot place would hold its shards forever (an
    # autoscaling cluster is sized before the run, not by it).
    return max(1, min(options.workers or fit, fit))


def ray_distribute(
    work: Work, shards: Iterator[Shard], progress: Progress, options: RayOptions, sink: ShardSink
) -> None:
    """Run ``work`` over ``shards`` on Ray actors, reporting to ``progress``; returns once every
    shard is done, raises the first failure (a worker's UserError as itself)."""
    ray = import_ray()
    from ray.util.queue import Queue

    limit = worker_count(options)
    reports = Queue(actor_options={"num_cpus": 0})
    actor_class = ray.remote(_ShardWorker).options(
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        max_restarts=-1,  # a worker is always restarted; each shard is retried this often:
        max_task_retries=options.max_shard_retries,
        max_concurrency=options.shards_per_worker + 1,  # + close()
    )
    actors: list[Any] = []
    load: list[int] = []
    in_flight: dict[Any, tuple[int, str]] = {}
    try:
        # What a worker is made of travels with each task, not with the actor: a restarted
        # actor gets it from the retried task (constructor arguments would have to outlive it).
        setup = ray.put((work, sink, reports.actor))
        pending = iter(shards)
        exhausted = False
        while True:
            while not exhausted and (len(actors) < limit or min(load) < options.shards_per_worker):
                shard = next(pending, None)
                if shard is None:
                    exhausted = True
                    break
                if len(actors) < limit and (not load or min(load) > 0):
                    actors.append(actor_class.remote())
                    load.append(0)
                index = load.index(min(load))
                in_flight[actors[index].run.remote(setup, shard)] = (index, shard.name)
                load[index] += 1
            if exhausted and not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=_POLL_S)
            _drain(reports, progress)
            for ref in done:
                index, name = in_flight.pop(ref)
                load[index] -= 1
                _raise_failure(ray, ref, name, options)
                if sink.remote is None and sink.done_stats(name) is None:
                    raise UserError(
                        f"shard {name} was written where this machine cannot see it: on a "
                        "cluster, OUTPUT_DIR must be on a filesystem every node shares, or an "
                        "object-store URL (s3://...)"
                    )
        for failure in ray.get([actor.close.remote() for actor in actors]):
            if failure is not None:
                raise failure.exception()
        _drain(reports, progress)
    finally:
        for actor in actors:
            ray.kill(actor)  # stops its work at once; an unfinished shard resumes next run
        ray.kill(reports.actor)


def _raise_failure(ray: Any, ref: Any, name: str, options: RayOptions) -> None:
    try:
        failure = ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise MachineFailure(
            f"shard {name}: its Ray worker died {options.max_shard_retries + 1} times "
            f"({type(e).__name__}); see the Ray logs, raise --max-shard-retries or fix the "
            "node, then rerun the same command to resume"
        ) from None
    if failure is not None:
        raise failure.exception()


def _drain(reports: Any, progress: Progress) -> None:
    while True:
        try:
            batches = reports.get_nowait_batch(max(1, reports.qsize()))
        except Exception:  # ray.util.queue.Empty
            return
        if not batches:
            return
        for batch in batches:
            report_rows(batch, progress)


class _ShardWorker:
    """One Ray actor: runs the stage's work on a thread over the shards its tasks hand it."""

    def __init__(self) -> None:
        self.todo: queue.Queue = queue.Queue()
        self.failure: WorkerFailure | None = None
        self.loop: threading.Thread | None = None
        self.lock = threading.Lock()

    def run(self, setup: tuple[Work, ShardSink, Any], shard: Shard) -> WorkerFailure | None:
        """Hand ``shard`` to the work and return once it is done (None) or the work failed;
        any failure comes back as a value, so that the driver raises it as it is."""
        try:
            return self._run(setup, shard)
        except Exception as e:
            return WorkerFailure.of(e)

    def _run(self, setup: tuple[Work, ShardSink, Any], shard: Shard) -> WorkerFailure | None:
        with self.lock:
            if self.loop is None:
                self._start(*setup)
        done = self.sink.hand_out(shard, self.watcher, self.progress)
        if done is None:
            return None  # done by an attempt that died before publishing it: published now
        self.todo.put(shard)
        while not done.wait(0.05):
            if self.watcher.failure is not None:
                return WorkerFailure.of(_as_exception(self.watcher.failure))
            if not self.loop.is_alive():
                break
        self.progress.flush()
        if done.is_set():
            return None
        return self.failure or WorkerFailure.of(
            WorkerError(f"the work stopped before shard {shard.name} was done")
        )

    def close(self) -> WorkerFailure | None:
        """End the work (it returns as at the end of a local run) and send the last rows."""
        if self.loop is None:
            return None
        self.todo.put(None)
        self.loop.join()
        try:
            self.watcher.close()
        except Exception as e:
            self.failure = self.failure or WorkerFailure.of(e)
        self.progress.flush()
        return self.failure

    def _start(self, work: Work, sink: ShardSink, reports: Any) -> None:
        # ``reports``: the queue's actor (a Queue object would be kept in the object store).
        if sink.remote is not None:
            sink.remote.prepare_staging(sink.plan)
        self.work, self.sink = work, sink
        ray = import_ray()
        # Delivered before a task returns: the driver drains the queue once the tasks are done.
        self.progress = BatchedProgress(lambda batch: ray.get(reports.put.remote(batch)))
        self.watcher = ShardWatcher(sink)
        self.loop = threading.Thread(target=self._work, name="vlmdata-work", daemon=True)
        self.loop.start()

    def _work(self) -> None:
        try:
            self.work(iter(self.todo.get, None), self.progress)
        except Exception as e:
            self.failure = WorkerFailure.of(e)


def _as_exception(error: BaseException) -> Exception:
    return error if isinstance(error, Exception) else WorkerError(repr(error))
