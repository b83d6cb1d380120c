"""The charts of vlmdata's HTML reports, in one style: light axes, muted ticks, a faint grid.

Figures are matplotlib ``Figure`` objects on the Agg canvas: no pyplot, no global backend.
Draw them inside :func:`drawing` (text as written, never mathtext: labels are the user's).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

# Series colours, by rank (cycled): muted, distinct, readable on white.
PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
    "#ff9da7", "#9c755f", "#86bcb6", "#8cd17d", "#d4a6c8", "#a0cbe8", "#ffbe7d",
)  # fmt: skip
BLUE, ORANGE, GREEN, RED, GREY = PALETTE[0], PALETTE[1], PALETTE[2], PALETTE[3], "#8c8c8c"
INK, MUTED, GRID = "#1f2328", "#656d76", "#e6e8eb"
DPI = 110
NAME_CHARS = 60  # a bar's name longer than this is cut (the page has it whole)
# Text is drawn as written, never as mathtext ("$3 and $4") or LaTeX.
_LITERAL_TEXT = {"text.usetex": False, "text.parse_math": False,
                 "axes.formatter.use_mathtext": False}  # fmt: skip


@contextmanager
def drawing() -> Iterator[None]:
    """The rc settings every chart is drawn (and saved) under: ticks are made when drawn."""
    import matplotlib

    with matplotlib.rc_context(_LITERAL_TEXT):
        yield


def figure(width: float, height: float):
    """A figure on the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    made = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(made)
    return made


def png(made) -> bytes:
    """The figure as PNG bytes."""
    out = io.BytesIO()
    made.savefig(out, format="png")
    return out.getvalue()


def style(axes, grid_axis: str) -> None:
    """Light axes: no box, a faint grid behind the data, muted ticks."""
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        axes.spines[side].set_color("#c9ced4")
    axes.tick_params(colors=MUTED, labelcolor=INK, labelsize=9, length=3)
    axes.grid(axis=grid_axis, color=GRID, linewidth=0.8)
    axes.set_axisbelow(True)


def title(made, text: str) -> None:
    made.suptitle(text, x=0.01, ha="left", fontsize=12, color=INK)


def axis_labels(axes, x: str, y: str) -> None:
    axes.set_xlabel(x, color=MUTED, fontsize=9)
    axes.set_ylabel(y, color=MUTED, fontsize=9)


def bar_chart(
    names: list[str], counts: list[int], shares: list[float], colours: list[str],
    notes: list[str], heading: str, width: float = 10,
):  # fmt: skip
    """Horizontal bars, most frequent on top, each labelled with its count and share."""
    made = figure(width, 0.7 + 0.27 * max(len(names), 1))
    axes = made.add_subplot()
    style(axes, "x")
    axes.grid(False)  # every bar carries its count: no value axis
    axes.spines["bottom"].set_visible(False)
    axes.tick_params(bottom=False, labelbottom=False)
    positions = range(len(names))
    axes.barh(positions, counts, color=colours, height=0.72)
    axes.set_yticks(list(positions), names)
    axes.invert_yaxis()
    axes.set_ylim(len(names) - 0.5, -0.5)
    top = max(counts, default=1) or 1
    axes.set_xlim(0, top * (1.62 if any(notes) else 1.3))  # room for the labels
    for y, (count, share, note) in enumerate(zip(counts, shares, notes, strict=True)):
        label = f"{count:,}  ·  {share:.1%}" + (f"   {note}" if note else "")
        axes.text(count + top * 0.01, y, label, va="center", fontsize=8.5, color=MUTED)
    title(made, heading)
    return made


def histogram(
    axes, edges: np.ndarray, series: Mapping[str, np.ndarray], colours: Sequence[str],
    stacked: bool = False,
) -> None:  # fmt: skip
    """Counts over ``edges`` per series: stacked, or overlaid and see-through; a legend when
    there is more than one."""
    base = np.zeros(len(edges) - 1)
    for (name, counts), colour in zip(series.items(), colours, strict=False):
        if stacked:
            axes.stairs(base + counts, edges, baseline=base, fill=True, color=colour, label=name)
            base = base + counts
        else:
            alpha = 0.85 if len(series) == 1 else 0.55
            axes.stairs(counts, edges, fill=True, color=colour, alpha=alpha, label=name)
    if len(series) > 1:  # beside the axes: bars can reach any corner
        axes.legend(frameon=False, fontsize=8.5, labelcolor=INK, loc="upper left",
                    bbox_to_anchor=(1.01, 1))  # fmt: skip
    count_axis(axes)


def count_axis(axes) -> None:
    """A y axis of counts written in full, with thousands separators (no "1e6" offset), ticked
    at whole numbers only (small counts would read "0 0 1 1 2 2")."""
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def log_x(axes, label: Callable[[float], str]) -> None:
    """A log x axis ticked at powers of two, each tick written by ``label`` (the default
    labels are mathtext, which :func:`drawing` turns off)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: label(value)))
    axes.xaxis.set_minor_formatter(NullFormatter())


def mark(axes, x: float, text: str) -> None:
    """A dashed vertical line at ``x`` with ``text`` at its top, on the side with room (near
    the right edge the text would run into a legend beside the axes)."""
    axes.axvline(x, color=INK, linewidth=1, linestyle="--")
    low, high = axes.get_xlim()
    left = x > low + 0.7 * (high - low)
    axes.text(x, axes.get_ylim()[1] * 0.97, f"{text} " if left else f" {text}", va="top",
              ha="right" if left else "left", fontsize=8.5, color=INK,
              bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})  # fmt: skip


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut_all(names: Iterable[str], limit: int = NAME_CHARS) -> list[str]:
    """Names as a chart shows them: cut to ``limit`` characters (the page has them whole)."""
    return [cut(name, limit) for name in names]
