"""The numbers behind `vlmdata labels report`: polars aggregations over a labels output.

The label parquets are scanned lazily, :data:`CHUNK_SHARDS` shards at a time, and each chunk is
reduced to small tables that merge across chunks: counts per description (and so per
category), fine histograms of probability and cosine per category, and the few rows the page
shows (a sample per category, the least confident rows, the placeholders). Memory follows the
chunk and the page, never the dataset. Quantiles are read off the histograms, exact to one bin
(a :data:`FINE_BINS`-th of the range the values span).

A row without a usable label (no description, or a score that is not a finite number: the
labels of a NaN embedding) is counted apart, as unlabelled, and left out of everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError, one_line
from vlmdata.labels import PLACEHOLDER_CATEGORY
from vlmdata.pipeline.runner import ROOT_STATS
from vlmdata.pipeline.shards import (
    PLAN,
    STAGE_DATA_FILES,
    ShardFiles,
    read_state_json,
    stage_of,
)
from vlmdata.pipeline.upstream import finished_shards

CHUNK_SHARDS = 16  # label shards per lazy scan: 160k rows at the default --shard-size
FINE_BINS = 2000  # histogram bins over each metric's range; quantiles are exact to one bin
METRICS = ("probability", "cosine")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ALL = "all images"  # the category name of the overall rows of :attr:`LabelSummary.confidence`
LABEL_FILES = STAGE_DATA_FILES["labels"]
# The columns read, as the types read: a parquet rewritten by another tool (float64 scores,
# say) still scans together with the rest.
_COLUMNS = {"key": pl.String, "description": pl.String, "category": pl.String,
            "probability": pl.Float64, "cosine": pl.Float64}  # fmt: skip
_RECORD_SCHEMA = {"shard": pl.String, "key": pl.String, "url": pl.String, "caption": pl.String}
_SAMPLE_SEED = 20240531  # which rows a category's sample holds: fixed, so reports repeat


@dataclass(frozen=True)
class LabelsRun:
    """A `vlmdata labels classify` output: its finished shards."""

    path: Path
    plan: dict
    shards: tuple[str, ...]  # the finished ones, in order
    labelling_s: float | None  # their durations summed (None: a marker records none)
    partial: bool  # an unfinished run: only its finished shards

    def parquet(self, shard: str) -> Path:
        return ShardFiles(self.path, shard).parquet


def open_labels(path: Path, allow_incomplete: bool = False) -> LabelsRun:
    """The labels output at ``path``; anything else is a UserError, and so is an unfinished
    run unless ``allow_incomplete`` (its finished shards are then read)."""
    if not (path / PLAN).is_file():
        raise UserError(
            f"LABELS_DIR {path} is not a vlmdata labels output (no {PLAN}); pass the output "
            "directory of `vlmdata labels classify`"
        )
    stage = stage_of(path)
    if stage != "labels":
        raise UserError(
            f"LABELS_DIR {path} holds a {stage} output, not labels; pass the output directory "
            "of `vlmdata labels classify`"
        )
    done, complete = finished_shards(path, LABEL_FILES)
    if not complete and not allow_incomplete:
        raise UserError(
            f"LABELS_DIR {path} is an unfinished labels run ({len(done)} shards done so far); "
            "finish it by rerunning the same `vlmdata labels classify` command, or pass "
            "--allow-incomplete to report on the finished shards now"
        )
    # A complete run's own shards (a stray finished marker is not one of them).
    shards = tuple(read_state_json(path / ROOT_STATS)["shard_names"]) if complete else tuple(done)
    if not shards:
        raise UserError(f"LABELS_DIR {path} has no finished shard yet; rerun once one is done")
    return LabelsRun(
        path=path,
        plan=read_state_json(path / PLAN),
        shards=shards,
        labelling_s=_total_duration(done[name] for name in shards),
        partial=not complete,
    )


def _total_duration(markers: Iterable[dict]) -> float | None:
    """The shards' ``duration_s`` summed; None if a marker holds no such number (edited by
    hand, or written by another tool): the time is only shown, a guess would mislead."""
    total = 0.0
    for stats in markers:
        seconds = stats.get("duration_s")
        number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if not (number and 0 <= seconds < float("inf")):
            return None
        total += seconds
    return total


@dataclass(frozen=True)
class SummaryOptions:
    """How many rows of each kind the page shows."""

    examples: int = 12  # sampled rows per category
    least_confident: int = 24
    placeholders: int = 48
    placeholder_category: str = PLACEHOLDER_CATEGORY


@dataclass(frozen=True)
class Bins:
    """:data:`FINE_BINS` equal bins over ``[low, high]``."""

    low: float
    high: float

    @property
    def width(self) -> float:
        return (self.high - self.low) / FINE_BINS

    def of(self, column: str) -> pl.Expr:
        """The bin of each value of ``column`` (values outside clamp to the end bins)."""
        position = ((pl.col(column).cast(pl.Float64) - self.low) / self.width).floor()
        return position.clip(0, FINE_BINS - 1).cast(pl.Int32)

    def edges(self, bins: int) -> np.ndarray:
        return np.linspace(self.low, self.high, bins + 1)


@dataclass
class LabelSummary:
    """What a labels output holds, as small polars tables."""

    rows: int  # every row, unlabelled ones included: the shares are of these
    unlabelled: int  # rows without a usable label, left out of every table below
    categories: pl.DataFrame  # category, count, share: most frequent first
    descriptions: pl.DataFrame  # description, category, count, share: most frequent first
    # category (ALL for every row), metric, count, then q05 ... q95 (see QUANTILES)
    confidence: pl.DataFrame
    histograms: pl.DataFrame  # category, metric, bin (of FINE_BINS), count
    bins: dict[str, Bins]  # per metric
    examples: pl.DataFrame  # shard, key, ... : a sample of up to ``examples`` per category
    least_confident: pl.DataFrame  # the rows of lowest probability, lowest first
    placeholders: pl.DataFrame  # rows in the placeholder category, most probable first
    options: SummaryOptions

    def histogram(self, metric: str, category: str | None = None, bins: int = 50) -> np.ndarray:
        """Counts of ``metric`` in ``bins`` equal bins over its range (a divisor of FINE_BINS),
        for one category or every row."""
        return _fine_counts(self.histograms, metric, category).reshape(bins, -1).sum(axis=1)

    @property
    def placeholder_count(self) -> int:
        row = self.categories.filter(pl.col("category") == self.options.placeholder_category)
        return int(row["count"][0]) if len(row) else 0


def summarize(run: LabelsRun, options: SummaryOptions = SummaryOptions()) -> LabelSummary:
    """Two lazy passes over the labels of ``run``: the range of each metric, then the rest."""
    bins = _ranges(run)

    def queries(frame: pl.LazyFrame) -> list[pl.LazyFrame]:
        labelled = frame.filter(_labelled())
        sample_order = pl.concat_str("shard", "key").hash(_SAMPLE_SEED)
        return [
            frame.select((~_labelled()).sum().alias("count")),
            labelled.group_by("category", "description").agg(pl.len().alias("count")),
            pl.concat(
                labelled.group_by("category", bins[metric].of(metric).alias("bin"))
                .agg(pl.len().alias("count"))
                .select("category", pl.lit(metric).alias("metric"), "bin", "count")
                for metric in METRICS
            ),
            _sample(labelled.with_columns(sample_order.alias("order")), options.examples),
            labelled.sort("probability", "shard", "key").head(options.least_confident),
            _most_probable(
                labelled.filter(pl.col("category") == options.placeholder_category),
                options.placeholders,
            ),
        ]

    unlabelled = 0
    counts = histograms = examples = least = placeholders = None
    for names in _chunks(run):
        new = _collect(run, names, queries)
        unlabelled += int(new[0]["count"][0])
        counts = _merge_counts(counts, new[1], ["category", "description"])
        histograms = _merge_counts(histograms, new[2], ["category", "metric", "bin"])
        examples = _sample(_concat(examples, new[3]).lazy(), options.examples).collect()
        least = _concat(least, new[4]).sort("probability", "shard", "key")
        least = least.head(options.least_confident)
        placeholders = _most_probable(_concat(placeholders, new[5]).lazy(), options.placeholders)
        placeholders = placeholders.collect()
    rows = int(counts["count"].sum()) + unlabelled
    descriptions = _with_share(counts.sort(["count", "description"], descending=[True, False]),
                               rows)  # fmt: skip
    categories = counts.group_by("category").agg(pl.col("count").sum())
    categories = _with_share(categories.sort(["count", "category"], descending=[True, False]),
                             rows)  # fmt: skip
    return LabelSummary(
        rows=rows,
        unlabelled=unlabelled,
        categories=categories,
        descriptions=descriptions,
        confidence=_confidence(histograms, bins, categories["category"].to_list()),
        histograms=histograms,
        bins=bins,
        examples=examples.drop("order").sort(["category", "probability"], descending=[False, True]),
        least_confident=least,
        placeholders=placeholders,
        options=options,
    )


def _labelled() -> pl.Expr:
    """True for a row with a label to show: a description and category, finite scores."""
    scored = pl.all_horizontal(pl.col(metric).is_finite() for metric in METRICS)
    named = pl.col("description").is_not_null() & pl.col("category").is_not_null()
    return (named & scored).fill_null(False)


def _chunks(run: LabelsRun) -> Iterator[tuple[str, ...]]:
    """The shards of ``run``, :data:`CHUNK_SHARDS` at a time."""
    for start in range(0, len(run.shards), CHUNK_SHARDS):
        yield run.shards[start : start + CHUNK_SHARDS]


def _scan(run: LabelsRun, names: Sequence[str]) -> pl.LazyFrame:
    """The labels of the shards ``names`` as one lazy frame, with a ``shard`` column (the name
    of the label shard, which is the name of its image shard)."""
    return pl.concat(
        pl.scan_parquet(run.parquet(name), glob=False).select(list(_COLUMNS)).cast(_COLUMNS)
        .with_columns(pl.lit(name).alias("shard"))
        for name in names
    )  # fmt: skip


def _collect(
    run: LabelsRun, names: Sequence[str], queries: Callable[[pl.LazyFrame], list[pl.LazyFrame]]
) -> list[pl.DataFrame]:
    """The results of ``queries`` over the shards ``names``. When they fail, the shard that
    fails alone is a UserError naming its parquet (damaged, or not labels as classify writes
    them); a failure no shard has alone is not the data's: it is raised as it came."""
    try:
        return pl.collect_all(queries(_scan(run, names)))
    except (pl.exceptions.PolarsError, OSError) as e:
        error = e
    for name in names:
        try:
            pq.read_table(run.parquet(name), columns=list(_COLUMNS))
            pl.collect_all(queries(_scan(run, [name])))
        except (pa.ArrowException, OSError, pl.exceptions.PolarsError) as e:
            raise UserError(
                f"{run.parquet(name)} is damaged ({one_line(e, 160)}); delete {name}.stats.json "
                "beside it and rerun `vlmdata labels classify` to label it again"
            ) from None
    raise error


