"""The download section: what became of the URLs (statuses, error kinds, the hosts that fail
most), throughput over time, the sizes of what was stored, and with ``--resize`` the squares."""

from __future__ import annotations

import html
from collections.abc import Callable

import numpy as np
import polars as pl

from vlmdata.pipeline.shards import SUCCESS
from vlmdata.report import charts
from vlmdata.report.outputs import StageOutput, collect, log_bin
from vlmdata.report.page import Section, chart, note, numbers_table, share
from vlmdata.report.preprocess import squares_html
from vlmdata.report.runs import STATUS_COLUMNS, Statuses, status_queries, throughput

COLUMNS = {**STATUS_COLUMNS, "url": pl.String, "bytes": pl.Int64,
           "original_width": pl.Int64, "original_height": pl.Int64}  # fmt: skip
TOP_HOSTS = 15
PER_DOUBLING = 4  # histogram bins from each power of two to the next
# The host of a URL: after the scheme and any user:password@, up to a port, path, query or
# fragment; an IPv6 literal keeps its brackets.
_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]*)"


def section(output: StageOutput, quiet: bool) -> Section:
    by_status, errors, hosts, sizes, widths, heights = collect(output, COLUMNS, _queries)
    statuses = Statuses.of(by_status, errors)
    rows, stored = statuses.rows, statuses.count(SUCCESS)
    rate, rate_line = throughput(output, "image")
    stored_bytes = int(output.totals().get("bytes", 0))
    parts = [
        "<h3>Statuses</h3>", statuses.html("URLs"),
        "<h3>Hosts that fail most</h3>", _hosts(hosts),
        "<h3>Throughput</h3>", rate,
        "<h3>What was stored</h3>", _sizes(sizes, widths, heights, stored, stored_bytes),
    ]  # fmt: skip
    resize = output.plan.get("resize")
    split = None
    if isinstance(resize, dict):
        squares, split = squares_html(output, resize.get("pad_threshold"), quiet)
        parts += [f"<h3>Squares (--resize {html.escape(str(resize.get('size')))})</h3>", squares]
    failed = rows - stored
    return Section(
        kind="download", path=output.path,
        headline=(f"{stored:,}", f"images of {rows:,} URLs ({share(stored, rows):.1%})"),
        more=tuple(x for x in (f"{failed:,} failed", _size(stored_bytes) + " stored", rate_line,
                               split) if x),
        body="".join(parts),
        line=f"{rows:,} URLs, {stored:,} images ({share(stored, rows):.1%}), "
             f"{_size(stored_bytes)}",
    )  # fmt: skip


def _queries(frame: pl.LazyFrame) -> list[pl.LazyFrame]:
    host = pl.col("url").str.extract(_HOST, 1).str.to_lowercase().fill_null("(none)")
    stored = frame.filter(pl.col("status") == SUCCESS)
    return [
        *status_queries(frame),
        frame.group_by(host.alias("host"))
        .agg(pl.len().alias("urls"), (pl.col("status") != SUCCESS).sum().alias("failed"))
        .filter(pl.col("failed") > 0)
        .top_k(TOP_HOSTS, by=["failed", "urls"]),
        *(stored.filter(pl.col(c) > 0).group_by(log_bin(c, PER_DOUBLING).alias("bin"))
          .agg(pl.len().alias("count"))
          for c in ("bytes", "original_width", "original_height")),
    ]  # fmt: skip


def _hosts(hosts: pl.DataFrame) -> str:
    if hosts.is_empty():
        return note("No URL failed.")
    hosts = hosts.sort(["failed", "urls", "host"], descending=[True, True, False])
    e = html.escape
    table = numbers_table(
        ["host", "#failed", "#of URLs", "#failing"],
        ([f"<code>{e(h)}</code>", f, n, f"{share(f, n):.0%}"] for h, n, f in
         hosts.select("host", "urls", "failed").iter_rows()),
    )  # fmt: skip
    which = f"The {len(hosts)} hosts" if len(hosts) > 1 else "The host"
    return note(f"{which} with the most failed URLs (the host is read from each URL).") + table


def _sizes(
    sizes: pl.DataFrame, widths: pl.DataFrame, heights: pl.DataFrame, stored: int, total: int
) -> str:
    if not stored:
        return note("No image was stored.")
    made = charts.figure(10, 3.0)
    size_axes, side_axes = made.add_subplot(1, 2, 1), made.add_subplot(1, 2, 2)
    _log_histogram(size_axes, {"bytes": sizes}, [charts.BLUE], _size)
    charts.axis_labels(size_axes, "bytes stored per image", "images")
    _log_histogram(side_axes, {"width": widths, "height": heights}, [charts.BLUE, charts.ORANGE],
                   lambda pixels: f"{pixels:g}")  # fmt: skip
    charts.axis_labels(side_axes, "side in pixels (of the original)", "images")
    charts.title(made, "Sizes of the stored images (log scale)")
    return chart(made, "image sizes") + note(
        f"{stored:,} images, {_size(total)} stored, {_size(total / stored)} each on average."
    )


def _log_histogram(
    axes, series: dict[str, pl.DataFrame], colours: list[str], label: Callable[[float], str]
) -> None:
    """Histograms of :func:`log_bin` counts on a log x axis, over the bins any series spans."""
    charts.style(axes, "y")
    present = pl.concat([frame["bin"] for frame in series.values()])
    if present.is_empty():
        return
    low, high = int(present.min()), int(present.max())
    edges = 2.0 ** (np.arange(low, high + 2) / PER_DOUBLING)
    counts = {}
    for name, frame in series.items():
        counts[name] = np.bincount(frame["bin"].to_numpy() - low, frame["count"].to_numpy(),
                                   high - low + 1)  # fmt: skip
    charts.histogram(axes, edges, counts, colours)
    charts.log_x(axes, label)


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} bytes"
