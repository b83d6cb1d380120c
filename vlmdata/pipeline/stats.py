"""Run statistics: the live progress bar, the early failure warning, totals across shards and
the summary printed at the end of a run."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from vlmdata.pipeline.shards import SUCCESS

EARLY_WARNING_ROWS = 1000  # judge the failure rate once this many rows are done
EARLY_WARNING_FAILURE_RATE = 0.5
# What to try when one error kind dominates the first rows.
_HINTS = {
    "private_address": "pass --allow-private-network if those hosts are yours",
    "invalid_url": "check that --url-col names the URL column",
    "timeout": "raise --timeout or lower --concurrency",
    "dns": "check this machine's DNS and network",
    "dns_temporary": "this machine's DNS servers are not answering: check them, or lower "
    "--concurrency",
    "connection": "check this machine's network, or lower --concurrency",
    "http_429": "lower --per-host: servers are throttling",
    "opted_out": "the sources opt out of AI use (--ignore-noai overrides)",
}


def merge_stats(shard_stats: list[dict]) -> dict:
    """Totals over shard stats: numbers add up, count tables merge, histograms add binwise."""
    totals: dict = {"shards": len(shard_stats)}
    for stats in shard_stats:
        for key, value in stats.items():
            if key in ("shard", "finished_at", "duration_s", "input", "sizes"):
                continue
            if isinstance(value, dict):
                totals[key] = dict(Counter(totals.get(key, {})) + Counter(value))
            elif isinstance(value, list):
                previous = totals.get(key, [0] * len(value))
                totals[key] = [a + b for a, b in zip(previous, value, strict=True)]
            else:
                totals[key] = totals.get(key, 0) + value
    for key in ("status", "error_kind", "action"):  # most common first
        if key in totals:
            totals[key] = dict(sorted(totals[key].items(), key=lambda item: -item[1]))
    totals.setdefault("rows", 0)
    totals.setdefault("status", {})
    totals.setdefault("error_kind", {})
    return totals


class RunProgress:
    """Counts rows as they finish, drives the tqdm bar and warns early when most fail."""

    def __init__(self, total: int | None, quiet: bool, unit: str = "url") -> None:
        self.bar = tqdm(
            total=total, unit=unit, disable=quiet, dynamic_ncols=True, smoothing=0.1,
            file=sys.stderr,
        )  # fmt: skip
        self.status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes = 0
        self.started = time.monotonic()
        self._warned = False
        self._next_postfix = 0.0

    def skip(self, rows: int) -> None:
        """Advance over rows finished by an earlier run."""
        self.bar.update(rows)

    def record(self, status: str, error_kind: str | None, nbytes: int) -> None:
        """Count one finished row (``nbytes``: what a success stored)."""
        if error_kind:
            self.errors[error_kind] += 1
        self.bytes += nbytes
        self.record_many(status, 1)

    def record_many(self, status: str, rows: int) -> None:
        """Count ``rows`` finished rows of one ``status``, with no error kind and no bytes: a
        stage that finishes rows a chunk at a time pays per chunk, not per row."""
        self.status[status] += rows
        self.bar.update(rows)
        now = time.monotonic()
        if now >= self._next_postfix:  # a postfix per row would cost more than the row
            done = sum(self.status.values())
            self.bar.set_postfix(ok=f"{self.status[SUCCESS] / done:.0%}", refresh=False)
            self._next_postfix = now + 0.5
        self._maybe_warn()

    def _maybe_warn(self) -> None:
        done = sum(self.status.values())
        if self._warned or done < EARLY_WARNING_ROWS:
            return
        self._warned = True
        failed = done - self.status[SUCCESS]
        if failed / done > EARLY_WARNING_FAILURE_RATE:
            top = self.errors.most_common(3)
            listed = ", ".join(f"{kind} {n}" for kind, n in top)
            hint = _HINTS.get(top[0][0], "check the network and the URL list")
            self.bar.write(
                f"warning: {failed} of the first {done} rows failed (top errors: {listed}); {hint}",
                file=sys.stderr,
            )

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunSummary:
    """What a stage run did: totals over all shards, and this run's own work and rates."""

    output_dir: str
    totals: dict
    elapsed_s: float = 0.0
    rows_this_run: int = 0
    images_this_run: int = 0
    bytes_this_run: int = 0
    nothing_to_do: bool = False
    retried: int = 0
    partial_input: bool = False  # made from the finished part of an unfinished upstream
    hint: str = ""  # appended to the "nothing to do" line

    @property
    def images_per_s(self) -> float:
        return self.images_this_run / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_this_run / 1e6 / self.elapsed_s if self.elapsed_s else 0.0

    def format(self) -> str:
        """A human-readable end-of-run report."""
        totals = self.totals
        rows = totals["rows"]
        if self.nothing_to_do:
            return (
                f"Nothing to do: all {totals['shards']} shards ({rows} rows) in "
                f"{self.output_dir} are complete.{self.hint}"
            )
        lines = [f"{rows} rows in {totals['shards']} shards -> {self.output_dir}"]
        for status, n in totals["status"].items():
            lines.append(f"  {status:<20} {n:>10}  ({n / rows:.1%})" if rows else f"  {status}")
        if totals["error_kind"]:
            kinds = ", ".join(f"{k} {n}" for k, n in totals["error_kind"].items())
            lines.append(f"  errors: {kinds}")
        if totals.get("action"):
            actions = ", ".join(f"{k} {n}" for k, n in totals["action"].items())
            lines.append(f"  squares: {actions}")
        if self.retried:
            lines.append(f"  re-attempted {self.retried} retryable failures")
        if self.partial_input:
            lines.append(
                "  the input is unfinished: this output covers its finished shards and stays "
                "incomplete; rerun once the input is done"
            )
        volume = f", {self.bytes_this_run / 1e6:.1f} MB" if self.bytes_this_run else ""
        rates = f", {self.mb_per_s:.1f} MB/s" if self.bytes_this_run else ""
        lines.append(
            f"this run: {self.rows_this_run} rows, {self.images_this_run} images{volume} in "
            f"{self.elapsed_s:.1f} s ({self.images_per_s:.1f} images/s{rates})"
        )
        return "\n".join(lines)
