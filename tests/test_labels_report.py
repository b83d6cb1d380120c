"""`vlmdata labels report`: the page, its charts and thumbnails, the polars numbers behind them,
refusals, and missing images."""

from __future__ import annotations

import colorsys
import fcntl
import html
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import LoopbackServer
from vlmdata.cli import app
from vlmdata.labels import summary as summary_module
from vlmdata.labels.summary import (
    ALL,
    FINE_BINS,
    QUANTILES,
    SummaryOptions,
    open_labels,
    summarize,
)
from vlmdata.labels.thumbnails import THUMBNAIL_SIZE, thumbnail_name
from vlmdata.labels.zeroshot import LABEL_SCHEMA
from vlmdata.pipeline.shards import (
    STAGE_DATA_FILES,
    ShardFiles,
    atomic_write_json,
    data_sizes,
    shard_stats,
)

pytestmark = [pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights")]
runner = CliRunner(env={"COLUMNS": "200"})
TINY = "tiny-random-clip"
IMAGES = 12
TAXONOMY = {
    "animals": ["a tabby cat asleep on a sofa", "a dog running on a beach", "a horse in a field"],
    "food": ["a pepperoni pizza", "a bowl of tomato soup", "a chocolate cake"],
    "vehicles": ["a red sports car", "a bicycle leaning on a wall", "a freight train"],
    "image not available": ["a grey box saying image not available", "a broken image icon"],
}
CHARTS = ["categories.png", "descriptions.png", "confidence.png", "confidence_by_category.png"]


def colour(i: int) -> tuple[int, int, int]:
    """Image ``i``'s colour: one hue each, so a thumbnail shows which image it was made from."""
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / IMAGES, 0.8, 0.9))


def caption_of(image: int) -> str:
    return f"picture <{image}> & “friends”"  # to be escaped on the page


