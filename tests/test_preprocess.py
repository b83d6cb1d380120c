"""`vlmdata preprocess` over every input kind, and `vlmdata download --resize`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.errors import UserError
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy
from vlmdata.pipeline.imageops import SquareOptions
from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

runner = CliRunner(env={"COLUMNS": "200"})
SIZE = 48


def rows_of(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def tar_images(out: Path) -> dict[str, Image.Image]:
    images = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".jpg", ".png", ".webp")):
                    data = tar.extractfile(member).read()
                    images[member.name.split(".")[0]] = Image.open(io.BytesIO(data))
    return images


def preprocess(input_dir: Path, out: Path, **options) -> object:
    square = SquareOptions(size=SIZE, **options.pop("square", {}))
    config = PreprocessConfig(
        str(input_dir), str(out), square=square, processes=1, quiet=True, **options
    )
    return run_preprocess(config)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Seven images in nested folders (two with captions), a panorama, a tiny one, a broken one."""
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    (folder / "a1.jpg").write_bytes(make_image(200, 150, seed=1))
    (folder / "a1.txt").write_text("first caption")
    (folder / "a2.png").write_bytes(make_image(100, 100, "PNG", seed=2))
    (folder / "a3.jpg").write_bytes(make_image(1000, 20, seed=3))  # panorama: padded
    (folder / "a4.jpg").write_bytes(make_image(20, 10, seed=4))  # tiny: filtered by --min-side
    (folder / "a5.jpg").write_bytes(b"not really a jpeg")
    (folder / "b" / "c1.webp").write_bytes(make_image(120, 90, "WEBP", seed=5))
    (folder / "b" / "c1.txt").write_text("nested caption")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_plain_folder_with_captions(image_folder, tmp_path):
    out = tmp_path / "out"
    summary = preprocess(image_folder, out, shard_size=4, square={"min_side": 16})
    rows = rows_of(out)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(6)]
    by_source = {Path(r["source"]).name: r for r in rows}
    assert by_source["a1.jpg"]["caption"] == "first caption"
    assert by_source["c1.webp"]["caption"] == "nested caption"
    assert by_source["a3.jpg"]["action"] == "pad" and by_source["a1.jpg"]["action"] == "crop"
    assert (by_source["a4.jpg"]["status"], by_source["a4.jpg"]["error_kind"]) == (
        "filtered",
        "too_small",
    )
    assert by_source["a5.jpg"]["status"] == "failed_to_decode"
    images = tar_images(out)
    assert len(images) == 4 and all(im.size == (SIZE, SIZE) for im in images.values())
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert summary.totals["status"] == {"success": 4, "filtered": 1, "failed_to_decode": 1}
    assert "squares: crop 3, pad 1" in summary.format()


def test_stats_hold_the_crop_pad_split_and_ratio_histogram(image_folder, tmp_path):
    out = tmp_path / "out"
    preprocess(image_folder, out, shard_size=4)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["action"] == {"crop": 3, "pad": 2}
    histogram = stats["ratio_histogram"]  # 20 bins of min/max side over [0, 1]
    assert {i: n for i, n in enumerate(histogram) if n} == {0: 1, 10: 1, 15: 2, 19: 1}


def test_vlmdata_download_shards_keep_their_keys(server, tmp_path):
    urls = [server.add_file(f"{i}.jpg", make_image(160 + 40 * i, 120, seed=i)) for i in range(5)]
    urls.append(server.url("/img/missing.jpg"))
    pq.write_table(
        pa.table({"image_url": urls, "capsfusion": [f"c{i}" for i in range(6)]}),
        tmp_path / "u.parquet",
    )
    downloaded = tmp_path / "downloaded"
    run_download(
        DownloadConfig(
            str(tmp_path / "u.parquet"),
            str(downloaded),
            shard_size=3,
            processes=1,
            quiet=True,
            fetch=FetchPolicy(allow_private_network=True),
        )
    )
    out = tmp_path / "squares"
    preprocess(downloaded, out)
    rows = rows_of(out)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(5)]  # the 404 had no image
    assert [r["caption"] for r in rows] == [f"c{i}" for i in range(5)]
    assert rows[0]["url"] == urls[0]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert all(im.size == (SIZE, SIZE) for im in tar_images(out).values())


def write_img2dataset_shard(folder: Path) -> None:
    """What img2dataset writes: 00000.tar with KEY.jpg/.txt/.json, plus its own stats file."""
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(3):
            key = f"0000000{i:02d}"
            meta = json.dumps({"url": f"http://x/{i}.jpg", "key": key}).encode()
            members = {"jpg": make_image(90, 60, seed=i), "txt": f"cap {i}".encode(), "json": meta}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "00000_stats.json").write_text(json.dumps({"successes": 3}))


