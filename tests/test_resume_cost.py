"""A rerun costs what is left to do: finished shards' parquet row groups are never read, the
input is fingerprinted from its head and footers, each shard marker is read once per look, and
the output of a resumed run is the output of a run in one go."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_image
from vlmdata.errors import UserError
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy
from vlmdata.pipeline.sources import UrlSource

# Far above the first MiB the fingerprint hashes, so a row group can be damaged past it.
ROWS = 4000
GROUP = 500  # row groups straddle the shards: 500 is no multiple of SHARD
SHARD = 300
DAMAGED_GROUP = 4  # rows 2000-2499: shards 6-8, finished ones in every test below


def caption(i: int) -> str:
    """600 incompressible characters: 4000 rows make a 2.4 MB file."""
    return random.Random(i).randbytes(300).hex()


def unfetchable(i: int) -> str:
    """A URL that fails at once, no packet sent (an unsupported scheme)."""
    return f"nofetch://host{i % 7}.example.com/{i}.jpg"


def write_parquet(
    path: Path, rows: range, group: int = GROUP, urls: dict[int, str] | None = None
) -> Path:
    """Rows ``rows`` of unfetchable URLs (but those ``urls`` gives), long captions, their row."""
    urls = urls or {}
    table = pa.table({
        "image_url": [urls.get(i) or unfetchable(i) for i in rows],
        "capsfusion": [caption(i) for i in rows],
        "row": list(rows),
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=group)
    return path


def damage_row_group(path: Path, group: int) -> None:
    """Overwrite the page headers of every column chunk of row group ``group``, keeping the
    file's times (a resume would refuse a touched input before reading a row)."""
    times = path.stat()
    meta = pq.ParquetFile(path).metadata.row_group(group)
    with open(path, "r+b") as f:
        for c in range(meta.num_columns):
            column = meta.column(c)
            offset = column.dictionary_page_offset or column.data_page_offset
            assert offset > 1 << 20  # past the head the fingerprint hashes
            f.seek(offset)
            f.write(b"\xff" * 64)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def config(input: Path, out: Path, **overrides) -> DownloadConfig:
    defaults = dict(shard_size=SHARD, concurrency=8, quiet=True)
    return DownloadConfig(input=str(input), output_dir=str(out), **{**defaults, **overrides})


def kill_before(out: Path, *shards: int) -> None:
    """Leave ``out`` as a run killed before ``shards`` were written."""
    for index in shards:
        for path in out.glob(f"{index:05d}.*"):
            path.unlink()
    (out / "stats.json").unlink()


def output_rows(out: Path) -> dict[str, list[dict]]:
    """What a download wrote, per shard file, without the per-run timings."""
    columns = ["key", "url", "caption", "status", "error_kind", "row"]
    return {
        path.name: pq.read_table(
            path, columns=[c for c in columns if c in pq.read_schema(path).names]
        ).to_pylist()
        for path in sorted(out.glob("*.parquet"))
    }


# -- the rows of finished shards are never read -----------------------------------------------


def test_a_resume_never_reads_the_row_groups_of_finished_shards(tmp_path):
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    clean = tmp_path / "clean"
    run_download(config(path, clean))
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    kill_before(out, 13)  # the last shard: rows 3900-3999, in a group shared with shard 12
    damage_row_group(path, DAMAGED_GROUP)

    summary = run_download(config(path, out))  # reading group 4 would fail
    assert summary.rows_this_run == ROWS - 13 * SHARD
    assert output_rows(out) == output_rows(clean)
    assert run_download(config(path, out)).nothing_to_do


