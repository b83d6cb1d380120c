"""Hostile inputs and kills for issue 9's encode loader (one index pass, workers reading their
own byte ranges): tars with sparse members, inputs that vanish between the index and the read,
a parent killed while its decoding workers start, and a SIGKILL mid-shard then resume."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.pipeline.image_sources import ImageShard, find_image_shards

pytestmark = pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights")
runner = CliRunner(env={"COLUMNS": "200"})
TINY = "tiny-random-clip"


def member(name: str, data: bytes) -> bytes:
    """A regular tar member: its header, its data, the padding to a whole block."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def sparse_member(name: str, data: bytes, real_size: int) -> bytes:
    """A GNU sparse member (type ``S``, what ``tar --sparse`` writes for a file with holes):
    ``data`` is stored for the first bytes, the rest of the ``real_size`` bytes is a hole that
    reads as zeros."""
    info = tarfile.TarInfo(name)
    info.size = len(data)  # what is stored
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    # The map, (offset, length) entries: the data, then an empty one at the end of the file
    # (as GNU tar writes it: the hole runs to there).
    for i, (offset, length) in enumerate([(0, len(data)), (real_size, 0)]):
        header[386 + 24 * i : 398 + 24 * i] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
        header[398 + 24 * i : 410 + 24 * i] = tarfile.itn(length, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # the file's size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """The process exists and is no zombie (an orphan's zombie may wait long for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


# --- sparse members ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["caption between samples", "image at the end"])
def test_a_sparse_member_reads_as_tarfile_expands_it(tmp_path, where):
    # The index takes a member's size as the length of its data in the file; for a sparse
    # member it is the size of the file it expands to. Between samples, the read runs on into
    # the next members (the caption gets their headers); at the end, past the end of the tar
    # (a valid tar is refused as cut). The streaming reader before issue 9 expanded it.
    first, second = make_image(64, 48, seed=1), make_image(80, 60, seed=2)
    if where == "caption between samples":
        members = [member("0000.jpg", first), sparse_member("0000.txt", b"a caption", 700),
                   member("0001.jpg", second), member("0001.txt", b"second")]  # fmt: skip
    else:
        members = [member("0000.jpg", first), member("0000.txt", b"first"),
                   member("0001.txt", b"second"),
                   sparse_member("0001.jpg", second, len(second) + 4096)]  # fmt: skip
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    path.write_bytes(b"".join(members) + b"\0" * 2 * tarfile.BLOCKSIZE)
    with tarfile.open(path) as tar:
        expanded = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    (shard,) = find_image_shards(path.parent, shard_size=10)
    samples = list(shard.samples())

    assert [s.key for s in samples] == ["0000", "0001"]
    assert [s.image for s in samples] == [expanded["0000.jpg"], expanded["0001.jpg"]]
    captions = [s.caption for s in samples]
    read = [caption.replace("\0", "") for caption in captions]  # shown without the holes
    assert captions == [expanded["0000.txt"].decode(), expanded["0001.txt"].decode()], read


# --- an input that vanishes between the index and the read -------------------------------------


@pytest.mark.parametrize("layout", ["image folder", "tar"])
def test_an_input_deleted_after_indexing_is_no_internal_error(tmp_path, monkeypatch, layout):
    # Deleting (or moving) input files under a running encode is a user's doing: one line
    # (or a status row for the lost image), not "internal error ... please report it".
    source = tmp_path / "input"
    source.mkdir()
    if layout == "tar":
        with tarfile.open(source / "00000.tar", "w") as tar:
            for i in range(6):
                data = make_image(60 + i, 40, seed=i)
                info = tarfile.TarInfo(f"{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        victim = source / "00000.tar"
    else:
        for i in range(6):
            (source / f"{i}.jpg").write_bytes(make_image(60 + i, 40, seed=i))
        victim = source / "3.jpg"
    real_index = ImageShard.index

    def index_then_delete(self):
        refs = real_index(self)
        victim.unlink()
        return refs

    monkeypatch.setattr(ImageShard, "index", index_then_delete)
    result = runner.invoke(app, ["encode", str(source), str(tmp_path / "out"), "--model", TINY,
                                 "--device", "cpu", "--workers", "2", "--batch-size", "4",
                                 "--no-placeholder-filter", "--quiet"])  # fmt: skip
    assert "internal error" not in result.output, result.output
    assert result.exit_code in (0, 2), result.output


# --- the parent killed while its decoding workers start ----------------------------------------

# Runs encode with two decoding workers that are slow to start: each waits, right after its
# fork, until this process is gone (the test kills it then). The second waits on until the test
# releases it, so the first looks for its parent while a sibling is still alive.
SLOW_START = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    flags, parent, forks = Path(sys.argv[1]), os.getpid(), [0]

    def count():
        forks[0] += 1

    def slow_start():
        index = forks[0] - 1
        if index > 1:
            return
        (flags / f"worker-{index}-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.02)
        while index == 1 and not (flags / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    os.register_at_fork(before=count, after_in_child=slow_start)
    from vlmdata.cli import app

    sys.argv = ["vlmdata", "encode", *sys.argv[2:]]
    app()
    """
)


def test_a_decoding_worker_whose_parent_dies_while_it_starts_exits(tmp_path):
    # README: encode's decoding workers die with their parent, even when only the parent is
    # killed. A worker that asks to (PR_SET_PDEATHSIG) after its parent died gets no signal;
    # the fallback check (multiprocessing's parent sentinel) is fooled by any later sibling,
    # which inherited the sentinel's other end at its fork; and DataLoader's own watchdog takes
    # the new parent (init) for the one to watch. The worker then polls its queue forever.
    source = tmp_path / "input"
    source.mkdir()
    for i in range(40):
        (source / f"{i:02d}.jpg").write_bytes(make_image(60, 40, seed=i))
    flags = tmp_path / "flags"
    flags.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_START, str(flags), str(source), str(tmp_path / "out"),
         "--model", TINY, "--device", "cpu", "--workers", "2", "--batch-size", "4", "--quiet"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def workers() -> dict[int, int]:
        found = (p.name.split("-") for p in flags.glob("worker-*"))
        return {int(index): int(pid) for _, index, pid in found}

    try:
        wait_for(lambda: len(workers()) == 2, 120, "two decoding workers")
        os.kill(process.pid, signal.SIGKILL)  # the parent alone
        process.wait(10)
        wait_for(lambda: not alive(workers()[0]), 10, "the first worker to die with its parent")
    finally:
        (flags / "release").touch()
        for pid in workers().values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait(10)


# --- SIGKILL mid-shard, then resume ------------------------------------------------------------

# encode killed (SIGKILL, by itself) right after the 2nd batch of the run went to the writer.
KILL_MID_SHARD = textwrap.dedent(
    """
    import os, signal, sys
    from vlmdata.encode import store

    real_append, calls = store.FeatureShardWriter.append, [0]

    def append_then_die(self, *args):
        row = real_append(self, *args)
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return row

    store.FeatureShardWriter.append = append_then_die
    from vlmdata.cli import app

    sys.argv = ["vlmdata", "encode", *sys.argv[1:]]
    app()
    """
)


def test_a_shard_killed_midway_resumes_to_the_features_of_an_uninterrupted_run(tmp_path):
    source = tmp_path / "input"
    source.mkdir()
    for i in range(30):
        size = (90 + 7 * i, 60 + 5 * (i % 4))
        data = make_image(*size, seed=i) if i % 9 != 4 else b"not an image"
        (source / f"{i:02d}.jpg").write_bytes(data)
    options = ["--model", TINY, "--device", "cpu", "--workers", "2", "--batch-size", "4",
               "--shard-size", "12", "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cut = subprocess.run([sys.executable, "-c", KILL_MID_SHARD, str(source), str(killed), *options],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    # The first shard was cut midway: its rows so far only in the hidden temporary .h5.
    assert not (killed / "00000.stats.json").exists() and (killed / ".00000.h5.tmp").exists()
    for out in (killed, whole):  # the resume, and a run never interrupted
        done = runner.invoke(app, ["encode", str(source), str(out), *options])
        assert done.exit_code == 0, done.output

    def contents(out: Path) -> list:
        shards = []
        for h5 in sorted(out.glob("*.h5")):
            with h5py.File(h5, "r") as f:
                shards.append((h5.name, list(f["keys"].asstr()[:]), list(f["captions"].asstr()[:]),
                               f["tokens"][:].tobytes(), f["embeds"][:].tobytes()))  # fmt: skip
        for parquet in sorted(out.glob("*.parquet")):
            rows = pq.read_table(parquet).to_pylist()
            shards.append([(r["key"], r["status"], r["row"], r["error_kind"],
                           r["placeholder_similarity"]) for r in rows])  # fmt: skip
        return shards

    assert [p.name for p in sorted(killed.glob("*.h5"))] == ["00000.h5", "00001.h5", "00002.h5"]
    assert contents(killed) == contents(whole)
    assert not list(killed.glob(".*.tmp"))
