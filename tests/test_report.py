"""`vlmdata report DIR`: one self-contained page of a stage output, a training run or a whole
pipeline directory, made from real stage outputs (download from a loopback server with --resize,
encode with tiny-random-clip, labels, a trained run with an eval)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import random
import re
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import LoopbackServer, make_image, write_shape_images
from vlmdata.cli import app
from vlmdata.errors import UserError
from vlmdata.pipeline.image_sources import ImageShard
from vlmdata.report import ReportConfig, write_report

pytestmark = pytest.mark.filterwarnings("ignore:tiny-random-(clip|llama) has random weights")
runner = CliRunner(env={"COLUMNS": "200"})
SIZES = [(120, 90), (90, 120), (160, 60), (64, 64), (200, 80), (100, 100)]  # crops and pads
IMAGES, GONE, BROKEN = 24, 3, 2
TAXONOMY = {"shapes": ["a green square", "an orange rectangle"],
            "gradients": ["a grey gradient", "a dark picture"],
            "image not available": ["a grey box saying image not available"]}  # fmt: skip


def ok(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, trained_run: Path,
             shape_features: Path) -> Path:  # fmt: skip
    """A pipeline directory as `vlmdata run` lays it out: download (--resize, some 404s and
    broken bodies), preprocess, encode, labels with its report, and a trained run with an
    eval."""
    root = tmp_path_factory.mktemp("report") / "pipe"
    root.mkdir()
    rng = random.Random(0)
    with LoopbackServer() as server:
        urls = [server.add_file(f"{i}.jpg", make_image(*rng.choice(SIZES), seed=i))
                for i in range(IMAGES)]  # fmt: skip
        urls += [server.url(f"/img/gone{i}.jpg") for i in range(GONE)]  # 404
        urls += [server.add_file(f"broken{i}.jpg", b"\xff\xd8\xffjunk" * 8) for i in range(BROKEN)]
        rng.shuffle(urls)
        captions = [f"picture {url.rsplit('/', 1)[1]}" for url in urls]
        pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}),
                       root.parent / "urls.parquet")  # fmt: skip
        ok("download", root.parent / "urls.parquet", root / "download", "--shard-size", "10",
           "--allow-private-network", "--resize", "64", "--processes", "1", "--quiet")  # fmt: skip
    ok("preprocess", root / "download", root / "preprocess", "--size", "48", "--processes", "1",
       "--quiet")  # fmt: skip
    ok("encode", root / "download", root / "encode", "--model", "tiny-random-clip", "--pretrained",
       "none", "--device", "cpu", "--workers", "0", "--batch-size", "8", "--quiet")  # fmt: skip
    (root.parent / "taxonomy.json").write_text(json.dumps({"categories": TAXONOMY}))
    ok("labels", "classify", root / "encode", root / "labels", "--taxonomy",
       root.parent / "taxonomy.json", "--device", "cpu", "--quiet")  # fmt: skip
    ok("labels", "report", root / "labels", "--images", root / "download", "--quiet")
    shutil.copytree(trained_run, root / "train")
    ok("eval", root / "train", shape_features, "--images", shape_features.parent / "images",
       "--samples", "3", "--device", "cpu", "--quiet")  # fmt: skip
    return root


class _Page(HTMLParser):
    """Every image source, link and id of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def checked_page(path: Path) -> str:
    """The page at ``path``, after checking that it stands alone: every image is an embedded
    image that decodes, every link is a web address, an anchor of the page, or a local file."""
    text = path.read_text(encoding="utf-8")
    page = _Page(text)
    assert page.sources, "no image on the page"
    for source in page.sources:
        match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", source)
        assert match, source[:80]
        with Image.open(io.BytesIO(base64.b64decode(match[2], validate=True))) as image:
            image.verify()
    for href in page.links:
        if href.startswith(("http://", "https://")):
            continue
        if href.startswith("#"):
            assert href[1:] in page.ids, href
            continue
        target = path.parent / unquote(urlsplit(href).path)
        assert target.is_file(), href
    assert "<script" not in text and "<link" not in text  # nothing else to fetch
    return text


