"""Nothing lost, nothing mixed: damaged outputs, foreign directories, unfinished inputs, torn
files and interrupted retries, across download, preprocess and encode (issue 7)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import LoopbackServer, make_image, one_error_line
from vlmdata.cli import app
from vlmdata.encode.stage import EncodeConfig, run_encode
from vlmdata.errors import UserError
from vlmdata.pipeline import download as download_module
from vlmdata.pipeline import shards as shards_module
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy
from vlmdata.pipeline.imageops import SquareOptions
from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

pytestmark = pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights")
N = 12
SHARD = 4


def download(input: Path, out: Path, **overrides) -> object:
    fetch = FetchPolicy(allow_private_network=True, timeout=5, backoff_s=0.01, retries=0)
    options = dict(shard_size=SHARD, concurrency=4, quiet=True, fetch=fetch, caption_col="caption")
    return run_download(DownloadConfig(str(input), str(out), **{**options, **overrides}))


def preprocess(input: Path, out: Path, **overrides) -> object:
    options = dict(square=SquareOptions(size=32), processes=1, quiet=True)
    return run_preprocess(PreprocessConfig(str(input), str(out), **{**options, **overrides}))


def encode(input: Path, out: Path, **overrides) -> object:
    options = dict(model="tiny-random-clip", device="cpu", workers=0, batch_size=4, quiet=True,
                   placeholder_filter=False)  # fmt: skip
    return run_encode(EncodeConfig(str(input), str(out), **{**options, **overrides}))


def rows_of(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("[0-9]*.parquet")) for r in pq.read_table(p).to_pylist()]


def url_list(server: LoopbackServer, folder: Path, n: int = N) -> Path:
    urls = [server.add_file(f"{i}.jpg", make_image(40, 30, seed=i)) for i in range(n)]
    path = folder / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "caption": [f"c{i}" for i in range(n)]}), path)
    return path


@pytest.fixture
def downloaded(server: LoopbackServer, tmp_path: Path) -> Path:
    out = tmp_path / "dl"
    download(url_list(server, tmp_path), out)
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# -- a finished output is not trusted blindly ---------------------------------------------


@pytest.mark.parametrize(("lost", "refetched"), [
    (("00001.tar", "00001.parquet", "00001.stats.json"), SHARD),
    (("00001.tar",), SHARD),
    (("00002.parquet",), 0),  # the samples are in the tar: recovered, not fetched again
])  # fmt: skip
def test_download_redoes_shards_whose_files_are_gone(server, downloaded, lost, refetched):
    for name in lost:
        (downloaded / name).unlink()
    server.hits.clear()
    summary = download(downloaded.parent / "urls.parquet", downloaded)
    assert not summary.nothing_to_do and summary.rows_this_run == refetched
    assert server.total_hits() == refetched
    assert sorted(r["key"] for r in rows_of(downloaded)) == [f"{i:09d}" for i in range(N)]
    totals = json.loads((downloaded / "stats.json").read_text())
    assert totals["complete"] and totals["rows"] == N and totals["status"] == {"success": N}
    assert download(downloaded.parent / "urls.parquet", downloaded).nothing_to_do


def test_stray_stats_files_are_not_shards(server, downloaded):
    (downloaded / "config.stats.json").write_text(json.dumps({"rows": 99, "status": {}}))
    (downloaded / "00007.stats.json").write_text(json.dumps({"rows": 5, "status": {"x": 5}}))
    (downloaded / "stats.json").unlink()  # force the totals to be made again
    summary = download(downloaded.parent / "urls.parquet", downloaded)
    assert summary.totals["rows"] == N and summary.totals["shards"] == N // SHARD
    assert summary.totals["status"] == {"success": N}


def test_preprocess_and_encode_redo_a_deleted_shard(downloaded, tmp_path):
    squares, features = tmp_path / "sq", tmp_path / "feat"
    preprocess(downloaded, squares)
    encode(squares, features)
    (squares / "00001.tar").unlink()
    summary = preprocess(downloaded, squares)
    assert not summary.nothing_to_do and summary.rows_this_run == SHARD
    (features / "00002.h5").unlink()
    summary = encode(squares, features)
    # 00002 lost its .h5; 00001 was made from a square shard that has been rebuilt since.
    assert not summary.nothing_to_do and summary.rows_this_run == 2 * SHARD
    with h5py.File(features / "00002.h5") as f:
        assert len(f["keys"]) == SHARD
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["rows"] == N


# -- an interrupted --retry-failed --------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a kill at a chosen point."""


