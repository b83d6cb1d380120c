"""The HTML of vlmdata's reports: one stylesheet for every report (the labels report's folder
and the one-file `vlmdata report` page), and the pieces the one-file page is built of.

The one-file page embeds everything it shows (charts and thumbnails as ``data:`` URIs, the CSS
inline), so it opens offline, moved or mailed; it links only to other local pages, by
relative path.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmdata.report import charts

CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --panel:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
header { background: var(--panel); border-bottom: 1px solid var(--line); }
.wrap { max-width: 1160px; margin: 0 auto; padding: 0 32px; }
header .wrap { padding-top: 28px; padding-bottom: 24px; }
h1 { font-size: 26px; margin: 0 0 2px; font-weight: 650; letter-spacing: -0.01em; }
.sub { color: var(--muted); margin: 0 0 20px; word-break: break-all; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; }
a { color: var(--accent); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px;
  margin-bottom: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .n { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .l { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; }
table.facts td { padding: 3px 18px 3px 0; vertical-align: top; }
table.facts td:first-child { color: var(--muted); white-space: nowrap; }
table.facts code { word-break: break-all; }
nav { margin-top: 16px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
h2 { font-size: 21px; margin: 44px 0 6px; padding-bottom: 6px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 28px 0 10px; }
h3 .meta { color: var(--muted); font-weight: 400; font-size: 14px; margin-left: 8px; }
p.note { color: var(--muted); margin: 6px 0 14px; max-width: 820px; }
img.chart { display: block; max-width: 100%; height: auto; margin: 14px 0 8px; }
table.numbers th { text-align: left; color: var(--muted); font-weight: 500;
  border-bottom: 1px solid var(--line); padding: 6px 14px 6px 0; }
table.numbers td { padding: 4px 14px 4px 0; border-bottom: 1px solid #eef1f4;
  font-variant-numeric: tabular-nums; }
table.numbers td.num, table.numbers th.num { text-align: right; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 8px; vertical-align: baseline; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 14px; }
.tile { margin: 0; background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  overflow: hidden; }
.tile img, .tile .missing { display: block; width: 100%; aspect-ratio: 1 / 1; object-fit: cover; }
.tile .missing { display: flex; align-items: center; justify-content: center; text-align: center;
  padding: 12px; color: var(--muted); font-size: 12px; background: repeating-linear-gradient(
  45deg, #eef1f4, #eef1f4 8px, #f6f8fa 8px, #f6f8fa 16px); }
.tile figcaption { padding: 7px 9px 9px; font-size: 12px; line-height: 1.35; }
.clamp { display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2;
  overflow: hidden; }
.tile .label { font-weight: 600; }
.tile .scores { color: var(--muted); font-variant-numeric: tabular-nums; margin: 2px 0; }
.tile .caption { color: var(--muted); }
footer { color: var(--muted); font-size: 13px; margin: 56px 0 32px; }
ul.missing-list { color: var(--muted); font-size: 14px; }
details { margin: 4px 0 8px; }
summary { cursor: pointer; color: var(--accent); font-size: 14px; margin-bottom: 10px; }
"""
# What the one-file page adds: stage cards, sections, strips of thumbnails, recorded options.
_PAGE_CSS = """
.stages { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr));
  gap: 12px; margin-bottom: 6px; }
.stage { display: block; background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; color: var(--ink); text-decoration: none; position: relative; }
.stage:hover { border-color: var(--accent); }
.stage .name { font-size: 13px; font-weight: 600; color: var(--muted); text-transform: uppercase;
  letter-spacing: 0.05em; }
.stage .n { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.stage .l { color: var(--muted); font-size: 13px; }
.stage .more { font-size: 13px; margin-top: 6px; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 10px;
  padding: 0 7px; margin-left: 6px; vertical-align: 1px; text-transform: none;
  letter-spacing: 0; background: #fff8c5; color: #7d4e00; border: 1px solid #d4a72c; }
section.stage-section { margin-bottom: 12px; }
section.stage-section > h2 .meta { color: var(--muted); font-weight: 400; font-size: 14px;
  margin-left: 10px; }
.where { color: var(--muted); font-size: 13px; margin: 0 0 10px; word-break: break-all; }
.where code { color: var(--ink); }
.row { display: flex; flex-wrap: wrap; gap: 8px 36px; align-items: center; }
.row .aside { padding-top: 12px; }
.grid.strip { grid-template-columns: repeat(auto-fill, minmax(118px, 1fr)); gap: 10px;
  margin-bottom: 8px; }
.strip .tile figcaption { padding: 5px 7px 7px; font-size: 11.5px; }
pre.options { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 12px; font-size: 12.5px; overflow-x: auto; max-width: 900px; }
table.numbers td.bad { color: #a40e26; }
table.numbers td.text { max-width: 520px; color: var(--muted); font-size: 13px;
  overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class Section:
    """One stage's part of the page: its key numbers (the header's card), its HTML, and the
    line printed at the end of the run."""

    kind: str  # download, preprocess, encode, labels, train
    path: Path
    headline: tuple[str, str]  # (number, what it counts): the card's big line
    more: tuple[str, ...]  # the card's smaller lines
    body: str
    line: str
    partial: bool = False

    @property
    def title(self) -> str:
        return "Training" if self.kind == "train" else self.kind.capitalize()


# Marks a page as this report's: --out may replace such a page, never another file.
GENERATOR = '<meta name="generator" content="vlmdata report">'


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chart(made, alt: str) -> str:
    """A figure as an embedded PNG."""
    uri = data_uri("image/png", charts.png(made))
    return f'<img class="chart" src="{uri}" alt="{html.escape(alt)}">'


def link(target: Path, page_dir: Path, text: str) -> str:
    """A link to a local file, relative to the page's folder (moved together, it still works)."""
    href = Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix()
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'


