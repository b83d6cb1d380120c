"""Run a stage's shard worker over the shards to do: in this process, or in a pool of processes.

Shards are the unit of work and the output directory the only shared state, so a worker is a
plain function ``work(shards, progress)``. With one process it runs here; with N, each worker
process pulls shards from a bounded queue (memory stays flat) and reports per-row outcomes back
in batches, so the bar, the early warning and the summary live in the parent alone.

What the pool guarantees, whatever ends the run:

- **No worker outlives the run.** A worker dies with its parent, even a ``kill -9``ed one
  (:func:`die_with_parent`), and the parent joins or kills every worker before it returns.
  Workers are not daemonic, so they may start processes of their own (the resize pool of
  ``download --resize``); other pools should call :func:`die_with_parent` in their children too.
- **Errors come home as what they are.** A :class:`~vlmdata.errors.UserError` or
  :class:`~vlmdata.errors.MachineFailure` raised in a worker is raised again here, message
  unchanged; any other exception becomes one :class:`WorkerError` line that carries the
  worker's traceback. The first failure stops the other workers at once (shards resume).
- **Ctrl-C is the parent's.** Workers ignore SIGINT (the terminal sends it to the whole process
  group); the parent stops them with SIGTERM, on which they exit quietly, and re-raises the
  KeyboardInterrupt: one line from the CLI, no traceback per worker.
- **No idle processes.** A worker starts when a shard is taken from the input and fewer than
  ``processes`` run, so one shard never starts four processes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any, Protocol

from vlmdata.errors import MachineFailure, UserError

__all__ = [
    "BatchedProgress", "Progress", "Work", "WorkerError", "WorkerFailure", "die_with_parent",
    "distribute", "report_rows", "single_threaded_worker", "usable_cpus",
]  # fmt: skip

_FLUSH_S = 0.2  # a worker sends its outcomes at least this often...
_FLUSH_ROWS = 512  # ...or every this many rows
_POLL_S = 0.05  # how long a wait lasts before checking whether to stop
# How long a worker may take to exit before it is killed. Unwinding takes well under a second;
# a loaded machine can stretch that, and a killed worker leaks its pools' semaphores.
_GRACE_S = 20.0
_ORPHAN_POLL_S = 0.5  # without PR_SET_PDEATHSIG: how often a child looks for its parent
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_ONE_LINE_ERRORS = (UserError, MachineFailure)  # raised again in the parent as themselves
# What sizes the compute thread pools of native libraries, read when the library loads (OpenBLAS,
# MKL, BLIS, Accelerate, numexpr) or first starts threads (OpenMP, Arrow's CPU pool).
_THREAD_POOL_SIZES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
)  # fmt: skip


class Progress(Protocol):
    """Where a worker reports rows: finished by an earlier run (skip) or just now (record; or
    record_many, for many rows of one status at once)."""

    def skip(self, rows: int) -> None: ...

    def record(self, status: str, error_kind: str | None, nbytes: int) -> None: ...

    def record_many(self, status: str, rows: int) -> None: ...


# A shard is any picklable object with a ``name``: a URL-list slice, an image tar, ...
Shard = Any
Work = Callable[[Iterator[Shard], Progress], None]


class WorkerError(RuntimeError):
    """An unexpected exception (a bug, not the user's input) in a worker process.

    ``str(error)`` is one line, ``"a worker process failed: ValueError: <first line>"``;
    ``traceback`` holds the worker's formatted traceback (empty when the worker died without
    one), for a log file. ``__cause__`` is the worker's exception itself when it survived the
    trip between processes (an ``OSError`` keeps its ``errno``), else None.
    """

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.traceback)


# ---- dying with the parent -----------------------------------------------------------------------


def die_with_parent(*_: object, parent_pid: int | None = None) -> None:
    """Make this process exit as soon as its parent process dies, however the parent died.

    Call it first thing in a child process: it is cheap and may be called again. Positional
    arguments are ignored, so it serves as is as a ``ProcessPoolExecutor(initializer=...)`` and
    as a torch DataLoader ``worker_init_fn`` (which is called with the worker id).

    On Linux the kernel sends this process SIGKILL when the parent dies (``PR_SET_PDEATHSIG``);
    elsewhere a daemon thread checks ``os.getppid()`` every 0.5 s and calls ``os._exit``. A
    parent that died before this call (the race every such request has) is noticed here, and
    this process exits at once: by ``parent_pid`` when given (the pid the parent had), else by
    the multiprocessing parent's sentinel, which tracks the process that started this one under
    spawn, fork and forkserver alike.

    Caveat (Linux): the signal fires when the *thread* that started this process exits, not
    only when the whole parent process does. A child started from a short-lived thread dies
    with that thread, so call this only in children started by a thread that outlives them:
    the main thread, an event loop's thread, the thread that iterates a DataLoader. A
    ProcessPoolExecutor starts its processes from the thread that submits to it (replacements
    under ``max_tasks_per_child``: from its manager thread, which lives as long as the pool):
    never submit the first tasks from a thread that ends while the pool lives on.
    """
    if not _ask_kernel_to_kill_us_with_parent():
        _exit_when_orphaned(os.getppid() if parent_pid is None else parent_pid, _ORPHAN_POLL_S)
    if _parent_is_gone(parent_pid):
        os._exit(1)


def _ask_kernel_to_kill_us_with_parent() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``; False where that does not exist or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbol, a sandbox that refuses prctl
        return False


def _parent_is_gone(parent_pid: int | None) -> bool:
    if parent_pid is not None:
        return os.getppid() != parent_pid
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _exit_when_orphaned(parent_pid: int, interval: float) -> None:
    """Start a daemon thread that exits this process once its parent is no longer
    ``parent_pid`` (an orphan is adopted by init or a subreaper). One thread per process."""
    name = "vlmdata-parent-watch"
    if any(thread.name == name for thread in threading.enumerate()):
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name=name, daemon=True).start()


# ---- sizing worker pools ------------------------------------------------------------------------


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a container's cpuset,
    a batch scheduler's allocation), not every core of the machine, which is what
    ``os.cpu_count()`` counts. (A CPU quota without a cpuset, ``docker --cpus``, is not seen.)"""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def default_download_processes() -> int:
    """``download --processes`` by default: a quarter of the usable CPUs, since one event loop
    with its resize workers keeps about four cores busy (README, Performance)."""
    return max(1, usable_cpus() // 4)


def single_threaded_worker(*_: object) -> None:
    """Set up a pool process meant to keep one core busy: it dies with its parent
    (:func:`die_with_parent`), and the native libraries it loads from here on start one
    compute thread each rather than one per core. OpenBLAS, loaded with numpy (which pyarrow
    imports), starts a thread per core at import: N such workers on an N-core machine would
    hold N² threads, against a container's process limit.

    Give it as the pool's ``initializer``, so that it runs before the worker's first task is
    unpickled (and imports numpy); this module imports neither numpy nor pyarrow for that
    reason. It sets environment variables: call it only in a worker process of our own.
    """
    die_with_parent()
    # Ctrl-C reaches the whole process group: the parent stops the run and the pool; a
    # worker's own KeyboardInterrupt would only print a traceback from its task queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in _THREAD_POOL_SIZES:
        os.environ[name] = "1"


# ---- the parent ----------------------------------------------------------------------------------


def distribute(work: Work, shards: Iterator[Shard], processes: int, progress: Progress) -> None:
    """Run ``work`` over ``shards`` with ``processes`` processes, reporting to ``progress``.

    With one process (or fewer) ``work`` runs here and its exceptions propagate as they are.
    With more, workers start one per shard taken from ``shards``, up to ``processes``;
    ``work`` must be picklable (a module-level function or a partial of one); a UserError or
    MachineFailure raised in a worker is raised here as itself, any other exception as a
    :class:`WorkerError`; a worker killed outright (SIGKILL: most often the out-of-memory
    killer) is a MachineFailure; an exception raised by ``shards`` (read in this process)
    propagates as itself once the workers have finished what they hold. Returns or raises only
    once every worker process has exited.
    """
    if processes <= 1:
        work(shards, progress)
        return
    _Pool(work, processes).run(shards, progress)


class _Pool:
    """The worker processes of one run: started lazily, watched, and stopped whatever happens."""

    def __init__(self, work: Work, processes: int) -> None:
        self.work, self.processes = work, processes
        self.ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        self.todo: Queue = self.ctx.Queue(maxsize=2 * processes)  # shards, then None per worker
        self.events: Queue = self.ctx.Queue()  # ("rows", [...]) and ("done", pid, failure)
        self.workers: list[BaseProcess] = []
        self.finished: set[int] = set()  # pids of the workers that said "done"

    def run(self, shards: Iterator[Shard], progress: Progress) -> None:
        feeder = _Feeder(shards, self.todo, self.processes)
        feeder.start()
        try:
            self._supervise(feeder, progress)
        except BaseException:  # a worker failed, or Ctrl-C: the others stop now
            self._stop(feeder, at_once=True)
            raise
        self._stop(feeder, at_once=False)
        if feeder.error is not None:
            raise feeder.error

    def _supervise(self, feeder: _Feeder, progress: Progress) -> None:
        """Start workers as shards are taken and pass their reports on, until every worker is
        done and the input is read; raises a worker's failure or death."""
        while True:
            wanted = min(self.processes, feeder.taken)
            while len(self.workers) < wanted:
                self.workers.append(self._start_worker())
            self._receive(progress, timeout=_POLL_S)
            if self._all_done(feeder):
                return
            self._check_for_deaths(progress)

    def _start_worker(self) -> BaseProcess:
        worker = self.ctx.Process(
            target=_worker_main,
            args=(self.work, self.todo, self.events),
            name=f"vlmdata-worker-{len(self.workers) + 1}",
        )
        # Until its first lines set SIGINT aside, a worker would answer a Ctrl-C with a
        # KeyboardInterrupt traceback from the middle of its imports. A blocked signal stays
        # blocked across exec: it waits, and is dropped once the worker ignores it.
        with _sigint_blocked():
            worker.start()
        return worker

    def _receive(self, progress: Progress, timeout: float | None) -> bool:
        """Handle one message from the workers; False if none came within ``timeout``."""
        try:
            message = self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
        except queue.Empty:
            return False
        if message[0] == "rows":
            report_rows(message[1], progress)
        else:  # "done"
            _, pid, failure = message
            self.finished.add(pid)
            if failure is not None:
                raise failure.exception()
        return True

    def _all_done(self, feeder: _Feeder) -> bool:
        if len(self.finished) < len(self.workers):
            return False
        if feeder.is_alive():
            if len(self.workers) == self.processes:
                # Every worker returned, yet the input goes on (a work function that stopped
                # taking shards): nobody will take the rest, so stop reading it.
                feeder.stop.set()
            return False
        return len(self.workers) == min(self.processes, feeder.taken)

    def _check_for_deaths(self, progress: Progress) -> None:
        """Raise if a worker exited without saying "done" (killed, crashed, stopped)."""
        for worker in self.workers:
            if worker.exitcode is None or worker.pid in self.finished:
                continue
            # Whatever it sent before exiting is in the pipe by now: read it first.
            while worker.pid not in self.finished and self._receive(progress, timeout=None):
                pass
            if worker.pid not in self.finished:
                raise _death(worker.exitcode)

    def _stop(self, feeder: _Feeder, at_once: bool) -> None:
        """Stop reading the input and leave no worker running: ask each to stop (SIGTERM, or
        nothing when they are finishing anyway), give them time to exit, kill the rest."""
        feeder.stop.set()
        workers = [w for w in self.workers if w.pid is not None]
        try:
            if at_once:
                for worker in workers:
                    if worker.exitcode is None:
                        worker.terminate()
            deadline = time.monotonic() + _GRACE_S
            for worker in workers:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
        finally:  # even when a second Ctrl-C cuts the wait short
            for worker in workers:
                if worker.exitcode is None:
                    worker.kill()
                    worker.join(timeout=_GRACE_S)
        feeder.join(timeout=1.0)  # it checks `stop` between shards; a stalled read is left
        self._close_queues()
        for worker in workers:
            if worker.exitcode is not None:
                worker.close()

    def _close_queues(self) -> None:
        """Release the queues without waiting long on anyone.

        Shards no worker will take are read back, so that the queue's writer thread can finish,
        and the thread is joined (briefly): a writer thread left running drops the queue's
        semaphores on its way out, and if that happens while the interpreter exits, their
        cleanup is cut short and a "leaked semaphore" warning follows the user's one line.
        """
        while True:
            try:
                self.todo.get(timeout=_POLL_S)
            except (queue.Empty, OSError, EOFError):
                break
        self.todo.close()
        writer = threading.Thread(target=self.todo.join_thread, daemon=True)
        writer.start()
        writer.join(timeout=_GRACE_S)  # stuck only if a killed worker holds the read lock
        self.events.close()  # the parent never writes to it: no writer thread


def _death(exitcode: int) -> BaseException:
    """What to raise for a worker that exited with ``exitcode`` before saying "done"."""
    if exitcode == -signal.SIGKILL:
        return MachineFailure(
            "a worker process was killed (SIGKILL), most likely for memory; lower --processes "
            "or free memory, then rerun the same command to resume"
        )
    if exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM):  # 128 + n: see _exit_quietly
        return KeyboardInterrupt()  # stopped from outside, as the parent is about to be
    how = f"exit code {exitcode}"
    if exitcode < 0:
        try:
            how = f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"signal {-exitcode}"
    return WorkerError(f"a worker process died ({how}); rerun the same command to resume")


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread for the duration (children started meanwhile inherit it)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Feeder(threading.Thread):
    """Reads the shards in the parent and queues them for the workers, then one end mark per
    worker. A thread, so that a slow read never stops the parent from passing reports on."""

    def __init__(self, shards: Iterator[Shard], todo: Queue, processes: int) -> None:
        super().__init__(name="vlmdata-feeder", daemon=True)
        self.shards, self.todo, self.processes = shards, todo, processes
        self.taken = 0  # shards read so far: the parent runs min(processes, taken) workers
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for shard in self.shards:
                self.taken += 1
                if not self._put(shard):
                    return
        except BaseException as e:  # a read error (a UserError) must reach the parent thread
            self.error = e
        # The workers finish what they hold, then stop at their end mark.
        for _ in range(min(self.processes, self.taken)):
            if not self._put(None):
                return

    def _put(self, item: Shard | None) -> bool:
        """Queue ``item``, waiting while the queue is full; False once told to stop."""
        while not self.stop.is_set():
            try:
                self.todo.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
            except ValueError:  # closed by the parent, which stopped while we were reading
                return False
        return False