def expect_interrupted(run, *args, **kwargs) -> None:
    """``run`` ends with Interrupted (task groups wrap it in an ExceptionGroup)."""
    with pytest.raises((Interrupted, ExceptionGroup)) as info:
        run(*args, **kwargs)
    assert info.errisinstance(Interrupted) or info.value.subgroup(Interrupted) is not None


def test_interrupted_retry_keeps_the_old_shard_and_resumes(server, tmp_path, monkeypatch):
    src = url_list(server, tmp_path)
    for i in (1, 5):
        server.fail_with[f"{i}.jpg"] = 503
    out = tmp_path / "dl"
    download(src, out)
    finished = ("tar", "parquet", "stats.json")
    before = {f"0000{i}.{x}": (out / f"0000{i}.{x}").read_bytes() for i in (0, 1) for x in finished}
    server.fail_with.clear()

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(shards_module.ShardWriter, "finish", killed)
    expect_interrupted(download, src, out, retry_failed=True)
    monkeypatch.undo()
    # The finished shards are still there, whole, for any reader...
    assert {name: (out / name).read_bytes() for name in before} == before
    # ...but the output does not claim to be complete, and consumers refuse it.
    assert not json.loads((out / "stats.json").read_text())["complete"]
    with pytest.raises(UserError, match="unfinished download"):
        preprocess(out, tmp_path / "sq")
    summary = download(src, out)  # the plain command finishes the retry
    assert not summary.nothing_to_do
    assert [r["status"] for r in rows_of(out)] == ["success"] * N
    assert not list(out.glob("*.retry.*"))
    assert download(src, out).nothing_to_do


# -- duplicate keys -----------------------------------------------------------------------


def test_a_repeated_key_is_kept_once_and_recorded(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "00000.tar", [
        ("a.jpg", make_image(40, 40, seed=1)), ("a.txt", b"first"),
        ("b.jpg", make_image(40, 40, seed=2)),
        ("a.jpg", make_image(40, 40, seed=3)), ("a.txt", b"second"),
    ])  # fmt: skip
    for run, out in ((preprocess, tmp_path / "sq"), (encode, tmp_path / "feat")):
        run(shards, out)
        rows = {r["key"]: r for r in rows_of(out)}
        assert sorted(rows) == ["a", "a#2", "b"]
        assert rows["a"]["caption"] == "first" and rows["a"]["status"] == "success"
        assert (rows["a#2"]["status"], rows["a#2"]["error_kind"]) == ("duplicate", "duplicate_key")
    with h5py.File(tmp_path / "feat" / "00000.h5") as f:
        assert sorted(f["keys"].asstr()[:]) == ["a", "b"]
    with tarfile.open(tmp_path / "sq" / "00000.tar") as tar:
        assert sorted(n for n in tar.getnames() if n.endswith(".jpg")) == ["a.jpg", "b.jpg"]


# -- unfinished or damaged upstream -------------------------------------------------------


def unfinish(out: Path, shards: list[str]) -> None:
    """Make a finished download look like one still running with ``shards`` not yet done."""
    stats = json.loads((out / "stats.json").read_text())
    (out / "stats.json").write_text(json.dumps({**stats, "complete": False}))
    for name in shards:
        (out / f"{name}.stats.json").unlink()
        (out / f"{name}.tar").rename(out / f"{name}.tar.partial")


