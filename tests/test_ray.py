"""`--distributor ray`: the same shard functions on Ray actors, on a 2-CPU cluster this test
run starts on 127.0.0.1. The output equals a local run's, a worker killed mid-shard is
restarted and its shards retried, and a rerun does nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from typer.testing import CliRunner

from conftest import LoopbackServer, make_image, one_error_line, shard_records, tar_members
from vlmdata.cli import app

pytestmark = [pytest.mark.usefixtures("ray_cluster", "quiet_random_weights")]

SHARD = 6
RUNNER = CliRunner()


def url_list(server: LoopbackServer, path: Path, extra: list[str] = ()) -> Path:
    urls = [server.add_file(f"{i}.jpg", make_image(40 + i, 30 + i % 7, seed=i)) for i in range(20)]
    urls += [server.url("/img/missing.jpg"), server.add_file("cut.jpg", make_image(50, 40)[:150])]
    urls += list(extra)
    pq.write_table(pa.table({"image_url": urls, "capsfusion": [f"c{i}" for i in range(len(urls))]}),
                   path)  # fmt: skip
    return path


def download(urls: Path, out: Path, *flags: str):
    result = RUNNER.invoke(app, ["download", str(urls), str(out), "--shard-size", str(SHARD),
                                 "--allow-private-network", "--timeout", "5", "--retries", "0",
                                 "--quiet", *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def test_download_on_ray_writes_what_a_local_run_writes(server: LoopbackServer, tmp_path: Path):
    urls = url_list(server, tmp_path / "urls.parquet")
    download(urls, tmp_path / "local", "--processes", "1")
    result = download(urls, tmp_path / "ray", "--distributor", "ray", "--processes", "2")
    assert "22 rows in 4 shards" in result.output
    assert shard_records(tmp_path / "ray") == shard_records(tmp_path / "local")
    assert tar_members(tmp_path / "ray") == tar_members(tmp_path / "local")
    statuses = {r["status"] for r in shard_records(tmp_path / "ray").values()}
    assert statuses == {"success", "failed_to_download", "failed_to_decode"}
    rerun = download(urls, tmp_path / "ray", "--distributor", "ray", "--processes", "2")
    assert "Nothing to do" in rerun.output


def _ray_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::_ShardWorker"):
                pids.append(int(entry.name))
    return pids


def test_a_worker_killed_mid_shard_is_restarted_and_its_shard_retried(tmp_path: Path):
    """The first request for /trap on Ray kills every Ray worker (SIGKILL) while their shards
    are in flight; Ray restarts them and retries the shards: the output is complete, whole and
    the local run's."""
    killed: list[int] = []
    armed = False

    async def trap(request: web.Request) -> web.Response:
        if armed and not killed:
            killed.extend(_ray_worker_pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            raise web.HTTPServiceUnavailable()  # nobody is left to read it
        return web.Response(body=make_image(33, 33, seed=99), content_type="image/jpeg")

    server = LoopbackServer()
    server.route("/trap", trap)
    with server:
        urls = url_list(server, tmp_path / "urls.parquet", extra=[server.url("/trap")])
        download(urls, tmp_path / "local", "--processes", "1")
        armed = True
        download(urls, tmp_path / "ray", "--distributor", "ray", "--processes", "2",
                 "--max-shard-retries", "2")  # fmt: skip
    assert killed, "the trap never fired"
    assert shard_records(tmp_path / "ray") == shard_records(tmp_path / "local")
    assert tar_members(tmp_path / "ray") == tar_members(tmp_path / "local")


def test_a_worker_that_keeps_dying_stops_the_run_in_one_line(tmp_path: Path):
    async def always_kill(request: web.Request) -> web.Response:
        for pid in _ray_worker_pids():
            os.kill(pid, signal.SIGKILL)
        raise web.HTTPServiceUnavailable()

    server = LoopbackServer()
    server.route("/trap", always_kill)
    with server:
        urls = url_list(server, tmp_path / "urls.parquet", extra=[server.url("/trap")])
        result = RUNNER.invoke(app, ["download", str(urls), str(tmp_path / "out"),
                                     "--shard-size", str(SHARD), "--allow-private-network",
                                     "--quiet", "--distributor", "ray", "--processes", "1",
                                     "--max-shard-retries", "1"])  # fmt: skip
    assert result.exit_code == 1, result.output
    # Ray prints its own "(raylet)" notes on the worker deaths, when they reach it in time.
    lines = [line for line in result.output.splitlines()
             if line.strip() and "(raylet)" not in line]  # fmt: skip
    assert len(lines) == 1 and "died 2 times" in lines[0] and "resume" in lines[0], lines
    assert "Traceback" not in result.output


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:03d}.png").write_bytes(make_image(30 + i, 40, "PNG", seed=i))
    return folder


