"""The process pool that runs a stage's shards: workers never outlive the run, may start
processes of their own, bring their errors home as one line, stop quietly on Ctrl-C and start
only as many as there are shards.

The work functions below are module-level so that spawned workers can unpickle them (the
tests directory is on ``sys.path``, which spawn hands to its children). Tests that kill or
interrupt a parent run it as a subprocess of its own; every wait is bounded and every process a
test starts is killed in ``finally``.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import pytest

from vlmdata.errors import MachineFailure, UserError
from vlmdata.pipeline.distributor import WorkerError, die_with_parent, distribute

TESTS = Path(__file__).parent


class Recorder:
    """A Progress that keeps what it is told."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str | None, int]] = []
        self.skipped = 0

    def skip(self, rows: int) -> None:
        self.skipped += rows

    def record(self, status: str, error_kind: str | None, nbytes: int) -> None:
        self.records.append((status, error_kind, nbytes))


# ---- work functions, run in worker processes -----------------------------------------------------


def hold_shards(folder: str, seconds: float, shards: Iterator, progress) -> None:
    """Record this worker's pid, then hold each shard ``seconds`` writing heartbeats."""
    Path(folder, f"pid-{os.getpid()}").touch()
    for _ in shards:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            Path(folder, f"beat-{os.getpid()}").write_text(str(time.monotonic()))
            time.sleep(0.05)
        progress.record("success", None, 0)


def square_in_a_pool(shards: Iterator, progress) -> None:
    """Use a process pool of its own, as ``download --resize`` does."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        for shard in shards:
            assert pool.submit(pow, shard, 2).result(timeout=60) == shard**2
            progress.record("success", None, shard**2)


class NeedsTwoArguments(Exception):
    """An exception that pickles but does not unpickle (its __init__ wants two arguments)."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what} at {where}")


def fail_on_bad(error: str, shards: Iterator, progress) -> None:
    """Raise ``error`` on the shard "bad"; hold any other shard for up to 30 s."""
    for shard in shards:
        if shard != "bad":
            end = time.monotonic() + 30
            while time.monotonic() < end:
                time.sleep(0.05)
            progress.record("held to the end", None, 0)  # never seen when stopped promptly
            continue
        if error == "user":
            raise UserError("line 7 of urls.csv has no closing quote; fix the line and rerun")
        if error == "machine":
            raise MachineFailure("no space left on the device; free space and rerun")
        if error == "value":
            raise ValueError("a bad value\nwith a second line")
        if error == "unpicklable":
            raise NeedsTwoArguments("a strange failure", "shard 3")
        if error == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", "/out/00003.tar")
        if error == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if error == "exit3":
            os._exit(3)


def record_pid(folder: str, shards: Iterator, progress) -> None:
    """Record this worker's pid, then take the shards."""
    Path(folder, f"pid-{os.getpid()}").touch()
    for _ in shards:
        progress.record("success", None, 1)


# ---- helpers -------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pids(folder: Path) -> list[int]:
    return [int(p.name.removeprefix("pid-")) for p in folder.glob("pid-*")]


def alive(pid: int) -> bool:
    """The process exists and is no zombie (an orphan's zombie may wait long for a reaper)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_all(process: subprocess.Popen | None, worker_pids: list[int]) -> None:
    """Leave nothing running: the test's subprocess and every worker it recorded."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(10)
    for pid in worker_pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