def _ranges(run: LabelsRun) -> dict[str, Bins]:
    """The bins of each metric: over the range its labelled values span (all equal: a tiny
    range)."""
    low = {metric: np.inf for metric in METRICS}
    high = {metric: -np.inf for metric in METRICS}

    def extremes(frame: pl.LazyFrame) -> list[pl.LazyFrame]:
        return [frame.filter(_labelled()).select(
            *(pl.col(m).min().alias(f"{m}_min") for m in METRICS),
            *(pl.col(m).max().alias(f"{m}_max") for m in METRICS),
        )]  # fmt: skip

    for names in _chunks(run):
        found = _collect(run, names, extremes)[0].row(0, named=True)
        for metric in METRICS:
            if found[f"{metric}_min"] is not None:
                low[metric] = min(low[metric], found[f"{metric}_min"])
                high[metric] = max(high[metric], found[f"{metric}_max"])
    bins = {}
    for metric in METRICS:
        lo, hi = (low[metric], high[metric]) if np.isfinite(low[metric]) else (0.0, 1.0)
        bins[metric] = Bins(float(lo), float(max(hi, lo + 1e-6)))
    return bins


def _sample(frame: pl.LazyFrame, size: int) -> pl.LazyFrame:
    """The ``size`` rows of lowest ``order`` in each category: a fixed pseudo-random sample
    that is the same whether taken at once or chunk by chunk."""
    return frame.sort("category", "order").group_by("category", maintain_order=True).head(size)


