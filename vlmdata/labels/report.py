"""`vlmdata labels report`: one HTML page (with PNG charts and thumbnails beside it) that shows
what a labelled dataset holds.

The numbers come from :mod:`vlmdata.labels.summary` (lazy polars scans, memory bounded by the
page), the thumbnails from :mod:`vlmdata.labels.thumbnails` (pulled by key from the image
shards). Charts are drawn on matplotlib ``Figure`` objects with the Agg canvas, so no global
backend is chosen. The page opens offline from the file system: every reference is a relative
path inside the report folder. The folder is built under a temporary name beside ``--out`` and
renamed into place, replacing an earlier report only; what a killed run leaves there is deleted
by the next.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import html
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from vlmdata.errors import UserError, require_at_least
from vlmdata.labels import PLACEHOLDER_CATEGORY
from vlmdata.labels.summary import (
    ALL,
    LabelsRun,
    LabelSummary,
    SummaryOptions,
    image_records,
    open_labels,
    summarize,
)
from vlmdata.labels.taxonomy import load_taxonomy, load_templates, templates_digest
from vlmdata.labels.thumbnails import Thumbnail, open_image_shards, write_thumbnails
from vlmdata.pipeline.runner import path_argument
from vlmdata.report import charts
from vlmdata.report.page import CSS

REPORT_FILE = "report.json"  # the report's numbers; also what marks a folder as a report
_REPORT_KIND = "vlmdata labels report"
TOP_BARS = 30  # bars per chart: the most frequent categories, the top descriptions
CHARTS = {
    "categories": "categories.png",
    "descriptions": "descriptions.png",
    "confidence": "confidence.png",
    "confidence_by_category": "confidence_by_category.png",
}
_LOCK = ".lock"  # in a report's work folder: held while the run lives


@dataclass
class ReportConfig:
    """Everything `vlmdata labels report` takes; the CLI flags map one to one."""

    labels_dir: str
    images: str
    out: str | None = None  # None: LABELS_DIR/report
    categories: int = 8  # the most frequent categories that get a grid of examples
    examples: int = 12  # thumbnails per category
    least_confident: int = 24
    placeholders: int = 48  # thumbnails of the placeholder category, at most
    placeholder_category: str = PLACEHOLDER_CATEGORY
    allow_incomplete: bool = False  # report the finished shards of an unfinished labels run
    quiet: bool = False

    def __post_init__(self) -> None:
        require_at_least(0, categories=self.categories, examples=self.examples,
                         least_confident=self.least_confident,
                         placeholders=self.placeholders)  # fmt: skip


@dataclass
class ReportSummary:
    """What the report shows, for the line printed at the end."""

    html: Path
    rows: int
    unlabelled: int  # rows without a usable label (see summary.py)
    shards: int
    categories: int
    thumbnails: int
    missing: int
    elapsed_s: float
    partial: bool  # the finished shards of an unfinished labels run

    def format(self) -> str:
        missing = f" ({self.missing} could not be shown)" if self.missing else ""
        partial = ("\n  the labels run is unfinished: this report covers its finished shards; "
                   "report again once it is done") if self.partial else ""  # fmt: skip
        unlabelled = f" ({self.unlabelled} without a label)" if self.unlabelled else ""
        return (
            f"report -> {self.html}\n  {self.rows} rows in {self.shards} shards{unlabelled}, "
            f"{self.categories} categories, {self.thumbnails} thumbnails{missing} in "
            f"{self.elapsed_s:.1f} s{partial}"
        )


def run_report(config: ReportConfig) -> ReportSummary:
    """Write the report of the labels output ``config.labels_dir``; return what it shows."""
    started = time.monotonic()
    run = open_labels(path_argument(config.labels_dir, "LABELS_DIR"), config.allow_incomplete)
    images = open_image_shards(path_argument(config.images, "--images"))
    out = run.path / "report"
    if config.out is not None:
        out = path_argument(config.out, "--out", written=True)
    check_report_location(out, run.path, images.path)
    options = SummaryOptions(config.examples, config.least_confident, config.placeholders,
                             config.placeholder_category)  # fmt: skip
    summary = summarize(run, options)
    top = summary.categories["category"].head(config.categories).to_list()
    shown = _shown_rows(summary, top)
    records = image_records(images.path, shown)
    with _staging(out) as folder:
        thumbnails = write_thumbnails(images, records.select("shard", "key").iter_rows(),
                                      folder, config.quiet)  # fmt: skip
        tiles = _tiles(records, thumbnails)
        _write_charts(summary, folder)
        missing = {k: t.problem for k, t in thumbnails.items() if t.file is None}
        elapsed = time.monotonic() - started
        page = _page(run, summary, images.path, top, tiles, missing, elapsed)
        (folder / "index.html").write_text(page, encoding="utf-8")
        (folder / REPORT_FILE).write_text(_report_json(summary, run, missing), encoding="utf-8")
    return ReportSummary(
        html=out / "index.html",
        rows=summary.rows,
        unlabelled=summary.unlabelled,
        shards=len(run.shards),
        categories=len(summary.categories),
        thumbnails=len(thumbnails) - len(missing),
        missing=len(missing),
        elapsed_s=time.monotonic() - started,
        partial=run.partial,
    )


def check_report_location(out: Path, labels: Path, images: Path) -> None:
    """Refuse an ``--out`` that is or holds an input, sits inside the image shards (a stage
    reading them would take the thumbnails for images), or holds anything but a report."""
    target = out.resolve()
    for flag, path in (("LABELS_DIR", labels), ("--images", images)):
        source = path.resolve()
        inside = flag == "--images" and target.is_relative_to(source)
        if target == source or source.is_relative_to(target) or inside:
            raise UserError(
                f"--out {out} must be neither {flag} {path}, nor hold it"
                f"{', nor sit inside it' if flag == '--images' else ''}; pass another directory"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise UserError(
            f"--out {out} is not empty and holds no earlier report; pass a new or empty "
            "directory (a report replaces only an earlier report)"
        )


def _is_report(folder: Path) -> bool:
    try:
        return json.loads((folder / REPORT_FILE).read_bytes()).get("kind") == _REPORT_KIND
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A new folder that becomes ``out`` when the block ends well, replacing an earlier report;
    on failure ``out`` is left as it was.

    The folder is made by a plain mkdir (so it gets the mode the umask gives, as every other
    output) inside a work folder beside ``out``, ``.NAME.XXXXXXXX.tmp``, which also takes the
    earlier report at the swap and is deleted at the end. Its lock file is held while the run
    lives: a later run deletes the work folders killed runs left, never one in use."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_work(out)
        work, lock = _locked_work_folder(out)
    except OSError as e:
        raise UserError(f"cannot write to {out.parent} ({e.strerror or e}); pass a writable "
                        "--out") from None  # fmt: skip
    try:
        folder = work / out.name
        folder.mkdir()
        yield folder
        if out.exists():
            os.replace(out, work / "earlier")
        os.replace(folder, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)


def _locked_work_folder(out: Path) -> tuple[Path, int]:
    """A new work folder beside ``out``, and the descriptor that holds its lock."""
    while True:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            lock = os.open(work / _LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        except FileNotFoundError:
            continue  # deleted by another run, taken for a killed run's (see below)
        with suppress(OSError):  # a file system without locks: nothing is then deleted
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits only for another run deleting it
        if os.fstat(lock).st_nlink:
            return work, lock
        os.close(lock)  # deleted in the instant before the lock: make another


def _remove_stale_work(out: Path) -> None:
    """Delete the work folders beside ``out`` whose lock no run holds: killed runs'."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]+\.tmp")  # as mkdtemp names
    for entry in list(os.scandir(out.parent)):
        if not (pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            lock = os.open(Path(entry.path, _LOCK), os.O_WRONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock file (a run is making it this instant), or not ours to open
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # held by a running report (or a file system without locks)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(lock)


# --- what the page shows -------------------------------------------------------------------


def _shown_rows(summary: LabelSummary, top: list[str]) -> pl.DataFrame:
    """Every row that gets a tile, once: examples of the top categories, the least confident
    and the placeholders."""
    examples = summary.examples.filter(pl.col("category").is_in(top))
    frames = [examples, summary.least_confident, summary.placeholders]
    columns = ["shard", "key", "description", "category", "probability", "cosine"]
    return pl.concat([f.select(columns) for f in frames]).unique(["shard", "key"], keep="first")


@dataclass(frozen=True)
class _Tile:
    """One thumbnail of the page and the words around it."""

    key: str
    shard: str
    description: str
    category: str
    probability: float
    cosine: float
    caption: str | None
    url: str | None
    thumbnail: Thumbnail


def _tiles(records: pl.DataFrame, thumbnails: dict[tuple[str, str], Thumbnail]) -> dict:
    """Each shown row's tile, by (shard, key)."""
    tiles = {}
    for row in records.iter_rows(named=True):
        thumbnail = thumbnails[row["shard"], row["key"]]
        tiles[row["shard"], row["key"]] = _Tile(
            key=row["key"], shard=row["shard"], description=row["description"],
            category=row["category"], probability=row["probability"], cosine=row["cosine"],
            caption=row["caption"] if row["caption"] is not None else thumbnail.caption,
            url=row["url"], thumbnail=thumbnail,
        )  # fmt: skip
    return tiles


def _report_json(summary: LabelSummary, run: LabelsRun, missing: dict) -> str:
    document = {
        "kind": _REPORT_KIND,
        "labels_dir": str(run.path),
        "rows": summary.rows,
        "unlabelled": summary.unlabelled,
        "shards": len(run.shards),
        "partial": run.partial,
        "categories": summary.categories.to_dicts(),
        "descriptions": summary.descriptions.head(TOP_BARS).to_dicts(),
        "confidence": summary.confidence.to_dicts(),
        "placeholders": summary.placeholder_count,
        "missing_thumbnails": [
            {"shard": s, "key": k, "why": why} for (s, k), why in sorted(missing.items())
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# --- charts --------------------------------------------------------------------------------


def _colours(summary: LabelSummary) -> dict[str, str]:
    """One colour per category, by frequency rank; the placeholder category in grey."""
    names = summary.categories["category"].to_list()
    palette = charts.PALETTE
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    colours[summary.options.placeholder_category] = charts.GREY
    return colours


def _write_charts(summary: LabelSummary, folder: Path) -> None:
    colours = _colours(summary)
    categories = summary.categories.head(TOP_BARS)
    descriptions = summary.descriptions.head(TOP_BARS)
    with charts.drawing():
        charts.bar_chart(
            charts.cut_all(categories["category"]), categories["count"].to_list(),
            categories["share"].to_list(), [colours[c] for c in categories["category"]],
            [""] * len(categories), f"Most frequent categories (of {len(summary.categories)})",
        ).savefig(folder / CHARTS["categories"], format="png")  # fmt: skip
        charts.bar_chart(
            charts.cut_all(descriptions["description"]), descriptions["count"].to_list(),
            descriptions["share"].to_list(), [colours[c] for c in descriptions["category"]],
            charts.cut_all(descriptions["category"], charts.NAME_CHARS // 2),
            f"Top {len(descriptions)} descriptions (of {len(summary.descriptions)} used)",
        ).savefig(folder / CHARTS["descriptions"], format="png")  # fmt: skip
        _histograms(summary, folder / CHARTS["confidence"])
        _category_ranges(summary, categories["category"].to_list(), colours,
                         folder / CHARTS["confidence_by_category"])  # fmt: skip


def _histograms(summary: LabelSummary, path: Path) -> None:
    """The distribution of each metric over every row, its median marked."""
    figure = charts.figure(10, 3.2)
    names = {"probability": "probability of the best description",
             "cosine": "cosine to the best description"}  # fmt: skip
    overall = summary.confidence.filter(pl.col("category") == ALL)
    for index, metric in enumerate(names):
        axes = figure.add_subplot(1, 2, index + 1)
        charts.style(axes, "y")
        counts = summary.histogram(metric, bins=50)
        charts.histogram(axes, summary.bins[metric].edges(50), {metric: counts}, [charts.BLUE])
        median = overall.filter(pl.col("metric") == metric)["q50"][0]
        if median is not None:
            charts.mark(axes, median, f"median {median:.3g}")
        charts.axis_labels(axes, names[metric], "images")
    charts.title(figure, "Confidence of the labels, all images")
    figure.savefig(path, format="png")


def _category_ranges(
    summary: LabelSummary, categories: list[str], colours: dict[str, str], path: Path
) -> None:
    """Per category, each metric's middle half (box), 5th-95th percentiles (whisker) and
    median (tick): a box plot drawn from the histogram quantiles."""
    figure = charts.figure(10, 1.0 + 0.27 * max(len(categories), 1))
    stats = summary.confidence
    for index, metric in enumerate(("probability", "cosine")):
        axes = figure.add_subplot(1, 2, index + 1)
        charts.style(axes, "x")
        for y, category in enumerate(categories):
            row = stats.filter((pl.col("category") == category) & (pl.col("metric") == metric))
            q = row.row(0, named=True)
            if q["q50"] is None:
                continue
            axes.hlines(y, q["q05"], q["q95"], color=charts.MUTED, linewidth=1)
            axes.barh(y, q["q75"] - q["q25"], left=q["q25"], height=0.6,
                      color=colours[category], alpha=0.9)  # fmt: skip
            axes.vlines(q["q50"], y - 0.3, y + 0.3, color=charts.INK, linewidth=1.6)
        axes.set_yticks(range(len(categories)), charts.cut_all(categories))
        if index:  # the rows are the left panel's
            axes.tick_params(left=False, labelleft=False)
        axes.set_ylim(len(categories) - 0.5, -0.5)
        axes.set_xlabel(metric, color=charts.MUTED, fontsize=9)
    charts.title(figure, "Confidence per category: median, middle half, 5th to 95th percentile")
    figure.savefig(path, format="png")


# --- the page ------------------------------------------------------------------------------


def _page(
    run: LabelsRun, summary: LabelSummary, images: Path, top: list[str], tiles: dict,
    missing: dict, elapsed: float,
) -> str:  # fmt: skip
    """The whole HTML page."""
    e = html.escape
    colours = _colours(summary)
    title = f"Labels of {run.path.resolve().name}"
    sections = [
        _header(run, summary, images, title, missing),
        '<main class="wrap">',
        '<h2 id="categories">Categories</h2>',
        '<p class="note">The category of each image is the category of its best-matching '
        "description.</p>",
        *([_unlabelled(summary)] if summary.unlabelled else []),
        _chart("categories", "Most frequent categories"),
        f"<details><summary>All {len(summary.categories)} categories as a table, with their "
        "median confidence</summary>",
        _category_table(summary, colours),
        "</details>",
        '<h2 id="descriptions">Descriptions</h2>',
        _chart("descriptions", "Top descriptions"),
        '<h2 id="confidence">Confidence</h2>',
        '<p class="note"><b>Probability</b>: the best description\'s share of a softmax over '
        "every description of the taxonomy, at the model's logit scale. <b>Cosine</b>: the "
        "similarity of the image embedding and the best description's text embedding. Low "
        "values mean no description fits well.</p>",
        _chart("confidence", "Confidence, all images"),
        _chart("confidence_by_category", "Confidence per category"),
        '<h2 id="examples">Examples by category</h2>',
        f'<p class="note">A fixed random sample of up to {summary.options.examples} images '
        f"from each of the {len(top)} most frequent categories, most probable first. Hover "
        "over an image for its full caption.</p>",
    ]
    for category in top:
        row = summary.categories.filter(pl.col("category") == category).row(0, named=True)
        keys = summary.examples.filter(pl.col("category") == category)
        sections.append(
            f'<h3><span class="swatch" style="background:{colours[category]}"></span>'
            f'{e(category)}<span class="meta">{row["count"]:,} images · {row["share"]:.1%}'
            "</span></h3>"
        )
        sections.append(_grid(keys, tiles, show_category=False))
    sections += [
        '<h2 id="least">Least confident</h2>',
        f'<p class="note">The {len(summary.least_confident)} images whose best description has '
        "the lowest probability: what the taxonomy describes worst.</p>",
        _grid(summary.least_confident, tiles, show_category=True),
        _placeholders(summary, tiles),
    ]
    if missing:
        sections.append(_missing(missing))
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections.append(f"<footer>Made by vlmdata labels report on {generated} in {elapsed:.1f} s."
                    "</footer></main>")  # fmt: skip
    body = "\n".join(sections)
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
        "</body>\n</html>\n"
    )


def _header(run: LabelsRun, summary: LabelSummary, images: Path, title: str, missing: dict) -> str:
    e = html.escape
    plan = run.plan
    cards = [
        (f"{summary.rows - summary.unlabelled:,}", "images labelled"),
        *([(f"{summary.unlabelled:,}", "images without a label")] if summary.unlabelled else []),
        (f"{len(run.shards):,}", "shards"),
        (f"{len(summary.categories):,}", "categories used"),
        (_duration(run.labelling_s), "labelling time (summed over shards)"),
    ]
    weights = e(str(plan.get("pretrained", "?")))
    if plan.get("weights_sha256"):
        weights += f" (sha256 <code>{e(str(plan['weights_sha256'])[:16])}</code>)"
    facts = [
        ("model", e(str(plan.get("model", "?")))),
        ("weights", weights),
        ("taxonomy", _taxonomy(plan)),
        ("prompt templates", _templates(plan)),
        ("top-k kept", e(str(plan.get("top_k", "?")))),
        ("labels", f"<code>{e(str(run.path))}</code>"),
        ("images", f"<code>{e(str(images))}</code>"),
    ]
    nav = [("categories", "Categories"), ("descriptions", "Descriptions"),
           ("confidence", "Confidence"), ("examples", "Examples"), ("least", "Least confident"),
           ("placeholders", summary.options.placeholder_category.capitalize()),
           *([("missing", "Images not shown")] if missing else [])]  # fmt: skip
    return "\n".join([
        '<header><div class="wrap">',
        f"<h1>{e(title)}</h1>",
        '<p class="sub">Zero-shot CLIP labels: what the images of this dataset show.</p>',
        *([f'<p class="warn">The labels run is unfinished: this report covers its '
           f"{len(run.shards)} finished shards. Report again once it is done.</p>"]
          if run.partial else []),
        '<div class="cards">',
        *(f'<div class="card"><div class="n">{n}</div><div class="l">{e(label)}</div></div>'
          for n, label in cards),
        "</div>",
        '<table class="facts">',
        *(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in facts),
        "</table>",
        "<nav>" + "".join(f'<a href="#{a}">{e(t)}</a>' for a, t in nav) + "</nav>",
        "</div></header>",
    ])  # fmt: skip


def _taxonomy(plan: dict) -> str:
    digest = str(plan.get("taxonomy", ""))
    default = load_taxonomy(None)
    if digest == default.digest:
        return (f"{html.escape(default.name)} (the default: {len(default.categories)} categories, "
                f"{len(default.descriptions):,} descriptions)")  # fmt: skip
    name = plan.get("taxonomy_name")
    named = f"{html.escape(str(name))}, " if name else ""
    return f"{named}your own, sha256 <code>{html.escape(digest[:16])}</code>"


def _templates(plan: dict) -> str:
    digest = str(plan.get("templates", ""))
    default = load_templates(None)
    if digest == templates_digest(default):
        return f"the default {len(default)}, averaged per description"
    return f"your own, sha256 <code>{html.escape(digest[:16])}</code>, averaged per description"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _unlabelled(summary: LabelSummary) -> str:
    count = summary.unlabelled
    return (
        f'<p class="warn">{count:,} image{"s" if count != 1 else ""} ({count / summary.rows:.2%}) '
        "got no label: a score that is not a finite number (the embedding held NaN or "
        "infinite values) or no description. They are left out of every chart, table and "
        "example below; the shares are of all images.</p>"
    )


def _chart(name: str, alt: str) -> str:
    return f'<img class="chart" src="{CHARTS[name]}" alt="{html.escape(alt)}">'


def _category_table(summary: LabelSummary, colours: dict[str, str]) -> str:
    e = html.escape
    medians = {
        (row["category"], row["metric"]): row["q50"]
        for row in summary.confidence.iter_rows(named=True)
    }
    lines = ['<table class="numbers"><tr><th>category</th><th class="num">images</th>'
             '<th class="num">share</th><th class="num">median probability</th>'
             '<th class="num">median cosine</th></tr>']  # fmt: skip
    for row in summary.categories.iter_rows(named=True):
        name = row["category"]
        lines.append(
            f'<tr><td><span class="swatch" style="background:{colours[name]}"></span>{e(name)}'
            f'</td><td class="num">{row["count"]:,}</td><td class="num">{row["share"]:.1%}</td>'
            f'<td class="num">{_number(medians[name, "probability"])}</td>'
            f'<td class="num">{_number(medians[name, "cosine"])}</td></tr>'
        )
    lines.append("</table>")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _grid(rows: pl.DataFrame, tiles: dict, show_category: bool) -> str:
    if rows.is_empty():
        return '<p class="note">None.</p>'
    cells = [_tile(tiles[row["shard"], row["key"]], show_category)
             for row in rows.iter_rows(named=True)]  # fmt: skip
    return '<div class="grid">\n' + "\n".join(cells) + "\n</div>"


def _tile(tile: _Tile, show_category: bool) -> str:
    e = html.escape
    hover = [tile.description, f"category: {tile.category}",
             f"probability {tile.probability:.3f}, cosine {tile.cosine:.3f}",
             f"key {tile.key} (shard {tile.shard})"]  # fmt: skip
    if tile.caption:
        hover.append(f"caption: {tile.caption}")
    if tile.url:
        hover.append(tile.url)
    thumbnail = tile.thumbnail
    if thumbnail.file is not None:
        picture = f'<img src="{e(thumbnail.file)}" alt="{e(charts.cut(tile.description, 80))}">'
        if tile.url and tile.url.startswith(("http://", "https://")):
            picture = (f'<a href="{e(tile.url)}" target="_blank" rel="noopener noreferrer">'
                       f"{picture}</a>")  # fmt: skip
    else:
        picture = f'<div class="missing">image not shown:<br>{e(thumbnail.problem or "")}</div>'
    label = f"{tile.category}: {tile.description}" if show_category else tile.description
    caption = (f'<div class="caption clamp">{e(charts.cut(tile.caption, 300))}</div>'
               if tile.caption else "")  # fmt: skip
    return (
        f'<figure class="tile" title="{e(chr(10).join(hover))}">{picture}<figcaption>'
        f'<div class="label clamp">{e(label)}</div>'
        f'<div class="scores">p {tile.probability:.2f} · cos {tile.cosine:.2f}</div>'
        f"{caption}</figcaption></figure>"
    )


def _placeholders(summary: LabelSummary, tiles: dict) -> str:
    e = html.escape
    name = summary.options.placeholder_category
    count = summary.placeholder_count
    heading = f'<h2 id="placeholders">{e(name.capitalize())}</h2>'
    if not count:
        return (f'{heading}<p class="note">No image is labelled “{e(name)}”: no placeholder '
                "slipped through the encode filter (if your taxonomy names its placeholder "
                "category otherwise, pass --placeholder-category).</p>")  # fmt: skip
    shown = len(summary.placeholders)
    which = "all shown" if shown == count else f"showing the {shown} most probable"
    return (
        f'{heading}<p class="note">{count:,} images ({count / summary.rows:.2%}) are labelled '
        f"“{e(name)}”: stand-in images that slipped through the encode placeholder filter "
        f"({which}). Consider a lower --placeholder-threshold or "
        "adding them as --reference images when encoding.</p>"
        + _grid(summary.placeholders, tiles, show_category=False)
    )


def _missing(missing: dict) -> str:
    """The images the page could not show, grouped by why, a few keys each."""
    e = html.escape
    by_reason: dict[str, list[str]] = {}
    for (shard, key), why in sorted(missing.items()):
        by_reason.setdefault(why or "unknown", []).append(f"{key} (shard {shard})")
    items = [
        f"<li>{e(why)}: {len(keys)} image{'s' if len(keys) != 1 else ''}, e.g. "
        f"<code>{e(', '.join(keys[:3]))}</code></li>"
        for why, keys in sorted(by_reason.items(), key=lambda item: -len(item[1]))
    ]
    return (
        f'<h2 id="missing">Images not shown</h2><p class="note">{len(missing)} of the images '
        "this page would show could not be read from --images; is it the download or "
        "preprocess output the features were made from? Every one is listed in "
        f'<a href="{REPORT_FILE}">{REPORT_FILE}</a>.</p>'
        f'<ul class="missing-list">{"".join(items)}</ul>'
    )