def section_of(text: str, anchor: str) -> str:
    """The HTML of one section of the page."""
    start = text.index(f'<section class="stage-section" id="{anchor}">')
    return text[start : text.index("</section>", start)]


def status_counts(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in sorted(folder.glob("[0-9]*.parquet")):
        for status in pq.read_table(path, columns=["status"])["status"].to_pylist():
            counts[status] = counts.get(status, 0) + 1
    return counts


def status_cell(status: str, count: int) -> str:
    """The status table's row of ``status``, as the page writes it."""
    return f'{status}</td><td class="num">{count:,}</td>'


def test_a_pipeline_directory_gives_one_page_with_every_section(pipeline):
    summary = write_report(ReportConfig(str(pipeline), quiet=True))
    assert summary.page == pipeline / "report.html"
    text = checked_page(summary.page)
    anchors = re.findall(r'<section class="stage-section" id="(\w+)"', text)
    assert anchors == ["download", "preprocess", "encode", "labels", "train"]
    for anchor in anchors:
        assert text.count(f'href="#{anchor}"') == 2  # its card and its nav link
    download = section_of(text, "download")
    counts = status_counts(pipeline / "download")
    assert counts == {"success": IMAGES, "failed_to_download": GONE, "failed_to_decode": BROKEN}
    for status, count in counts.items():
        assert status_cell(status, count) in download
    for part in ("Hosts that fail most", "<code>127.0.0.1</code>", "<code>http_4xx</code>",
                 'alt="throughput per shard"', 'alt="image sizes"', "Squares (--resize 64)",
                 'alt="aspect ratios"', "Cropped", "Padded"):  # fmt: skip
        assert part in download, part
    for stage in ("preprocess", "encode"):
        for status, count in status_counts(pipeline / stage).items():
            assert status_cell(status, count) in section_of(text, stage)
    assert "Cropped" in section_of(text, "preprocess")
    encode = section_of(text, "encode")
    assert 'alt="placeholder similarity"' in encode and "--placeholder-threshold 0.92" in encode
    labels = section_of(text, "labels")
    assert 'href="labels/report/index.html"' in labels
    training = section_of(text, "train")
    assert 'alt="loss curves"' in training
    assert re.search(r'href="train/eval/step-\d+/index.html"', training)
    assert "BLEU-4" in training
    lines = summary.format().splitlines()
    titles = ["Download", "Preprocess", "Encode", "Labels", "Training"]
    assert [line.split()[0] for line in lines[:-1]] == titles
    assert lines[-1].startswith(f"report -> {summary.page}")


def test_recorded_options_and_version_are_shown(pipeline, tmp_path):
    encode = tmp_path / "pipe"
    shutil.copytree(pipeline / "download", encode / "download")
    (encode / "download" / "vlmdata.toml").write_text('input = "<urls>.parquet"\nresize = 64\n')
    text = checked_page(write_report(ReportConfig(str(encode), quiet=True)).page)
    assert "<details><summary>Options it was made with (vlmdata.toml)</summary>" in text
    assert "input = &quot;&lt;urls&gt;.parquet&quot;" in text
    config = ReportConfig(str(pipeline / "encode"), out=str(tmp_path / "e.html"), quiet=True)
    text = checked_page(write_report(config).page)
    assert "made by vlmdata " in text  # the encode plan records its version


@pytest.mark.parametrize("stage", ["download", "preprocess", "encode", "labels", "train"])
def test_each_output_alone_reports_to_any_place(pipeline, tmp_path, stage):
    out = tmp_path / "somewhere" / "page.html"
    summary = write_report(ReportConfig(str(pipeline / stage), out=str(out), quiet=True))
    assert summary.page == out
    text = checked_page(out)  # links to the labels report and eval pages work from here too
    assert re.findall(r'<section class="stage-section" id="(\w+)"', text) == [stage]
    assert len(summary.format().splitlines()) == 2


def test_the_encode_shows_the_images_either_side_of_its_threshold(pipeline, tmp_path):
    text = checked_page(write_report(ReportConfig(str(pipeline), quiet=True)).page)
    encode = section_of(text, "encode")
    kept = status_counts(pipeline / "encode").get("success", 0)
    shown = encode.count('<img src="data:image/jpeg')
    assert shown == min(kept, 8) + min(IMAGES - kept, 8)
    assert "cannot be shown" not in encode
    # Alone, away from the download it read: said on the page, not fatal.
    shutil.copytree(pipeline / "encode", tmp_path / "alone" / "encode")
    (tmp_path / "alone" / "encode" / "vlmdata.toml").unlink(missing_ok=True)
    text = checked_page(write_report(ReportConfig(str(tmp_path / "alone" / "encode"),
                                                  quiet=True)).page)  # fmt: skip
    assert "are neither where its vlmdata.toml says nor beside it" in text
    assert '<img src="data:image/jpeg' not in text


def test_an_encode_of_an_image_folder_shows_its_files(tmp_path):
    write_shape_images(tmp_path / "images", 12)
    ok("encode", tmp_path / "images", tmp_path / "encode", "--model", "tiny-random-clip",
       "--pretrained", "none", "--device", "cpu", "--workers", "0", "--quiet")  # fmt: skip
    text = checked_page(write_report(ReportConfig(str(tmp_path / "encode"), quiet=True)).page)
    assert text.count('<img src="data:image/jpeg') == min(
        status_counts(tmp_path / "encode").get("success", 0), 8
    ) + min(status_counts(tmp_path / "encode").get("placeholder", 0), 8)
    assert "image not shown" not in text


def test_only_the_thumbnails_shown_are_read_from_the_tars(pipeline, tmp_path, monkeypatch):
    indexed, read = [], []
    index, read_refs = ImageShard.index, ImageShard.read

    def counting_index(self):
        indexed.append(self.tar)
        return index(self)

    def counting_read(self, refs):
        read.extend(ref.key for ref in refs)
        return read_refs(self, refs)

    monkeypatch.setattr(ImageShard, "index", counting_index)
    monkeypatch.setattr(ImageShard, "read", counting_read)
    text = write_report(ReportConfig(str(pipeline), out=str(tmp_path / "r.html"),
                                     quiet=True)).page.read_text()  # fmt: skip
    assert len(read) == text.count('<img src="data:image/jpeg') > 0  # each shown, once a section
    # A tar's member headers are read once by each section showing some of its samples: the
    # download's by its own and the encode's strips, the preprocess's by its own.
    assert {tar.parent.name for tar in indexed} == {"download", "preprocess"}
    assert max(Counter(indexed).values()) <= 2


def test_an_unfinished_stage_output_is_reported_as_far_as_it_goes(pipeline, tmp_path):
    out = tmp_path / "download"
    shutil.copytree(pipeline / "download", out)
    last = sorted(out.glob("*.stats.json"))[-1].name.removesuffix(".stats.json")
    (out / f"{last}.stats.json").unlink()  # as if killed before the marker
    (out / f"{last}.parquet").unlink()
    (out / f"{last}.tar").rename(out / f"{last}.tar.partial")
    summary = write_report(ReportConfig(str(out), quiet=True))
    text = checked_page(summary.page)
    assert "This download output is unfinished" in text and last in text
    done = sum(status_counts(out).values())
    assert status_cell("<b>all</b>", done) in text
    assert "[unfinished]" in summary.format()
    # Nothing finished yet: the page says so.
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(out / "plan.json", empty / "plan.json")
    text = write_report(ReportConfig(str(empty), quiet=True)).page.read_text()
    assert "This download output has no finished shard yet" in text
    # A training run stopped early.
    run = tmp_path / "run"
    shutil.copytree(pipeline / "train", run)
    (run / "summary.json").unlink()
    summary = write_report(ReportConfig(str(run), quiet=True))
    assert "This run is unfinished" in checked_page(summary.page)
    assert "[unfinished]" in summary.format()


def test_what_is_no_vlmdata_output_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    what, gone = "a report is made of a stage output", "missing does not exist; pass the directory"
    for path, said in ((tmp_path / "notes", what), (tmp_path / "notes" / "a.txt", what),
                       (tmp_path / "missing", gone)):  # fmt: skip
        with pytest.raises(UserError, match=said) as caught:
            write_report(ReportConfig(str(path)))
        assert "\n" not in str(caught.value)


def test_damaged_files_are_named_in_one_line(pipeline, tmp_path):
    out = tmp_path / "download"
    shutil.copytree(pipeline / "download", out)
    parquet = out / "00001.parquet"
    parquet.write_bytes(b"\0" * parquet.stat().st_size)  # same size: its marker still vouches
    with pytest.raises(UserError, match=re.escape(f"{parquet} is damaged")) as caught:
        write_report(ReportConfig(str(out), quiet=True))
    assert "\n" not in str(caught.value)
    # Restored by a rename, never rewritten in place: polars' readers of the failed report may
    # still have the damaged file mapped (polars 1.3x), and a file cut under a mapping is SIGBUS.
    shutil.copy(pipeline / "download" / "00001.parquet", out / "restored")
    os.replace(out / "restored", parquet)
    (out / "stats.json").write_text("{")
    with pytest.raises(UserError, match=re.escape(f"{out / 'stats.json'} is damaged")):
        write_report(ReportConfig(str(out), quiet=True))
    (out / "plan.json").write_text("[")
    with pytest.raises(UserError, match=re.escape(f"{out / 'plan.json'} is damaged")):
        write_report(ReportConfig(str(out), quiet=True))
    run = tmp_path / "run"
    shutil.copytree(pipeline / "train", run)
    (run / "config.json").write_text("not json")
    with pytest.raises(UserError, match=re.escape(f"{run / 'config.json'} is damaged")):
        write_report(ReportConfig(str(run), quiet=True))


def test_a_damaged_shard_marker_or_eval_is_a_note_on_the_page(pipeline, tmp_path):
    out = tmp_path / "pipe"
    for stage in ("download", "train"):
        shutil.copytree(pipeline / stage, out / stage)
    (out / "download" / "00000.stats.json").write_text("{")
    (eval_json,) = (out / "train" / "eval").glob("*/eval.json")
    eval_json.write_text("not json")
    metrics = out / "train" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '[1, 2]\n{"step": "x", "loss": 1}\n\xff\n')
    encode_like = out / "train" / "captions.json"  # what `vlmdata caption --json` would write
    encode_like.write_text('{"images": 3}')
    text = checked_page(write_report(ReportConfig(str(out), quiet=True)).page)
    assert "not finished (or damaged) are left out: 00000" in text
    assert html.escape(str(eval_json)) + " is damaged" in text
    assert 'alt="loss curves"' in text  # from the log's whole records
    assert html.escape(str(encode_like)) + " is damaged" in text


