"""Resume as a hostile user meets it: inputs edited or cut oddly between runs, shards damaged
in every way, kills at random moments. A resumed output must be the output of one run, and an
input that is no longer the one the output was made from must be refused."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LoopbackServer, make_image
from vlmdata.errors import UserError
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.sources import UrlSource


def config(input: Path, out: Path, **overrides) -> DownloadConfig:
    defaults = dict(concurrency=8, quiet=True)
    return DownloadConfig(input=str(input), output_dir=str(out), **{**defaults, **overrides})


def unfetchable(i: int) -> str:
    """A URL that fails at once, no packet sent (an unsupported scheme)."""
    return f"nofetch://img.example.com/{i:06d}/{random.Random(i).randbytes(16).hex()}.jpg"


def table(rows: range) -> pa.Table:
    return pa.table({
        "image_url": pa.array([unfetchable(i) for i in rows], pa.string()),
        "capsfusion": pa.array([f"caption {i}" for i in rows], pa.string()),
        "row": pa.array(list(rows), pa.int64()),
    })  # fmt: skip


def write_groups(path: Path, groups: list[range]) -> None:
    """A parquet file with exactly these row groups (an empty range: a zero-row group)."""
    with pq.ParquetWriter(path, table(range(0)).schema) as writer:
        for rows in groups:
            writer.write_table(table(rows), row_group_size=max(1, len(rows)))


def write_csv(path: Path, rows: range) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_url", "capsfusion", "row"])
        writer.writerows([unfetchable(i), f"caption {i}", i] for i in rows)


def odd_input(directory: Path) -> Path:
    """Zero-row groups, an empty parquet file, a csv, a one-row group and one big group."""
    directory.mkdir()
    write_groups(directory / "0.parquet", [range(0), range(0, 37), range(0), range(37, 95)])
    write_groups(directory / "1.parquet", [])  # no row group at all
    write_csv(directory / "2.csv", range(95, 130))
    write_groups(directory / "3.parquet", [range(130, 130), range(130, 200), range(200, 201)])
    write_groups(directory / "4.parquet", [range(201, 460)])  # one group, many shards
    return directory


def output_rows(out: Path) -> dict[str, list[dict]]:
    """What a download wrote, per shard parquet, without the per-run timing column."""
    rows = {}
    for path in sorted(out.glob("*.parquet")):
        rows[path.name] = [{k: v for k, v in r.items() if k != "elapsed_s"}
                           for r in pq.read_table(path).to_pylist()]  # fmt: skip
    return rows


def tar_members(out: Path) -> dict[str, list[str]]:
    members = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == len(set(names)), f"{path.name} holds a key twice"
        members[path.name] = sorted(names)
    return members


# -- the input as it is now --------------------------------------------------------------------


def test_a_parquet_input_rewritten_with_one_url_changed_is_told_apart(tmp_path):
    """pyarrow's default writer (snappy, dictionary): one character of one URL past the first
    MiB changed keeps the file's size, and the footer's statistics (min/max) and offsets too."""
    rows = range(4000)
    urls = [unfetchable(i) for i in rows]
    captions = [random.Random(-i).randbytes(200).hex() for i in rows]  # 1.8 MB, incompressible
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}), path, row_group_size=500)
    out = tmp_path / "out"
    run_download(config(path, out, shard_size=300))
    before = path.read_bytes()

    changed = 3212  # in finished shard 10, neither the min nor the max of its row group
    url = urls[changed]
    at = url.index(".jpg") - 5  # one hex digit of the path
    urls[changed] = url[:at] + ("0" if url[at] != "0" else "1") + url[at + 1 :]
    pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}), path, row_group_size=500)
    after = path.read_bytes()
    assert len(after) == len(before) and after[: 1 << 20] == before[: 1 << 20] and after != before

    # The output's shard 10 holds the old URL: the rewritten input must not pass for its input.
    with pytest.raises(UserError, match="different input"):
        run_download(config(path, out, shard_size=300))


def test_a_rerun_of_a_finished_csv_output_with_a_limit_past_its_end_has_nothing_to_do(tmp_path):
    """--limit 1000000 on a shorter csv: the run reads what there is and finishes; the rerun
    should then say "nothing to do" without reading the input again."""
    path = tmp_path / "urls.csv"
    write_csv(path, range(100))
    out = tmp_path / "out"
    first = run_download(config(path, out, shard_size=30, limit=150))
    assert first.totals["rows"] == 100
    assert run_download(config(path, out, shard_size=30, limit=150)).nothing_to_do


# -- odd layouts read as a full read would -----------------------------------------------------


@pytest.mark.parametrize("limit", [None, 1, 37, 95, 130, 131, 201, 459, 460, 1000])
@pytest.mark.parametrize("shard_size", [1, 7, 37, 100, 1000])
def test_zero_row_groups_empty_files_and_a_big_group_give_the_rows_of_a_full_read(
    tmp_path, limit, shard_size
):
    source = UrlSource(str(odd_input(tmp_path / "in")), keep_cols=("row",), limit=limit)
    full = list(source.shards(shard_size))
    every = [str(i) for i in range(min(limit or 460, 460))]  # the csv makes the column text
    assert [r["row"] for s in full for r in s.rows()] == every
    rng = random.Random(f"{limit}-{shard_size}")
    n = len(full)
    trials = [{0}, {n - 1}, set(range(1, n)), set()]
    trials += [{i for i in range(n) if rng.random() < 0.3} for _ in range(6)]
    for wanted in trials:
        shards = list(source.shards(shard_size, lambda i, w=wanted: i in w))
        assert [(s.index, s.start) for s in shards] == [(s.index, s.start) for s in full]
        for shard, whole in zip(shards, full, strict=True):
            assert shard.rows() == (whole.rows() if shard.index in wanted else [])


# -- shards redone for every reason a user can cause ---------------------------------------------


def damage(out: Path, index: int, how: str) -> None:
    name = f"{index:05d}"
    stats, tar, parquet = (out / f"{name}{s}" for s in (".stats.json", ".tar", ".parquet"))
    if how == "stats deleted":
        stats.unlink()
    elif how == "stats damaged":
        stats.write_text('{"rows": ')
    elif how == "stats emptied":
        stats.write_text("")
    elif how == "tar deleted":
        tar.unlink()
    elif how == "parquet deleted":
        parquet.unlink()
    elif how == "tar cut":
        tar.write_bytes(tar.read_bytes()[:-1024])
    elif how == "parquet cut":
        parquet.write_bytes(parquet.read_bytes()[:-10])


@pytest.mark.parametrize(
    "how",
    ["stats deleted", "stats damaged", "stats emptied", "tar deleted", "parquet deleted",
     "tar cut", "parquet cut"],
)  # fmt: skip
def test_a_damaged_shard_is_redone_to_the_rows_of_one_run(tmp_path, how):
    given = odd_input(tmp_path / "in")
    options = dict(shard_size=40, keep_cols=("row",))
    one_go = tmp_path / "one_go"
    run_download(config(given, one_go, **options))
    # Shards 2 (straddles the empty file and the csv), 5 and 11 (inside the big group).
    for index in (2, 5, 11):
        damage(one_go, index, how)
    summary = run_download(config(given, one_go, **options))
    assert summary.totals["rows"] == 460 and not summary.nothing_to_do
    again = tmp_path / "again"
    run_download(config(given, again, **options))
    assert output_rows(one_go) == output_rows(again)
    assert run_download(config(given, one_go, **options)).nothing_to_do


# -- SIGKILL at random moments: the output of one uninterrupted run ------------------------------


N_URLS = 360
SHARD = 40


def served_input(server: LoopbackServer, directory: Path) -> Path:
    """Three parquet files whose row groups straddle the shards: images, 404s, a URL repeated
    within a shard and URLs that fail without a request."""
    urls = []
    for i in range(N_URLS):
        if i % 10 == 3:
            urls.append(server.url(f"/img/missing-{i}.jpg"))
        elif i % 10 == 5:
            urls.append(server.url(f"/img/{i - 1}.jpg"))
        elif i % 10 == 7:
            urls.append(unfetchable(i))
        else:
            urls.append(server.add_file(f"{i}.jpg", make_image(40, 30, seed=i)))
    directory.mkdir()
    for name, rows, group in [("a", range(0, 70), 25), ("b", range(70, 71), 1),
                              ("c", range(71, N_URLS), 1000)]:  # fmt: skip
        pq.write_table(pa.table({
            "image_url": [urls[i] for i in rows],
            "capsfusion": [f"caption {i}" for i in rows],
            "row": list(rows),
        }), directory / f"{name}.parquet", row_group_size=group)  # fmt: skip
    return directory


def cli(input: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vlmdata", "download", str(input), str(out),
            "--allow-private-network", "--shard-size", str(SHARD), "--concurrency", "8",
            "--keep-col", "row", "--retries", "0", "--quiet"]  # fmt: skip


def test_sigkill_at_random_moments_then_resume_is_one_uninterrupted_run(server, tmp_path):
    """A multi-file input whose row groups straddle the shards (test_download_resume kills a
    one-file run with --processes 1 and 2 and checks statuses; this checks every value)."""
    given = served_input(server, tmp_path / "in")
    server.delay_s = 0.01  # slow enough to be caught mid-run
    one_go = tmp_path / "one_go"
    subprocess.run(cli(given, one_go), check=True, timeout=300)
    out = tmp_path / "out"
    rng = random.Random(0)
    kills = 0
    for _ in range(2):
        target = server.total_hits("/img/") + rng.randint(20, 120)
        process = subprocess.Popen(cli(given, out), start_new_session=True)
        deadline = time.monotonic() + 60
        while server.total_hits("/img/") < target and process.poll() is None:
            assert time.monotonic() < deadline, "download made no progress"
            time.sleep(0.002)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(10)
    assert kills >= 1
    subprocess.run(cli(given, out), check=True, timeout=300)
    assert output_rows(out) == output_rows(one_go)
    assert tar_members(out) == tar_members(one_go)
    keys = [r["key"] for rows in output_rows(out).values() for r in rows]
    assert keys == [f"{i:09d}" for i in range(N_URLS)]
    assert not list(out.glob("*.partial")) and not list(out.glob("*.journal.jsonl"))