def solid_jpeg(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (72, 72), rgb).save(out, "JPEG", quality=95)
    return out.getvalue()


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str) -> object:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def refused(*args: str, message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """download (loopback) -> encode (tiny-random-clip) -> labels classify, through the CLI."""
    tmp = tmp_path_factory.mktemp("report")
    with LoopbackServer() as server:
        urls = [server.add_file(f"{i}.jpg", solid_jpeg(colour(i))) for i in range(IMAGES)]
        captions = [caption_of(i) for i in range(IMAGES)]
        urls.insert(5, server.url("/img/gone.jpg"))  # a 404: a failed row, no label
        captions.insert(5, "gone")
        pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}),
                       tmp / "urls.parquet")  # fmt: skip
        ok("download", tmp / "urls.parquet", tmp / "shards", "--shard-size", "5",
           "--allow-private-network", "--quiet")  # fmt: skip
    ok("encode", tmp / "shards", tmp / "features", "--model", TINY, "--pretrained", "none",
       "--device", "cpu", "--workers", "0", "--batch-size", "4", "--no-placeholder-filter",
       "--quiet")  # fmt: skip
    (tmp / "taxonomy.json").write_text(json.dumps({"categories": TAXONOMY}))
    ok("labels", "classify", tmp / "features", tmp / "labels", "--taxonomy",
       tmp / "taxonomy.json", "--device", "cpu", "--quiet")  # fmt: skip
    colours = {}
    for path in sorted((tmp / "shards").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row["status"] == "success":
                colours[row["key"]] = colour(image_of(row["url"]))
    return {"tmp": tmp, "shards": tmp / "shards", "features": tmp / "features",
            "labels": tmp / "labels", "colours": colours, "urls": set(urls)}  # fmt: skip


def image_of(url: str) -> int:
    """The number of the image a URL of the dataset serves: .../img/7.jpg -> 7."""
    return int(url.rsplit("/", 1)[1].removesuffix(".jpg"))


def label_rows(labels: Path) -> pl.DataFrame:
    """Every label row with its shard: read whole, the straightforward way."""
    return pl.concat(
        pl.from_arrow(pq.read_table(p)).with_columns(pl.lit(p.stem).alias("shard"))
        for p in sorted(labels.glob("[0-9]*.parquet"))
    )


class _References(HTMLParser):
    """Every src/href of a page, and every id."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.references.append(value)
            if name == "id" and value:
                self.ids.add(value)


def check_page(report: Path, urls: set[str]) -> set[str]:
    """Every reference of ``report/index.html`` resolves: a file inside the report, an id of
    the page, or one of the dataset's own URLs. Returns the files referenced."""
    parser = _References()
    parser.feed((report / "index.html").read_text(encoding="utf-8"))
    files = set()
    assert parser.references
    for reference in parser.references:
        if reference.startswith("#"):
            assert reference[1:] in parser.ids, reference
        elif urlsplit(reference).scheme in ("http", "https"):
            assert reference in urls, reference
        else:
            assert not urlsplit(reference).scheme and not reference.startswith("/"), reference
            path = report / unquote(reference)
            assert path.is_file() and path.resolve().is_relative_to(report.resolve()), reference
            files.add(unquote(reference))
    return files


def test_report_end_to_end(dataset):
    labels = dataset["labels"]
    result = ok("labels", "report", labels, "--images", dataset["shards"], "--quiet")
    report = labels / "report"  # the default --out
    assert f"report -> {report / 'index.html'}" in result.stdout
    assert f"{IMAGES} rows in 3 shards" in result.stdout
    for chart in CHARTS:
        with Image.open(report / chart) as image:
            assert image.format == "PNG" and image.width >= 600
            image.verify()
    referenced = check_page(report, dataset["urls"])
    assert set(CHARTS) <= referenced
    rows = label_rows(labels)
    thumbs = sorted((report / "thumbs").iterdir())
    assert {f"thumbs/{t.name}" for t in thumbs} == {f for f in referenced if "thumbs/" in f}
    # The defaults show every row of so small a dataset: each key has its own thumbnail,
    # made from its own image (the colour of the picture its URL served).
    by_name = {thumbnail_name(s, k): k for s, k in rows.select("shard", "key").iter_rows()}
    assert sorted(by_name) == [t.name for t in thumbs]
    for thumb in thumbs:
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and image.size == (THUMBNAIL_SIZE,) * 2
            mean = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
        assert np.abs(mean - dataset["colours"][by_name[thumb.name]]).max() < 12, thumb.name
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "picture &lt;0&gt; &amp; “friends”" in page and "<0>" not in page  # escaped
    for category in rows["category"].unique():
        assert html.escape(category) in page
    document = json.loads((report / "report.json").read_text())
    assert document["rows"] == IMAGES and document["missing_thumbnails"] == []
    again = ok("labels", "report", labels, "--images", dataset["shards"], "--quiet")
    assert "report ->" in again.stdout  # an earlier report is replaced, nothing left aside
    assert sorted(p.name for p in labels.iterdir() if p.name.startswith(".report")) == []


def test_report_from_preprocess_output_to_another_folder(dataset, tmp_path):
    squares = tmp_path / "squares"
    ok("preprocess", dataset["shards"], squares, "--size", "64", "--processes", "1", "--quiet")
    out = tmp_path / "elsewhere" / "report"
    ok("labels", "report", dataset["labels"], "--images", squares, "--out", out, "--quiet",
       "--categories", "1", "--examples", "2", "--least-confident", "3")  # fmt: skip
    files = check_page(out, dataset["urls"])
    thumbs = {f for f in files if f.startswith("thumbs/")}
    assert 3 <= len(thumbs) <= 2 + 3 + 48
    assert len(list((out / "thumbs").iterdir())) == len(thumbs)


def test_missing_keys_and_shards_are_noted_not_fatal(dataset, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(dataset["shards"], images)
    dropped = _drop_first_sample(images / "00000.tar")
    cut = images / "00001.tar"
    cut.write_bytes(cut.read_bytes()[:1500])  # cut inside a member: unreadable
    (images / "00002.tar").unlink()
    out = tmp_path / "report"
    result = ok("labels", "report", dataset["labels"], "--images", images, "--out", out,
                "--quiet")  # fmt: skip
    rows = label_rows(dataset["labels"])
    lost = 1 + int((rows["shard"] != "00000").sum())
    assert f"({lost} could not be shown)" in result.stdout
    check_page(out, dataset["urls"])
    missing = json.loads((out / "report.json").read_text())["missing_thumbnails"]
    reasons = {(m["shard"], m["key"]): m["why"] for m in missing}
    assert reasons["00000", dropped] == "not in 00000.tar"
    assert {why for (s, _), why in reasons.items() if s == "00001"} == {"00001.tar is unreadable"}
    assert {why for (s, _), why in reasons.items() if s == "00002"} == {"no 00002.tar in --images"}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="missing"' in page and "not in 00000.tar" in page
    assert len(list((out / "thumbs").iterdir())) == len(rows) - lost


def _drop_first_sample(tar: Path) -> str:
    """Rewrite ``tar`` without its first sample; return that sample's key."""
    with tarfile.open(tar) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers() if m.isfile()]
    key = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "w") as target:
        for member, data in members:
            if member.name.split(".")[0] != key:
                target.addfile(member, io.BytesIO(data))
    return key