def test_an_unfinished_upstream_is_refused_or_taken_in_part(downloaded, tmp_path):
    unfinish(downloaded, ["00002"])
    squares = tmp_path / "sq"
    with pytest.raises(UserError, match=r"unfinished download.*--allow-incomplete"):
        preprocess(downloaded, squares)
    summary = preprocess(downloaded, squares, allow_incomplete=True)
    assert summary.totals["rows"] == 2 * SHARD
    assert not json.loads((squares / "stats.json").read_text())["complete"]
    with pytest.raises(UserError, match="unfinished preprocess"):
        encode(squares, tmp_path / "feat")
    # The download finishes; the same preprocess command picks up the rest.
    download(downloaded.parent / "urls.parquet", downloaded)
    summary = preprocess(downloaded, squares)
    assert summary.rows_this_run == SHARD and summary.totals["rows"] == N
    assert json.loads((squares / "stats.json").read_text())["complete"]


def test_a_tar_cut_at_a_member_boundary_is_refused(downloaded, tmp_path):
    tar = downloaded / "00001.tar"
    with tarfile.open(tar) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    write_tar(tar, members[:-3])  # the last sample is gone, the tar still valid
    # Its size no longer matches what the shard's marker recorded: the shard is not done.
    with pytest.raises(UserError, match="unfinished download"):
        preprocess(downloaded, tmp_path / "sq")
    # Without recorded sizes (img2dataset's shards), the parquet beside the tar tells.
    marker = downloaded / "00001.stats.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items()
                                  if k != "sizes"}))  # fmt: skip
    with pytest.raises(UserError, match=r"00001.tar lacks 1 samples.*cut short or damaged"):
        preprocess(downloaded, tmp_path / "sq")
    with pytest.raises(UserError, match="cut short or damaged"):
        encode(downloaded, tmp_path / "feat")


# -- outputs that are not this stage's own ------------------------------------------------


def test_foreign_output_directories_are_refused(server, downloaded, tmp_path):
    src = downloaded.parent / "urls.parquet"
    squares = tmp_path / "sq"
    preprocess(downloaded, squares)
    with pytest.raises(UserError, match="holds a preprocess output"):
        download(src, squares)
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000.parquet").write_bytes(b"someone else's")
    with pytest.raises(UserError, match=r"holds no vlmdata plan.json"):
        download(src, other)
    assert [p.name for p in other.iterdir()] == ["00000.parquet"]  # left untouched


def test_output_overlapping_the_input_is_refused(downloaded, tmp_path):
    for out in (downloaded, downloaded / "inside", tmp_path):
        with pytest.raises(UserError, match="must differ from the input"):
            preprocess(downloaded, out)
    with pytest.raises(UserError, match="must differ from the input"):
        download(downloaded.parent / "urls.parquet", tmp_path)  # OUT holds the URL list
    with pytest.raises(UserError, match="OUTPUT_DIR is empty"):
        preprocess(downloaded, "")


@pytest.mark.parametrize("blocked", ["00001.stats.json", "00001.tar"])
def test_a_directory_where_a_shard_file_goes_is_one_line(downloaded, blocked):
    """It was an internal error (IsADirectoryError when the redone shard was written)."""
    path = downloaded / blocked
    path.unlink()
    (path / "mine").mkdir(parents=True)
    result = CliRunner().invoke(app, ["download", str(downloaded.parent / "urls.parquet"),
                                      str(downloaded), "--shard-size", str(SHARD),
                                      "--caption-col", "caption", "--allow-private-network",
                                      "--retries", "0", "--quiet"])  # fmt: skip
    assert f"{path} is a directory where the shard's file goes" in one_error_line(result)
    assert (path / "mine").is_dir()  # not ours: left as it was


def test_a_deleted_plan_makes_the_shards_foreign(server, downloaded):
    (downloaded / "plan.json").unlink()
    with pytest.raises(UserError, match=r"holds no vlmdata plan.json"):
        download(downloaded.parent / "urls.parquet", downloaded, shard_size=SHARD + 1)


# -- torn files, markers and power cuts ---------------------------------------------------


