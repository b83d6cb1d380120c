"""Bad input files end in one line and exit 2; odd but valid rows are data (issue 8)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import tarfile

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
