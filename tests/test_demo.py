"""`vlmdata demo`: the whole job on built-in data, small. Every stage runs and records itself,
the report's every image and link resolves, the README's Python snippets run on the result,
and a rerun resumes instead of redoing."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest
from test_readme import README, python_blocks
from typer.testing import CliRunner

from vlmdata.cli import app

runner = CliRunner(env={"COLUMNS": "200"})
SMALL = ["--images", "40", "--steps", "20", "--quiet"]
STAGES = ("download", "encode", "labels", "labels/report", "train")


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "vlmdata-demo"
    result = runner.invoke(app, ["demo", str(out), *SMALL])  # it says once: random weights
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_demo_runs_every_stage_and_says_where_each_went(demo):
    out, output = demo
    for command in ("vlmdata download", "vlmdata encode", "vlmdata labels classify",
                    "vlmdata labels report", "vlmdata train", "vlmdata eval", "vlmdata caption",
                    "vlmdata report"):  # fmt: skip
        assert f"] {command} " in output, command
    assert output.rstrip().endswith(f"report: {out / 'report.html'}")
    for stage in STAGES:
        record = tomllib.loads((out / stage / "vlmdata.toml").read_text())
        assert record, stage
    statuses = json.loads((out / "download" / "stats.json").read_text())["status"]
    assert statuses["success"] > 40 and statuses["failed_to_download"] > 0  # the dead links too
    captions = json.loads((out / "train" / "captions.json").read_text())["images"]
    assert len(captions) == 4 and all(c["captions"] and c["error"] is None for c in captions)
    assert not (out / "corpus" / "urls.parquet").read_bytes().count(b"new/")  # never trained on


def test_every_image_and_link_of_the_report_resolves(demo):
    out, _ = demo
    page = out / "report.html"
    html = page.read_text()
    images = re.findall(r'<img[^>]*\bsrc="([^"]+)"', html)
    links = re.findall(r'<a[^>]*\bhref="([^"]+)"', html)
    assert images and links
    for source in images:
        assert source.startswith("data:image/") or (page.parent / unquote(source)).is_file()
    local = [link for link in links if not link.startswith(("http://", "https://", "#"))]
    assert any("labels/report/index.html" in link for link in local)
    assert "train/captions.json" in local
    new_images = html[html.index("Captions of new images") :]
    assert new_images.count('<img src="data:image/jpeg') >= 4  # the captioned files, shown
    for link in local:
        assert (page.parent / unquote(link.split("#")[0])).exists(), link


def test_the_readme_snippets_run_on_the_demo_output(demo, tmp_path, monkeypatch):
    out, _ = demo
    (tmp_path / "capsfusion-run").symlink_to(out)  # the README's walkthrough directory
    monkeypatch.chdir(tmp_path)
    snippets = [b for b in python_blocks(README.read_text()) if "capsfusion-run" in b]
    assert len(snippets) >= 2
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})


def test_a_rerun_resumes_and_other_directories_are_refused(demo, tmp_path):
    out, _ = demo
    again = runner.invoke(app, ["demo", str(out), *SMALL])
    assert again.exit_code == 0, again.output
    assert again.output.count("Nothing to do") == 3  # download, encode, labels

    for changed in (["--images", "50", "--steps", "20"], ["--images", "40"]):
        other = runner.invoke(app, ["demo", str(out), *changed, "--quiet"])
        assert other.exit_code == 2, other.output
        assert f"continue it with vlmdata demo {out} --images 40 --steps 20," in other.output
    (tmp_path / "notes.txt").write_text("mine")
    foreign = runner.invoke(app, ["demo", str(tmp_path), *SMALL])
    assert foreign.exit_code == 2 and "holds no vlmdata demo" in foreign.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--images", "5"], "--images 5 is out of the demo's range; pass 40 to 10,000"),
     (["--images", "10000000"], "--images 10000000 is out of the demo's range"),
     (["--steps", "0"], "--steps 0 is out of the demo's range; pass 1 to 100,000")],
)  # fmt: skip
def test_demo_sizes_out_of_range_are_one_line_before_anything_runs(tmp_path, flags, message):
    result = runner.invoke(app, ["demo", str(tmp_path / "d"), *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "d").exists()


def test_a_second_demo_in_the_same_directory_stops_in_one_line(tmp_path):
    """Two demos at once would each write a corpus and serve it: the second one stops before
    touching anything."""
    from vlmdata.pipeline.shards import exclusive_output

    out = tmp_path / "d"
    with exclusive_output(out):  # as a running demo holds it
        result = runner.invoke(app, ["demo", str(out), *SMALL])
    assert result.exit_code == 2, result.output
    assert "another vlmdata run is writing" in result.output
    assert [p.name for p in out.iterdir()] == [".lock"]