def test_torn_journal_lines_are_dropped_not_fatal(server, tmp_path, monkeypatch):
    src = url_list(server, tmp_path)
    for i in range(N):
        server.fail_with[f"{i}.jpg"] = 404
    out = tmp_path / "dl"

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(shards_module.ShardWriter, "finish", killed)
    expect_interrupted(download, src, out, limit=SHARD)
    monkeypatch.undo()
    journal = out / "00000.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == SHARD
    torn_middle = lines[1][: len(lines[1]) // 2] + b"\n"  # a short write before ENOSPC
    torn_tail = json.dumps({"key": "x", "caption": "caf\u00e9"}, ensure_ascii=False).encode()
    journal.write_bytes(lines[0] + torn_middle + b"".join(lines[2:]) + torn_tail[:-3])
    server.hits.clear()
    download(src, out, limit=SHARD)
    assert server.total_hits() == 1  # only the row of the torn middle line is fetched again
    assert sorted(r["key"] for r in rows_of(out)) == [f"{i:09d}" for i in range(SHARD)]


def test_the_manifest_is_written_before_the_run_is_marked_complete(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(make_image(40, 40, seed=i))
    out = tmp_path / "feat"
    from vlmdata.encode import stage as encode_stage

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(encode_stage, "_write_manifest", killed)
    expect_interrupted(encode, folder, out)
    monkeypatch.undo()
    assert not (out / "stats.json").exists()  # no marker says complete
    encode(folder, out)
    assert json.loads((out / "manifest.json").read_text())["rows"] == 3


def test_data_files_reach_the_disk_before_their_marker(server, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "dl"
    download(url_list(server, tmp_path, SHARD), out)
    marker = events.index(("replace", str(out / "00000.stats.json")))
    synced = {path for kind, path in events[:marker] if kind == "fsync"}
    assert {str(out / "00000.tar.partial"), str(out / ".00000.parquet.tmp"), str(out)} <= synced
    last_rename = max(i for i, e in enumerate(events) if e == ("replace", str(out / "stats.json")))
    assert ("fsync", str(out)) in events[last_rename:]  # the directory after the renames


# -- the in-flight bound ------------------------------------------------------------------


def test_arrived_bodies_wait_inside_the_concurrency_bound(server, tmp_path, monkeypatch):
    src = url_list(server, tmp_path, 24)
    arrived_not_written = 0
    most = 0
    lock = threading.Lock()
    real_fetch, real_check = download_module.fetch_with_deadline, download_module.check_and_write

    async def fetch(*args, **kwargs):
        nonlocal arrived_not_written, most
        result = await real_fetch(*args, **kwargs)
        with lock:
            arrived_not_written += 1
            most = max(most, arrived_not_written)
        return result

    def check(*args, **kwargs):
        nonlocal arrived_not_written
        time.sleep(0.02)  # the checks are the slow side: bodies pile up
        records = real_check(*args, **kwargs)
        with lock:
            arrived_not_written -= 1
        return records

    monkeypatch.setattr(download_module, "fetch_with_deadline", fetch)
    monkeypatch.setattr(download_module, "check_and_write", check)
    download(src, tmp_path / "dl", concurrency=4, shard_size=24)
    assert 1 < most <= 4  # a SIGKILL loses at most --concurrency finished downloads


def test_every_input_tar_gets_its_own_output_shard(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    for name, keys in (("00000", "ab"), ("00002", "cd"), ("extra", "ef")):
        write_tar(shards / f"{name}.tar", [(f"{k}.jpg", make_image(30, 30)) for k in keys])
    out = tmp_path / "sq"
    summary = preprocess(shards, out, processes=2)
    assert summary.totals["rows"] == 6
    assert sorted(r["key"] for r in rows_of(out)) == list("abcdef")
    mapping = json.loads((out / "plan.json").read_text())["input"]
    assert sorted(entry[1] for entry in mapping["tars"]) == ["00000", "00002", "00003"]


def test_an_upstream_shard_lost_after_it_finished_makes_it_unfinished(downloaded, tmp_path):
    for suffix in (".tar", ".parquet", ".stats.json"):
        (downloaded / f"00001{suffix}").unlink()
    (downloaded / "99999.tar").write_bytes(b"a stray tar is no shard of the run")
    with pytest.raises(UserError, match="unfinished download"):
        preprocess(downloaded, tmp_path / "sq")
    summary = preprocess(downloaded, tmp_path / "sq", allow_incomplete=True)
    assert summary.totals["rows"] == 2 * SHARD and summary.partial_input


def test_rows_recovered_upstream_by_retry_failed_reach_downstream(server, tmp_path):
    src = url_list(server, tmp_path)
    server.fail_with["5.jpg"] = 503
    dl, squares, features = tmp_path / "dl", tmp_path / "sq", tmp_path / "feat"
    download(src, dl)
    preprocess(dl, squares)
    encode(squares, features)
    server.fail_with.clear()
    download(src, dl, retry_failed=True)
    summary = preprocess(dl, squares)
    assert summary.rows_this_run == SHARD  # only the shard the retry rewrote
    assert summary.totals["status"] == {"success": N}
    assert encode(squares, features).totals["status"] == {"success": N}
    assert encode(squares, features).nothing_to_do


def test_inspect_agrees_with_the_runner_on_what_is_done(downloaded):
    from vlmdata.describe import describe

    (downloaded / "00001.tar").unlink()
    text = describe(str(downloaded))
    assert "2 shards done" in text
    assert "00001.stats.json: marks a shard whose 00001.tar is gone" in text


def test_retry_failed_over_a_damaged_parquet_redoes_the_shard(server, tmp_path):
    src = url_list(server, tmp_path)
    server.fail_with["1.jpg"] = 503
    out = tmp_path / "dl"
    download(src, out)
    (out / "00000.parquet").write_bytes(b"PAR1 not really")
    server.fail_with.clear()
    summary = download(src, out, retry_failed=True)
    assert summary.totals["status"] == {"success": N}
    assert len(rows_of(out)) == N


@pytest.mark.parametrize("damage", ["empty tar", "cut tar", "garbage parquet", "cut h5"])
def test_a_data_file_damaged_after_its_marker_is_redone(downloaded, tmp_path, damage):
    features = tmp_path / "feat"
    encode(downloaded, features)
    target = {"empty tar": downloaded / "00001.tar", "cut tar": downloaded / "00001.tar",
              "garbage parquet": downloaded / "00001.parquet",
              "cut h5": features / "00001.h5"}[damage]  # fmt: skip
    size = target.stat().st_size
    if damage == "garbage parquet":
        target.write_bytes(b"x" * 10)
    else:
        os.truncate(target, 0 if damage == "empty tar" else size // 2)
    if target.parent == downloaded:  # the download redoes its shard, then encode follows
        summary = download(downloaded.parent / "urls.parquet", downloaded)
        assert not summary.nothing_to_do
    summary = encode(downloaded, features)
    assert not summary.nothing_to_do and summary.totals["rows"] == N
    (features / "manifest.json").unlink()
    assert not encode(downloaded, features).nothing_to_do  # the manifest is written again
    assert json.loads((features / "manifest.json").read_text())["rows"] == N
    assert encode(downloaded, features).nothing_to_do


def test_a_retry_that_recovers_nothing_leaves_the_tar_untouched(server, tmp_path):
    src = url_list(server, tmp_path)
    server.fail_with["1.jpg"] = 503
    out = tmp_path / "dl"
    download(src, out)
    before = (out / "00000.tar").stat()
    download(src, out, retry_failed=True)  # the host is still down
    after = (out / "00000.tar").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(out.glob("*.retry.*"))


def test_a_retry_killed_after_its_swap_adds_no_sample_twice(server, tmp_path, monkeypatch):
    src = url_list(server, tmp_path)
    server.fail_with["1.jpg"] = 503
    out = tmp_path / "dl"
    download(src, out)
    server.fail_with.clear()

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(shards_module, "write_parquet_atomic", killed)  # right after the swap
    expect_interrupted(download, src, out, retry_failed=True)
    monkeypatch.undo()
    download(src, out)
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert len(names) == len(set(names)) == 3 * SHARD
    assert [r["status"] for r in rows_of(out)] == ["success"] * N