def test_retry_failed_reads_only_the_row_groups_of_reopened_shards(server, tmp_path):
    flaky = range(3990, ROWS)  # the last shard's last rows: a 503 the first time
    urls = {i: server.add_file(f"{i}.jpg", make_image(40, 30, seed=i)) for i in flaky}
    server.fail_with.update({f"{i}.jpg": 503 for i in flaky})
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS), urls=urls)
    out = tmp_path / "out"
    fetch = FetchPolicy(allow_private_network=True, retries=0)
    assert run_download(config(path, out, fetch=fetch)).totals["error_kind"]["http_5xx"] == 10
    server.fail_with.clear()
    damage_row_group(path, DAMAGED_GROUP)

    summary = run_download(config(path, out, fetch=fetch, retry_failed=True))
    assert summary.retried == 10
    assert summary.totals["status"]["success"] == 10


def test_a_damaged_row_group_that_is_needed_is_one_line_naming_the_row_reached(tmp_path):
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    out = tmp_path / "out"
    run_download(config(path, out))
    kill_before(out, 7)  # rows 2100-2399: inside the damaged group
    damage_row_group(path, DAMAGED_GROUP)
    result = subprocess.run(
        [sys.executable, "-m", "vlmdata", "download", str(path), str(out),
         "--shard-size", str(SHARD), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: cannot read urls.parquet after row 2000 (") and "damaged" in line


def test_a_row_group_shared_by_wanted_shards_is_read_once(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    decoded = []  # the row numbers of every batch pyarrow hands out
    iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            decoded.extend(batch.column("row").to_pylist())
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    wanted = {11, 12}  # rows 3300-3899: the end of group 6 and most of group 7
    shards = list(UrlSource(str(path), keep_cols=("row",)).shards(SHARD, lambda i: i in wanted))
    assert sorted(decoded) == list(range(3000, 4000))  # groups 6 and 7, once each
    assert [s.table.num_rows for s in shards] == [0] * 11 + [300, 300, 0]
    assert shards[12].table.column("row").to_pylist() == list(range(3600, 3900))


# -- the same rows and keys as a run in one go -------------------------------------------------


def mixed_input(directory: Path) -> Path:
    """A parquet, a csv and another parquet, whose groups and files straddle the shards."""
    directory.mkdir()
    write_parquet(directory / "a.parquet", range(0, 170), group=40)
    with open(directory / "b.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_url", "capsfusion", "row"])
        writer.writerows([unfetchable(i), f"caption {i}", i] for i in range(170, 260))
    write_parquet(directory / "c.parquet", range(260, 500), group=70)
    return directory


@pytest.mark.parametrize("limit", [None, 430])
@pytest.mark.parametrize("unfinished", [(0,), (3, 4), (5, 8), (2, 6, 8)])
def test_a_resumed_output_is_the_output_of_one_run(tmp_path, limit, unfinished):
    given = mixed_input(tmp_path / "in")
    one_go = tmp_path / "one_go"
    run_download(config(given, one_go, shard_size=50, limit=limit, keep_cols=("row",)))
    resumed = tmp_path / "resumed"
    shutil.copytree(one_go, resumed)
    kill_before(resumed, *unfinished)
    run_download(config(given, resumed, shard_size=50, limit=limit, keep_cols=("row",)))
    rows = output_rows(resumed)
    assert rows == output_rows(one_go)
    keys = [r["key"] for shard in rows.values() for r in shard]
    assert keys == [f"{i:09d}" for i in range(limit or 500)]
    assert [r["row"] for shard in rows.values() for r in shard] == [
        str(i) for i in range(limit or 500)
    ]


@pytest.mark.parametrize("limit", [None, 1, 169, 170, 171, 433])
def test_any_wanted_shards_get_the_rows_of_a_full_read(tmp_path, limit):
    source = UrlSource(str(mixed_input(tmp_path / "in")), keep_cols=("row",), limit=limit)
    full = list(source.shards(30))
    rng = random.Random(limit)
    for _ in range(20):
        wanted = {i for i in range(len(full)) if rng.random() < 0.3}
        shards = list(source.shards(30, lambda i, w=wanted: i in w))
        assert [(s.index, s.start) for s in shards] == [(s.index, s.start) for s in full]
        for shard, whole in zip(shards, full, strict=True):
            assert shard.rows() == (whole.rows() if shard.index in wanted else [])


# -- identity of the input ---------------------------------------------------------------------


def same_size_other_content(path: Path, other: Path) -> None:
    """Two parquet files of one size and first MiB that differ in their last row group."""
    rows = range(ROWS)
    urls = [f"http://host.example.com/{i:06d}-{'z' if i >= 3500 else 'a'}.jpg" for i in rows]
    for target, url_list in [(path, [u.replace("-z", "-a") for u in urls]), (other, urls)]:
        table = pa.table({"image_url": url_list, "capsfusion": [caption(i) for i in rows]})
        pq.write_table(table, target, row_group_size=GROUP, compression="none",
                       use_dictionary=False)  # fmt: skip
    assert path.stat().st_size == other.stat().st_size
    with open(path, "rb") as a, open(other, "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)


def test_an_input_rewritten_to_the_same_size_and_head_is_told_apart(tmp_path):
    path = tmp_path / "urls.parquet"
    rewritten = tmp_path / "new" / "urls.parquet"
    rewritten.parent.mkdir()
    same_size_other_content(path, rewritten)
    assert UrlSource(str(path)).fingerprint() != UrlSource(str(rewritten)).fingerprint()
    out = tmp_path / "out"
    run_download(config(path, out, limit=10))
    shutil.copyfile(rewritten, path)
    with pytest.raises(UserError, match="different input"):
        run_download(config(path, out, limit=10))


def test_a_copied_input_resumes_when_its_times_are_kept(tmp_path):
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    out = tmp_path / "out"
    run_download(config(path, out))
    copy = tmp_path / "elsewhere" / "urls.parquet"
    copy.parent.mkdir()
    shutil.copy2(path, copy)  # cp -p, rsync -a: a new inode, the same bytes and times
    assert run_download(config(copy, out)).nothing_to_do


def test_an_input_touched_since_is_refused_with_the_way_back(tmp_path):
    """Same size, head and footer but another time: a copy without -p, or an edit in place
    that kept the footer. The refusal names the file and how to restore its time."""
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    out = tmp_path / "out"
    run_download(config(path, out))
    recorded = path.stat().st_mtime_ns
    os.utime(path, ns=(recorded + 10**9, recorded + 10**9))
    with pytest.raises(UserError, match=r"urls.parquet was modified since .*touch -d @") as error:
        run_download(config(path, out))
    seconds, fraction = re.search(r"touch -d @(\d+)\.(\d{9}) ", str(error.value)).groups()
    restored = int(seconds) * 10**9 + int(fraction)  # what touch -d @SECONDS.NANOS does
    os.utime(path, ns=(restored, restored))
    assert run_download(config(path, out)).nothing_to_do


# -- each shard marker read once a look --------------------------------------------------------


def test_a_resume_reads_each_finished_shard_marker_once_and_once_at_the_end(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    out = tmp_path / "out"
    run_download(config(path, out))
    kill_before(out, 13)
    reads: dict[str, int] = {}
    read_bytes = Path.read_bytes

    def counting(self: Path) -> bytes:
        if self.name.endswith(".stats.json"):
            reads[self.name] = reads.get(self.name, 0) + 1
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    run_download(config(path, out))
    # Once when the run starts, once to total the output at its end.
    assert reads == {f"{i:05d}.stats.json": 2 if i < 13 else 1 for i in range(14)}
    reads.clear()
    assert run_download(config(path, out)).nothing_to_do
    assert reads == {f"{i:05d}.stats.json": 1 for i in range(14)}


def test_an_output_fingerprinted_by_an_older_vlmdata_is_refused_saying_so(tmp_path):
    path = write_parquet(tmp_path / "urls.parquet", range(ROWS))
    out = tmp_path / "out"
    run_download(config(path, out))
    plan = json.loads((out / "plan.json").read_text())
    for entry in plan["input"]["files"]:
        del entry["mtime_ns"], entry["footer_sha256"]
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="made by an older vlmdata"):
        run_download(config(path, out))
