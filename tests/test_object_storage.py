"""Outputs and inputs on an object store: moto's S3 server on 127.0.0.1 stands in for S3.

A shard is published whole (data files, then its stats marker); a resume trusts only shards
whose marker vouches for data files of the recorded sizes; the lock is a lease object."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import LoopbackServer, make_image, one_error_line, shard_records, tar_members
from vlmdata.cli import app

pytestmark = pytest.mark.usefixtures("quiet_random_weights")

SHARD = 5
RUNNER = CliRunner()


def s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def url_list(server: LoopbackServer, path: Path, count: int = 18) -> Path:
    urls = [server.add_file(f"{i}.jpg", make_image(40 + i, 30, seed=i)) for i in range(count)]
    urls.append(server.url("/img/missing.jpg"))
    pq.write_table(pa.table({"image_url": urls, "capsfusion": [f"c{i}" for i in range(len(urls))]}),
                   path)  # fmt: skip
    return path


def download_args(urls: str, out: str) -> list[str]:
    return ["download", urls, out, "--shard-size", str(SHARD), "--allow-private-network",
            "--timeout", "5", "--retries", "0", "--processes", "1", "--quiet"]  # fmt: skip


def invoke(args: list[str]):
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def fetch(url: str, local: Path) -> Path:
    """The objects under ``url``, copied into ``local``."""
    fs = s3()
    local.mkdir(parents=True)
    for entry in fs.ls(url, detail=True):
        fs.get_file(entry["name"], str(local / entry["name"].rsplit("/", 1)[-1]))
    return local


def test_download_to_s3_reads_back_as_a_local_run(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet")
    invoke(download_args(str(urls), str(tmp_path / "local")))
    out = f"{bucket}/shards"
    result = invoke(download_args(str(urls), out))
    assert f"-> {out}" in result.output
    copy = fetch(out, tmp_path / "copy")
    assert shard_records(copy) == shard_records(tmp_path / "local")
    assert tar_members(copy) == tar_members(tmp_path / "local")
    assert {p.name for p in copy.iterdir()} >= {"plan.json", "stats.json", "vlmdata.toml"}
    assert not (copy / ".lease.json").exists()  # released at the end
    assert json.loads((copy / "stats.json").read_text())["complete"] is True
    hits = server.total_hits("/img/")
    assert "Nothing to do" in invoke(download_args(str(urls), out)).output
    assert server.total_hits("/img/") == hits


def test_a_url_list_on_s3_is_read(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=4)
    s3().put_file(str(urls), f"{bucket}/lists/urls.parquet")
    invoke(download_args(f"{bucket}/lists/urls.parquet", str(tmp_path / "out")))
    assert len(shard_records(tmp_path / "out")) == 5


def published_shards(url: str) -> dict[str, int]:
    try:
        entries = s3().ls(url, detail=True)
    except FileNotFoundError:  # nothing published yet
        return {}
    return {e["name"].rsplit("/", 1)[-1]: e["size"] for e in entries}


def test_an_interrupted_s3_run_leaves_only_whole_shards_and_resumes(
    server: LoopbackServer, bucket: str, tmp_path: Path
):
    """Ctrl-C mid-run (SIGINT to a subprocess): every shard with a marker is whole, the lease
    is released, and a rerun fetches only the shards not published."""
    urls = url_list(server, tmp_path / "urls.parquet", count=29)
    invoke(download_args(str(urls), str(tmp_path / "local")))
    server.delay_s = 0.25
    out = f"{bucket}/shards"
    args = download_args(str(urls), out)
    args[args.index("--processes") + 1] = "1"
    run = subprocess.Popen([sys.executable, "-m", "vlmdata", *args, "--concurrency", "2"],
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(n.endswith(".stats.json") for n in published_shards(out)):
        assert time.monotonic() < deadline and run.poll() is None, "no shard was published"
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    objects = published_shards(out)
    assert ".lease.json" not in objects
    markers = [n.removesuffix(".stats.json") for n in objects if n.endswith(".stats.json")]
    assert 0 < len(markers) < 6
    for name in markers:  # a marker vouches for whole data files
        stats = json.loads(s3().cat_file(f"{out}/{name}.stats.json"))
        assert stats["sizes"] == {".tar": objects[f"{name}.tar"], ".parquet":
                                  objects[f"{name}.parquet"]}  # fmt: skip
    server.delay_s = 0.0
    before = dict(server.hits)
    invoke(download_args(str(urls), out))
    copy = fetch(out, tmp_path / "copy")
    assert shard_records(copy) == shard_records(tmp_path / "local")
    assert tar_members(copy) == tar_members(tmp_path / "local")
    done_before = {row["url"] for name in markers
                   for row in pq.read_table(copy / f"{name}.parquet").to_pylist()}  # fmt: skip
    for url in done_before:  # what was published was not fetched again
        path = url.split("127.0.0.1", 1)[1].split("/", 1)[1]
        assert server.hits[f"/{path}"] == before.get(f"/{path}", 0)


def test_damaged_or_unvouched_objects_are_redone(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=14)
    out = f"{bucket}/shards"
    invoke(download_args(str(urls), out))
    fs = s3()
    fs.pipe_file(f"{out}/00000.tar", b"cut")  # a tar not of the size its marker records
    fs.rm_file(f"{out}/00001.stats.json")  # data files nobody vouches for
    hits = server.total_hits("/img/")
    result = invoke(download_args(str(urls), out))
    assert "this run: 10 rows" in result.output
    assert server.total_hits("/img/") - hits == 10
    copy = fetch(out, tmp_path / "copy")
    assert len(shard_records(copy)) == 15 and len(tar_members(copy)) == 14 * 2


def test_a_held_lease_refuses_a_second_run_and_a_lapsed_one_is_taken(
    server, bucket: str, tmp_path: Path
):
    urls = url_list(server, tmp_path / "urls.parquet", count=3)
    out = f"{bucket}/shards"
    lease = {"holder": "other-host:42:abcd", "expires": time.time() + 300}
    s3().pipe_file(f"{out}/.lease.json", json.dumps(lease).encode())
    line = one_error_line(RUNNER.invoke(app, download_args(str(urls), out)))
    assert "another vlmdata run (other-host:42:abcd) holds" in line
    lease["expires"] = time.time() - 1  # its run was killed outright: the lease lapsed
    s3().pipe_file(f"{out}/.lease.json", json.dumps(lease).encode())
    invoke(download_args(str(urls), out))
    assert ".lease.json" not in published_shards(out)


def test_a_prefix_holding_other_objects_is_refused(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=3)
    s3().pipe_file(f"{bucket}/mine/notes.txt", b"x")
    line = one_error_line(RUNNER.invoke(app, download_args(str(urls), f"{bucket}/mine")))
    assert "not empty and holds no vlmdata plan.json" in line
    invoke(download_args(str(urls), f"{bucket}/dl"))
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(make_image(20, 20, "PNG"))
    line = one_error_line(RUNNER.invoke(app, ["preprocess", str(images), f"{bucket}/dl"]))
    assert "holds a download output" in line


def test_encode_from_s3_to_s3_writes_the_local_features(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=9)
    invoke(download_args(str(urls), f"{bucket}/dl"))
    encode = ["--model", "tiny-random-clip", "--pretrained", "none", "--workers", "0",
              "--no-placeholder-filter", "--quiet"]  # fmt: skip
    invoke(["encode", f"{bucket}/dl", f"{bucket}/enc", *encode])
    copy = fetch(f"{bucket}/dl", tmp_path / "dl")
    invoke(["encode", str(copy), str(tmp_path / "local"), *encode])
    features = fetch(f"{bucket}/enc", tmp_path / "enc")
    names = sorted(p.name for p in (tmp_path / "local").glob("*.h5"))
    assert names == sorted(p.name for p in features.glob("*.h5")) and names
    for name in names:
        with h5py.File(features / name) as a, h5py.File(tmp_path / "local" / name) as b:
            for key in ("keys", "tokens", "embeds"):
                assert np.array_equal(a[key][...], b[key][...])
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["rows"] == 9
    assert "Nothing to do" in invoke(["encode", f"{bucket}/dl", f"{bucket}/enc", *encode]).output


def _patch_object_reads(monkeypatch, read) -> None:
    """Route every object read of s3fs through ``read(original, self, path, ...)``. fsspec
    binds each instance's sync methods when it is made: cached instances go first."""
    import s3fs

    original = s3fs.S3FileSystem._cat_file

    async def patched(self, path, *args, **kwargs):
        return await read(original, self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", patched)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_resume_reads_the_shard_markers_together(server, bucket, tmp_path, monkeypatch):
    """A resume of CapsFusion's 11,000 published shards read their markers one GET after
    another (minutes on S3); the store is now asked for all of them at once."""
    urls = url_list(server, tmp_path / "urls.parquet")
    out = f"{bucket}/shards"
    invoke(download_args(str(urls), out))  # 4 shards
    reads = {"now": 0, "most": 0, "markers": 0}

    async def counted(original, self, path, *args, **kwargs):
        reads["now"] += 1
        reads["most"] = max(reads["most"], reads["now"])
        reads["markers"] += path.endswith(".stats.json") and not path.endswith("/stats.json")
        try:
            return await original(self, path, *args, **kwargs)
        finally:
            reads["now"] -= 1

    _patch_object_reads(monkeypatch, counted)
    assert "Nothing to do" in invoke(download_args(str(urls), out)).output
    assert reads["markers"] == 4  # each marker read once
    assert reads["most"] >= 4  # together


def test_a_marker_the_store_refuses_is_named_in_one_line(server, bucket, tmp_path, monkeypatch):
    urls = url_list(server, tmp_path / "urls.parquet")
    out = f"{bucket}/shards"
    invoke(download_args(str(urls), out))

    async def refuse_one(original, self, path, *args, **kwargs):
        if path.endswith("/00001.stats.json"):
            raise PermissionError("Access Denied")
        return await original(self, path, *args, **kwargs)

    _patch_object_reads(monkeypatch, refuse_one)
    line = one_error_line(RUNNER.invoke(app, download_args(str(urls), out)))
    assert f"cannot read {out}/00001.stats.json (PermissionError: Access Denied)" in line


@pytest.mark.parametrize(
    ("command", "named", "fix"),
    [
        (["report", "s3://bucket/run"], "DIR s3://bucket/run", "copy it to a local path"),
        (["train", "s3://b/features", "--llm", "tiny-random-llama", "--out", "run"],
         "FEATURES_DIR s3://b/features", "copy it to a local path"),
        (["train", "features", "--llm", "tiny-random-llama", "--out", "gs://b/run"],
         "--out gs://b/run", "write to a local path and copy it up"),
        (["train", "features", "--llm", "tiny-random-llama", "--out", "run", "--init", "s3://b/r"],
         "--init s3://b/r", "copy it to a local path"),
        (["eval", "s3://b/run", "features"], "RUN_DIR s3://b/run", "copy it to a local path"),
        (["eval", "run", "s3://b/features"], "FEATURES_DIR s3://b/features",
         "copy it to a local path"),
        (["caption", "s3://b/run", "a.jpg"], "RUN_DIR s3://b/run", "copy it to a local path"),
        (["caption", "run", "a.jpg", "--json", "s3://b/c.json"], "--json s3://b/c.json",
         "write to a local path and copy it up"),
        (["eval", "run", "features", "--out", "s3://b/e"], "--out s3://b/e",
         "write to a local path and copy it up"),
        (["report", "run", "--out", "s3://b/r.html"], "--out s3://b/r.html",
         "write to a local path and copy it up"),
    ],
)  # fmt: skip
def test_commands_without_object_store_support_refuse_a_url(command, named, fix, tmp_path,
                                                          monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    line = one_error_line(RUNNER.invoke(app, command))
    assert f"{named}: this command reads and writes local paths; {fix} (object-store" in line


def test_an_unknown_protocol_is_one_line(tmp_path: Path):
    line = one_error_line(RUNNER.invoke(app, ["encode", "nosuch://x/y", str(tmp_path / "o")]))
    assert "nosuch://" in line


def test_without_s3fs_the_error_names_the_extra(tmp_path: Path):
    """In a process of its own: fsspec keeps the S3 class once this one has imported it."""
    blocked = "import sys; sys.modules['s3fs'] = None; from vlmdata.cli import app; app()"
    run = subprocess.run([sys.executable, "-c", blocked, "encode", str(tmp_path), "s3://b/x"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "s3:// needs s3fs; pip install 'vlmdata[s3]'" in run.stderr


def test_an_input_cache_places_shard_tars_and_fetches_them_where_they_are_read(
    bucket: str, tmp_path: Path, monkeypatch
):
    from vlmdata.pipeline.storage import InputCache

    fs = s3()
    fs.pipe_file(f"{bucket}/in/plan.json", b'{"stage": "download"}')
    fs.pipe_file(f"{bucket}/in/00000.tar", b"t" * 5000)
    fs.pipe_file(f"{bucket}/in/00000.parquet", b"p" * 300)
    fs.pipe_file(f"{bucket}/in/00000.stats.json", b"{}")
    monkeypatch.setenv("VLMDATA_STAGING", str(tmp_path / "planner"))
    cache = InputCache(f"{bucket}/in")
    root = cache.sync(lazy=(".tar", ".parquet"))
    tar = root / "00000.tar"
    assert (root / "plan.json").read_bytes() == b'{"stage": "download"}'
    assert tar.stat().st_size == 5000 and tar.read_bytes() == bytes(5000)  # placed, not fetched
    cache.fetch_shard(tar)
    assert tar.read_bytes() == b"t" * 5000 and (root / "00000.parquet").read_bytes() == b"p" * 300
    assert not [p for p in root.iterdir() if p.name.endswith(".pending")]
    # Another machine: nothing cached there, the worker fetches the shard it is handed.
    elsewhere = InputCache(cache.url, root=tmp_path / "worker", versions=cache.versions)
    elsewhere.fetch_shard(elsewhere.root / "00000.tar")
    assert (elsewhere.root / "00000.tar").read_bytes() == b"t" * 5000
    assert (elsewhere.root / "00000.stats.json").read_bytes() == b"{}"
    # A shard rewritten at the URL is placed again, then fetched anew.
    fs.pipe_file(f"{bucket}/in/00000.tar", b"u" * 4000)
    cache.sync(lazy=(".tar", ".parquet"))
    assert tar.read_bytes() == bytes(4000)
    cache.fetch_shard(tar)
    assert tar.read_bytes() == b"u" * 4000
    # Removed at the URL: removed here.
    fs.rm_file(f"{bucket}/in/00000.parquet")
    cache.sync(lazy=(".tar", ".parquet"))
    assert not (root / "00000.parquet").exists()


def test_the_record_of_an_s3_run_runs_it_again(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=3)
    out = f"{bucket}/shards"
    invoke(download_args(str(urls), out))
    record = s3().cat_file(f"{out}/vlmdata.toml").decode()
    assert f"--config {out}/vlmdata.toml" in record
    again = invoke(["download", "--config", f"{out}/vlmdata.toml"])
    assert "Nothing to do" in again.output


def test_a_placed_input_shard_removed_before_its_fetch_is_one_line(bucket: str, monkeypatch,
                                                                    tmp_path: Path):  # fmt: skip
    from vlmdata.errors import UserError
    from vlmdata.pipeline.storage import InputCache

    fs = s3()
    fs.pipe_file(f"{bucket}/in/00000.tar", b"t" * 1000)
    fs.pipe_file(f"{bucket}/in/00000.stats.json", b"{}")
    monkeypatch.setenv("VLMDATA_STAGING", str(tmp_path))
    cache = InputCache(f"{bucket}/in")
    root = cache.sync(lazy=(".tar",))
    fs.rm_file(f"{bucket}/in/00000.tar")  # gone between planning and the worker
    with pytest.raises(UserError, match="was removed since this run read the input"):
        cache.fetch_shard(root / "00000.tar")


def test_a_worker_fetches_the_planned_version_not_the_one_it_holds(bucket: str, monkeypatch,
                                                                   tmp_path: Path):  # fmt: skip
    import pickle

    from vlmdata.pipeline.storage import InputCache

    fs = s3()
    fs.pipe_file(f"{bucket}/in/00000.tar", b"1" * 100)
    monkeypatch.setenv("VLMDATA_STAGING", str(tmp_path / "worker"))
    worker_copy = InputCache(f"{bucket}/in")
    worker_copy.sync(lazy=(".tar",))
    worker_copy.fetch_shard(worker_copy.root / "00000.tar")  # the worker holds version 1
    fs.pipe_file(f"{bucket}/in/00000.tar", b"2" * 100)  # same size, new content
    planned = InputCache(f"{bucket}/in", root=worker_copy.root.parent / "planner")
    planned.sync(lazy=(".tar",))
    shipped = pickle.loads(pickle.dumps(planned))  # as it reaches a worker
    shipped.root = worker_copy.root
    shipped.fetch_shard(worker_copy.root / "00000.tar")
    assert (worker_copy.root / "00000.tar").read_bytes() == b"2" * 100


def test_a_missing_bucket_or_an_unreachable_store_is_one_line(server, s3_server: str,
                                                              tmp_path: Path):  # fmt: skip
    urls = url_list(server, tmp_path / "urls.parquet", count=2)
    line = one_error_line(RUNNER.invoke(app, download_args(str(urls), "s3://no-such-bucket/x")))
    assert "no-such-bucket" in line
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    run = subprocess.run([sys.executable, "-m", "vlmdata", *download_args(str(urls), "s3://b/x")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "cannot" in run.stderr and "Traceback" not in run.stderr


def test_a_refused_upload_stops_the_run(server, bucket: str, tmp_path: Path, monkeypatch):
    from vlmdata.errors import UserError
    from vlmdata.pipeline.storage import RemoteOutput

    original = RemoteOutput.publish_shard

    def refuse_the_second(self, name, data_files):
        if name == "00001":
            raise UserError("cannot write 00001 (AccessDenied); check the credentials")
        original(self, name, data_files)

    monkeypatch.setattr(RemoteOutput, "publish_shard", refuse_the_second)
    # Slow images (12 s for all at --concurrency 2): the refusal, noticed within a poll of
    # the shard's end, comes long before the rest would be staged, however loaded the machine.
    server.delay_s = 0.4
    urls = url_list(server, tmp_path / "urls.parquet", count=60)
    args = download_args(str(urls), f"{bucket}/shards")
    args[args.index("--shard-size") + 1] = "2"
    result = RUNNER.invoke(app, [*args, "--concurrency", "2"])
    assert "AccessDenied" in one_error_line(result)
    assert server.total_hits("/img/") < 40  # it stopped, instead of staging all 30 shards


def test_a_lease_taken_by_another_run_is_noticed(bucket: str, monkeypatch):
    from vlmdata.errors import UserError
    from vlmdata.pipeline import storage

    monkeypatch.setattr(storage, "_RENEW_S", 0.05)
    output = storage.RemoteOutput(f"{bucket}/out")
    with output.lease() as lease:
        lease.check()
        # The other run holds it as runs do: renewing it (a lone write could be overwritten by
        # a renewal that read the lease just before it: no conditional writes, see README).
        taken = {"holder": "elsewhere:1:x", "expires": time.time() + 60}
        deadline = time.monotonic() + 30
        while not lease.lost.is_set() and time.monotonic() < deadline:
            s3().pipe_file(f"{bucket}/out/.lease.json", json.dumps(taken).encode())
            time.sleep(0.05)
        with pytest.raises(UserError, match="lost its lease"):
            lease.check()
    held = json.loads(s3().cat_file(f"{bucket}/out/.lease.json"))
    assert held["holder"] == "elsewhere:1:x"  # not taken back, not deleted


def test_a_resume_from_another_machine_trusts_the_published_shards(
    server, bucket: str, tmp_path: Path, monkeypatch
):
    """Another machine (its own staging and input cache) resumes an s3 run from an s3 URL
    list: nothing to do, nothing refused."""
    urls = url_list(server, tmp_path / "urls.parquet", count=6)
    s3().put_file(str(urls), f"{bucket}/lists/urls.parquet")
    args = download_args(f"{bucket}/lists/urls.parquet", f"{bucket}/shards")
    monkeypatch.setenv("VLMDATA_STAGING", str(tmp_path / "first"))
    invoke(args)
    monkeypatch.setenv("VLMDATA_STAGING", str(tmp_path / "second"))
    assert "Nothing to do" in invoke(args).output


def test_labels_classify_from_s3_to_s3_labels_as_a_local_run(shape_features: Path, bucket: str,
                                                              tmp_path: Path):  # fmt: skip
    fs = s3()
    for path in shape_features.iterdir():
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/features/{path.name}")
    invoke(["labels", "classify", str(shape_features), str(tmp_path / "local"), "--quiet"])
    invoke(["labels", "classify", f"{bucket}/features", f"{bucket}/labels", "--quiet"])
    copy = fetch(f"{bucket}/labels", tmp_path / "copy")
    assert shard_records(copy) == shard_records(tmp_path / "local")


def test_an_output_inside_its_input_prefix_is_refused(bucket: str):
    line = one_error_line(RUNNER.invoke(app, ["encode", f"{bucket}/dl", f"{bucket}/dl/enc"]))
    assert "must differ from the input" in line


def test_a_damaged_stats_json_on_s3_is_made_again(server, bucket: str, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=4)
    out = f"{bucket}/shards"
    invoke(download_args(str(urls), out))
    s3().pipe_file(f"{out}/stats.json", b"{garbage")
    hits = server.total_hits("/img/")
    invoke(download_args(str(urls), out))
    assert server.total_hits("/img/") == hits  # the shards stood: only the totals were redone
    assert json.loads(s3().cat_file(f"{out}/stats.json"))["complete"] is True


def test_input_shards_are_given_back_after_their_work(server, bucket: str, tmp_path: Path,
                                                      monkeypatch):  # fmt: skip
    urls = url_list(server, tmp_path / "urls.parquet", count=7)
    invoke(download_args(str(urls), f"{bucket}/dl"))
    monkeypatch.setenv("VLMDATA_STAGING", str(tmp_path / "staging"))
    invoke(["encode", f"{bucket}/dl", str(tmp_path / "enc"), "--model", "tiny-random-clip",
            "--pretrained", "none", "--workers", "0", "--quiet"])  # fmt: skip
    tars = list((tmp_path / "staging").rglob("in-*/*.tar"))
    assert len(tars) == 2
    for tar in tars:  # placed again: the size planning reads, no data held
        assert tar.read_bytes() == bytes(tar.stat().st_size)
        assert tar.with_name(f".{tar.name}.pending").exists()
    assert "Nothing to do" in invoke(["encode", f"{bucket}/dl", str(tmp_path / "enc"), "--model",
                                      "tiny-random-clip", "--pretrained", "none", "--workers", "0",
                                      "--quiet"]).output  # fmt: skip


def test_a_file_url_output_is_made_like_a_directory(server, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet", count=3)
    invoke(download_args(str(urls), f"file://{tmp_path}/new/out"))
    assert len(shard_records(tmp_path / "new" / "out")) == 4


def test_an_input_in_a_missing_bucket_is_one_line(s3_server: str, tmp_path: Path):
    line = one_error_line(RUNNER.invoke(app, download_args("s3://no-such-bucket/urls.parquet",
                                                           str(tmp_path / "out"))))  # fmt: skip
    assert "s3://no-such-bucket/urls.parquet does not exist or is empty" in line