SCRIPT = """
import os, signal, sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context

sys.path.insert(0, {tests!r})
from test_distributor import Recorder, hold_shards
from vlmdata.pipeline.distributor import die_with_parent, distribute


def interrupt(signum, frame):
    raise KeyboardInterrupt  # what the CLI does on SIGTERM


def main(mode, folder):
    signal.signal(signal.SIGTERM, interrupt)
    try:
        if mode == "distribute":
            distribute(partial(hold_shards, folder, 60.0), iter(range(4)), 2, Recorder())
        else:  # a plain pool whose processes call die_with_parent first
            with ProcessPoolExecutor(
                2, mp_context=get_context("spawn"), initializer=die_with_parent
            ) as pool:
                list(pool.map(partial(hold_shards, folder, 60.0), [[0], [1]], [Recorder()] * 2))
    except KeyboardInterrupt:
        print("interrupted: rerun to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


def start_script(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    folder = tmp_path / "workers"
    folder.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(script), mode, str(folder)],
        start_new_session=True,  # its own process group: the test can signal it alone
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, folder


# ---- 1. workers die with their parent ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["distribute", "pool"])
def test_workers_die_with_their_parent(tmp_path, mode):
    process, folder = None, tmp_path / "workers"
    try:
        process, folder = start_script(tmp_path, mode)
        wait_for(lambda: len(pids(folder)) == 2, 60, "two workers")
        os.kill(process.pid, signal.SIGKILL)  # the parent alone, not its process group
        process.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in pids(folder)), 5, "workers to die")
    finally:
        kill_all(process, pids(folder))


def test_a_process_whose_parent_already_died_exits_at_once():
    # The race die_with_parent closes: the parent died before the child could ask to follow
    # it. A parent pid that is not our parent's stands for that.
    code = (
        "from vlmdata.pipeline.distributor import die_with_parent\n"
        f"die_with_parent(parent_pid={os.getppid()})\n"
        "print('still here')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "still here" not in done.stdout


def test_the_polling_fallback_exits_when_the_parent_changes():
    # Platforms without PR_SET_PDEATHSIG poll getppid; exercised here with a wrong parent.
    code = (
        "import time\n"
        "from vlmdata.pipeline.distributor import _exit_when_orphaned\n"
        f"_exit_when_orphaned({os.getppid()}, 0.05)\n"
        "time.sleep(30)\n"
        "print('still here')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "still here" not in done.stdout


def test_a_positional_argument_is_no_parent_pid():
    # A DataLoader calls worker_init_fn(worker_id): 0 must not read as "my parent is pid 0".
    code = (
        "from vlmdata.pipeline.distributor import die_with_parent\n"
        "die_with_parent(0)\n"
        "print('still here')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "still here" in done.stdout


def test_die_with_parent_serves_as_a_dataloader_worker_init_fn():
    torch_data = pytest.importorskip("torch.utils.data")
    loader = torch_data.DataLoader(
        list(range(4)), batch_size=2, num_workers=1, worker_init_fn=die_with_parent,
        multiprocessing_context="spawn", timeout=60,
    )  # fmt: skip
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]


def test_die_with_parent_is_harmless_in_a_live_child():
    with ProcessPoolExecutor(
        1, mp_context=get_context("spawn"), initializer=die_with_parent
    ) as pool:
        assert pool.submit(pow, 3, 2).result(timeout=60) == 9


# ---- 2. workers may start processes of their own -------------------------------------------------


def test_workers_may_start_process_pools():
    progress = Recorder()
    distribute(square_in_a_pool, iter([2, 3]), 2, progress)
    assert sorted(progress.records) == [("success", None, 4), ("success", None, 9)]


# ---- 3. errors come home as what they are --------------------------------------------------------


def test_a_user_error_in_a_worker_is_the_same_user_error():
    with pytest.raises(UserError) as raised:
        distribute(partial(fail_on_bad, "user"), iter(["bad"]), 2, Recorder())
    assert type(raised.value) is UserError
    assert str(raised.value) == "line 7 of urls.csv has no closing quote; fix the line and rerun"


def test_a_machine_failure_in_a_worker_is_the_same_machine_failure():
    with pytest.raises(MachineFailure, match=r"^no space left on the device; free space"):
        distribute(partial(fail_on_bad, "machine"), iter(["bad"]), 2, Recorder())


def test_a_bug_in_a_worker_is_one_line_with_the_traceback_attached():
    with pytest.raises(WorkerError) as raised:
        distribute(partial(fail_on_bad, "value"), iter(["bad"]), 2, Recorder())
    error = raised.value
    assert isinstance(error, RuntimeError)
    assert str(error) == "a worker process failed: ValueError: a bad value"
    assert error.traceback.startswith("Traceback (most recent call last):")
    assert "in fail_on_bad" in error.traceback
    assert error.traceback.rstrip().endswith("ValueError: a bad value\nwith a second line")


def test_an_exception_that_does_not_unpickle_still_comes_home():
    with pytest.raises(WorkerError) as raised:
        distribute(partial(fail_on_bad, "unpicklable"), iter(["bad"]), 2, Recorder())
    assert str(raised.value) == (
        "a worker process failed: NeedsTwoArguments: a strange failure at shard 3"
    )
    assert "in fail_on_bad" in raised.value.traceback


def test_an_os_error_in_a_worker_keeps_its_errno_as_the_cause():
    # What lets the CLI still say "no space left on the device" in one line.
    with pytest.raises(WorkerError) as raised:
        distribute(partial(fail_on_bad, "enospc"), iter(["bad"]), 2, Recorder())
    cause = raised.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert cause.filename == "/out/00003.tar"


def test_in_process_errors_propagate_as_they_are():
    with pytest.raises(ValueError, match=r"^a bad value"):
        distribute(partial(fail_on_bad, "value"), iter(["bad"]), 1, Recorder())


def test_a_user_error_reading_the_input_arrives_as_itself():
    def shards() -> Iterator[int]:
        yield 1
        raise UserError("urls.parquet: column image_url is missing; pass --url-col")

    with pytest.raises(UserError, match=r"^urls.parquet: column image_url is missing"):
        distribute(record_pid_nowhere, shards(), 2, Recorder())


def record_pid_nowhere(shards: Iterator, progress) -> None:
    for _ in shards:
        progress.record("success", None, 1)


def test_one_failing_worker_stops_the_others_promptly():
    recorder = Recorder()
    with pytest.raises(WorkerError):
        distribute(partial(fail_on_bad, "value"), iter(["slow", "bad"]), 2, recorder)
    assert ("held to the end", None, 0) not in recorder.records  # the slow shard was cut short


def test_a_worker_killed_outright_is_a_machine_failure():
    with pytest.raises(MachineFailure, match="killed"):
        distribute(partial(fail_on_bad, "sigkill"), iter(["bad"]), 2, Recorder())


def test_a_worker_that_vanishes_is_one_line():
    with pytest.raises(WorkerError, match=r"^a worker process died \(exit code 3\); rerun"):
        distribute(partial(fail_on_bad, "exit3"), iter(["bad"]), 2, Recorder())


def test_work_that_does_not_pickle_fails_at_once():
    with pytest.raises(Exception, match="pickle"):
        distribute(lambda shards, progress: None, iter([1]), 2, Recorder())


def test_worker_errors_pickle_with_their_traceback():
    import pickle

    error = pickle.loads(pickle.dumps(WorkerError("a worker process failed: X", "Traceback...")))
    assert str(error) == "a worker process failed: X" and error.traceback == "Traceback..."


# ---- 4. Ctrl-C and SIGTERM stop the run quietly --------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_every_worker_quietly(tmp_path, signum):
    process, folder = None, tmp_path / "workers"
    try:
        process, folder = start_script(tmp_path, "distribute")
        wait_for(lambda: len(pids(folder)) == 2, 60, "two workers")
        os.killpg(process.pid, signum)  # what the terminal (or a supervisor) does
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert "leaked semaphore" not in stderr
        assert stderr.strip() == "interrupted: rerun to resume"
        wait_for(lambda: not any(alive(pid) for pid in pids(folder)), 5, "workers to exit")
    finally:
        kill_all(process, pids(folder))


# ---- 5. no idle workers --------------------------------------------------------------------------


@pytest.mark.parametrize(("shards", "processes", "workers"), [(1, 4, 1), (3, 4, 3), (5, 2, 2)])
def test_workers_start_only_for_shards_taken(tmp_path, shards, processes, workers):
    progress = Recorder()
    distribute(partial(record_pid, str(tmp_path)), iter(range(shards)), processes, progress)
    assert len(pids(tmp_path)) == workers
    assert len(progress.records) == shards


def test_an_empty_input_starts_no_worker(tmp_path):
    distribute(partial(record_pid, str(tmp_path)), iter([]), 4, Recorder())
    assert pids(tmp_path) == []


def test_the_module_installs_no_signal_handler_in_the_parent():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    distribute(record_pid_nowhere, iter(range(2)), 2, Recorder())
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # SIGINT blocked only briefly


def record_in_bulk(shards: Iterator, progress) -> None:
    """Report each shard's rows (the shard is their number) in one call."""
    for shard in shards:
        progress.record_many("success", shard)


def test_rows_recorded_in_bulk_in_a_worker_reach_the_parent():
    progress = Recorder()
    distribute(record_in_bulk, iter([3, 1000]), 2, progress)
    assert progress.records == [("success", None, 0)] * 1003
