"""What a directory given to `vlmdata report` holds (one stage output, a training run, or a
pipeline directory of several), and each one's section with its common header: where it is,
how it was made, and how far it got."""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import read_state_json
from vlmdata.report import download, encode, labels, preprocess
from vlmdata.report.outputs import (
    STAGES,
    TRAIN,
    StageOutput,
    command_of,
    kind_of,
    open_stage,
    recorded_options,
)
from vlmdata.report.page import Section, options, plural, warn
from vlmdata.train import RUN_CONFIG

_ORDER = (*STAGES, TRAIN)


def found_in(path: Path) -> list[tuple[str, Path]]:
    """What ``path`` holds, as (kind, directory) in pipeline order: itself, or the stage
    outputs and training runs right inside it. Anything else is a UserError."""
    if not path.exists():
        raise UserError(f"{path} does not exist; pass the directory of a vlmdata output")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; {_WHAT}")
    kind = kind_of(path)
    if kind == "unknown":
        raise UserError(f"{path}/plan.json names no stage a report can show; {_WHAT}")
    if kind is not None:
        return [(kind, path)]
    inside = [(kind_of(p), p) for p in sorted(path.iterdir()) if p.is_dir()]
    found = [(kind, p) for kind, p in inside if kind in _ORDER]
    if not found:
        raise UserError(f"{path} holds no vlmdata output; {_WHAT}")
    return sorted(found, key=lambda item: _ORDER.index(item[0]))


_WHAT = ("a report is made of a stage output (download, preprocess, encode or labels: a "
         "directory with plan.json), a training run (the --out of vlmdata train) or a "
         "directory holding such directories")  # fmt: skip


def section(kind: str, path: Path, page_dir: Path, quiet: bool) -> Section:
    """The section of the output ``path`` holds, under its common header."""
    text, _ = recorded_options(path)
    if kind == TRAIN:
        from vlmdata.report import training  # torch comes with it: only for a training run

        made = training.section(path, page_dir)
        version = (read_state_json(path / RUN_CONFIG, missing_ok=True) or {}).get("vlmdata_version")
        return replace(made, body=options(text, version) + made.body)
    output = open_stage(path, kind)
    progress = _progress(output)
    if not output.done:
        made = Section(kind, path, ("0", "shards finished"), (), "", "no shard finished yet")
    elif kind == "download":
        made = download.section(output, quiet)
    elif kind == "preprocess":
        made = preprocess.section(output, quiet)
    elif kind == "encode":
        made = encode.section(output, quiet)
    else:
        made = labels.section(output, page_dir)
    header = options(text, output.plan.get("vlmdata_version"))
    body = header + (warn(progress) if progress else "") + made.body
    shards = plural(len(output.done), "shard")
    return replace(made, body=body, partial=not output.complete,
                   more=(*made.more, shards), line=f"{made.line} ({shards})")  # fmt: skip


def _progress(output: StageOutput) -> str | None:
    """What the page says of an unfinished output, None for a complete one."""
    if output.complete:
        return None
    done = len(output.done)
    begun = output.unfinished
    if not done:
        return (f"This {output.stage} output has no finished shard yet ({len(begun)} begun); "
                f"rerun the same {command_of(output.stage)} command to go on.")  # fmt: skip
    listed = ", ".join(begun[:8]) + (", ..." if len(begun) > 8 else "")
    left_out = (f" {len(begun)} more begun and not finished (or damaged) are left out: "
                f"{listed}." if begun else "")  # fmt: skip
    return html.escape(
        f"This {output.stage} output is unfinished: {plural(done, 'shard')} finished so far, "
        f"and this report covers {'them' if done != 1 else 'it'}.{left_out} "
        f"Rerun the same {command_of(output.stage)} command to finish it."
    )
