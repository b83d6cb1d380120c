"""Failures of the machine: a full disk stops a stage with one line, and a rerun completes."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LoopbackServer, make_image

LIMIT = 300_000  # bytes any one file may grow to: the stand-in for a full disk


def limited_file_size() -> None:
    # Writes past the limit then fail with EFBIG, as they would with ENOSPC on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def vlmdata(*args: str, limited: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmdata", *args, "--quiet"],
        capture_output=True, text=True, timeout=240,
        preexec_fn=limited_file_size if limited else None,
    )  # fmt: skip


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.jpg").write_bytes(make_image(64, 64, seed=i))
    return folder


def assert_one_line_failure(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 1, result.stderr  # not a crash (139), not a traceback
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "file size limit exceeded" in errors[0], result.stderr
    assert "rerun the same command to resume" in errors[0]


def test_encode_stops_with_one_line_on_a_full_disk_and_resumes(photos, tmp_path):
    out = tmp_path / "feat"
    args = ("encode", str(photos), str(out), "--model", "tiny-random-clip", "--tokens", "all",
            "--no-placeholder-filter", "--workers", "0", "--shard-size", "20")  # fmt: skip
    assert_one_line_failure(vlmdata(*args, limited=True))
    assert not list(out.glob(".*.tmp"))
    finished = vlmdata(*args, limited=False)
    assert finished.returncode == 0, finished.stderr
    assert "40 rows in 2 shards" in finished.stdout


def test_download_stops_with_one_line_on_a_full_disk_and_resumes(server: LoopbackServer,
                                                                 tmp_path):  # fmt: skip
    urls = [server.add_file(f"{i}.jpg", make_image(1200, 1200, seed=i)) for i in range(60)]
    src = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "capsfusion": ["c"] * len(urls)}), src)
    args = ("download", str(src), str(tmp_path / "dl"), "--allow-private-network",
            "--shard-size", "60")  # fmt: skip
    assert_one_line_failure(vlmdata(*args, limited=True))
    finished = vlmdata(*args, limited=False)
    assert finished.returncode == 0, finished.stderr
    assert re.search(r"success +60 ", finished.stdout), finished.stdout


def test_a_killed_decoding_worker_stops_encode_with_one_line(photos, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmdata.cli import app
    from vlmdata.encode import stage

    real = stage.make_square
    poison = (photos / "07.jpg").read_bytes()

    def killed_for_memory(data, *args):  # runs in the forked DataLoader worker
        if data == poison:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, *args)

    monkeypatch.setattr(stage, "make_square", killed_for_memory)
    out = tmp_path / "feat"
    args = ["encode", str(photos), str(out), "--model", "tiny-random-clip", "--workers", "1",
            "--no-placeholder-filter", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "a decoding worker died" in result.stderr and "Traceback" not in result.output
    monkeypatch.undo()
    assert CliRunner().invoke(app, args).exit_code == 0  # the rerun completes
    assert len(pq.read_table(out / "00000.parquet")) == 40
