"""The encode section: what was encoded with which model, what the placeholder filter left out,
and the images on either side of its threshold, so the threshold can be judged by eye."""

from __future__ import annotations

import html

import numpy as np
import polars as pl

from vlmdata.pipeline.shards import PLACEHOLDER, SUCCESS
from vlmdata.report import charts
from vlmdata.report.outputs import SHARD, StageOutput, collect, find_upstream
from vlmdata.report.page import Section, chart, note, share, tiles, warn
from vlmdata.report.runs import STATUS_COLUMNS, Statuses, status_queries, throughput
from vlmdata.report.thumbnails import Picture, file_pictures, shard_pictures

COLUMNS = {**STATUS_COLUMNS, "key": pl.String, "url": pl.String, "caption": pl.String,
           "placeholder_similarity": pl.Float64, "source": pl.String}  # fmt: skip
NEAREST = 8  # thumbnails on each side of the threshold
FINE_BINS = 400  # over [-1, 1]: cosine similarities; merged for the chart
MAX_BARS = 60
_SIMILARITY = "placeholder_similarity"


def section(output: StageOutput, quiet: bool) -> Section:
    plan = output.plan
    threshold = plan.get("placeholder_threshold")
    by_status, errors, bins, filtered, kept = collect(
        output, COLUMNS, lambda frame: _queries(frame, threshold)
    )
    statuses = Statuses.of(by_status, errors)
    rows, encoded, dropped = statuses.rows, statuses.count(SUCCESS), statuses.count(PLACEHOLDER)
    rate, rate_line = throughput(output, "image")
    parts = [_facts(plan), "<h3>Statuses</h3>", statuses.html("images"),
             "<h3>Placeholder filter</h3>"]  # fmt: skip
    if threshold is None:
        parts.append(note("The placeholder filter was off (--no-placeholder-filter): every image "
                          "that decoded was encoded."))  # fmt: skip
    elif bins.is_empty():
        parts.append(note(f"No image was scored against the placeholders (threshold "
                          f"{threshold:g}): none decoded."))  # fmt: skip
    else:
        parts += [_histogram(bins, threshold, dropped),
                  _nearest(output, filtered, kept, threshold, quiet)]  # fmt: skip
    parts += ["<h3>Throughput</h3>", rate]
    filter_line = (f"{dropped:,} placeholders (≥ {threshold:g})" if threshold is not None
                   else "no placeholder filter")  # fmt: skip
    return Section(
        kind="encode", path=output.path,
        headline=(f"{encoded:,}", f"images encoded of {rows:,} ({share(encoded, rows):.1%})"),
        more=tuple(x for x in (filter_line, f"{plan.get('model')} · {plan.get('tokens')} tokens",
                               rate_line) if x),
        body="".join(parts),
        line=f"{rows:,} images, {encoded:,} encoded, {filter_line}",
    )  # fmt: skip


def _queries(frame: pl.LazyFrame, threshold: float | None) -> list[pl.LazyFrame]:
    """Statuses; similarities by (fine bin, status); the filtered images nearest the
    threshold, and the kept ones just below it."""
    scored = frame.filter(pl.col(_SIMILARITY).is_not_null() & pl.col(_SIMILARITY).is_not_nan())
    fine = ((pl.col(_SIMILARITY) + 1) / 2 * FINE_BINS).floor().clip(0, FINE_BINS - 1)
    below = pl.col(_SIMILARITY) < (threshold if threshold is not None else np.inf)
    return [
        *status_queries(frame),
        scored.group_by(fine.cast(pl.Int32).alias("bin"), "status").agg(pl.len().alias("count")),
        scored.filter(pl.col("status") == PLACEHOLDER).bottom_k(
            NEAREST, by=[_SIMILARITY, SHARD, "key"]
        ),
        scored.filter((pl.col("status") == SUCCESS) & below).top_k(
            NEAREST, by=[_SIMILARITY, SHARD, "key"]
        ),
    ]