def test_refusals(dataset, tmp_path):
    labels, shards = dataset["labels"], dataset["shards"]
    plain = tmp_path / "plain"
    plain.mkdir()
    refused("labels", "report", plain, "--images", shards,
            message="is not a vlmdata labels output (no plan.json); pass the output directory "
            "of `vlmdata labels classify`")  # fmt: skip
    refused("labels", "report", dataset["features"], "--images", shards,
            message="holds a encode output, not labels")  # fmt: skip
    unfinished = tmp_path / "unfinished"
    shutil.copytree(labels, unfinished, ignore=shutil.ignore_patterns("report"))
    (unfinished / "00001.stats.json").unlink()
    refused("labels", "report", unfinished, "--images", shards,
            message="is an unfinished labels run (2 shards done so far); finish it by rerunning "
            "the same `vlmdata labels classify` command, or pass --allow-incomplete")  # fmt: skip
    for images, message in [
        (tmp_path / "nowhere", "is not a directory"),
        (plain, "holds no .tar image shards; pass the download or preprocess output"),
        (dataset["features"], "holds a encode output, not image shards"),
        (labels, "holds a labels output, not image shards"),
    ]:
        refused("labels", "report", labels, "--images", images, message=message)
    (plain / "notes.txt").write_text("mine")
    refused("labels", "report", labels, "--images", shards, "--out", plain,
            message="is not empty and holds no earlier report")  # fmt: skip
    refused("labels", "report", labels, "--images", shards, "--out", shards / "report",
            message="must be neither --images")  # fmt: skip
    refused("labels", "report", labels, "--images", shards, "--out", labels,
            message="must be neither LABELS_DIR")  # fmt: skip
    refused("labels", "report", labels, "--images", shards, "--examples", "-1",
            message="--examples must be at least 0")  # fmt: skip
    assert (plain / "notes.txt").read_text() == "mine" and not (shards / "report").exists()


def test_allow_incomplete_reports_the_finished_shards(dataset, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dataset["labels"], unfinished, ignore=shutil.ignore_patterns("report"))
    (unfinished / "00001.stats.json").unlink()  # as if classify were killed in that shard
    result = ok("labels", "report", unfinished, "--images", dataset["shards"], "--quiet",
                "--allow-incomplete")  # fmt: skip
    finished = label_rows(unfinished).filter(pl.col("shard") != "00001")
    assert f"{len(finished)} rows in 2 shards" in result.stdout
    assert "the labels run is unfinished" in result.stdout
    check_page(unfinished / "report", dataset["urls"])
    assert "this report covers its 2 finished shards" in (
        unfinished / "report" / "index.html").read_text()  # fmt: skip
    for marker in unfinished.glob("*.stats.json"):
        marker.unlink()
    refused("labels", "report", unfinished, "--images", dataset["shards"], "--allow-incomplete",
            message="has no finished shard yet")  # fmt: skip


