"""`download --processes N --resize`: N processes write what one writes, and each keeps to its
share of the CPUs. (A kill mid-run with --processes 2 and its resume: test_download_resume.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LoopbackServer, make_image
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy
from vlmdata.pipeline.imageops import SquareOptions
from vlmdata.pipeline.shards import ShardWriter

SHARD = 8
SQUARE = SquareOptions(size=40)
TIMING = "elapsed_s"  # the one column that differs between two runs of the same input


@pytest.fixture
def mixed(server: LoopbackServer, tmp_path: Path) -> Path:
    """A URL list over several shards: crops and pads, PNG with alpha, a duplicate URL, a 404,
    a broken image and an HTML page."""
    urls = []
    for i in range(28):
        width, height = (90, 30) if i % 4 == 0 else (60 + i, 50)  # pad, else crop
        urls.append(server.add_file(f"{i}.jpg", make_image(width, height, seed=i)))
    urls += [
        server.add_file("alpha.png", make_image(50, 40, "PNG", alpha=True), "image/png"),
        urls[3],  # the same URL again: fetched once, recorded twice
        server.url("/img/missing.jpg"),
        server.add_file("broken.jpg", make_image(64, 48)[:200]),
        server.add_file("page.jpg", b"<!doctype html><html>nope</html>", "text/html"),
    ]
    path = tmp_path / "urls.parquet"
    captions = [f"caption {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}), path)
    return path


def download(input: Path, out: Path, processes: int):
    return run_download(
        DownloadConfig(
            input=str(input), output_dir=str(out), shard_size=SHARD, concurrency=8,
            processes=processes, resize=SQUARE, quiet=True,
            fetch=FetchPolicy(allow_private_network=True, timeout=5, retries=0),
        )
    )  # fmt: skip


def rows_by_key(out: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted(out.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            assert row["key"] not in rows, f"key {row['key']} has two status rows"
            rows[row["key"]] = {k: v for k, v in row.items() if k != TIMING}
    return rows


def samples(out: Path) -> dict[str, bytes | dict]:
    """Every tar member by name: images and captions as bytes, metadata without timing."""
    members: dict[str, bytes | dict] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.name not in members, f"{member.name} is in the tars twice"
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    members[member.name] = {
                        k: v for k, v in json.loads(data).items() if k != TIMING
                    }
                else:
                    members[member.name] = data
    return members


def test_two_processes_write_what_one_writes(mixed, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    download(mixed, one, processes=1)
    download(mixed, two, processes=2)

    rows = rows_by_key(two)
    assert sorted(rows) == [f"{i:09d}" for i in range(33)]  # every row a status, once
    assert all(row["status"] for row in rows.values())
    assert rows == rows_by_key(one)
    statuses = [row["status"] for row in rows.values()]
    assert statuses.count("success") == 30 and statuses.count("failed_to_download") == 1
    assert {row["action"] for row in rows.values() if row["status"] == "success"} == {
        "crop", "pad",
    }  # fmt: skip
    squares = samples(two)
    assert squares == samples(one)  # the same JPEG bytes, captions and metadata
    assert sum(name.endswith(".jpg") for name in squares) == 30


def test_squares_are_written_off_the_event_loop(mixed, tmp_path, monkeypatch):
    """Appending a square waits on the disk: never on the loop, which holds every connection."""
    on_loop = []
    add = ShardWriter.add

    def spy(self, record, image=None, extension=None):
        if image is not None:
            on_loop.append(threading.current_thread() is threading.main_thread())
        add(self, record, image, extension)

    monkeypatch.setattr(ShardWriter, "add", spy)
    download(mixed, tmp_path / "out", processes=1)  # the loop runs on this thread
    assert len(on_loop) == 30 and not any(on_loop)


def pool_workers(pid: int) -> int:
    """How many worker processes (multiprocessing's spawned children) ``pid`` runs now."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sum(b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
                   for child in children)  # fmt: skip
    except OSError:
        return 0  # gone meanwhile


@pytest.mark.skipif(
    not Path("/proc/self/task").exists() or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux /proc and at least two CPUs to pin to one",
)
def test_resize_workers_fit_the_cpus_the_run_may_use(server, mixed, tmp_path):
    """Pinned to one CPU (taskset, a container's cpuset) on a bigger machine: one resize
    worker, not one per core of the machine."""
    server.delay_s = 0.05  # long enough to look at the running process
    cpu = min(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "vlmdata", "download", str(mixed), str(tmp_path / "out"),
               "--allow-private-network", "--shard-size", str(SHARD), "--resize", "40",
               "--processes", "1", "--quiet"]  # fmt: skip
    pinned = (f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); "
              f"os.execv(sys.executable, {command!r})")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", pinned], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    most = 0
    deadline = time.monotonic() + 60
    while process.poll() is None:
        assert time.monotonic() < deadline, "the download did not finish"
        most = max(most, pool_workers(process.pid))
        time.sleep(0.01)
    assert process.returncode == 0, process.stderr.read().decode()
    assert most == 1


def test_resize_workers_leave_ctrl_c_to_the_parent():
    """A Ctrl-C (to the whole process group) printed a KeyboardInterrupt traceback per resize
    worker before the run's own one-line message."""
    import subprocess
    import sys

    code = (
        "import signal; from vlmdata.pipeline.distributor import single_threaded_worker; "
        "single_threaded_worker(); print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr
