"""`vlmdata inspect`: what a stage output directory, or one shard file, holds."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from vlmdata.errors import UserError


def describe(path: str) -> str:
    """A human-readable account of ``path``: a directory, ``.h5``, ``.tar`` or ``.parquet``."""
    target = Path(path)
    if not target.exists():
        raise UserError(f"{path} does not exist; pass a stage output directory or a shard file")
    if target.is_dir():
        return _directory(target)
    describers = {".h5": _hdf5, ".tar": _tar, ".parquet": _parquet}
    if target.suffix not in describers:
        raise UserError(f"cannot inspect {target.name}: pass a directory, .h5, .tar or .parquet")
    return describers[target.suffix](target)


def _directory(path: Path) -> str:
    plan_path, stats_path = path / "plan.json", path / "stats.json"
    if not plan_path.exists():
        raise UserError(f"{path} is not a vlmdata output (no plan.json); pass a stage's output")
    plan = json.loads(plan_path.read_text())
    done = sorted(path.glob("*.stats.json"))
    pending = {p.name.split(".")[0] for p in path.glob("*.partial")} | {
        p.name.split(".")[0] for p in path.glob("*.journal.jsonl")
    }
    lines = [f"{path}: {plan.get('stage', '?')} output, {len(done)} shards done"
             + (f", {len(pending)} in progress" if pending else "")]  # fmt: skip
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        lines.append(f"  rows: {stats['rows']}{'' if stats.get('complete') else ' (incomplete)'}")
        lines += _counts("status", stats["status"]) + _counts("error kinds", stats["error_kind"])
        if stats.get("action"):
            lines += _counts("actions", stats["action"])
    manifest = path / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        attrs = data["attrs"]
        lines.append(
            f"  features: {data['rows']} rows in {len(data['shards'])} .h5 files; "
            f"tokens [{attrs['tokens']}, {attrs['width']}], embeds [{attrs['embed_dim']}] from "
            f"{attrs['model']} ({attrs['pretrained']}), layer {attrs['layer']}"
        )
    options = {k: v for k, v in plan.items() if k not in ("stage", "input")}
    lines.append(f"  options: {json.dumps(options, ensure_ascii=False)[:300]}")
    return "\n".join(lines)


def _hdf5(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        lines = [f"{path}: {len(f['keys']) if 'keys' in f else '?'} rows"]
        for name, dataset in f.items():
            lines.append(f"  {name:<9} {dataset.shape} {dataset.dtype} chunks={dataset.chunks}")
        for key, value in sorted(f.attrs.items()):
            lines.append(f"  @{key} = {value}")
    return "\n".join(lines)


def _tar(path: Path) -> str:
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
    except tarfile.TarError as e:
        raise UserError(f"{path} is not a valid tar ({e})") from None
    kinds = ", ".join(f"{ext} {n}" for ext, n in extensions.most_common())
    return (
        f"{path}: {len(set(keys))} samples, {sum(extensions.values())} members, "
        f"{size / 1e6:.1f} MB\n  members: {kinds}\n  first keys: {', '.join(keys[:3])}"
    )


def _parquet(path: Path) -> str:
    table = pq.read_table(path)
    lines = [f"{path}: {table.num_rows} rows", f"  columns: {', '.join(table.column_names)}"]
    if "status" in table.column_names:
        lines += _counts("status", Counter(table.column("status").to_pylist()))
    return "\n".join(lines)


def _counts(title: str, counts: dict) -> list[str]:
    if not counts:
        return []
    return [f"  {title}: " + ", ".join(f"{k} {n}" for k, n in counts.items())]
