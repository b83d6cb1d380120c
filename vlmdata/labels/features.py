"""The encode output that `labels classify` reads: its finished ``.h5`` shards, the model they
were made with, and the state of each shard (a shard encoded again since is labelled again).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py

from vlmdata.errors import UserError, one_line
from vlmdata.pipeline.shards import (
    PLAN,
    STAGE_DATA_FILES,
    SUCCESS,
    ShardFiles,
    complete_shard_stats,
    read_state_json,
    stage_of,
)
from vlmdata.pipeline.upstream import read_upstream, refuse_incomplete

ENCODE_FILES = STAGE_DATA_FILES["encode"]


@dataclass(frozen=True)
class FeatureModel:
    """The CLIP model the features came from, as their HDF5 attributes record it."""

    name: str
    pretrained: str  # a tag, the weights file's path when encoded, or "random"
    weights_sha256: str | None  # for a weights file
    embed_dim: int

    @property
    def weights(self) -> str:
        """What identifies the weights: the file's digest, else the tag."""
        return self.weights_sha256 or self.pretrained

    def describe(self) -> str:
        return f"{self.name} ({self.weights[:16]})"


@dataclass(frozen=True)
class FeatureShard:
    """One finished ``NNNNN.h5`` of the encode output."""

    name: str
    h5: Path
    rows: int
    marker: str  # the state of the encode shard: a digest of its stats marker


@dataclass(frozen=True)
class FeatureInput:
    """The shards to label and what identifies them for the plan."""

    shards: list[FeatureShard]
    model: FeatureModel
    fingerprint: dict
    partial: bool  # only the finished shards of an unfinished encode


def open_features(features_dir: Path, allow_incomplete: bool) -> FeatureInput:
    """The finished shards of the encode output ``features_dir`` and their one model; an
    unfinished encode is refused unless ``allow_incomplete``."""
    _require_encode_output(features_dir)
    upstream = read_upstream(features_dir)
    # read_upstream judges image shards (.tar); an encode shard is done with its .h5.
    root = read_state_json(features_dir / "stats.json", missing_ok=True) or {}
    done = frozenset(
        name
        for path in features_dir.glob("*.stats.json")
        if complete_shard_stats(
            ShardFiles(features_dir, name := path.name.removesuffix(".stats.json")), ENCODE_FILES
        )
    )
    names = root.get("shard_names")
    complete = bool(root.get("complete")) and isinstance(names, list) and done >= set(names)
    upstream = dataclasses.replace(upstream, complete=complete, done=done)
    refuse_incomplete(features_dir, upstream, allow_incomplete)
    if not done:
        raise UserError(f"{features_dir} has no finished shard yet; rerun once one is done")
    shards = [_feature_shard(features_dir, name) for name in sorted(done)]
    return FeatureInput(
        shards=shards,
        model=_one_model(features_dir, shards),
        fingerprint=upstream.fingerprint(),
        partial=not complete,
    )


def _require_encode_output(features_dir: Path) -> None:
    if not (features_dir / PLAN).is_file():
        raise UserError(
            f"FEATURES_DIR {features_dir} is not a vlmdata encode output (no {PLAN}); pass the "
            "output directory of `vlmdata encode`"
        )
    stage = stage_of(features_dir)
    if stage != "encode":
        raise UserError(
            f"FEATURES_DIR {features_dir} holds a {stage} output, not encode features; pass the "
            "output directory of `vlmdata encode`"
        )


def _feature_shard(features_dir: Path, name: str) -> FeatureShard:
    files = ShardFiles(features_dir, name)
    marker = files.stats.read_bytes()
    stats = read_state_json(files.stats)
    return FeatureShard(
        name=name,
        h5=files.data(".h5"),
        rows=stats.get("status", {}).get(SUCCESS, 0),
        # Like upstream.input_marker for image shards: rewriting the shard changes its marker.
        marker=hashlib.sha256(marker).hexdigest()[:16],
    )


def _one_model(features_dir: Path, shards: list[FeatureShard]) -> FeatureModel:
    """The model every shard was made with; shards of two models cannot share one taxonomy's
    text embeddings."""
    first = _model_of(shards[0].h5)
    for shard in shards[1:]:
        other = _model_of(shard.h5)
        if other != first:
            raise UserError(
                f"{features_dir} mixes features of two models ({shards[0].h5.name}: "
                f"{first.describe()}, {shard.h5.name}: {other.describe()}); label the "
                "features of one model at a time"
            )
    return first


def _model_of(h5: Path) -> FeatureModel:
    try:
        with h5py.File(h5, "r") as f:
            attrs = dict(f.attrs)
            embed_dim = int(f["embeds"].shape[1])
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{h5} is damaged ({one_line(e, 120)}); rerun the encode") from None
    if "model" not in attrs or "pretrained" not in attrs:
        raise UserError(f"{h5} records no model (attributes model, pretrained); rerun the encode")
    sha = attrs.get("weights_sha256")
    return FeatureModel(
        name=str(attrs["model"]),
        pretrained=str(attrs["pretrained"]),
        weights_sha256=str(sha) if sha is not None else None,
        embed_dim=embed_dim,
    )
