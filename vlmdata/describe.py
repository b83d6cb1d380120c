"""`vlmdata inspect`: what a stage output directory, or one shard file, holds.

People reach for it when something is broken, so a damaged file never stops it. One file given
alone that cannot be read is one UserError line. In a directory every damaged file is one line
(``  plan.json: corrupt (Expecting value: line 1 column 1 (char 0))``) and the rest is still
described: the JSON files are parsed and their fields checked, and each shard's data files get a
cheap check (HDF5 opens and its datasets agree, the parquet footer reads, the tar starts with a
valid header and ends with the end-of-archive marker) that reads headers only, never the data.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError, one_line
from vlmdata.pipeline.shards import IMAGE_SHARD_FILES, STAGE_DATA_FILES

MAX_PROBLEM_LINES = 50  # beyond this, one line counts the rest
_SHARD_DATA = re.compile(r"^\d+\.(h5|parquet|tar)$")  # NNNNN.h5, not .00001.h5.tmp or x.tar
# Fields each JSON file must hold, and their types; anything else is reported as corrupt.
_STATS_FIELDS = {"rows": int, "status": dict}
_MANIFEST_FIELDS = {"rows": int, "shards": list, "attrs": dict}
_MANIFEST_ATTRS = ("tokens", "width", "embed_dim", "model", "pretrained", "layer")
_SHARD_STATS_FIELDS = {"rows": int}  # what makes a shard's marker count (as the runner reads it)
# What reading a damaged file raises: h5py and pyarrow report damage as OSError or ValueError
# (ArrowInvalid), tarfile as TarError, a cut compressed tar as EOFError or zlib.error.
_HDF5_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)
_PARQUET_ERRORS = (OSError, ValueError, pa.ArrowException)
_TAR_ERRORS = (OSError, tarfile.TarError, EOFError, zlib.error)
_TAR_BLOCK = 512

_MESSAGE_CHARS = 160  # how much of an error a problem line quotes


class Corrupt(Exception):
    """A file that cannot be read as what it should be; the message says why, on one line."""


def describe(path: str) -> str:
    """A human-readable account of ``path``: a directory, ``.h5``, ``.tar`` or ``.parquet``."""
    from vlmdata.pipeline.runner import path_argument

    target = path_argument(path, "PATH")  # an object-store URL: one line saying where they work
    if not target.exists():
        raise UserError(f"{path} does not exist; pass a stage output directory or a shard file")
    if target.is_dir():
        return _directory(target)
    describers = {".h5": (_hdf5, "HDF5"), ".tar": (_tar, "tar"), ".parquet": (_parquet, "parquet")}
    if target.suffix not in describers:
        raise UserError(f"cannot inspect {target.name}: pass a directory, .h5, .tar or .parquet")
    describer, kind = describers[target.suffix]
    try:
        return describer(target)
    except Corrupt as e:
        raise UserError(f"{path} is not a readable {kind} file ({e})") from None


# --- a stage output directory --------------------------------------------------------------


def _directory(path: Path) -> str:
    plan_path = path / "plan.json"
    if not plan_path.exists():
        raise UserError(f"{path} is not a vlmdata output (no plan.json); pass a stage's output")
    problems: list[str] = []
    plan = _checked_json(plan_path, {}, problems)
    stage = plan.get("stage", "?") if plan else "?"
    done = _done_shards(path, _data_files(path, stage), problems)
    pending = {p.name.split(".")[0] for p in path.glob("*.partial")} | {
        p.name.split(".")[0] for p in path.glob("*.journal.jsonl")
    }
    lines = [f"{path}: {stage} output, {len(done)} shards done"
             + (f", {len(pending)} in progress" if pending else "")]  # fmt: skip
    stats = None
    if (path / "stats.json").exists():
        stats = _checked_json(path / "stats.json", _STATS_FIELDS, problems)
    if stats:
        lines += _stats_lines(stats)
    lines += _manifest_lines(path, stage, stats, problems)
    if plan:
        options = {k: v for k, v in plan.items() if k not in ("stage", "input")}
        lines.append(f"  options: {json.dumps(options, ensure_ascii=False)[:300]}")
    problems += _damaged_data_files(path)
    return "\n".join(lines + _problem_lines(problems))


def _stats_lines(stats: dict) -> list[str]:
    lines = [f"  rows: {stats['rows']}{'' if stats.get('complete') else ' (incomplete)'}"]
    lines += _counts("status", stats["status"])
    for title, key in (("error kinds", "error_kind"), ("actions", "action")):
        if isinstance(stats.get(key), dict):
            lines += _counts(title, stats[key])
    return lines


def _manifest_lines(path: Path, stage: str, stats: dict | None, problems: list[str]) -> list[str]:
    """The features line from ``manifest.json``; a complete encode run must have one."""
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        if stage == "encode" and stats and stats.get("complete"):
            problems.append("manifest.json: missing (a complete encode output has one)")
        return []
    manifest = _checked_json(manifest_path, _MANIFEST_FIELDS, problems)
    if not manifest:
        return []
    attrs = manifest["attrs"]
    absent = [name for name in _MANIFEST_ATTRS if name not in attrs]
    if absent:
        problems.append(f"manifest.json: corrupt (attrs lack {', '.join(absent)})")
        return []
    return [
        f"  features: {manifest['rows']} rows in {len(manifest['shards'])} .h5 files; "
        f"tokens [{attrs['tokens']}, {attrs['width']}], embeds [{attrs['embed_dim']}] from "
        f"{attrs['model']} ({attrs['pretrained']}), layer {attrs['layer']}"
    ]


def _data_files(path: Path, stage: str) -> tuple[str, ...]:
    """What a done shard holds; with the plan unreadable, guessed from the files there."""
    if stage in STAGE_DATA_FILES:
        return STAGE_DATA_FILES[stage]
    return STAGE_DATA_FILES["encode"] if any(path.glob("*.h5")) else IMAGE_SHARD_FILES


def _done_shards(path: Path, data_files: tuple[str, ...], problems: list[str]) -> list[Path]:
    """The shards the runner takes as done: a whole stats marker and its data files. A damaged
    marker, or one whose data files are gone, marks nothing (the shard is redone) and is
    reported."""
    done = []
    for marker in sorted(path.glob("*.stats.json")):
        if _checked_json(marker, _SHARD_STATS_FIELDS, problems) is None:
            continue
        name = marker.name.removesuffix(".stats.json")
        missing = [f"{name}{suffix}" for suffix in data_files
                   if not (path / f"{name}{suffix}").exists()]  # fmt: skip
        if missing:
            problems.append(f"{marker.name}: marks a shard whose {', '.join(missing)} is gone "
                            "(a rerun redoes it)")  # fmt: skip
        else:
            done.append(marker)
    return done


def _checked_json(path: Path, fields: dict[str, type], problems: list[str]) -> dict | None:
    """``path`` parsed as a JSON object holding ``fields``; None (and a problem line) if not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(f"{path.name}: corrupt ({one_line(e, _MESSAGE_CHARS)})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name}: corrupt (not a JSON object)")
        return None
    for name, kind in fields.items():
        field = value.get(name)
        if not isinstance(field, kind) or isinstance(field, bool):  # True is an int to Python
            problems.append(f"{path.name}: corrupt ({name!r} missing or not a {kind.__name__})")
            return None
    return value