def _facts(plan: dict) -> str:
    e = html.escape
    weights = str(plan.get("pretrained"))
    if plan.get("weights_sha256"):
        weights += f" (sha256 {str(plan['weights_sha256'])[:16]})"
    facts = [("model", plan.get("model")), ("weights", weights),
             ("features", f"{plan.get('tokens')} tokens ({plan.get('token_grid')}² grid) of "
                          f"layer {plan.get('layer_requested')}, width {plan.get('width')}; "
                          f"embedding {plan.get('embed_dim')}"),
             ("input", f"{plan.get('image_size')} px squares, pad below ratio "
                       f"{plan.get('pad_threshold')}; {plan.get('precision')}")]  # fmt: skip
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _histogram(bins: pl.DataFrame, threshold: float, dropped: int) -> str:
    """The similarities, kept and filtered stacked, over the range they span."""
    present = bins["bin"]
    edge = int((threshold + 1) / 2 * FINE_BINS)
    low = max(0, min(int(present.min()), edge) - 2)
    high = min(FINE_BINS, max(int(present.max()) + 1, edge + 1) + 2)
    merge = max(1, -(-(high - low) // MAX_BARS))
    starts = np.arange(low, high, merge)  # the last bar may hold fewer fine bins
    series = {}
    for status, name in ((SUCCESS, "kept"), (PLACEHOLDER, "filtered as placeholders")):
        rows = bins.filter(pl.col("status") == status)
        fine = np.bincount(rows["bin"].to_numpy(), rows["count"].to_numpy(), FINE_BINS)
        series[f"{name} ({int(fine.sum()):,})"] = np.add.reduceat(fine[low:high], starts - low)
    edges = np.append(starts, high) / FINE_BINS * 2 - 1
    made = charts.figure(10, 3.1)
    axes = made.add_subplot()
    charts.style(axes, "y")
    charts.histogram(axes, edges, series, [charts.BLUE, "#edc948"], stacked=True)
    axes.set_xlim(edges[0], edges[-1])
    charts.mark(axes, threshold, f"threshold {threshold:g}")
    charts.axis_labels(axes, "cosine similarity to the nearest placeholder reference", "images")
    charts.title(made, "Similarity to placeholder images: at or above the threshold, left out")
    return chart(made, "placeholder similarity") + note(
        f"{dropped:,} images scored at or above --placeholder-threshold {threshold:g} and are "
        "not in the HDF5 shards (their rows stay in the parquets with their similarity)."
    )


def _nearest(
    output: StageOutput, filtered: pl.DataFrame, kept: pl.DataFrame, threshold: float,
    quiet: bool,
) -> str:  # fmt: skip
    """The images either side of the threshold, from the image shards the encode read."""
    shown, missing = _pictures(output, pl.concat([filtered, kept]), quiet)
    # One digit more than the threshold has: 0.99995 against 0.9999 must not read 1.000.
    digits = max(3, len(f"{threshold:g}".partition(".")[2]) + 1)
    parts = [] if missing is None else [warn(missing)]
    for title, order, rows, empty in (
        ("Filtered, nearest the threshold", "lowest similarity first", filtered,
         "No image was filtered."),
        ("Kept, just below the threshold", "highest similarity first", kept,
         "No kept image scored below the threshold."),
    ):  # fmt: skip
        parts.append(f'<h3>{title}<span class="meta">{order}</span></h3>')
        items = []
        for row in rows.iter_rows(named=True):
            picture = shown[row[SHARD], row["key"]]
            label = f"{row[_SIMILARITY]:.{digits}f} · {row['key']}"
            hover = "\n".join(x for x in (f"key {row['key']} (shard {row[SHARD]})",
                                          f"similarity {row[_SIMILARITY]:.{digits + 1}f}",
                                          row["caption"], row["url"]) if x)  # fmt: skip
            items.append((picture.uri, picture.problem or label, label, hover))
        parts.append(tiles(items) if items else note(empty))
    return "".join(parts)


def _pictures(
    output: StageOutput, rows: pl.DataFrame, quiet: bool
) -> tuple[dict[tuple[str, str], Picture], str | None]:
    """The thumbnails of ``rows`` from the encode's input, and why there are none if so."""
    wanted = [(r[SHARD], r["key"]) for r in rows.iter_rows(named=True)]
    fingerprint = output.plan.get("input")
    images = find_upstream(output.path, fingerprint)
    if images is not None:
        return shard_pictures(images, wanted, quiet), None
    if isinstance(fingerprint, dict) and "images" in fingerprint:  # a plain image folder
        sources = {(r[SHARD], r["key"]): r["source"] for r in rows.iter_rows(named=True)}
        return file_pictures(sources, quiet), None
    stage = fingerprint.get("upstream") if isinstance(fingerprint, dict) else None
    why = (
        f"The image shards this encode read (a {html.escape(str(stage))} output) are "
        "neither where its vlmdata.toml says nor beside it, so its images cannot be shown."
        if stage
        else "This encode's input is not recorded, so its images cannot be shown."
    )
    return {w: Picture(None, "input not found") for w in wanted}, why