# ---- a worker process ----------------------------------------------------------------------------


def _worker_main(work: Work, todo: Queue, events: Queue) -> None:
    """A worker process: follow the parent in death, leave Ctrl-C to it, run ``work`` and say
    "done" with its failure, if any."""
    die_with_parent()
    stopping = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; children inherit this
    signal.signal(signal.SIGTERM, partial(_exit_quietly, stopping, events))
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # see _Pool._start_worker
    sink = BatchedProgress(lambda batch: events.put(("rows", batch)))
    failure = None
    try:
        work(_queued_shards(todo, stopping), sink)
    except Exception as e:
        failure = WorkerFailure.of(e)
    finally:
        _stop_children()
    sink.flush()
    events.put(("done", os.getpid(), failure))


def _exit_quietly(stopping: threading.Event, events: Queue, signum: int, frame: object) -> None:
    """SIGTERM (the parent stopping the run): unwind with SystemExit, no traceback.

    Unwinding runs ``finally`` blocks, so shard writers close their files (an interrupted shard
    is never marked done, and resumes), and exiting through multiprocessing's own exit path
    unregisters the semaphores of child pools (no "leaked semaphore" warnings). If the
    unwinding hangs, the parent kills the process after a grace period: shard files are
    append-only and recovered on resume, so that is safe too.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut cleanup
    stopping.set()  # a shard iterator waiting on another thread gives up too
    events.cancel_join_thread()  # the parent no longer reads: do not wait at exit to flush
    # The parent reports the stop in one line; whatever the unwinding prints from here on
    # (an event loop torn down mid-task, a pool's complaints) is noise on the user's terminal.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    raise SystemExit(128 + signum)


def _stop_children(grace: float = 1.0) -> None:
    """Stop the child processes ``work`` left running. multiprocessing joins a process's
    children before it may exit, so one idle pool process would hold this worker forever; and
    a SystemExit does not reliably unwind an event loop's tasks, so the ``finally`` that shuts
    a pool down may never run."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.exitcode is None:
            child.kill()
            child.join(timeout=grace)


