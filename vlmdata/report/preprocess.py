"""The preprocess section, and the squares part it shares with `download --resize`: how the
originals' aspect ratios fall about the pad threshold, how many were cropped or padded, and a
strip of examples of each."""

from __future__ import annotations

import numpy as np
import polars as pl

from vlmdata.pipeline.shards import SUCCESS
from vlmdata.report import charts
from vlmdata.report.outputs import SHARD, StageOutput, collect
from vlmdata.report.page import Section, chart, note, share, tiles, warn
from vlmdata.report.runs import STATUS_COLUMNS, Statuses, status_queries, throughput
from vlmdata.report.thumbnails import shard_pictures

SQUARE_COLUMNS = {"key": pl.String, "status": pl.String, "ratio": pl.Float64,
                  "action": pl.String, "original_width": pl.Int64,
                  "original_height": pl.Int64}  # fmt: skip
RATIO_BINS = 40
EXAMPLES = 8  # thumbnails per strip
_SAMPLE_SEED = 20240531  # which rows a strip shows: fixed, so reports repeat
_ACTION_COLOURS = {"crop": charts.BLUE, "pad": charts.ORANGE}


def section(output: StageOutput, quiet: bool) -> Section:
    """A preprocess output: its statuses, throughput and squares."""
    statuses = Statuses.of(*collect(output, STATUS_COLUMNS, status_queries))
    rate, rate_line = throughput(output, "image")
    threshold = output.plan.get("square", {}).get("pad_threshold")
    squares, split = squares_html(output, threshold, quiet)
    made = statuses.count(SUCCESS)
    body = "".join([
        "<h3>Statuses</h3>", statuses.html("images"), "<h3>Throughput</h3>", rate,
        "<h3>Squares</h3>", squares,
    ])  # fmt: skip
    return Section(
        kind="preprocess", path=output.path,
        headline=(f"{made:,}", f"squares of {statuses.rows:,} images "
                               f"({share(made, statuses.rows):.1%})"),
        more=tuple(x for x in (split, rate_line) if x),
        body=body,
        line=f"{statuses.rows:,} images, {made:,} squares ({split})",
    )  # fmt: skip


def _sample(frame: pl.LazyFrame) -> pl.LazyFrame:
    """A fixed pseudo-random few rows, the same however the shards are scanned."""
    order = pl.concat_str(SHARD, "key").hash(_SAMPLE_SEED).alias("order")
    return frame.with_columns(order).bottom_k(EXAMPLES, by="order").sort("order")


def square_queries(frame: pl.LazyFrame) -> list[pl.LazyFrame]:
    """Squares by (ratio bin, action) and by action; a sample of crops and one of pads."""
    made = frame.filter(pl.col("status") == SUCCESS)
    ratio_bin = (pl.col("ratio") * RATIO_BINS).floor().clip(0, RATIO_BINS - 1).cast(pl.Int32)
    return [
        made.filter(pl.col("ratio").is_not_null())
        .group_by(ratio_bin.alias("bin"), "action")
        .agg(pl.len().alias("count")),
        made.group_by("action").agg(pl.len().alias("count")),
        _sample(made.filter(pl.col("action") == "crop")),
        _sample(made.filter(pl.col("action") == "pad")),
    ]


def squares_html(output: StageOutput, threshold: float | None, quiet: bool) -> tuple[str, str]:
    """The squares part of a section, and the crop/pad split in a few words."""
    bins, actions, crops, pads = collect(output, SQUARE_COLUMNS, square_queries)
    counts = dict(actions.drop_nulls("action").iter_rows())
    total = sum(counts.values())
    split = " · ".join(f"{share(counts.get(a, 0), total):.0%} {a}" for a in ("crop", "pad"))
    if not total:
        return note("No image was squared."), split
    made = charts.figure(10, 3.1)
    axes = made.add_subplot()
    charts.style(axes, "y")
    edges = np.linspace(0, 1, RATIO_BINS + 1)
    series = {}
    for action in ("pad", "crop"):
        rows = bins.filter(pl.col("action") == action)
        series[f"{action} ({counts.get(action, 0):,})"] = np.bincount(
            rows["bin"].to_numpy(), rows["count"].to_numpy(), RATIO_BINS
        )
    charts.histogram(axes, edges, series, [_ACTION_COLOURS["pad"], _ACTION_COLOURS["crop"]],
                     stacked=True)  # fmt: skip
    axes.set_xlim(0, 1)
    if threshold is not None:
        charts.mark(axes, threshold, f"pad threshold {threshold:g}")
    charts.axis_labels(axes, "aspect ratio of the original: shorter side / longer side", "images")
    charts.title(made, "Aspect ratios: below the threshold an image is padded, above it cropped")
    wanted = [
        (r[SHARD], r["key"]) for r in (*crops.iter_rows(named=True), *pads.iter_rows(named=True))
    ]
    shown = shard_pictures(output.path, wanted, quiet)
    strips = []
    for name, action, rows in (("Cropped", "crop", crops), ("Padded", "pad", pads)):
        count = counts.get(action, 0)
        strips.append(f'<h3>{name}<span class="meta">{count:,} images · '
                      f"{share(count, total):.1%}</span></h3>{_strip(rows, shown)}")  # fmt: skip
    explain = note(
        "A square is cut from the middle of an image whose shorter side is at least the "
        "threshold times its longer side (little is lost); a narrower image is padded to a "
        "square instead, keeping all of it. Each strip is a fixed random sample of "
        f"{EXAMPLES}, from the stored squares."
    )
    warning = "" if threshold is not None else warn("The plan records no pad threshold.")
    return chart(made, "aspect ratios") + warning + explain + "".join(strips), split


def _strip(rows: pl.DataFrame, shown: dict) -> str:
    items = []
    for row in rows.iter_rows(named=True):
        picture = shown[row[SHARD], row["key"]]
        size = f"{row['original_width']}×{row['original_height']}"
        label = f"{row['ratio']:.2f} · {size}"
        hover = f"key {row['key']} (shard {row[SHARD]}), original {size}, ratio {row['ratio']:.3f}"
        items.append((picture.uri, picture.problem or label, label, hover))
    return tiles(items) if items else note("None.")
