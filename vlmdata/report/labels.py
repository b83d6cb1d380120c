"""The labels section: the most frequent categories from the labels' stats, and the labels
report (its own page, with thumbnails per category) linked, or the command that makes it."""

from __future__ import annotations

import html
import shlex
from pathlib import Path

from vlmdata.labels import PLACEHOLDER_CATEGORY
from vlmdata.pipeline.shards import PLAN, read_state_json
from vlmdata.report import charts
from vlmdata.report.outputs import StageOutput, find_upstream
from vlmdata.report.page import Section, chart, link, note, plural, share

TOP_CATEGORIES = 15
LABELS_REPORT = Path("report") / "index.html"  # where `vlmdata labels report` puts its page


def section(output: StageOutput, page_dir: Path) -> Section:
    totals = output.totals()
    rows, unlabelled = int(totals.get("rows", 0)), int(totals.get("unlabelled", 0))
    categories = sorted(totals.get("category", {}).items(), key=lambda item: (-item[1], item[0]))
    plan = output.plan
    parts = [_facts(plan), _report_link(output, page_dir)]
    if categories:
        top = categories[:TOP_CATEGORIES]
        names = [name for name, _ in top]
        palette = charts.PALETTE
        colours = [charts.GREY if name == PLACEHOLDER_CATEGORY else palette[i % len(palette)]
                   for i, name in enumerate(names)]  # fmt: skip
        parts.append(chart(charts.bar_chart(
            charts.cut_all(names), [n for _, n in top], [share(n, rows) for _, n in top], colours,
            [""] * len(top), f"Most frequent categories ({len(top)} of {len(categories)})",
        ), "most frequent categories"))  # fmt: skip
        parts.append(note("The category of each image is the category of its best-matching "
                          "description, counted in the labels' stats."))  # fmt: skip
    else:
        parts.append(note("No image is labelled yet."))
    if unlabelled:
        parts.append(note(f"{unlabelled:,} images got no label (an embedding that is not finite)."))
    leader = f"most: {categories[0][0]} ({share(categories[0][1], rows):.0%})" if categories else ""
    return Section(
        kind="labels", path=output.path,
        headline=(f"{rows - unlabelled:,}", "images labelled"),
        more=tuple(x for x in (leader, plural(len(categories), "category", "categories") + " used")
                   if x),
        body="".join(parts),
        line=f"{rows:,} images labelled, {plural(len(categories), 'category', 'categories')}"
             + (f"; {leader}" if leader else ""),
    )  # fmt: skip


def _facts(plan: dict) -> str:
    e = html.escape
    facts = [("model", f"{plan.get('model')} ({plan.get('pretrained')})"),
             ("taxonomy", plan.get("taxonomy_name") or str(plan.get("taxonomy", ""))[:16]),
             ("top-k kept", plan.get("top_k"))]  # fmt: skip
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _report_link(output: StageOutput, page_dir: Path) -> str:
    """A link to the labels report when there is one, else the command that makes it."""
    page = output.path / LABELS_REPORT
    if page.is_file():
        report = link(page, page_dir, "the labels report")
        return note("Thumbnails by category, the least confident labels and the placeholders "
                    f"that slipped through: {report}.")  # fmt: skip
    encode = find_upstream(output.path, output.plan.get("input"))
    images = find_upstream(encode, _plan_input(encode)) if encode is not None else None
    command = ["vlmdata", "labels", "report", str(output.path), "--images",
               str(images) if images is not None else "IMAGES_DIR"]  # fmt: skip
    where = ("" if images is not None else " (IMAGES_DIR: the download or preprocess output the "
             "features were made from)")  # fmt: skip
    return note(f"For thumbnails by category, make the labels report{html.escape(where)}:") + (
        f'<pre class="options">{html.escape(shlex.join(command))}</pre>'
    )


def _plan_input(path: Path) -> object:
    return (read_state_json(path / PLAN, missing_ok=True) or {}).get("input")
