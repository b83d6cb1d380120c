"""`vlmdata labels classify`: zero-shot labels for every embedding an encode output cached.

Per feature shard ``NNNNN.h5``: its embeddings are read in chunks and labelled against the
taxonomy's text embeddings (:mod:`vlmdata.labels.zeroshot`); ``NNNNN.parquet`` gets one row per
key of the ``.h5``, in its row order, and ``NNNNN.stats.json`` (counts per category and per
description) marks the shard done. The text embeddings are made once, on the first shard to
do, and cached in the output directory. A killed run redoes only its unfinished shards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import torch

from vlmdata.encode.models import resolve_device
from vlmdata.errors import UserError, require_at_least
from vlmdata.labels.features import FeatureShard, open_features
from vlmdata.labels.taxonomy import load_taxonomy, load_templates, templates_digest
from vlmdata.labels.text import (
    CACHE_FILE,
    LabelEmbeddings,
    cache_key,
    cached_label_embeddings,
    check_model_flag,
    label_embeddings,
    load_text_model,
    resolve_weights,
)
from vlmdata.labels.zeroshot import LABEL_SCHEMA, ZeroShotClassifier
from vlmdata.pipeline.distributor import Progress
from vlmdata.pipeline.runner import (
    Stage,
    check_output_location,
    check_ownership,
    path_argument,
    run_stage,
)
from vlmdata.pipeline.shards import (
    STAGE_DATA_FILES,
    SUCCESS,
    ShardFiles,
    atomic_write_json,
    data_sizes,
    shard_stats,
    write_parquet_atomic,
)
from vlmdata.pipeline.stats import RunSummary

LABEL_FILES = STAGE_DATA_FILES["labels"]


@dataclass
class ClassifyConfig:
    """Everything `vlmdata labels classify` takes; the CLI flags map one to one."""

    features_dir: str
    output_dir: str
    taxonomy: str | None = None  # None: the default shipped with vlmdata
    templates: str | None = None  # None: the default prompt templates
    model: str | None = None  # None: the features' own (a different one is refused)
    pretrained: str | None = None  # where the features' weights file is now
    top_k: int = 5
    batch_size: int = 4096  # embeddings per matrix product
    device: str = "auto"
    allow_incomplete: bool = False  # label the finished shards of an unfinished encode
    quiet: bool = False

    def __post_init__(self) -> None:
        require_at_least(1, top_k=self.top_k, batch_size=self.batch_size)


def run_classify(config: ClassifyConfig) -> RunSummary:
    """Label every embedding of ``config.features_dir`` into ``config.output_dir``."""
    source = path_argument(config.features_dir, "FEATURES_DIR")
    out = path_argument(config.output_dir)
    features = open_features(source, config.allow_incomplete)
    check_model_flag(features.model, config.model)
    taxonomy, templates = load_taxonomy(config.taxonomy), load_templates(config.templates)
    if config.top_k > len(taxonomy.descriptions):
        raise UserError(f"--top-k {config.top_k} is more than the taxonomy's "
                        f"{len(taxonomy.descriptions)} descriptions; lower --top-k")  # fmt: skip
    device = resolve_device(config.device, "fp32")
    # A weights file the user names is checked now; the recorded one only if it is needed.
    weights = resolve_weights(features.model, config.pretrained) if config.pretrained else None
    check_output_location(out, [source])  # user mistakes first: before any text is encoded
    check_ownership(out, "labels")
    model = features.model
    stage = Stage(
        name="labels",
        output_dir=out,
        # The options a user sets first: a refused resume names what changed.
        plan={
            "stage": "labels",
            "input": features.fingerprint,
            "taxonomy": taxonomy.digest,
            "templates": templates_digest(templates),
            "top_k": config.top_k,
            "model": model.name,
            "pretrained": model.pretrained,
            "weights_sha256": model.weights_sha256,
        },
        inputs=[source],
        data_files=LABEL_FILES,
        planned_shards=[shard.name for shard in features.shards],
        unit="img",
        total_rows=sum(shard.rows for shard in features.shards),
        quiet=config.quiet,
        partial_input=features.partial,
        input_markers={shard.name: shard.marker for shard in features.shards},
    )

    def classifier() -> ZeroShotClassifier:
        """Made on the first shard to do: a finished run never loads the model."""
        key = cache_key(model, taxonomy.digest, templates_digest(templates))

        def encode() -> LabelEmbeddings:
            clip = load_text_model(model, weights or resolve_weights(model, None), device)
            return label_embeddings(clip, taxonomy.descriptions, templates)

        labels = cached_label_embeddings(out / CACHE_FILE, key, encode)
        return ZeroShotClassifier(labels, taxonomy, config.top_k, device)

    def work(shards: Iterator[FeatureShard], progress: Progress) -> None:
        made = None
        for shard in shards:
            made = made or classifier()
            classify_shard(shard, made, out, config.batch_size, progress)

    return run_stage(stage, lambda stage: features.shards, work)


def classify_shard(
    shard: FeatureShard, classifier: ZeroShotClassifier, out: Path, batch_size: int,
    progress: Progress,
) -> None:  # fmt: skip
    """Label one feature shard: ``NNNNN.parquet``, then its stats marker."""
    started = time.monotonic()
    files = ShardFiles(out, shard.name)
    tables = []
    counts = _Counts(classifier)
    with h5py.File(shard.h5, "r") as f:
        embeds, keys = f["embeds"], f["keys"].asstr()
        for start in range(0, len(embeds), batch_size):
            stop = min(start + batch_size, len(embeds))
            predictions = classifier.predict(torch.from_numpy(embeds[start:stop]))
            tables.append(classifier.table(keys[start:stop].tolist(), start, predictions))
            counts.add(predictions.best, predictions.top_category)
            for _ in range(stop - start):
                progress.record(SUCCESS, None, 0)
    table = pa.concat_tables(tables) if tables else LABEL_SCHEMA.empty_table()
    write_parquet_atomic(files.parquet, table)
    stats = shard_stats(shard.name, [], time.monotonic() - started, shard.marker,
                        data_sizes(files, LABEL_FILES))  # fmt: skip
    # Every row is a success; the label counts are what the totals add up.
    stats.update(rows=len(table), status={SUCCESS: len(table)} if len(table) else {},
                 **counts.as_stats())  # fmt: skip
    atomic_write_json(files.stats, stats)


class _Counts:
    """Per-shard counts of the best descriptions, their categories and the top categories."""

    def __init__(self, classifier: ZeroShotClassifier) -> None:
        self.classifier = classifier
        self.description = np.zeros(len(classifier.descriptions), dtype=np.int64)
        self.top_category = np.zeros(len(classifier.categories), dtype=np.int64)

    def add(self, best: np.ndarray, top_category: np.ndarray) -> None:
        self.description += np.bincount(best, minlength=len(self.description))
        self.top_category += np.bincount(top_category, minlength=len(self.top_category))

    def as_stats(self) -> dict:
        classifier = self.classifier
        category = np.bincount(classifier.description_category, weights=self.description,
                               minlength=len(classifier.categories))  # fmt: skip
        return {
            "category": _nonzero(classifier.categories, category),
            "top_category": _nonzero(classifier.categories, self.top_category),
            "description": _nonzero(classifier.descriptions, self.description),
        }


def _nonzero(names: list[str], counts: np.ndarray) -> dict[str, int]:
    return {name: int(n) for name, n in zip(names, counts, strict=True) if n}