def _queued_shards(todo: Queue, stopping: threading.Event) -> Iterator[Shard]:
    """The shards the parent queues, until its end mark (or until this worker is stopping:
    work that reads shards on a thread, as the download event loop does, must not keep the
    process alive waiting for one)."""
    while not stopping.is_set():
        try:
            shard = todo.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if shard is None:
            return
        yield shard


class BatchedProgress:
    """A worker's Progress: buffers outcomes and hands them to ``send`` in batches (to the
    parent's queue here, to the driver's Ray queue from a Ray worker). Threads of one worker
    may share it."""

    def __init__(self, send: Callable[[list[tuple[str, str | None, int]]], None]) -> None:
        self.send = send
        self.buffer: list[tuple[str, str | None, int]] = []
        self.flushed = time.monotonic()
        self.lock = threading.Lock()

    def skip(self, rows: int) -> None:
        self._add([("skip", None, rows)])

    def record(self, status: str, error_kind: str | None, nbytes: int) -> None:
        self._add([(status, error_kind, nbytes)])

    def record_many(self, status: str, rows: int) -> None:
        self._add([(status, None, 0)] * rows)

    def _add(self, rows: list[tuple[str, str | None, int]]) -> None:
        with self.lock:
            self.buffer.extend(rows)
            due = len(self.buffer) >= _FLUSH_ROWS or time.monotonic() - self.flushed > _FLUSH_S
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            batch, self.buffer = self.buffer, []
            self.flushed = time.monotonic()
        if batch:
            self.send(batch)


