"""Nothing lost: SIGKILL at any moment and resume, torn files, reruns, --retry-failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LoopbackServer, make_image
from vlmdata.errors import UserError
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy

N_URLS = 300
SHARD = 50
CONCURRENCY = 8


@pytest.fixture
def corpus(server: LoopbackServer, tmp_path: Path) -> Path:
    """N_URLS distinct small JPEGs on the server and a parquet listing them."""
    urls = [server.add_file(f"{i}.jpg", make_image(48, 32, seed=i)) for i in range(N_URLS)]
    path = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table({"image_url": urls, "capsfusion": [f"c{i}" for i in range(N_URLS)]}), path
    )
    return path


def config(input: Path, out: Path, **overrides) -> DownloadConfig:
    fetch = FetchPolicy(allow_private_network=True, timeout=5, backoff_s=0.01)
    defaults = dict(shard_size=SHARD, concurrency=CONCURRENCY, processes=1, quiet=True, fetch=fetch)
    return DownloadConfig(input=str(input), output_dir=str(out), **{**defaults, **overrides})


def read_rows(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def tar_names(out: Path) -> list[str]:
    names = []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:  # raises on an invalid tar
            names += tar.getnames()
    return names


def assert_complete(out: Path, n: int) -> None:
    rows = read_rows(out)
    keys = [r["key"] for r in rows]
    assert sorted(keys) == [f"{i:09d}" for i in range(n)]  # every row exactly once
    names = tar_names(out)
    assert len(names) == len(set(names))  # every key at most once per tar
    successes = {r["key"] for r in rows if r["status"] == "success"}
    assert {name.split(".")[0] for name in names} == successes
    assert not list(out.glob("*.partial")) and not list(out.glob("*.journal.jsonl"))


def cli_args(input: Path, out: Path, *extra: str, processes: int = 1) -> list[str]:
    return [sys.executable, "-m", "vlmdata", "download", str(input), str(out),
            "--allow-private-network", "--shard-size", str(SHARD),
            "--concurrency", str(CONCURRENCY), "--processes", str(processes), "--quiet",
            *extra]  # fmt: skip


def download_cli(input: Path, out: Path, processes: int) -> subprocess.Popen:
    return subprocess.Popen(
        cli_args(input, out, processes=processes),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_at_any_moment_then_resume(server, corpus, tmp_path, processes):
    server.delay_s = 0.02  # slow enough to be caught mid-run
    out = tmp_path / "out"
    kills = 0
    for threshold in (90, 200):  # kill twice, at different points of the run
        process = download_cli(corpus, out, processes)
        deadline = time.monotonic() + 60
        while server.total_hits("/img/") < threshold and process.poll() is None:
            assert time.monotonic() < deadline, "download made no progress"
            time.sleep(0.005)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: main process and decoders
            kills += 1
        process.wait(10)
    assert kills >= 1
    assert list(out.glob("*.tar.partial")) or list(out.glob("*.journal.jsonl"))  # caught mid-shard
    finished = subprocess.run(
        cli_args(corpus, out, processes=processes), capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert_complete(out, N_URLS)
    assert all(r["status"] == "success" for r in read_rows(out))
    # Only what was in flight at each kill (requests, fetched-but-unwritten rows) is fetched
    # again: at most --concurrency rows per kill.
    assert server.total_hits("/img/") <= N_URLS + kills * CONCURRENCY


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; it only waits to be reaped


def wait_for_hits(server: LoopbackServer, process: subprocess.Popen, hits: int) -> None:
    """Wait until the download under test has made ``hits`` image requests (mid-run)."""
    deadline = time.monotonic() + 60
    while server.total_hits("/img/") < hits:
        assert time.monotonic() < deadline and process.poll() is None, "no progress"
        time.sleep(0.005)


def wait_until_gone(pids: list[int]) -> None:
    """Every process of ``pids`` stops within a few seconds (multiprocessing's resource
    tracker, a child too, takes a moment to notice its parent is gone)."""
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "processes outlived their parent"
        time.sleep(0.05)


@pytest.mark.parametrize("resize", [False, True])
def test_killing_the_parent_alone_stops_its_workers(server, corpus, tmp_path, resize):
    server.delay_s = 0.02
    out = tmp_path / "out"
    extra = ("--resize", "32") if resize else ()
    process = subprocess.Popen(cli_args(corpus, out, *extra, processes=2), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_hits(server, process, 60)
        workers = children_of(process.pid)
        assert workers, "the download runs no worker processes"
        os.kill(process.pid, signal.SIGKILL)  # the parent alone, not its process group
        process.wait(10)
        wait_until_gone(workers)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if alive(process.pid) else None
    finished = subprocess.run(cli_args(corpus, out, *extra, processes=2), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert_complete(out, N_URLS)


def test_torn_tar_and_journal_are_recovered_without_refetching(server, corpus, tmp_path):
    server.add_file("gone.jpg", b"")  # a failure, so shard 0 has a journal line to tear
    out = tmp_path / "out"
    run_download(config(corpus, out))
    hits = server.total_hits("/img/")
    # Make shard 0 look like a SIGKILL hit it: a torn last member, no parquet or stats.
    tar = out / "00000.tar"
    with tarfile.open(tar) as t:
        members = t.getmembers()
    cut = members[-1].offset_data + 3  # inside the last sample's KEY.json
    data = tar.read_bytes()[:cut]
    (out / "00000.tar.partial").write_bytes(data)
    tar.unlink()
    (out / "00000.parquet").unlink()
    (out / "00000.stats.json").unlink()
    (out / "stats.json").unlink()
    (out / "00000.journal.jsonl").write_text('{"key": "0000000')  # a torn line
    summary = run_download(config(corpus, out))
    assert_complete(out, N_URLS)
    assert summary.rows_this_run == 1  # only the sample whose metadata was torn
    assert server.total_hits("/img/") == hits + 1


def test_rerun_on_finished_output_does_nothing(server, corpus, tmp_path):
    out = tmp_path / "out"
    run_download(config(corpus, out))
    hits = server.total_hits()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = run_download(config(corpus, out))
    assert summary.nothing_to_do
    assert "Nothing to do" in summary.format()
    assert server.total_hits() == hits
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_plan_is_refused(server, corpus, tmp_path):
    out = tmp_path / "out"
    run_download(config(corpus, out, limit=60))
    with pytest.raises(UserError, match="--shard-size 50, this run has --shard-size 51"):
        run_download(config(corpus, out, limit=60, shard_size=SHARD + 1))
    with pytest.raises(UserError, match="different input"):
        run_download(config(corpus, out))  # no limit: a different input
    other = corpus.with_name("other.parquet")
    pq.write_table(pa.table({"image_url": ["http://127.0.0.1/x"], "capsfusion": ["x"]}), other)
    with pytest.raises(UserError, match="different input"):
        run_download(config(other, out, limit=60))


def test_retry_failed_reattempts_only_retryable_failures(server, tmp_path):
    ok = [server.add_file(f"{i}.jpg", make_image(40, 30, seed=i)) for i in range(6)]
    flaky = [server.add_file(f"flaky{i}.jpg", make_image(40, 30, seed=i)) for i in range(4)]
    server.fail_with.update({f"flaky{i}.jpg": 503 for i in range(4)})
    missing = [server.url("/img/missing.jpg")]
    urls = ok[:3] + flaky[:2] + missing + ok[3:] + flaky[2:]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "capsfusion": ["c"] * len(urls)}), path)
    out = tmp_path / "out"
    cfg = dict(shard_size=5, fetch=FetchPolicy(allow_private_network=True, retries=0))

    first = run_download(config(path, out, **cfg))
    assert first.totals["error_kind"] == {"http_5xx": 4, "http_4xx": 1}
    tars_before = {p.name: len(tar_names_of(p)) for p in out.glob("*.tar")}

    server.fail_with.clear()
    ok_hits = sum(server.hits[f"/img/{i}.jpg"] for i in range(6))
    missing_hits = server.hits["/img/missing.jpg"]
    second = run_download(config(path, out, retry_failed=True, **cfg))
    assert second.retried == 4
    assert second.totals["status"] == {"success": 10, "failed_to_download": 1}
    assert sum(server.hits[f"/img/{i}.jpg"] for i in range(6)) == ok_hits  # not fetched again
    assert server.hits["/img/missing.jpg"] == missing_hits  # a 404 is not retryable
    assert_complete(out, len(urls))
    tars_after = {p.name: len(tar_names_of(p)) for p in out.glob("*.tar")}
    assert sum(tars_after.values()) == sum(tars_before.values()) + 4 * 3
    assert json.loads((out / "stats.json").read_text())["status"]["success"] == 10


def tar_names_of(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_is_one_line_and_resumable(server, corpus, tmp_path, signum):
    server.delay_s = 0.02
    out = tmp_path / "out"
    process = subprocess.Popen(cli_args(corpus, out, "--resize", "32", processes=2),
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_hits(server, process, 60)
        workers = children_of(process.pid)
        # Ctrl-C reaches the whole foreground group; SIGTERM (a scheduler) the parent alone.
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["interrupted: rerun the same command to resume"]
    wait_until_gone(workers)
    finished = subprocess.run(cli_args(corpus, out, "--resize", "32", processes=2),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert_complete(out, N_URLS)
