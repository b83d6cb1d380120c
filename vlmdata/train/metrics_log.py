"""What a training run shows: ``metrics.jsonl`` (one record per step), TensorBoard logs when
tensorboard is installed, and ``loss.png`` (training and validation loss, learning rate).

A resumed run first drops the records after its checkpoint's step: the steps it trains again
are logged once, not twice.
"""

from __future__ import annotations

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

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        with plt.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False}):
            figure, (loss_axes, lr_axes) = plt.subplots(
                2, 1, figsize=(7, 4.6), sharex=True, height_ratios=(3, 1), layout="constrained"
            )
            steps = [r["step"] for r in records]
            loss_axes.plot(steps, [r["loss"] for r in records], color="#9ab", lw=0.8,
                           label="train (per step)")  # fmt: skip
            smooth = _moving_average([r["loss"] for r in records], max(1, len(records) // 50))
            loss_axes.plot(steps, smooth, color="#246", lw=1.6, label="train (smoothed)")
            val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
            if val:
                loss_axes.plot(*zip(*val, strict=True), "o-", color="#d62", lw=1.4, ms=4,
                               label="validation")  # fmt: skip
            loss_axes.set_ylabel("loss per answer token")
            loss_axes.legend(frameon=False)
            loss_axes.grid(alpha=0.3)
            lr_axes.plot(steps, [r["lr"] for r in records], color="#484", lw=1.2)
            lr_axes.set_ylabel("learning rate")
            lr_axes.set_xlabel("optimizer step")
            lr_axes.grid(alpha=0.3)
            path = self.path.with_name(PLOT)
            tmp = path.with_name(f".{PLOT}.tmp.png")
            figure.savefig(tmp, dpi=120)
            plt.close(figure)
        tmp.replace(path)
        return path


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics log (a torn last line, from a kill, is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