def test_readme_join_example(dataset, monkeypatch):
    """The README's example, word for word: labels joined to the download parquet by key."""
    monkeypatch.chdir(dataset["tmp"])  # holds labels/ and shards/ as the README names them
    import polars as pl

    labelled = pl.scan_parquet("labels/*.parquet").join(
        pl.scan_parquet("shards/*.parquet").select("key", "url", "caption"), on="key"
    ).collect()  # fmt: skip

    rows = label_rows(dataset["labels"])
    assert sorted(labelled["key"]) == sorted(rows["key"]) and len(labelled) == IMAGES
    assert labelled["url"].null_count() == 0
    assert {"description", "category", "probability", "caption"} <= set(labelled.columns)
    for row in labelled.iter_rows(named=True):
        assert row["caption"] == caption_of(image_of(row["url"]))


# --- the polars numbers, against a straightforward recomputation ----------------------------


def write_labels(out: Path, shards: list[list[dict]], complete: bool = True) -> Path:
    """A labels output laid out as `labels classify` writes one: parquets, markers, plan."""
    out.mkdir(parents=True)
    for index, rows in enumerate(shards):
        files = ShardFiles(out, name := f"{index:05d}")
        pq.write_table(pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), files.parquet)
        stats = shard_stats(name, [], 0.25, None, data_sizes(files, STAGE_DATA_FILES["labels"]))
        atomic_write_json(files.stats, {**stats, "rows": len(rows)})
    atomic_write_json(out / "plan.json", {"stage": "labels", "input": {}, "taxonomy": "x" * 64,
                                          "templates": "y" * 64, "top_k": 1, "model": TINY,
                                          "pretrained": "random"})  # fmt: skip
    atomic_write_json(out / "stats.json", {"rows": sum(map(len, shards)), "complete": complete,
                                           "shard_names": [f"{i:05d}" for i in
                                                           range(len(shards))]})  # fmt: skip
    return out


def synthetic_rows(count: int, first_key: int, rng: np.random.Generator) -> list[dict]:
    """Skewed categories (A most, E least), descriptions of varied frequency, ties in
    probability (a few values repeat) and values across the whole range."""
    categories = rng.choice(list("ABCDE"), size=count, p=[0.4, 0.25, 0.2, 0.1, 0.05])
    rows = []
    for i, category in enumerate(categories):
        description = f"{category} thing {min(int(rng.exponential(2)), 7)}"
        probability = float(np.float32(rng.choice([0.5, rng.uniform(0.02, 1)])))
        cosine = float(np.float32(rng.uniform(0.1, 0.4)))
        rows.append({
            "key": f"{first_key + i:09d}", "row": i, "description": description,
            "category": str(category), "cosine": cosine, "probability": probability,
            "top_category": str(category), "top_category_probability": probability,
            "top_k_descriptions": [description], "top_k_probabilities": [probability],
        })  # fmt: skip
    return rows


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    sizes = [300, 0, 250, 410, 1, 200, 333]  # an empty shard too
    shards, first = [], 0
    for size in sizes:
        shards.append(synthetic_rows(size, first, rng))
        first += size
    return write_labels(tmp_path / "labels [v1] *", shards)  # no glob in the name


