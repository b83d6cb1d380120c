"""Hostile but real URL-list files: stray quotes, broken gzip, odd encodings, odd types.

A file the user must fix ends in one UserError line naming the file (and line or row); rows
that are merely odd data (a half emoji, invalid UTF-8) are repaired and the run goes on.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmdata.errors import UserError
from vlmdata.pipeline.sources import UrlSource

HEADER = "image_url,capsfusion\n"


def url_rows(n: int, sep: str = ",", start: int = 0) -> str:
    """``n`` rows of ``http://e.com/I.jpg<sep>caption I``."""
    return "".join(f"http://e.com/{i}.jpg{sep}caption {i}\n" for i in range(start, start + n))


def read(spec: Path, **kw: object) -> list[dict]:
    source = UrlSource(str(spec), **kw)
    return [row for shard in source.shards(100) for row in shard.rows()]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# -- 1. quoting -------------------------------------------------------------------------------


def test_tsv_quotes_are_data_kept_verbatim(tmp_path):
    """CC3M-style TSV has no quoting: an unclosed or balanced quote is part of the caption."""
    src = tmp_path / "cc3m.tsv"
    captions = ['"Best pizza in town', 'say "cheese"', '"quoted whole"', "it's 5'11\""]
    body = "".join(f"http://e.com/{i}.jpg\t{c}\n" for i, c in enumerate(captions))
    src.write_text("image_url\tcapsfusion\n" + body + url_rows(2000, "\t", start=4))
    rows = read(src)
    assert len(rows) == 2004
    assert [r["caption"] for r in rows[:4]] == captions
    assert rows[-1]["url"] == "http://e.com/2003.jpg"


def test_csv_unterminated_quote_is_a_user_error_naming_its_line(tmp_path):
    src = tmp_path / "urls.csv"
    src.write_text(HEADER + url_rows(3) + 'http://e.com/x.jpg,"Best pizza in town\n' + url_rows(40))
    with pytest.raises(UserError) as error:
        read(src)
    message = one_line(error)
    assert "urls.csv line 5" in message and "close the quote" in message
    assert "--input-format tsv" in message


def test_csv_unterminated_quote_in_the_last_rows_is_an_error_too(tmp_path):
    src = tmp_path / "urls.csv.gz"
    with gzip.open(src, "wt") as f:
        f.write(HEADER + url_rows(5) + 'http://e.com/x.jpg,"cut')
    with pytest.raises(UserError, match=r"urls\.csv\.gz line 7.*quote"):
        read(src)


def test_csv_quoted_fields_spanning_lines_still_work(tmp_path):
    src = tmp_path / "urls.csv"
    src.write_text(
        HEADER + 'http://e.com/0.jpg,"two\nlines, and a ""quote"""\n'
        + 'http://e.com/1.jpg,"three\r\nlines\n"\n' + url_rows(3, start=2)
    )  # fmt: skip
    rows = read(src)
    assert [r["caption"] for r in rows[:2]] == ['two\nlines, and a "quote"', "three\r\nlines\n"]
    assert len(rows) == 5 and rows[-1]["url"] == "http://e.com/4.jpg"


def test_csv_quote_swallowing_many_rows_is_a_user_error(tmp_path):
    """A stray quote closed by another stray quote hundreds of rows later is no caption."""
    src = tmp_path / "urls.csv"
    src.write_text(
        HEADER + url_rows(2) + 'http://e.com/a.jpg,"Best pizza\n' + url_rows(500, start=2)
        + 'http://e.com/b.jpg,"Great view\n' + url_rows(10, start=502)
    )  # fmt: skip
    with pytest.raises(UserError, match=r"urls\.csv line 4: a quoted field runs over"):
        read(src)


def test_csv_field_over_a_mebibyte_is_a_user_error(tmp_path):
    src = tmp_path / "urls.csv"
    src.write_text(HEADER + url_rows(2) + 'http://e.com/a.jpg,"' + "x" * (1 << 21) + '"\n')
    with pytest.raises(UserError, match=r"urls\.csv line 4: a field is longer than 1 MiB"):
        read(src)