def report_rows(batch: list[tuple[str, str | None, int]], progress: Progress) -> None:
    """Pass a :class:`BatchedProgress` batch on to ``progress``."""
    for status, error_kind, nbytes in batch:
        if status == "skip":
            progress.skip(nbytes)
        else:
            progress.record(status, error_kind, nbytes)


@dataclass(frozen=True)
class WorkerFailure:
    """An exception raised by ``work`` in a worker, in a form that always crosses processes:
    any exception may hold what does not pickle, so its text travels beside it."""

    kind: str  # "ValueError"
    message: str
    traceback: str
    pickled: bytes | None  # the exception itself, when it pickles and unpickles

    @classmethod
    def of(cls, error: Exception) -> WorkerFailure:
        if isinstance(error, _ONE_LINE_ERRORS) and _pickled(error) is None:
            # Still a user's one line, whatever its subclass holds.
            error = next(base for base in _ONE_LINE_ERRORS if isinstance(error, base))(str(error))
        return cls(
            kind=type(error).__name__,
            message=str(error),
            traceback="".join(traceback.format_exception(error)),
            pickled=_pickled(error),
        )

    def exception(self) -> BaseException:
        """What the parent raises: a one-line error as itself, anything else as WorkerError."""
        original = None
        if self.pickled is not None:
            try:
                original = pickle.loads(self.pickled)
            except Exception:  # a class the parent cannot import: the text still tells it
                original = None
        if isinstance(original, _ONE_LINE_ERRORS):
            return original
        first_line = self.message.splitlines()[0] if self.message.strip() else ""
        summary = f"{self.kind}: {first_line}" if first_line else self.kind
        error = WorkerError(f"a worker process failed: {summary}", self.traceback)
        error.__cause__ = original
        return error


def _pickled(error: BaseException) -> bytes | None:
    """``error`` pickled, if it also unpickles (many exception classes do not)."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
    except Exception:
        return None
    return data
