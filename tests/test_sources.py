"""Reading URL lists: every format, gzip, directories and globs, limits, column errors."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmdata.errors import UserError
from vlmdata.pipeline.sources import UrlSource, detect_format

ROWS = [
    {
        "image_url": f"http://example.com/{i}.jpg",
        "capsfusion": f"caption {i}, with «ünïcode»\nand a newline",
        "laion_2b": f"alt {i}",
    }
    for i in range(25)
]  # fmt: skip
# TSV has no quoting (CC3M): a field cannot hold a newline or a tab, so its captions have none.
TSV_ROWS = [{**r, "capsfusion": r["capsfusion"].replace("\n", " ")} for r in ROWS]


def write(path: Path, fmt: str, rows: list[dict] = ROWS) -> Path:
    """Write ``rows`` to ``path`` in ``fmt`` (gzip'd when the name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif fmt == "csv":
        with opener(path, "wt", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "tsv":
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines("\t".join(r) + "\n" for r in [list(rows[0]), *map(dict.values, rows)])
    elif fmt == "jsonl":
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(r["image_url"] + "\n" for r in rows)
    return path


def all_rows(source: UrlSource, shard_size: int = 10) -> list[dict]:
    return [row for shard in source.shards(shard_size) for row in shard.rows()]


@pytest.mark.parametrize(
    "name",
    [
        "urls.parquet",
        "urls.csv",
        "urls.csv.gz",
        "urls.tsv",
        "urls.tsv.gz",
        "urls.jsonl",
        "urls.jsonl.gz",
    ],
)
def test_tabular_formats_read_the_same_rows(tmp_path, name):
    fmt = detect_format(Path(name))
    given = TSV_ROWS if fmt == "tsv" else ROWS
    path = write(tmp_path / name, fmt, given)
    rows = all_rows(UrlSource(str(path), keep_cols=("laion_2b",)))
    assert [r["url"] for r in rows] == [r["image_url"] for r in given]
    assert [r["caption"] for r in rows] == [r["capsfusion"] for r in given]
    assert [r["laion_2b"] for r in rows] == [r["laion_2b"] for r in given]
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(len(given))]


@pytest.mark.parametrize("name", ["urls.txt", "urls.txt.gz"])
def test_plain_url_lists_have_no_captions(tmp_path, name):
    path = write(tmp_path / name, "txt")
    rows = all_rows(UrlSource(str(path)))  # default --url-col/--caption-col do not apply
    assert [r["url"] for r in rows] == [r["image_url"] for r in ROWS]
    assert all(r["caption"] is None for r in rows)


def test_shards_cut_at_shard_size_and_keys_continue_across_files(tmp_path):
    write(tmp_path / "a.parquet", "parquet", ROWS[:13])
    write(tmp_path / "b.parquet", "parquet", ROWS[13:])
    for spec in (str(tmp_path), str(tmp_path / "*.parquet")):
        source = UrlSource(spec)
        shards = list(source.shards(10))
        assert [(s.index, s.start, s.table.num_rows) for s in shards] == [
            (0, 0, 10),
            (1, 10, 10),
            (2, 20, 5),
        ]
        assert shards[1].rows()[3]["url"] == ROWS[13]["image_url"]
        assert source.total_rows() == len(ROWS)


def test_unwanted_shards_are_counted_but_empty(tmp_path):
    source = UrlSource(str(write(tmp_path / "u.parquet", "parquet")))
    shards = list(source.shards(10, wanted=lambda i: i == 1))
    assert [s.table.num_rows for s in shards] == [0, 10, 0]
    assert shards[1].rows()[0]["key"] == "000000010"


def test_limit_takes_the_first_rows(tmp_path):
    source = UrlSource(str(write(tmp_path / "u.csv", "csv")), limit=12)
    assert len(all_rows(source)) == 12
    assert source.total_rows() is None  # a text file's length is unknown until it is read


def test_missing_column_lists_the_columns(tmp_path):
    path = write(tmp_path / "u.parquet", "parquet")
    with pytest.raises(
        UserError, match=r"no column 'url'.*image_url, capsfusion, laion_2b.*--url-col"
    ):
        UrlSource(str(path), url_col="url")
    with pytest.raises(UserError, match="--caption-col"):
        UrlSource(str(write(tmp_path / "u.csv", "csv")), caption_col="caption")
    with pytest.raises(UserError, match="to keep"):
        UrlSource(str(path), keep_cols=("nope",))


def test_unusable_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        UrlSource(str(tmp_path / "missing.parquet"))
    (tmp_path / "urls.xlsx").write_text("x")
    with pytest.raises(UserError, match="--input-format"):
        UrlSource(str(tmp_path / "urls.xlsx"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable parquet"):
        UrlSource(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no input files"):
        UrlSource(str(tmp_path / "empty_dir"))
    with pytest.raises(UserError, match="clashes"):
        UrlSource(str(write(tmp_path / "u.parquet", "parquet")), keep_cols=("status",))


def test_parquet_is_read_batch_by_batch(tmp_path):
    """Holding the first shard of a large file holds a batch or two, not the file."""
    rows = [{"image_url": f"http://e.com/{i}", "capsfusion": "c" * 300} for i in range(100_000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=10_000)
    del rows
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    first = next(UrlSource(str(tmp_path / "big.parquet")).shards(1000))
    assert first.table.num_rows == 1000
    assert pool.bytes_allocated() - before < 10_000_000  # the whole column is 30 MB


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "txt"])
def test_text_formats_stream(tmp_path, fmt):
    """The first shard arrives before the reader ever sees the (broken) end of the file."""
    path = write(tmp_path / f"u.{fmt}", fmt, ROWS * 2000)
    with open(path, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    first = next(UrlSource(str(path)).shards(100))
    assert first.rows()[0]["url"] == ROWS[0]["image_url"]