def test_a_line_without_line_breaks_is_refused_before_it_fills_memory(tmp_path):
    src = tmp_path / "urls.txt"
    src.write_text("http://e.com/0.jpg\n" + "x" * (17 << 20))
    with pytest.raises(UserError, match=r"urls\.txt line 2 is longer than 16 MiB"):
        read(src)


# -- 2. read errors after the first rows ---------------------------------------------------------


def test_a_broken_jsonl_line_mid_file_names_its_line(tmp_path):
    src = tmp_path / "urls.jsonl"
    lines = [json.dumps({"image_url": f"http://e.com/{i}", "capsfusion": "c"}) for i in range(300)]
    src.write_text("\n".join([*lines[:250], "{broken", *lines[250:]]) + "\n")
    with pytest.raises(UserError, match=r"urls\.jsonl line 251 is not valid JSON"):
        read(src)


def _gzip_csv(path: Path, rows: int = 20_000) -> bytes:
    data = gzip.compress((HEADER + url_rows(rows)).encode(), mtime=0)
    path.write_bytes(data)
    return data


def test_a_truncated_gzip_is_a_user_error_naming_the_file(tmp_path):
    src = tmp_path / "urls.csv.gz"
    data = _gzip_csv(src)
    src.write_bytes(data[: len(data) // 2])
    source = UrlSource(str(src))
    with pytest.raises(UserError) as error:
        for _ in source.shards(100):
            pass
    message = one_line(error)
    assert "urls.csv.gz" in message and "after line" in message and "cut short" in message


@pytest.mark.parametrize("where", ["deflate", "crc"])
def test_a_corrupt_gzip_is_a_user_error_naming_the_file(tmp_path, where):
    src = tmp_path / "urls.csv.gz"
    data = bytearray(_gzip_csv(src))
    if where == "deflate":  # a second gzip member whose first block has the reserved type
        second = bytearray(gzip.compress(url_rows(100).encode(), mtime=0))
        second[10] = 0xFF  # BFINAL=1, BTYPE=11: zlib.error "invalid block type"
        data += second
    else:
        data[-8] ^= 0xFF  # the CRC trailer: BadGzipFile at the very end
    src.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"urls\.csv\.gz after line \d+ \(.*\); the file is dama"):
        read(src)


def test_gzip_is_told_by_its_bytes_not_its_name(tmp_path):
    src = tmp_path / "urls.csv"  # gzip'd, named .csv
    src.write_bytes(gzip.compress((HEADER + url_rows(3)).encode()))
    assert [r["url"] for r in read(src)] == [f"http://e.com/{i}.jpg" for i in range(3)]


def test_invalid_utf8_in_a_parquet_string_column_is_repaired(tmp_path):
    """Bytes a scraper stored unchecked are data: they become U+FFFD, as in csv and jsonl."""
    bad = pa.Array.from_buffers(
        pa.string(), 3, [None, pa.py_buffer(pa.array([0, 1, 3, 6], pa.int32()).buffers()[1]),
                         pa.py_buffer(b"ab\xff\xfeok")],
    )  # fmt: skip
    src = tmp_path / "urls.parquet"
    table = pa.table({"image_url": ["http://e.com/0", "http://e.com/1", "http://e.com/2"],
                      "capsfusion": bad, "alt": bad})  # fmt: skip
    pq.write_table(table, src)
    shards = list(UrlSource(str(src), keep_cols=("alt",)).shards(10))
    shards[0].table.validate(full=True)
    rows = shards[0].rows()
    assert [r["caption"] for r in rows] == ["a", "b\ufffd", "\ufffdok"]
    assert [r["alt"] for r in rows] == ["a", "b\ufffd", "\ufffdok"]


def _parquet(path: Path, **columns: pa.Array) -> Path:
    n = len(next(iter(columns.values())))
    urls = [f"http://e.com/{path.stem}/{i}" for i in range(n)]
    pq.write_table(pa.table({"image_url": urls, "capsfusion": ["c"] * n, **columns}), path)
    return path


def test_a_kept_column_typed_differently_across_files_is_unified(tmp_path):
    _parquet(tmp_path / "a.parquet", n=pa.array([1, 2], pa.int64()), w=pa.array([1, 2], pa.int32()))
    _parquet(tmp_path / "b.parquet", n=pa.array(["x", None]), w=pa.array([3, 2**40], pa.int64()))
    source = UrlSource(str(tmp_path), keep_cols=("n", "w"))
    assert source.output_schema().field("n").type == pa.string()
    assert source.output_schema().field("w").type == pa.int64()
    rows = read(tmp_path, keep_cols=("n", "w"))
    assert [r["n"] for r in rows] == ["1", "2", "x", None]
    assert [r["w"] for r in rows] == [1, 2, 3, 2**40]


def test_a_kept_column_from_csv_and_parquet_becomes_text(tmp_path):
    _parquet(tmp_path / "a.parquet", n=pa.array([7], pa.int64()))
    (tmp_path / "b.csv").write_text("image_url,capsfusion,n\nhttp://e.com/b,c,seven\n")
    rows = read(tmp_path, keep_cols=("n",))
    assert [r["n"] for r in rows] == ["7", "seven"]


def test_kept_column_types_without_a_common_type_fail_upfront(tmp_path):
    _parquet(tmp_path / "a.parquet", n=pa.array([b"\x00"], pa.binary()))
    _parquet(tmp_path / "b.parquet", n=pa.array([[1, 2]], pa.list_(pa.int64())))
    with pytest.raises(UserError) as error:
        UrlSource(str(tmp_path), keep_cols=("n",))
    message = one_line(error)
    assert "'n'" in message and "a.parquet" in message and "b.parquet" in message
    assert "binary" in message and "list<" in message


def test_a_lossy_cast_between_files_is_a_user_error_naming_file_and_column(tmp_path):
    _parquet(tmp_path / "a.parquet", n=pa.array([0.5], pa.float64()))
    _parquet(tmp_path / "b.parquet", n=pa.array([2**53 + 1], pa.int64()))
    source = UrlSource(str(tmp_path), keep_cols=("n",))
    assert source.output_schema().field("n").type == pa.float64()
    with pytest.raises(UserError, match=r"b\.parquet.*column 'n'.*double"):
        list(source.shards(10))


# -- 3. odd rows are data ----------------------------------------------------------------------


def test_lone_surrogates_in_jsonl_become_replacement_characters(tmp_path):
    src = tmp_path / "urls.jsonl"
    src.write_text(
        '{"image_url": "http://e.com/\\ud83d.jpg", "capsfusion": "pizza \\ud83d", '
        '"alt": "\\ude00 x", "meta": {"k": "\\ud83d"}}\n'
        '{"image_url": "http://e.com/ok.jpg", "capsfusion": "whole \\ud83d\\ude00"}\n'
    )  # fmt: skip
    shards = list(UrlSource(str(src), keep_cols=("alt", "meta")).shards(10))
    rows = shards[0].rows()
    assert rows[0]["url"] == "http://e.com/\ufffd.jpg"
    assert rows[0]["caption"] == "pizza \ufffd"
    assert rows[0]["alt"] == "\ufffd x"
    assert json.loads(rows[0]["meta"]) == {"k": "\ufffd"}
    assert rows[1]["caption"] == "whole \U0001f600"  # a whole pair is one emoji
    pq.write_table(shards[0].table, tmp_path / "out.parquet")  # writable as is


def test_timestamp_and_binary_kept_columns_keep_their_types(tmp_path):
    when = [dt.datetime(2024, 1, 2, 3, 4, tzinfo=dt.UTC), None]
    blobs = [b"\x00\xff", b""]
    _parquet(tmp_path / "a.parquet", seen=pa.array(when, pa.timestamp("ms", tz="UTC")),
             blob=pa.array(blobs, pa.binary()))  # fmt: skip
    source = UrlSource(str(tmp_path / "a.parquet"), keep_cols=("seen", "blob"))
    assert source.output_schema().field("seen").type == pa.timestamp("ms", tz="UTC")
    assert source.output_schema().field("blob").type == pa.binary()
    (shard,) = source.shards(10)
    assert shard.table.schema == source.output_schema()
    assert [r["seen"] for r in shard.rows()] == when
    assert [r["blob"] for r in shard.rows()] == blobs


# -- 4. encodings and empty inputs -------------------------------------------------------------


@pytest.mark.parametrize("name", ["u.csv", "u.tsv", "u.jsonl", "u.txt", "u.csv.gz"])
def test_a_utf8_byte_order_mark_is_ignored(tmp_path, name):
    fmt = name.split(".")[1]
    text = {
        "csv": HEADER + url_rows(2),
        "tsv": "image_url\tcapsfusion\n" + url_rows(2, "\t"),
        "jsonl": "".join(
            json.dumps({"image_url": f"http://e.com/{i}.jpg", "capsfusion": f"caption {i}"}) + "\n"
            for i in range(2)
        ),
        "txt": "http://e.com/0.jpg\nhttp://e.com/1.jpg\n",
    }[fmt]
    data = b"\xef\xbb\xbf" + text.encode()
    src = tmp_path / name
    src.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    rows = read(src)
    assert [r["url"] for r in rows] == ["http://e.com/0.jpg", "http://e.com/1.jpg"]


@pytest.mark.parametrize("name", ["u.csv", "u.tsv", "u.csv.gz"])
def test_a_header_only_file_is_an_empty_input(tmp_path, name):
    header = HEADER if "csv" in name else "image_url\tcapsfusion\n"
    src = tmp_path / name
    src.write_bytes(gzip.compress(header.encode()) if name.endswith(".gz") else header.encode())
    source = UrlSource(str(src))
    assert list(source.shards(10)) == []
    with pytest.raises(UserError, match=r"no column 'url' \(columns: image_url, capsfusion\)"):
        UrlSource(str(src), url_col="url")  # the header still names the columns


def test_a_header_only_file_beside_others_adds_no_rows(tmp_path):
    (tmp_path / "a.csv").write_text(HEADER)
    (tmp_path / "b.csv").write_text(HEADER + url_rows(3))
    (tmp_path / "c.jsonl").write_text("\n")  # no records at all
    assert [r["key"] for r in read(tmp_path)] == ["000000000", "000000001", "000000002"]


@pytest.mark.parametrize(
    "encoding, bom", [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"), ("utf-16-le", b"")]
)
@pytest.mark.parametrize("name", ["u.csv", "u.jsonl", "u.txt.gz"])
def test_utf16_input_is_a_user_error_with_the_fix(tmp_path, name, encoding, bom):
    data = bom + (HEADER + url_rows(50)).encode(encoding)
    src = tmp_path / name
    src.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(UserError) as error:
        read(src)
    message = one_line(error)
    assert name in message and "UTF-16" in message and "iconv -f UTF-16 -t UTF-8" in message


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_cut_gzip_stops_a_download_with_one_line(tmp_path, processes):
    """The read error surfaces from the shard generator mid-run: exit 2, one line, no traceback."""
    src = tmp_path / "urls.csv.gz"
    data = gzip.compress((HEADER + "".join(f"no-url-{i},c\n" for i in range(20_000))).encode())
    src.write_bytes(data[: len(data) // 2])  # rows are invalid_url: nothing is fetched
    result = subprocess.run(
        [sys.executable, "-m", "vlmdata", "download", str(src), str(tmp_path / "out"),
         "--shard-size", "1000", "--processes", processes, "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr  # beside the error, only the all-failed warning
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: cannot read urls.csv.gz after line ") and "cut short" in line


def test_reading_csv_leaves_the_process_wide_csv_limit_alone(tmp_path):
    import csv

    src = tmp_path / "urls.csv"
    src.write_text("image_url,capsfusion\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two\n")
    before = csv.field_size_limit()
    rows = [row for shard in UrlSource(str(src)).shards(10) for row in shard.rows()]
    assert len(rows) == 2 and csv.field_size_limit() == before