def test_out_must_be_a_file_name(pipeline, tmp_path):
    with pytest.raises(UserError, match="is a directory; pass a file name"):
        write_report(ReportConfig(str(pipeline / "labels"), out=str(tmp_path)))


def test_out_never_replaces_a_file_that_is_not_a_report(pipeline, tmp_path):
    """--out o/download/00000.parquet once replaced a shard with HTML."""
    shard = tmp_path / "00000.parquet"
    shard.write_bytes(b"PAR1 data")
    with pytest.raises(UserError, match=r"is not an \.html file name"):
        write_report(ReportConfig(str(pipeline / "labels"), out=str(shard)))
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(UserError, match="exists and is not a vlmdata report"):
        write_report(ReportConfig(str(pipeline / "labels"), out=str(mine)))
    assert shard.read_bytes() == b"PAR1 data" and "my notes" in mine.read_text()
    page = tmp_path / "labels.html"
    for _ in range(2):  # a page of its own is replaced
        assert write_report(ReportConfig(str(pipeline / "labels"), out=str(page))).page == page


@pytest.mark.parametrize("fine_bins", [[200, 399], [1, 398], [0, 399], [398, 399], [390]])
def test_the_similarity_histogram_spans_any_range(fine_bins):
    """Real CLIP puts kept images near 0.3-0.7 and a copy of a stand-in at 1.0: a range whose
    bar count does not divide evenly must still draw (it raised in reshape)."""
    import polars as pl

    from vlmdata.report.encode import _histogram

    bins = pl.DataFrame({"status": ["success"] * (len(fine_bins) - 1) + ["placeholder"],
                         "bin": fine_bins, "count": [3] * len(fine_bins)})  # fmt: skip
    assert 'alt="placeholder similarity"' in _histogram(bins, 0.92, 3)
