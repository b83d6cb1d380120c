"""What an image input says about itself: which vlmdata stage wrote it, whether that run
finished, and which samples each of its tars must hold.

preprocess and encode read the outputs of download and preprocess. Consuming one that is still
being written (or was interrupted) would mark a partial dataset complete, and a tar cut at a
member boundary reads as a valid, shorter tar: both are caught here, before they turn into
"100 % success" on a fraction of the data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError
from vlmdata.pipeline.image_sources import ImageShard, find_image_shards, fingerprint
from vlmdata.pipeline.runner import ROOT_STATS
from vlmdata.pipeline.shards import (
    IMAGE_SHARD_FILES,
    PLAN,
    SUCCESS,
    ShardFiles,
    complete_shard_stats,
    read_state_json,
)


@dataclass(frozen=True)
class Upstream:
    """A vlmdata stage output used as input."""

    stage: str
    complete: bool  # its run finished and every shard it names is whole
    done: Mapping[str, dict]  # the stats marker of each shard it has finished, by name
    plan_sha256: str  # identifies the run: stable while it adds shards

    def fingerprint(self) -> dict:
        return {"upstream": self.stage, "plan_sha256": self.plan_sha256}


def read_upstream(
    input_dir: Path, data_files: tuple[str, ...] = IMAGE_SHARD_FILES
) -> Upstream | None:
    """The stage output ``input_dir`` holds, or None when it is not a vlmdata output; its
    shards hold ``data_files`` (an image stage's by default)."""
    plan = read_state_json(input_dir / PLAN, missing_ok=True)
    if plan is None:
        return None
    done, complete = finished_shards(input_dir, data_files)
    canonical = json.dumps(plan, sort_keys=True).encode()
    return Upstream(
        stage=str(plan.get("stage", "unknown")),
        complete=complete,
        done=MappingProxyType(done),
        plan_sha256=hashlib.sha256(canonical).hexdigest(),
    )


def finished_shards(output_dir: Path, data_files: tuple[str, ...]) -> tuple[dict[str, dict], bool]:
    """The stats marker of each finished shard of the stage output ``output_dir`` (whose
    shards hold ``data_files``), by name in order, and whether the output is complete: its run
    finished and every shard it names is whole (one deleted or damaged since makes it not)."""
    done = {}
    for path in sorted(output_dir.glob("*.stats.json")):
        name = path.name.removesuffix(".stats.json")
        if (stats := complete_shard_stats(ShardFiles(output_dir, name), data_files)) is not None:
            done[name] = stats
    root = read_state_json(output_dir / ROOT_STATS, missing_ok=True) or {}
    names = root.get("shard_names")
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        names = None  # stats.json edited or damaged: the run's shards are not known
    complete = bool(root.get("complete")) and names is not None and done.keys() >= set(names)
    return done, complete


def input_marker(shard: ImageShard) -> str | None:
    """What identifies the current state of a vlmdata input shard: a digest of its stats
    marker, which changes whenever the shard is rewritten (``--retry-failed``). A downstream
    shard made from an older state is redone. None for inputs that are not vlmdata shards."""
    if shard.tar is None:
        return None
    return marker_of(shard.tar.with_name(f"{shard.tar.stem}.stats.json"))


def marker_of(stats: Path) -> str | None:
    """A digest of the stats marker at ``stats`` (None when it cannot be read): what a
    downstream shard records of the input shard it was made from."""
    try:
        return hashlib.sha256(stats.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def refuse_incomplete(input_dir: Path, upstream: Upstream, allow_incomplete: bool) -> None:
    """Refuse an unfinished upstream unless ``--allow-incomplete`` asks for its done shards."""
    if upstream.complete or allow_incomplete:
        return
    raise UserError(
        f"{input_dir} is an unfinished {upstream.stage} output ({len(upstream.done)} shards "
        f"done so far); finish it by rerunning the {upstream.stage}, or pass --allow-incomplete "
        "to process the finished shards now and the rest on a later run"
    )


def expected_keys(tar: Path) -> set[str] | None:
    """The keys the parquet beside ``tar`` lists as stored successes (None: no such parquet).

    Both vlmdata's and img2dataset's shards have one, with ``key`` and ``status`` columns.
    """
    parquet = tar.with_suffix(".parquet")
    if not parquet.exists():
        return None
    try:
        table = pq.read_table(parquet, columns=["key", "status"])
    except (pa.ArrowException, OSError, KeyError):  # not one of ours: nothing to check against
        return None
    return {
        key
        for key, status in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True)
        if status == SUCCESS
    }


def check_tar_complete(tar: Path, expected: set[str] | None, seen: set[str]) -> None:
    """Refuse a tar that lacks samples its parquet lists as successes (cut or damaged)."""
    if expected is None:
        return
    missing = expected - seen
    if missing:
        raise UserError(
            f"{tar} lacks {len(missing)} samples that {tar.with_suffix('.parquet').name} lists "
            f"as stored (e.g. {min(missing)}): the tar is cut short or damaged; rerun the stage "
            "that wrote it"
        )


@dataclass(frozen=True)
class ImageInput:
    """The shards an image stage reads, and what identifies them for the plan."""

    shards: list[ImageShard]
    fingerprint: dict
    partial: bool  # only the finished shards of an unfinished upstream


def open_image_input(input_dir: Path, shard_size: int, allow_incomplete: bool) -> ImageInput:
    """Find the shards of ``input_dir``, refusing an unfinished upstream unless allowed.

    A vlmdata upstream is identified by its plan, not its files, so a run that took the done
    shards of an unfinished download resumes, and picks up the rest, once it has finished.
    """
    upstream = read_upstream(input_dir) if input_dir.is_dir() else None
    if upstream is not None:  # before listing: a run killed before its first tar is unfinished
        refuse_incomplete(input_dir, upstream, allow_incomplete)
    shards = find_image_shards(input_dir, shard_size)
    if upstream is None:
        return ImageInput(shards, fingerprint(shards), partial=False)
    # Only the shards the upstream finished: a stray or half-written tar is not one of them.
    shards = [s for s in shards if s.tar is not None and s.tar.stem in upstream.done]
    if not shards:
        raise UserError(f"{input_dir} has no finished shard yet; rerun once one is done")
    return ImageInput(shards, upstream.fingerprint(), partial=not upstream.complete)
