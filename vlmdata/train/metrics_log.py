"""What a training run shows: ``metrics.jsonl`` (one record per step), TensorBoard logs when
tensorboard is installed, and ``loss.png`` (training and validation loss, learning rate).

A resumed run first drops the records after its checkpoint's step: the steps it trains again
are logged once, not twice.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from vlmdata.pipeline.shards import atomic_write_bytes

METRICS = "metrics.jsonl"
PLOT = "loss.png"


class MetricsLog:
    def __init__(self, run_dir: Path, step: int, enabled: bool = True) -> None:
        self.path, self.enabled = run_dir / METRICS, enabled
        self._file = self._tensorboard = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        # NaN and inf are no JSON: strict readers (and polars) refuse them.
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None
                  for k, v in record.items()}  # fmt: skip
        self._file.write(json.dumps(finite) + "\n")
        self._file.flush()  # a line per step: cheap, and a killed run keeps its log
        if self._tensorboard is not None:
            for name, value in record.items():
                if name not in ("step", "epoch") and value is not None:
                    self._tensorboard.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def plot(self) -> Path | None:
        """``loss.png``: the loss curves over steps, the learning rate beneath."""
        records = read_metrics(self.path)
        if not records:
            return None
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        with matplotlib.rc_context({"font.size": 9, "axes.spines.top": False,
                                    "axes.spines.right": False}):  # fmt: skip
            figure = Figure(figsize=(7, 4.6), layout="constrained")
            FigureCanvasAgg(figure)  # the Agg canvas, no pyplot: no global backend
            draw_loss(figure, records)
            image = io.BytesIO()
            figure.savefig(image, format="png", dpi=120)
        path = self.path.with_name(PLOT)
        atomic_write_bytes(path, image.getvalue())
        return path


def draw_loss(figure, records: list[dict]) -> tuple:
    """The training loss (per step and smoothed) and validation loss over steps on ``figure``,
    the learning rate beneath; returns the two axes. Steps without a value are skipped."""
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    losses = [(r["step"], r["loss"]) for r in records if finite_number(r.get("loss"))]
    if losses:
        steps, values = zip(*losses, strict=True)
        loss_axes.plot(steps, values, color="#9ab", lw=0.8, label="train (per step)")
        smooth = _moving_average(list(values), max(1, len(values) // 50))
        loss_axes.plot(steps, smooth, color="#246", lw=1.6, label="train (smoothed)")
    val = [(r["step"], r["val_loss"]) for r in records if finite_number(r.get("val_loss"))]
    if val:
        loss_axes.plot(*zip(*val, strict=True), "o-", color="#d62", lw=1.4, ms=4,
                       label="validation")  # fmt: skip
    loss_axes.set_ylabel("loss per answer token")
    if losses or val:
        loss_axes.legend(frameon=False)
    loss_axes.grid(alpha=0.3)
    rates = [(r["step"], r["lr"]) for r in records if finite_number(r.get("lr"))]
    if rates:
        lr_axes.plot(*zip(*rates, strict=True), color="#484", lw=1.2)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.grid(alpha=0.3)
    return loss_axes, lr_axes


def finite_number(value: object) -> bool:
    """A logged value that can be drawn (NaN and inf are logged as null)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics log: a torn last line (from a kill) and lines that are no
    record of a step (damage, hand edits) are skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