def encode(images: Path, out: Path | str, *flags: str):
    result = RUNNER.invoke(app, ["encode", str(images), str(out), "--model", "tiny-random-clip",
                                 "--pretrained", "none", "--workers", "0", "--shard-size", "5",
                                 "--no-placeholder-filter", "--quiet", *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def test_encode_on_ray_actors_writes_the_local_features(tmp_path: Path):
    images = write_images(tmp_path / "images", 13)
    encode(images, tmp_path / "local")
    encode(images, tmp_path / "ray", "--distributor", "ray")
    for local in sorted((tmp_path / "local").glob("*.h5")):
        with h5py.File(local) as a, h5py.File(tmp_path / "ray" / local.name) as b:
            assert {k: str(v) for k, v in a.attrs.items()} == {
                k: str(v) for k, v in b.attrs.items()
            }
            for name in ("keys", "tokens", "embeds"):
                assert np.array_equal(a[name][...], b[name][...]), name
    assert shard_records(tmp_path / "ray") == shard_records(tmp_path / "local")
    assert "Nothing to do" in encode(images, tmp_path / "ray", "--distributor", "ray").output


def test_labels_classify_on_ray_labels_as_a_local_run(shape_features: Path, tmp_path: Path):
    for name, flags in (("local", []), ("ray", ["--distributor", "ray"])):
        result = RUNNER.invoke(app, ["labels", "classify", str(shape_features),
                                     str(tmp_path / name), "--quiet", *flags])  # fmt: skip
        assert result.exit_code == 0, result.output
    assert shard_records(tmp_path / "ray") == shard_records(tmp_path / "local")


def test_gpus_the_cluster_lacks_are_one_line(tmp_path: Path):
    images = write_images(tmp_path / "images", 2)
    result = RUNNER.invoke(
        app,
        [
            "encode",
            str(images),
            str(tmp_path / "out"),
            "--model",
            "tiny-random-clip",
            "--pretrained",
            "none",
            "--precision",
            "fp16",
            "--workers",
            "0",
            "--distributor",
            "ray",
            "--gpus-per-worker",
            "1",
        ],
    )
    assert "has 0 GPUs" in one_error_line(result)


def test_ray_options_without_ray_distributor_are_refused(tmp_path: Path):
    result = RUNNER.invoke(app, ["download", "x.parquet", str(tmp_path / "o"),
                                 "--max-shard-retries", "5"])  # fmt: skip
    assert "--max-shard-retries only applies with --distributor ray" in one_error_line(result)
    result = RUNNER.invoke(app, ["download", "x.parquet", str(tmp_path / "o"),
                                 "--distributor", "dask"])  # fmt: skip
    assert "--distributor must be local or ray" in one_error_line(result)


def test_without_ray_installed_the_error_names_the_extra(tmp_path: Path, monkeypatch):
    images = write_images(tmp_path / "images", 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    result = RUNNER.invoke(app, ["preprocess", str(images), str(tmp_path / "out"),
                                 "--distributor", "ray"])  # fmt: skip
    line = one_error_line(result)
    assert "vlmdata[ray]" in line and "--distributor local" in line


def test_encode_on_ray_publishes_to_s3(bucket: str, tmp_path: Path):
    """Ray workers and an object store together: each worker publishes its own shards."""
    import s3fs

    images = write_images(tmp_path / "images", 11)
    encode(images, tmp_path / "local")
    encode(images, f"{bucket}/enc", "--distributor", "ray")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for local in sorted((tmp_path / "local").glob("*.h5")):
        copy = tmp_path / f"copy-{local.name}"
        fs.get_file(f"{bucket}/enc/{local.name}", str(copy))
        with h5py.File(local) as a, h5py.File(copy) as b:
            assert np.array_equal(a["embeds"][...], b["embeds"][...])
    assert "Nothing to do" in encode(images, f"{bucket}/enc", "--distributor", "ray").output


def test_a_worker_larger_than_any_node_is_one_line(tmp_path: Path):
    images = write_images(tmp_path / "images", 2)
    result = RUNNER.invoke(app, ["encode", str(images), str(tmp_path / "out"), "--model",
                                 "tiny-random-clip", "--pretrained", "none", "--workers", "4",
                                 "--distributor", "ray"])  # fmt: skip
    assert "needs 5 CPUs but the largest node of the cluster has 2" in one_error_line(result)


def test_preprocess_on_ray_squares_as_a_local_run(tmp_path: Path):
    images = write_images(tmp_path / "images", 9)
    for name, flags in (("local", []), ("ray", ["--distributor", "ray", "--processes", "2"])):
        result = RUNNER.invoke(app, ["preprocess", str(images), str(tmp_path / name), "--size",
                                     "32", "--shard-size", "4", "--quiet", *flags])  # fmt: skip
        assert result.exit_code == 0, result.output
    assert shard_records(tmp_path / "ray") == shard_records(tmp_path / "local")
    assert tar_members(tmp_path / "ray") == tar_members(tmp_path / "local")


def test_an_unreachable_cluster_address_is_one_line_in_seconds(tmp_path: Path):
    """In a process of its own (this one's Ray is running): nothing listens on port 1."""
    images = write_images(tmp_path / "images", 1)
    run = subprocess.run([sys.executable, "-m", "vlmdata", "preprocess", str(images),
                          str(tmp_path / "out"), "--distributor", "ray", "--ray-address",
                          "127.0.0.1:1"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in run.stderr
