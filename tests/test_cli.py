"""The `vlmdata` CLI: help, one-line user errors with exit 2, summaries, flags end to end."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from typer.testing import CliRunner

from conftest import LoopbackServer, make_image
from vlmdata.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # rich help would wrap flags


def write_urls(path, urls, **extra_columns):
    columns = {
        "image_url": urls,
        "capsfusion": [f"caption {i}" for i in range(len(urls))],
        **extra_columns,
    }
    pq.write_table(pa.table(columns), path)
    return str(path)


def download(*args: str):
    return runner.invoke(
        app, ["download", *args, "--allow-private-network", "--processes", "1", "--quiet"]
    )


def test_help_lists_commands_and_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "download" in result.output
    result = runner.invoke(app, ["download", "--help"])
    for flag in ("--url-col", "--caption-col", "--keep-col", "--input-format", "--shard-size",
                 "--concurrency", "--per-host", "--timeout", "--retries", "--max-bytes",
                 "--processes",
                 "--limit", "--allow-private-network", "--ignore-noai", "--retry-failed",
                 "--user-agent-token", "--quiet"):  # fmt: skip
        assert flag in result.output, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.parquet"], "does not exist"),
        (["{urls}", "--url-col", "url"], "no column 'url' (columns: image_url, capsfusion)"),
        (["{urls}", "--keep-col", "laion_2b"], "no column 'laion_2b' to keep"),
        (["{urls}", "--input-format", "xlsx"], "unknown --input-format"),
        (["{urls}", "--shard-size", "0"], "--shard-size must be at least 1"),
        (["{urls}", "--limit", "0"], "--limit must be at least 1"),
        (["{urls}", "--timeout", "0"], "--timeout must be a number in (0, 86400]"),
        (["{urls}", "--timeout", "inf"], "--timeout must be a number in (0, 86400]"),
        (["{urls}", "--timeout", "nan"], "--timeout must be a number in (0, 86400]"),
        (["{urls}", "--max-pixels", "0"], "--max-pixels must be at least 1"),
        (["{urls}", "--fill", "1,2,3"], "--fill only applies with --resize N"),
        (["{urls}", "--resize", "64", "--pad-threshold", "1.5"], "--pad-threshold must be in"),
        (["{urls}", "--resize", "64", "--pad-threshold", "nan"], "--pad-threshold must be in"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    urls = write_urls(tmp_path / "u.parquet", ["http://127.0.0.1/x.jpg"])
    args = [a.replace("{urls}", urls) for a in args]
    result = runner.invoke(app, ["download", *args, str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output + result.stderr


def test_output_that_is_a_file_is_refused(tmp_path):
    urls = write_urls(tmp_path / "u.parquet", ["http://127.0.0.1/x.jpg"])
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["download", urls, str(tmp_path / "file")])
    assert result.exit_code == 2 and "is not a directory" in result.stderr


def test_user_error_from_a_real_process_has_no_traceback(tmp_path):
    urls = write_urls(tmp_path / "u.parquet", ["http://127.0.0.1/x.jpg"])
    done = subprocess.run(
        [sys.executable, "-m", "vlmdata", "download", urls, str(tmp_path / "o"),
         "--url-col", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: u.parquet has no column 'nope'")
    assert "Traceback" not in done.stderr


def test_download_prints_a_summary_and_a_rerun_does_nothing(server, tmp_path):
    urls = [server.add_file(f"{i}.jpg", make_image(64, 48, seed=i)) for i in range(5)]
    urls.append(server.url("/img/missing.jpg"))
    src = write_urls(tmp_path / "u.parquet", urls)
    out = str(tmp_path / "out")
    result = download(src, out)
    assert result.exit_code == 0, result.output
    assert "6 rows in 1 shards" in result.stdout
    assert "success" in result.stdout and "http_4xx 1" in result.stdout
    assert "images/s" in result.stdout and "MB/s" in result.stdout
    again = download(src, out)
    assert again.exit_code == 0 and "Nothing to do" in again.stdout
    changed = download(src, out, "--shard-size", "3")
    assert changed.exit_code == 2
    assert "made with --shard-size 10000, this run has --shard-size 3" in changed.stderr


def test_flags_reach_the_output(server, tmp_path):
    urls = [server.add_file(f"{i}.jpg", make_image(32, 32, seed=i)) for i in range(5)]
    src = write_urls(tmp_path / "u.parquet", urls, laion_2b=["a", "b", "c", "d", "e"])
    out = tmp_path / "out"
    result = download(src, str(out), "--keep-col", "laion_2b", "--caption-col", "", "--limit", "4",
                      "--shard-size", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [r["laion_2b"] for r in rows] == ["a", "b", "c", "d"]
    assert all(r["caption"] is None for r in rows)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["input"]["limit"] == 4 and plan["shard_size"] == 2


def test_ignore_noai_downloads_opted_out_images(tmp_path):
    server = LoopbackServer()
    image = make_image(32, 32)

    async def opted_out(request):
        return web.Response(
            body=image, headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}
        )

    server.route("/optout.jpg", opted_out)
    with server:
        src = write_urls(tmp_path / "u.parquet", [server.url("/optout.jpg")])
        respected = download(src, str(tmp_path / "a"))
        ignored = download(src, str(tmp_path / "b"), "--ignore-noai")
    assert "opted_out 1" in respected.stdout
    assert "success" in ignored.stdout and "opted_out" not in ignored.stdout


def test_early_warning_when_most_rows_fail(tmp_path):
    src = write_urls(tmp_path / "u.parquet", ["ftp://nowhere/x.jpg"] * 1200)
    result = download(src, str(tmp_path / "out"))
    assert result.exit_code == 0
    assert (
        "warning: 1000 of the first 1000 rows failed (top errors: invalid_url 1000)"
        in result.stderr
    )


def test_text_input_with_gzip(server, tmp_path):
    urls = [
        server.add_file(f"{i}.png", make_image(20, 20, "PNG", seed=i), "image/png")
        for i in range(3)
    ]
    path = tmp_path / "urls.txt.gz"
    path.write_bytes(gzip.compress("\n".join(urls).encode()))
    result = download(str(path), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "success                       3" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--placeholder-threshold", "nan"], "--placeholder-threshold must be a number"),
        (["--shard-size", "0"], "--shard-size must be at least 1"),
        (["--max-pixels", "0"], "--max-pixels must be at least 1"),
        (["--pad-threshold", "0"], "--pad-threshold must be in"),
    ],
)
def test_encode_refuses_nonsense_numbers(tmp_path, args, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    result = runner.invoke(app, ["encode", str(tmp_path / "in"), str(tmp_path / "out"), *args,
                                 "--model", "tiny-random-clip"])  # fmt: skip
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
