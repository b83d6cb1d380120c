"""Bad input files end in one line and exit 2; odd but valid rows are data (issue 8)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LoopbackServer, make_image


def vlmdata(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmdata", *args, "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_read_error_after_the_first_rows_is_one_line(server: LoopbackServer, tmp_path,
                                                       processes):  # fmt: skip
    url = server.add_file("a.jpg", make_image(20, 20))
    lines = [json.dumps({"image_url": url, "capsfusion": "ok"})] * 30 + ["{broken"]
    src = tmp_path / "urls.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = vlmdata("download", str(src), str(tmp_path / "out"), "--allow-private-network",
                     "--shard-size", "10", "--processes", processes)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: urls.jsonl line 31 is not valid JSON (Expecting property name enclosed in "
        "double quotes); fix or drop it"
    ]


def test_kept_columns_of_any_type_keep_their_type(server: LoopbackServer, tmp_path):
    urls = [server.add_file(f"{i}.jpg", make_image(20, 20, seed=i)) for i in range(3)]
    urls.append(server.url("/img/missing.jpg"))
    when = [dt.datetime(2024, 1, i + 1, 12, 30) for i in range(4)]
    blobs = [bytes([i, 255]) for i in range(4)]
    src = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "capsfusion": ["c"] * 4,
                             "seen": pa.array(when, pa.timestamp("us")),
                             "blob": pa.array(blobs, pa.binary())}), src)  # fmt: skip
    out = tmp_path / "out"
    result = vlmdata("download", str(src), str(out), "--allow-private-network",
                     "--keep-col", "seen", "--keep-col", "blob")  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out / "00000.parquet")
    assert table.schema.field("seen").type == pa.timestamp("us")
    assert table.column("seen").to_pylist() == when and table.column("blob").to_pylist() == blobs
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000001.json").read())
    assert meta["seen"] == "2024-01-02T12:30:00"  # KEY.json: a text form
    assert base64.b64decode(meta["blob"]) == blobs[1]


def test_a_long_member_name_is_written_and_recovered(tmp_path, monkeypatch):
    from vlmdata.pipeline import shards
    from vlmdata.pipeline.imageops import SquareOptions
    from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

    key = "k" * 150 + "\u00e9"  # over USTAR's 100 bytes, and not ASCII
    src = tmp_path / "in"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"{key}.jpg", make_image(40, 40)), ("b.jpg", make_image(40, 40))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = PreprocessConfig(str(src), str(tmp_path / "out"), square=SquareOptions(size=16),
                              processes=1, quiet=True)  # fmt: skip

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the shard finished")

    monkeypatch.setattr(shards.ShardWriter, "finish", killed)
    with pytest.raises(RuntimeError):
        run_preprocess(config)
    monkeypatch.undo()
    summary = run_preprocess(config)
    assert summary.rows_this_run == 0  # both samples recovered from the partial tar
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert f"{key}.jpg" in tar.getnames()


def write_list(tmp_path: Path) -> Path:
    src = tmp_path / "urls.txt"
    src.write_text("http://10.0.0.1/a.jpg\n")  # refused by the SSRF guard: no packet sent
    return src


@pytest.mark.parametrize("case", ["under a file", "not writable"])
def test_output_directory_problems_are_one_line(tmp_path, case):
    src = write_list(tmp_path)
    if case == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores modes: make the path unusable
            (tmp_path / "ro").chmod(0o700)
            (tmp_path / "ro" / "out").write_text("a file where the directory should be")
    result = vlmdata("download", str(src), str(out))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(out) in result.stderr


@pytest.mark.parametrize(("name", "content"), [
    ("plan.json", b""), ("plan.json", b'{"stage": "downl'), ("plan.json", b"[1, 2]"),
    ("stats.json", b'"a string"'),
])  # fmt: skip
def test_damaged_state_files_are_one_line_naming_the_file(tmp_path, name, content):
    src = write_list(tmp_path)
    out = tmp_path / "out"
    assert vlmdata("download", str(src), str(out)).returncode == 0
    (out / name).write_bytes(content)
    result = vlmdata("download", str(src), str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"{out / name} is damaged" in result.stderr
    if name == "plan.json":  # deleting it would make the directory foreign: say what works
        assert "restore it, or start over in an empty directory" in result.stderr


def test_a_damaged_shard_marker_is_redone(tmp_path):
    src = write_list(tmp_path)
    out = tmp_path / "out"
    vlmdata("download", str(src), str(out))
    (out / "00000.stats.json").write_text("[]")
    result = vlmdata("download", str(src), str(out))
    assert result.returncode == 0 and "1 rows in 1 shards" in result.stdout, result.stderr


def test_a_non_utf8_file_name_is_data_for_preprocess_and_encode(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "plain.jpg").write_bytes(make_image(40, 40))
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(make_image(40, 40, seed=1))
    for args in (["preprocess", str(folder), str(tmp_path / "sq"), "--size", "32"],
                 ["encode", str(folder), str(tmp_path / "feat"), "--model", "tiny-random-clip",
                  "--no-placeholder-filter", "--workers", "0"]):  # fmt: skip
        result = vlmdata(*args)
        assert result.returncode == 0, result.stderr
        assert "2 rows in 1 shards" in result.stdout
        assert "success                       2" in result.stdout


def jpeg_with_odd_exif(seed: int) -> bytes:
    """A valid JPEG whose EXIF points past its end: Pillow warns "Tag data larger than file"."""
    import struct

    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010F, 2, 400, 5000) + b"\0\0\0\0"
    payload = b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd
    data = make_image(40, 30, seed=seed)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_decoder_warnings_about_bad_files_stay_quiet(tmp_path, processes):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(jpeg_with_odd_exif(i))
    result = vlmdata("preprocess", str(folder), str(tmp_path / "sq"), "--size", "16",
                     "--shard-size", "2", "--processes", processes)  # fmt: skip
    assert result.returncode == 0 and "success                       4" in result.stdout
    assert result.stderr == ""


def test_a_header_declaring_an_impossible_size_is_a_status_row(tmp_path):
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("P", (50, 40)).save(buffer, "BMP")
    bmp = bytearray(buffer.getvalue())
    bmp[18:22] = struct.pack("<i", -50000)  # read as a width of 4294917296
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "neg.bmp").write_bytes(bytes(bmp))
    (folder / "ok.jpg").write_bytes(make_image(40, 40))
    result = vlmdata("preprocess", str(folder), str(tmp_path / "sq"), "--size", "16")
    assert result.returncode == 0, result.stderr
    assert "decompression_bomb 1" in result.stdout or "broken_image 1" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["download", "", "{out}"], "INPUT is empty"),
    (["download", "{csv}", "{out}", "--url-col", ""], "--url-col is empty"),
    (["download", "{urls}", "{out}", "--user-agent-token", "a\nb"], "--user-agent-token"),
    (["download", "{urls}", "{out}", "--resize", "100000"], "must be 1 to 8192"),
    (["preprocess", "", "{out}"], "INPUT_DIR is empty"),
    (["preprocess", "{photos}", "{out}", "--size", "60000"], "must be 1 to 8192"),
    (["encode", "{photos}", "{out}", "--model", "tiny-random-clip", "--pretrained", "nope.pt"],
     "is not a weights file"),
    (["encode", "{photos}", "{out}", "--model", "tiny-random-clip", "--reference", "{bomb}"],
     "is not a readable image"),
    (["encode", "{photos}", "{out}", "--model", "tiny-random-clip", "--reference", "{bomb}",
      "--no-placeholder-filter"], "--reference has no effect"),
])  # fmt: skip
def test_more_user_mistakes_are_one_line(tmp_path, args, message):
    from conftest import png_header_only

    urls = tmp_path / "urls.txt"
    urls.write_text("http://10.0.0.1/a.jpg\n")
    table = tmp_path / "urls.csv"
    table.write_text("image_url,capsfusion\nhttp://10.0.0.1/a.jpg,a\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(make_image(30, 30))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40000, 40000))
    values = {"{out}": str(tmp_path / "out"), "{urls}": str(urls), "{csv}": str(table),
              "{photos}": str(photos), "{bomb}": str(bomb)}  # fmt: skip
    result = vlmdata(*[values.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_an_upstream_killed_before_its_first_shard_is_unfinished(tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"stage": "download", "input": {}}))
    (out / "00000.tar.partial").write_bytes(b"")
    result = vlmdata("preprocess", str(out), str(tmp_path / "sq"))
    assert result.returncode == 2 and "unfinished download" in result.stderr, result.stderr