OPTIONS = SummaryOptions(examples=3, least_confident=7, placeholders=5, placeholder_category="D")


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_summary_equals_a_straightforward_recomputation(synthetic, monkeypatch, chunk):
    monkeypatch.setattr(summary_module, "CHUNK_SHARDS", chunk)  # merged across chunks or not
    summary = summarize(open_labels(synthetic), OPTIONS)
    rows = label_rows(synthetic)
    assert summary.rows == len(rows) == 1494
    per_category = Counter(rows["category"].to_list())
    assert dict(summary.categories.select("category", "count").iter_rows()) == per_category
    assert summary.categories["count"].sum() == len(rows)
    assert summary.categories["category"].to_list() == ["A", "B", "C", "D", "E"]
    assert summary.categories["share"].to_list() == pytest.approx(
        [per_category[c] / len(rows) for c in "ABCDE"]
    )
    per_description = Counter(zip(rows["description"], rows["category"], strict=True))
    expected = sorted(per_description.items(), key=lambda item: (-item[1], item[0][0]))
    assert list(summary.descriptions.select("description", "category", "count").iter_rows()) \
        == [(d, c, n) for (d, c), n in expected]  # fmt: skip
    for category in [ALL, *"ABCDE"]:
        subset = rows if category == ALL else rows.filter(pl.col("category") == category)
        for metric in ("probability", "cosine"):
            values = subset[metric].to_numpy().astype(np.float64)
            bins = summary.bins[metric]
            assert bins.low == values.min() or category != ALL
            mine = (pl.col("category") == category) & (pl.col("metric") == metric)
            stats = summary.confidence.filter(mine).row(0, named=True)
            assert stats["count"] == len(values)
            for q in QUANTILES:
                exact = np.quantile(values, q, method="inverted_cdf")
                assert abs(stats[f"q{round(q * 100):02d}"] - exact) <= 1.001 * bins.width
            assert summary.histogram(metric, None if category == ALL else category,
                                     bins=FINE_BINS // 40).sum() == len(values)  # fmt: skip
    least = rows.sort("probability", "shard", "key").head(7).select("shard", "key")
    assert summary.least_confident.select("shard", "key").rows() == least.rows()
    placeholders = rows.filter(pl.col("category") == "D").sort(
        ["probability", "shard", "key"], descending=[True, False, False]).head(5)  # fmt: skip
    assert summary.placeholders["key"].to_list() == placeholders["key"].to_list()
    assert summary.placeholder_count == per_category["D"]
    examples = summary.examples
    assert Counter(examples["category"].to_list()) == {c: 3 for c in "ABCDE"}
    for row in examples.iter_rows(named=True):  # real rows, with their own labels
        original = rows.filter((pl.col("shard") == row["shard"]) & (pl.col("key") == row["key"]))
        assert original.select("category", "description", "probability").row(0) == (
            row["category"], row["description"], row["probability"])  # fmt: skip


def test_the_sample_does_not_depend_on_chunking(synthetic, monkeypatch):
    samples = []
    for chunk in (1, 2, 100):
        monkeypatch.setattr(summary_module, "CHUNK_SHARDS", chunk)
        samples.append(summarize(open_labels(synthetic), OPTIONS).examples)
    assert samples[0].equals(samples[1]) and samples[0].equals(samples[2])


def test_report_of_empty_labels_and_an_absent_placeholder_category(tmp_path, dataset):
    labels = write_labels(tmp_path / "labels", [[], []])
    out = tmp_path / "report"
    result = ok("labels", "report", labels, "--images", dataset["shards"], "--out", out,
                "--quiet")  # fmt: skip
    assert "0 rows in 2 shards, 0 categories, 0 thumbnails" in result.stdout
    check_page(out, set())
    for chart in CHARTS:
        with Image.open(out / chart) as image:
            image.verify()
    assert "No image is labelled “image not available”" in (out / "index.html").read_text()


def test_a_damaged_label_parquet_is_named(synthetic, dataset):
    parquet = synthetic / "00003.parquet"
    data = bytearray(parquet.read_bytes())
    data[100:2100] = bytes(2000)  # same size: its marker still vouches for it
    parquet.write_bytes(bytes(data))
    for message in (f"{parquet} is damaged (", "delete 00003.stats.json beside it and rerun"):
        refused("labels", "report", synthetic, "--images", dataset["shards"], message=message)


# --- label text, scores and files a labels run should not have ------------------------------


def test_long_category_names_are_cut_in_the_charts_and_whole_on_the_page(tmp_path, dataset):
    """A category name of a few hundred characters took the charts' whole width: matplotlib
    gave up its layout (a warning) and drew the name cut off at the image's edge."""
    long = "a category whose name runs on and on " * 8
    rows = synthetic_rows(40, 0, np.random.default_rng(0))
    for row in rows:
        if row["category"] == "A":
            row.update(category=long, top_category=long)
    labels = write_labels(tmp_path / "labels", [rows])
    result = ok("labels", "report", labels, "--images", dataset["shards"], "--quiet")
    assert "warning" not in result.stderr, result.stderr  # the layout given up
    report = labels / "report"
    assert html.escape(long) in (report / "index.html").read_text(encoding="utf-8")
    assert long in {c["category"] for c in json.loads((report / "report.json").read_text())[
        "categories"]}  # fmt: skip


def _usable(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.filter(pl.col("probability").is_finite() & pl.col("cosine").is_finite()
                       & pl.col("description").is_not_null())  # fmt: skip


def test_rows_without_a_finite_score_or_a_label_are_counted_apart(tmp_path, dataset):
    """A NaN embedding gives NaN scores (older classify runs named a description anyway);
    such rows, infinite ones and rows with no description are counted as unlabelled and left
    out of the charts, quantiles and examples: a NaN used to break the histogram bins."""
    rng = np.random.default_rng(1)
    shards = [synthetic_rows(30, 0, rng), synthetic_rows(30, 30, rng)]
    shards[0][2].update(probability=float("nan"), cosine=float("nan"))
    shards[1][0].update(probability=float("inf"))
    shards[1][5].update(description=None, category=None, probability=None, cosine=None)
    labels = write_labels(tmp_path / "labels", shards)
    summary = summarize(open_labels(labels), OPTIONS)
    usable = _usable(label_rows(labels))
    assert (summary.rows, summary.unlabelled) == (60, 3) and len(usable) == 57
    assert summary.categories["count"].sum() == 57
    assert summary.categories["share"].to_list() == pytest.approx(
        (summary.categories["count"] / 60).to_list())  # fmt: skip
    for metric in ("probability", "cosine"):
        mine = (pl.col("category") == ALL) & (pl.col("metric") == metric)
        stats = summary.confidence.filter(mine).row(0, named=True)
        assert stats["count"] == 57 and summary.histogram(metric).sum() == 57
        assert summary.bins[metric].low == usable[metric].min()
        assert summary.bins[metric].high == usable[metric].max()
    least = usable.sort("probability", "shard", "key").head(OPTIONS.least_confident)
    assert summary.least_confident["key"].to_list() == least["key"].to_list()
    assert set(summary.examples["key"]) <= set(usable["key"])
    result = ok("labels", "report", labels, "--images", dataset["shards"], "--quiet")
    assert "60 rows in 2 shards (3 without a label)" in result.stdout
    report = labels / "report"
    assert "3 images (5.00%) got no label" in (report / "index.html").read_text()
    assert json.loads((report / "report.json").read_text())["unlabelled"] == 3


def test_a_label_parquet_of_other_column_types_is_read_or_named(synthetic, dataset):
    """A shard rewritten by another tool: float64 scores are read with the rest (they made the
    scan of a chunk fail), text where a score should be names that file (the message named a
    range of shards, "00000..00006.parquet", no file at all)."""
    parquet = synthetic / "00002.parquet"
    table = pq.read_table(parquet)
    index = table.schema.get_field_index("probability")
    doubled = table.set_column(index, "probability", table["probability"].cast(pa.float64()))
    pq.write_table(doubled, parquet)
    _vouch_for(synthetic, "00002")
    assert summarize(open_labels(synthetic), OPTIONS).rows == 1494
    words = table.set_column(index, "probability", pa.array(["abc"] * len(table)))
    pq.write_table(words, parquet)
    _vouch_for(synthetic, "00002")
    refused("labels", "report", synthetic, "--images", dataset["shards"],
            message=f"{parquet} is damaged (")  # fmt: skip


def _vouch_for(labels: Path, name: str) -> None:
    """Record the shard's current parquet size in its marker, as if classify wrote it."""
    files = ShardFiles(labels, name)
    stats = json.loads(files.stats.read_text())
    sizes = data_sizes(files, STAGE_DATA_FILES["labels"])
    atomic_write_json(files.stats, {**stats, "sizes": sizes})


@pytest.mark.parametrize("duration", ["abc", None, -1, float("inf"), True])
def test_a_stats_marker_without_a_duration_is_tolerated(tmp_path, dataset, duration):
    """The labelling time only shows on the page: a marker edited to hold no number there
    made the report fail with an internal error; the time is shown as unknown."""
    rng = np.random.default_rng(0)
    labels = write_labels(tmp_path / "labels", [synthetic_rows(10, 0, rng),
                                                synthetic_rows(10, 10, rng)])  # fmt: skip
    marker = ShardFiles(labels, "00001").stats
    stats = json.loads(marker.read_text())
    marker.write_text(json.dumps({**stats, "duration_s": duration}))
    result = ok("labels", "report", labels, "--images", dataset["shards"], "--quiet")
    assert "20 rows in 2 shards" in result.stdout
    page = (labels / "report" / "index.html").read_text()
    assert '<div class="n">unknown</div><div class="l">labelling time' in page


def test_a_run_list_of_other_than_names_is_an_unfinished_run(tmp_path, dataset):
    labels = write_labels(tmp_path / "labels", [synthetic_rows(10, 0, np.random.default_rng(0))])
    root = json.loads((labels / "stats.json").read_text())
    (labels / "stats.json").write_text(json.dumps({**root, "shard_names": [["00000"], 1]}))
    refused("labels", "report", labels, "--images", dataset["shards"],
            message="is an unfinished labels run (1 shards done so far)")  # fmt: skip
    ok("labels", "report", labels, "--images", dataset["shards"], "--quiet",
       "--allow-incomplete")  # fmt: skip


def test_a_killed_reports_work_folder_is_removed_by_the_next_report(tmp_path, dataset):
    """A report killed (SIGKILL, power loss) leaves its work folder beside --out; the next
    report deletes it, but not one a running report holds, nor anything else."""
    labels = write_labels(tmp_path / "labels", [synthetic_rows(10, 0, np.random.default_rng(0))])
    killed, running = labels / ".report.k1ll3d_x.tmp", labels / ".report.runn1ng_.tmp"
    for work in (killed, running):  # as tempfile.mkdtemp names them, with their lock file
        (work / "report" / "thumbs").mkdir(parents=True)
        (work / "report" / "index.html").write_text("half a page")
        (work / ".lock").touch()
    making = labels / ".report.m4k1ng__.tmp"  # no lock file yet: a report making it now
    others = [making, *(labels / name for name in (".report.mine", ".report.x.tmp.keep",
                                                    "report.a.tmp"))]  # fmt: skip
    for other in others:
        other.mkdir()
    held = os.open(running / ".lock", os.O_WRONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running report holds its own
        ok("labels", "report", labels, "--images", dataset["shards"], "--quiet")
    finally:
        os.close(held)
    assert not killed.exists()
    assert (running / "report" / "index.html").is_file()
    assert all(other.is_dir() for other in others)
    assert (labels / "report" / "index.html").is_file()