def _damaged_data_files(path: Path) -> list[str]:
    """One line per shard data file (``NNNNN.h5/.parquet/.tar``) that fails its cheap check."""
    checks = {".h5": _check_hdf5, ".parquet": _check_parquet, ".tar": _check_tar}
    problems = []
    for file in sorted(path.iterdir()):
        if _SHARD_DATA.match(file.name) and file.is_file():
            try:
                checks[file.suffix](file)
            except Corrupt as e:
                problems.append(f"{file.name}: corrupt ({e})")
    return problems


def _problem_lines(problems: list[str]) -> list[str]:
    """The root files' problems first, then the shards' in name order."""
    problems = sorted(problems, key=lambda line: (line[0].isdigit(), line))
    lines = [f"  {problem}" for problem in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"  ... and {len(problems) - MAX_PROBLEM_LINES} more damaged files")
    return lines


# --- one shard file --------------------------------------------------------------------------


def _hdf5(path: Path) -> str:
    import h5py

    _check_hdf5(path)
    try:
        with h5py.File(path, "r") as f:
            lines = [f"{path}: {len(f['keys']) if 'keys' in f else '?'} rows"]
            for name, item in f.items():
                if isinstance(item, h5py.Dataset):
                    lines.append(f"  {name:<9} {item.shape} {item.dtype} chunks={item.chunks}")
                else:
                    lines.append(f"  {name:<9} (group)")
            for key, value in sorted(f.attrs.items()):
                lines.append(f"  @{key} = {value}")
    except _HDF5_ERRORS as e:
        raise Corrupt(one_line(e, _MESSAGE_CHARS)) from None
    return "\n".join(lines)


