"""What every shard stage's section shows of its run: rows by status, the error kinds behind
the failures, and throughput over time from the shards' stats markers."""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass

import numpy as np
import polars as pl

from vlmdata.report import charts
from vlmdata.report.outputs import StageOutput
from vlmdata.report.page import chart, note, numbers_table, plural, share

STATUS_COLUMNS = {"status": pl.String, "error_kind": pl.String, "error": pl.String}
_COLOURS = {"success": charts.GREEN, "failed_to_download": charts.RED,
            "failed_to_decode": charts.ORANGE, "placeholder": "#edc948",
            "filtered": "#76b7b2", "duplicate": charts.GREY}  # fmt: skip
TOP_ERRORS = 20  # error kinds in the chart and table


def colour(status: str) -> str:
    return _COLOURS.get(status, "#b07aa1")


def status_queries(frame: pl.LazyFrame) -> list[pl.LazyFrame]:
    """Rows by status; rows by (status, error kind) with one example message each."""
    return [
        frame.group_by("status").agg(pl.len().alias("count")),
        frame.filter(pl.col("error_kind").is_not_null())
        .group_by("status", "error_kind")
        .agg(pl.len().alias("count"), pl.col("error").drop_nulls().min().alias("example")),
    ]


@dataclass(frozen=True)
class Statuses:
    """Rows by status, most first, and the error kinds, most first."""

    by_status: list[tuple[str, int]]
    errors: pl.DataFrame  # status, error_kind, count, example

    @classmethod
    def of(cls, by_status: pl.DataFrame, errors: pl.DataFrame) -> Statuses:
        ordered = by_status.sort(["count", "status"], descending=[True, False])
        errors = errors.sort(["count", "error_kind"], descending=[True, False])
        return cls([(str(s), int(n)) for s, n in ordered.iter_rows()], errors)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.by_status)

    def count(self, status: str) -> int:
        return dict(self.by_status).get(status, 0)

    def html(self, what: str) -> str:
        """The statuses (chart and table), the error kinds (chart, and a table of them with an
        example message each)."""
        e = html.escape
        rows = self.rows
        names = [s for s, _ in self.by_status]
        counts = [n for _, n in self.by_status]
        by_status = chart(charts.bar_chart(
            names, counts, [share(n, rows) for n in counts], [colour(s) for s in names],
            [""] * len(names), f"{rows:,} {what} by status", width=6.4,
        ), "rows by status")  # fmt: skip
        table = numbers_table(
            ["status", "#rows", "#share"],
            [*([f'<span class="swatch" style="background:{colour(s)}"></span>{e(s)}', n,
                f"{share(n, rows):.1%}"] for s, n in self.by_status),
             ["<b>all</b>", rows, "100%"]],
        )  # fmt: skip
        parts = [f'<div class="row"><div>{by_status}</div><div class="aside">{table}</div></div>']
        if self.errors.is_empty():
            return "".join(parts) + note("No errors.")
        top = self.errors.head(TOP_ERRORS)
        parts.append(chart(charts.bar_chart(
            charts.cut_all(top["error_kind"].to_list()), top["count"].to_list(),
            [share(n, rows) for n in top["count"]], [colour(s) for s in top["status"]],
            [""] * len(top), f"Why rows failed: error kinds (of {len(self.errors)})",
        ), "error kinds"))  # fmt: skip
        table = numbers_table(
            ["error kind", "status", "#rows", "#share", "an example message"],
            ([f"<code>{e(kind)}</code>", e(status), n, f"{share(n, rows):.1%}",
              f'<span class="text">{e(charts.cut(example or "", 160))}</span>']
             for status, kind, n, example in top.iter_rows()),
        )  # fmt: skip
        parts.append(f"<details><summary>Error kinds as a table, with an example message each"
                     f"</summary>{table}</details>")  # fmt: skip
        return "".join(parts)


def throughput(output: StageOutput, unit: str) -> tuple[str, str | None]:
    """The throughput chart (per shard, from its stats marker) and the overall rate's line."""
    shards = []
    for stats in output.done.values():
        try:
            finished = dt.datetime.fromisoformat(stats["finished_at"]).timestamp()
            duration = float(stats["duration_s"])
            rows, images = int(stats["rows"]), int(stats["status"].get("success", 0))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # a marker without times (another tool's): it is left out of the chart
        shards.append((finished - duration, finished, duration, rows, images))
    if not shards:
        return note("No shard records when it ran: no throughput to show."), None
    shards.sort(key=lambda s: s[1])
    start = min(s[0] for s in shards)
    span = max(shards[-1][1] - start, 1e-9)
    images = sum(s[4] for s in shards)
    scale, label = (1, "seconds") if span < 120 else (60, "minutes") if span < 7200 else (
        3600, "hours")  # fmt: skip
    made = charts.figure(10, 3.0)
    done_axes, rate_axes = made.add_subplot(1, 2, 1), made.add_subplot(1, 2, 2)
    for axes in (done_axes, rate_axes):
        charts.style(axes, "y")
    finishes = np.array([(s[1] - start) / scale for s in shards])
    done_axes.step([0, *finishes], [0, *np.cumsum([s[4] for s in shards])], where="post",
                   color=charts.BLUE, linewidth=1.6)  # fmt: skip
    done_axes.set_xlim(left=0)
    done_axes.set_ylim(bottom=0)
    charts.count_axis(done_axes)
    charts.axis_labels(done_axes, f"{label} since the first shard began", f"{unit}s stored")
    rates = [s[3] / s[2] if s[2] > 0 else 0.0 for s in shards]
    rate_axes.plot(finishes, rates, "o", color=charts.ORANGE, markersize=4)
    rate_axes.axhline(float(np.median(rates)), color=charts.INK, linewidth=1, linestyle="--")
    rate_axes.set_ylim(bottom=0)
    charts.axis_labels(rate_axes, f"{label} (when the shard finished)", "rows/s of the shard")
    charts.title(
        made, f"Throughput over time, per shard ({plural(len(shards), 'shard')}; dashed: median)"
    )
    line = f"{images / span:,.1f} {unit}s/s overall"
    text = note(
        f"Per shard, from its stats marker: left, the {unit}s stored as shards finished; right, "
        "each shard's rows over its own duration (shards run side by side, so these do not add "
        f"up to the run's rate). Overall: {images:,} {unit}s in {_duration(span)} from the first "
        f"shard's start to the last one's end, {line} (a resumed run counts the pause too)."
    )
    return chart(made, "throughput per shard") + text, line


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"