def test_img2dataset_webdataset_output(tmp_path):
    write_img2dataset_shard(tmp_path / "i2d")
    out = tmp_path / "out"
    preprocess(tmp_path / "i2d", out)
    rows = rows_of(out)
    assert [r["key"] for r in rows] == ["000000000", "000000001", "000000002"]
    assert [r["url"] for r in rows] == [f"http://x/{i}.jpg" for i in range(3)]
    assert [r["caption"] for r in rows] == [f"cap {i}" for i in range(3)]


def test_resume_redoes_only_unfinished_shards_and_refuses_changed_options(image_folder, tmp_path):
    out = tmp_path / "out"
    preprocess(image_folder, out, shard_size=2)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02]*")}
    for path in out.glob("00001.*"):  # as if the run died before shard 1 finished
        path.unlink()
    (out / "stats.json").unlink()
    summary = preprocess(image_folder, out, shard_size=2)
    assert summary.rows_this_run == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02]*")} == kept
    assert len(rows_of(out)) == 6
    assert preprocess(image_folder, out, shard_size=2).nothing_to_do
    changed = r"made with --pad-threshold 0.6, this run has --pad-threshold 0.5"
    with pytest.raises(UserError, match=changed):
        preprocess(image_folder, out, shard_size=2, square={"pad_threshold": 0.5})


def test_torn_partial_tar_is_recovered(image_folder, tmp_path):
    out = tmp_path / "out"
    preprocess(image_folder, out, shard_size=10)
    tar = out / "00000.tar"
    data = tar.read_bytes()
    with tarfile.open(tar) as t:
        cut = t.getmembers()[-1].offset_data + 5  # inside the last KEY.json
    (out / "00000.tar.partial").write_bytes(data[:cut])
    for name in ("00000.tar", "00000.parquet", "00000.stats.json", "stats.json"):
        (out / name).unlink()
    summary = preprocess(image_folder, out, shard_size=10)
    assert summary.rows_this_run == 2  # the torn sample, and the failure (its journal is gone)
    assert len(rows_of(out)) == 6
    with tarfile.open(out / "00000.tar") as t:
        names = t.getnames()
    assert len(names) == len(set(names)) == 5 * 3


def test_download_resize_stores_squares(server, tmp_path):
    urls = [
        server.add_file("wide.jpg", make_image(900, 100)),
        server.add_file("photo.png", make_image(300, 200, "PNG")),
    ]
    pq.write_table(
        pa.table({"image_url": urls, "capsfusion": ["wide", "photo"]}), tmp_path / "u.parquet"
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["download", str(tmp_path / "u.parquet"), str(out), "--allow-private-network", "--quiet",
         "--resize", str(SIZE), "--fill", "255,255,255", "--format", "png"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["caption"]: r for r in rows_of(out)}
    assert (rows["wide"]["action"], rows["photo"]["action"]) == ("pad", "crop")
    assert (rows["wide"]["original_width"], rows["wide"]["width"]) == (900, SIZE)
    images = tar_images(out)
    assert {im.size for im in images.values()} == {(SIZE, SIZE)}
    assert images[rows["wide"]["key"]].getpixel((0, 0)) == (255, 255, 255)
    assert json.loads((out / "plan.json").read_text())["resize"]["size"] == SIZE


def test_preprocess_cli(image_folder, tmp_path):
    result = runner.invoke(
        app,
        [
            "preprocess",
            str(image_folder),
            str(tmp_path / "o"),
            "--size",
            "32",
            "--quiet",
            "--processes",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rows in" in result.stdout and "success" in result.stdout
    help_text = runner.invoke(app, ["preprocess", "--help"]).output
    for flag in ("--size", "--pad-threshold", "--fill", "--format", "--quality", "--min-side",
                 "--max-pixels", "--processes", "--quiet"):  # fmt: skip
        assert flag in help_text
    for args, message in (
        ([str(tmp_path / "nope"), str(tmp_path / "o2")], "not a directory"),
        ([str(image_folder), str(tmp_path / "o3"), "--fill", "red"], "R,G,B"),
        ([str(image_folder), str(tmp_path / "o4"), "--format", "gif"], "--format"),
        ([str(image_folder), str(image_folder)], "must differ"),
    ):
        bad = runner.invoke(app, ["preprocess", *args])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output