def _check_hdf5(path: Path) -> None:
    """The file opens as HDF5 and vlmdata's datasets, where present, agree on the row count."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            counts = {
                name: f[name].shape[0]
                for name in ("keys", "tokens", "embeds", "captions")
                if name in f and isinstance(f[name], h5py.Dataset) and f[name].shape
            }
    except _HDF5_ERRORS as e:
        raise Corrupt(one_line(e, _MESSAGE_CHARS)) from None
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise Corrupt(f"datasets disagree on the row count: {listed}")


def _tar(path: Path) -> str:
    _check_tar(path)
    extensions: Counter[str] = Counter()
    keys: list[str] = []
    size = 0
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
                extensions[extension] += 1
                if not keys or keys[-1] != key:
                    keys.append(key)
                size += member.size
    except _TAR_ERRORS as e:
        raise Corrupt(one_line(e, _MESSAGE_CHARS)) from None
    kinds = ", ".join(f"{ext} {n}" for ext, n in extensions.most_common())
    return (
        f"{path}: {len(set(keys))} samples, {sum(extensions.values())} members, "
        f"{size / 1e6:.1f} MB\n  members: {kinds}\n  first keys: {', '.join(keys[:3])}"
    )


def _check_tar(path: Path) -> None:
    """A valid first header, and the end-of-archive marker (two zero blocks) that every tar
    writer (vlmdata's, img2dataset's, tarfile's) ends with: a cut tar lacks it. Headers only."""
    try:
        with tarfile.open(path) as tar:
            tar.next()
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 2 * _TAR_BLOCK))
            tail = f.read()
    except _TAR_ERRORS as e:
        raise Corrupt(one_line(e, _MESSAGE_CHARS)) from None
    if size % _TAR_BLOCK or len(tail) < 2 * _TAR_BLOCK or tail.strip(b"\0"):
        raise Corrupt(f"no end-of-archive marker after {size} bytes: the file was cut short")


def _parquet(path: Path) -> str:
    try:
        table = pq.read_table(path)
    except _PARQUET_ERRORS as e:
        raise Corrupt(one_line(e, _MESSAGE_CHARS)) from None
    lines = [f"{path}: {table.num_rows} rows", f"  columns: {', '.join(table.column_names)}"]
    if "status" in table.column_names:
        lines += _counts("status", Counter(table.column("status").to_pylist()))
    return "\n".join(lines)


def _check_parquet(path: Path) -> None:
    """The footer (schema, row groups) reads: a cut or overwritten file fails here."""
    try:
        pq.read_metadata(path)
    except _PARQUET_ERRORS as e:
        raise Corrupt(one_line(e, _MESSAGE_CHARS)) from None


# --- text ----------------------------------------------------------------------------------


def _counts(title: str, counts: dict) -> list[str]:
    if not counts:
        return []
    return [f"  {title}: " + ", ".join(f"{k} {n}" for k, n in counts.items())]
