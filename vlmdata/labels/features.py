"""The encode output that `labels classify` reads: its finished ``.h5`` shards, the model they
were made with, and the state of each shard (a shard encoded again since is labelled again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py

from vlmdata.errors import UserError, one_line
from vlmdata.pipeline.shards import PLAN, STAGE_DATA_FILES, SUCCESS, ShardFiles, read_state_json
from vlmdata.pipeline.upstream import marker_of, read_upstream, refuse_incomplete

ENCODE_FILES = STAGE_DATA_FILES["encode"]


@dataclass(frozen=True)
class FeatureModel:
    """The CLIP model the features came from, as the encode's plan (and each HDF5 file's
    attributes) record it."""

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
    marker: str | None  # the state of the encode shard: a digest of its stats marker


@dataclass(frozen=True)
class FeatureInput:
    """The shards to label and what identifies them for the plan."""

    shards: list[FeatureShard]
    model: FeatureModel
    fingerprint: dict
    partial: bool  # only the finished shards of an unfinished encode


def open_features(features_dir: Path, allow_incomplete: bool) -> FeatureInput:
    """The finished shards of the encode output ``features_dir`` and their model (as its plan
    records it); an unfinished encode is refused unless ``allow_incomplete``."""
    plan = _encode_plan(features_dir)
    upstream = read_upstream(features_dir, ENCODE_FILES)
    refuse_incomplete(features_dir, upstream, allow_incomplete)
    if not upstream.done:
        raise UserError(f"{features_dir} has no finished shard yet; rerun once one is done")
    shards = [_feature_shard(features_dir, name, stats) for name, stats in upstream.done.items()]
    return FeatureInput(
        shards=shards,
        model=_plan_model(features_dir, plan, shards[0].h5),
        fingerprint=upstream.fingerprint(),
        partial=not upstream.complete,
    )


def check_made_with(model: FeatureModel, h5: Path, attrs: Mapping) -> None:
    """Refuse a feature shard (its root attributes ``attrs``) made with another model than
    the encode's plan records: shards of two models cannot share one set of text embeddings."""
    sha = attrs.get("weights_sha256")
    weights = str(sha if sha is not None else attrs.get("pretrained"))
    name = str(attrs.get("model"))
    if (name, weights) != (model.name, model.weights):
        raise UserError(
            f"{h5.parent} mixes features of two models ({h5.name}: {name} ({weights[:16]}), its "
            f"{PLAN}: {model.describe()}); label the features of one model at a time"
        )


def _encode_plan(features_dir: Path) -> dict:
    plan = read_state_json(features_dir / PLAN, missing_ok=True)
    if plan is None:
        raise UserError(
            f"FEATURES_DIR {features_dir} is not a vlmdata encode output (no {PLAN}); pass the "
            "output directory of `vlmdata encode`"
        )
    if (stage := plan.get("stage")) != "encode":
        stage = stage if isinstance(stage, str) else "unknown"
        raise UserError(
            f"FEATURES_DIR {features_dir} holds a {stage} output, not encode features; pass the "
            "output directory of `vlmdata encode`"
        )
    return plan


def _feature_shard(features_dir: Path, name: str, stats: dict) -> FeatureShard:
    files = ShardFiles(features_dir, name)
    return FeatureShard(
        name=name,
        h5=files.data(".h5"),
        rows=stats.get("status", {}).get(SUCCESS, 0),
        # Like upstream.input_marker for image shards: rewriting the shard changes its marker.
        marker=marker_of(files.stats),
    )


def _plan_model(features_dir: Path, plan: dict, first: Path) -> FeatureModel:
    """The model ``plan`` records, checked shard by shard as each is labelled: the plan of an
    encode is the same for all its shards, and reading it opens no ``.h5`` (there may be
    thousands). A weights file's path is left out of the plan: it is the first shard's."""
    name, sha, embed_dim = plan.get("model"), plan.get("weights_sha256"), plan.get("embed_dim")
    pretrained = plan.get("pretrained") if sha is None else _recorded_pretrained(first)
    if not (isinstance(name, str) and isinstance(pretrained, str) and isinstance(embed_dim, int)):
        raise UserError(
            f"{features_dir / PLAN} records no model (model, pretrained or weights_sha256, "
            "embed_dim); rerun the encode"
        )
    return FeatureModel(name=name, pretrained=pretrained,
                        weights_sha256=str(sha) if sha is not None else None,
                        embed_dim=embed_dim)  # fmt: skip


def _recorded_pretrained(h5: Path) -> str | None:
    try:
        with h5py.File(h5, "r") as f:
            pretrained = f.attrs.get("pretrained")
    except OSError as e:
        raise UserError(f"{h5} is damaged ({one_line(e, 120)}); rerun the encode") from None
    return None if pretrained is None else str(pretrained)