def note(content: str) -> str:
    return f'<p class="note">{content}</p>'


def warn(content: str) -> str:
    return f'<p class="warn">{content}</p>'


def numbers_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A table: a header starting with "#" marks a column of numbers, right-aligned; ints and
    floats are formatted, strings are HTML as given."""
    numeric = [h.startswith("#") for h in headers]
    head = "".join(f'<th class="num">{h[1:]}</th>' if n else f"<th>{h}</th>"
                   for h, n in zip(headers, numeric, strict=True))  # fmt: skip
    lines = [f'<table class="numbers"><tr>{head}</tr>']
    for row in rows:
        cells = "".join(
            f'<td class="num">{_number(v)}</td>' if n else f"<td>{v}</td>"
            for v, n in zip(row, numeric, strict=True)
        )
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join([*lines, "</table>"])


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value) if value is not None else "–"


def plural(count: int, word: str, words: str | None = None) -> str:
    """``3 shards``, ``1 shard``: the count with thousands separators, and the word."""
    return f"{count:,} {word if count == 1 else words or word + 's'}"


def share(count: int, total: int) -> float:
    return count / total if total else 0.0


def tiles(items: Iterable[tuple[str | None, str, str, str]]) -> str:
    """A strip of thumbnails: (data URI or None, its problem or alt text, label, hover text)
    each; an image that cannot be shown says why in its place."""
    e = html.escape
    cells = []
    for uri, alt, label, hover in items:
        picture = (f'<img src="{uri}" alt="{e(alt)}">' if uri is not None
                   else f'<div class="missing">image not shown:<br>{e(alt)}</div>')  # fmt: skip
        cells.append(f'<figure class="tile" title="{e(hover)}">{picture}<figcaption>'
                     f'<div class="scores">{e(label)}</div></figcaption></figure>')  # fmt: skip
    if not cells:
        return note("None.")
    return '<div class="grid strip">\n' + "\n".join(cells) + "\n</div>"


def options(text: str | None, version: object) -> str:
    """How the output was made: the vlmdata version and the recorded options, collapsed."""
    e = html.escape
    parts = []
    if version:
        parts.append(f'<p class="where">made by vlmdata {e(str(version))}</p>')
    if text is not None:
        parts.append(f"<details><summary>Options it was made with (vlmdata.toml)</summary>"
                     f'<pre class="options">{e(text)}</pre></details>')  # fmt: skip
    return "".join(parts)


def section_html(section: Section, anchor: str) -> str:
    e = html.escape
    badge = '<span class="badge">unfinished</span>' if section.partial else ""
    return (
        f'<section class="stage-section" id="{anchor}"><h2>{e(section.title)}{badge}</h2>'
        f'<p class="where"><code>{e(str(section.path))}</code></p>\n{section.body}</section>'
    )


def stage_cards(sections: Sequence[tuple[str, Section]]) -> str:
    """The header's cards: one per stage found, its key numbers, linked to its section."""
    e = html.escape
    cards = []
    for anchor, s in sections:
        badge = '<span class="badge">unfinished</span>' if s.partial else ""
        more = "".join(f"<div>{e(line)}</div>" for line in s.more)
        cards.append(
            f'<a class="stage" href="#{anchor}"><div class="name">{e(s.title)}{badge}</div>'
            f'<div class="n">{e(s.headline[0])}</div><div class="l">{e(s.headline[1])}</div>'
            f'<div class="more">{more}</div></a>'
        )
    return '<div class="stages">' + "".join(cards) + "</div>"


def document(title: str, subtitle: str, sections: Sequence[tuple[str, Section]],
             bodies: Sequence[str], elapsed: float) -> str:  # fmt: skip
    """The whole page: a header with a card per stage, then each stage's section."""
    e = html.escape
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{anchor}">{e(s.title)}</a>' for anchor, s in sections)
    return "\n".join([
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        GENERATOR,
        f"<title>{e(title)}</title>\n<style>{CSS}{_PAGE_CSS}</style>\n</head>\n<body>",
        '<header><div class="wrap">',
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{subtitle}</p>',
        stage_cards(sections),
        f"<nav>{nav}</nav>" if len(sections) > 1 else "",
        "</div></header>",
        '<main class="wrap">',
        *bodies,
        f"<footer>Made by vlmdata report on {generated} in {elapsed:.1f} s.</footer>",
        "</main>\n</body>\n</html>\n",
    ])  # fmt: skip
