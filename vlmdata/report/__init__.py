"""`vlmdata report DIR`: one self-contained HTML page of what a stage output, a training run,
or a whole pipeline directory (download, preprocess, encode, labels, train) holds.

The numbers come from lazy polars scans of the shard parquets and from the stats markers, so a
dataset of any size reports in bounded memory; the only image bytes read are those of the few
thumbnails shown. The page embeds its charts and thumbnails and is written atomically.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

from vlmdata.errors import UserError
from vlmdata.pipeline.runner import path_argument
from vlmdata.pipeline.shards import write_named_file
from vlmdata.report import charts, page
from vlmdata.report.pipeline import found_in, section

PAGE = "report.html"  # in DIR, by default


@dataclass(frozen=True)
class ReportConfig:
    """Everything `vlmdata report` takes; the CLI flags map one to one."""

    path: str  # a stage output dir, a training run dir, or a pipeline dir holding several
    out: str | None = None  # default: PATH/report.html
    quiet: bool = False


@dataclass(frozen=True)
class ReportSummary:
    """What the page shows, for the lines printed at the end."""

    page: Path
    found: tuple[tuple[str, str, bool], ...]  # per section: (title, its line, unfinished)
    elapsed_s: float

    def format(self) -> str:
        lines = [f"  {title:<11} {line}{'  [unfinished]' if partial else ''}"
                 for title, line, partial in self.found]  # fmt: skip
        return "\n".join([*lines, f"report -> {self.page} ({self.elapsed_s:.1f} s)"])


def write_report(config: ReportConfig) -> ReportSummary:
    """Write the report of ``config.path`` to ``config.out``; return what it shows."""
    started = time.monotonic()
    path = path_argument(config.path, "DIR")
    out = path / PAGE
    if config.out is not None:
        out = path_argument(config.out, "--out", written=True)
    found = found_in(path)
    _check_page_location(out)
    with charts.drawing():
        sections = [section(kind, where, out.parent, config.quiet) for kind, where in found]
    anchors = _anchors([s.kind for s in sections])
    pipeline = len(sections) > 1 or found[0][1] != path
    title = (f"vlmdata report: {path.resolve().name}" if pipeline
             else f"{sections[0].title} report: {path.resolve().name}")  # fmt: skip
    kinds = ", ".join(s.title.lower() for s in sections)
    subtitle = html.escape(f"{path.resolve()}" + (f" · {kinds}" if pipeline else ""))
    bodies = [page.section_html(s, a) for s, a in zip(sections, anchors, strict=True)]
    text = page.document(title, subtitle, list(zip(anchors, sections, strict=True)), bodies,
                         time.monotonic() - started)  # fmt: skip
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_named_file(out, text.encode())
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass a writable --out") from None
    return ReportSummary(
        page=out,
        found=tuple((s.title, s.line, s.partial) for s in sections),
        elapsed_s=time.monotonic() - started,
    )


def _check_page_location(out: Path) -> None:
    """Refuse an --out that is a directory, not an .html name, or a file other than a page
    this report wrote (a shard, a plan, anyone's file would be lost)."""
    if out.is_dir() or str(out).endswith("/"):
        raise UserError(f"--out {out} is a directory; pass a file name, e.g. {out / PAGE}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out} is not an .html file name; pass one, e.g. "
                        f"{out.with_suffix('.html')}")  # fmt: skip
    if out.exists() and page.GENERATOR.encode() not in _head_of(out):
        raise UserError(f"--out {out} exists and is not a vlmdata report; pass a new file name")


def _head_of(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return b""


def _anchors(kinds: list[str]) -> list[str]:
    """One id per section: its kind, numbered from the second of a kind on."""
    seen: dict[str, int] = {}
    anchors = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        anchors.append(kind if seen[kind] == 1 else f"{kind}-{seen[kind]}")
    return anchors