def _most_probable(frame: pl.LazyFrame, size: int) -> pl.LazyFrame:
    return frame.sort(["probability", "shard", "key"], descending=[True, False, False]).head(size)


def _concat(merged: pl.DataFrame | None, new: pl.DataFrame) -> pl.DataFrame:
    return new if merged is None else pl.concat([merged, new])


def _merge_counts(merged: pl.DataFrame | None, new: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return _concat(merged, new).group_by(by).agg(pl.col("count").sum())


def _with_share(counts: pl.DataFrame, rows: int) -> pl.DataFrame:
    return counts.with_columns((pl.col("count") / max(rows, 1)).alias("share"))


def _confidence(
    histograms: pl.DataFrame, bins: dict[str, Bins], categories: list[str]
) -> pl.DataFrame:
    """Quantiles of each metric, for every row and per category (most frequent first)."""
    records = []
    for category in [ALL, *categories]:
        for metric in METRICS:
            fine = _fine_counts(histograms, metric, None if category == ALL else category)
            values = quantiles_of_histogram(fine, bins[metric], QUANTILES)
            quantiles = dict(zip(map(_q, QUANTILES), values, strict=True))
            records.append({"category": category, "metric": metric, "count": int(fine.sum()),
                            **quantiles})  # fmt: skip
    schema = {"category": pl.String, "metric": pl.String, "count": pl.Int64,
              **{_q(q): pl.Float64 for q in QUANTILES}}  # fmt: skip
    return pl.DataFrame(records, schema=schema)


def _fine_counts(histograms: pl.DataFrame, metric: str, category: str | None) -> np.ndarray:
    """The :data:`FINE_BINS` counts of ``metric``, for one category or (None) every row."""
    rows = histograms.filter(pl.col("metric") == metric)
    if category is not None:
        rows = rows.filter(pl.col("category") == category)
    fine = np.zeros(FINE_BINS, dtype=np.int64)
    np.add.at(fine, rows["bin"].to_numpy(), rows["count"].to_numpy())
    return fine


def _q(quantile: float) -> str:
    """The column of a quantile: q05, q50, ..."""
    return f"q{round(quantile * 100):02d}"


def quantiles_of_histogram(counts: np.ndarray, bins: Bins, quantiles: Sequence[float]) -> list:
    """The values below which ``quantiles`` of the counted rows fall, interpolated linearly
    inside the bin where each is reached (None for no rows)."""
    total = counts.sum()
    if total == 0:
        return [None] * len(quantiles)
    cumulative = np.cumsum(counts)
    values = []
    for quantile in quantiles:
        target = quantile * total
        index = int(np.searchsorted(cumulative, target, side="left"))
        before = cumulative[index - 1] if index else 0
        inside = (target - before) / counts[index] if counts[index] else 0.0
        values.append(bins.low + (index + inside) * bins.width)
    return values


def image_records(images_dir: Path, rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (shard, key, ...) joined by key to the image shards' parquets for ``url`` and
    ``caption`` (null where a shard has no parquet, no such column, or no such key). Only the
    shards ``rows`` come from are read, only the rows of its keys kept."""
    found = []
    for (shard,), wanted in rows.group_by("shard"):
        parquet = images_dir / f"{shard}.parquet"
        try:
            columns = [c for c in ("key", "url", "caption") if c in pq.read_schema(parquet).names]
            if "key" not in columns:
                continue
            found.append(
                pl.scan_parquet(parquet, glob=False).select(columns)
                .filter(pl.col("key").is_in(wanted["key"].to_list()))
                .unique("key", keep="first")
                .with_columns(pl.lit(shard).alias("shard"))
                .collect()
                .pipe(_record_columns)
            )  # fmt: skip
        except (OSError, pl.exceptions.PolarsError, ValueError):
            continue  # no parquet (or not a readable one): the tar's captions stand in
    table = pl.concat(found) if found else pl.DataFrame(schema=_RECORD_SCHEMA)
    return rows.join(table, on=["shard", "key"], how="left")


def _record_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with exactly the columns of :data:`_RECORD_SCHEMA`, missing ones null."""
    return frame.select(
        pl.col(name).cast(kind) if name in frame.columns else pl.lit(None, kind).alias(name)
        for name, kind in _RECORD_SCHEMA.items()
    )
