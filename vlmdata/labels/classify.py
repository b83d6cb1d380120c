"""`vlmdata labels classify`: zero-shot labels for every embedding an encode output cached.

Per feature shard ``NNNNN.h5``: its embeddings are read in chunks and labelled against the
taxonomy's text embeddings (:mod:`vlmdata.labels.zeroshot`); ``NNNNN.parquet`` gets one row per
key of the ``.h5``, in its row order, and ``NNNNN.stats.json`` (counts per category and per
description, and of the images left unlabelled: a NaN or inf embedding) marks the shard done;
both are written on a thread while the next shard is labelled. The text embeddings are made
once, on the first shard to do, and cached in the output directory. A killed run redoes only
its unfinished shards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import torch

from vlmdata.encode.models import resolve_device
from vlmdata.errors import UserError, one_line, require_at_least
from vlmdata.labels.features import (
    FeatureInput,
    FeatureModel,
    FeatureShard,
    check_made_with,
    open_features,
)
from vlmdata.labels.taxonomy import Taxonomy, load_taxonomy, load_templates, templates_digest
from vlmdata.labels.text import (
    CACHE_FILE,
    LabelEmbeddings,
    cache_key,
    cached_label_embeddings,
    check_model_flag,
    check_text_model,
    label_embeddings,
    load_text_model,
    read_cache,
    resolve_weights,
)
from vlmdata.labels.zeroshot import LABEL_SCHEMA, Predictions, ZeroShotClassifier
from vlmdata.pipeline.distributor import Progress
from vlmdata.pipeline.ray_distributor import RayOptions
from vlmdata.pipeline.runner import (
    Stage,
    check_output_location,
    check_ownership,
    input_location,
    output_location,
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
    ray: RayOptions | None = None  # --distributor ray: Ray actors, one text model each

    def __post_init__(self) -> None:
        require_at_least(1, top_k=self.top_k, batch_size=self.batch_size)


def run_classify(config: ClassifyConfig) -> RunSummary:
    """Label every embedding of ``config.features_dir`` into ``config.output_dir``."""
    out, remote = output_location(config.output_dir, inputs=(config.features_dir,))
    source, cache = input_location(config.features_dir, "FEATURES_DIR")
    features = open_features(source, config.allow_incomplete)
    check_model_flag(features.model, config.model)
    taxonomy, templates = load_taxonomy(config.taxonomy), load_templates(config.templates)
    if config.top_k > len(taxonomy.descriptions):
        raise UserError(f"--top-k {config.top_k} is more than the taxonomy's "
                        f"{len(taxonomy.descriptions)} descriptions; lower --top-k")  # fmt: skip
    device = resolve_device(config.device, "fp32", config.ray and config.ray.gpus_per_worker)
    # A weights file the user names is checked now; the recorded one only if it is needed.
    weights = resolve_weights(features.model, config.pretrained) if config.pretrained else None
    if remote is None:  # user mistakes first: before any text is encoded
        check_output_location(out, [source])
    check_ownership(out, "labels", remote)
    model = features.model
    key = cache_key(model, taxonomy.digest, templates_digest(templates))
    shape = (len(taxonomy.descriptions), model.embed_dim)
    # Before the plan is written, so that a refused taxonomy, fixed, reruns into the same
    # directory. Text embeddings cached for this key were checked when made (seconds saved).
    if read_cache(out / CACHE_FILE, key, shape) is None:
        check_text_model(model, taxonomy.descriptions, templates)
    stage = Stage(
        name="labels",
        output_dir=out,
        plan=labels_plan(features, taxonomy, templates, config.top_k),
        inputs=[source],
        data_files=LABEL_FILES,
        planned_shards=[shard.name for shard in features.shards],
        unit="img",
        total_rows=sum(shard.rows for shard in features.shards),
        quiet=config.quiet,
        partial_input=features.partial,
        input_markers={shard.name: shard.marker for shard in features.shards},
        remote=remote,
        input_cache=cache,
        ray=config.ray,
    )

    def classifier() -> ZeroShotClassifier:
        """Made on the first shard to do: a finished run never loads the model."""

        def encode() -> LabelEmbeddings:
            clip = load_text_model(model, weights or resolve_weights(model, None), device)
            return label_embeddings(clip, taxonomy.descriptions, templates)

        labels = cached_label_embeddings(out / CACHE_FILE, key, encode, shape)
        return ZeroShotClassifier(labels, taxonomy, config.top_k, device)

    def work(shards: Iterator[FeatureShard], progress: Progress) -> None:
        made = None
        # A shard's files are written (and fsynced) while the next shard is labelled; one
        # shard waits at most, so memory holds two shards' labels.
        with ThreadPoolExecutor(1, thread_name_prefix="vlmdata-labels-writer") as writer:
            written: Future | None = None
            for shard in shards:
                if made is None:
                    made = classifier()
                labelled = label_shard(shard, model, made, config.batch_size, progress)
                if written is not None:
                    written.result()  # a failed write stops the run here
                written = writer.submit(labelled.write, out)
            if written is not None:
                written.result()

    return run_stage(stage, lambda stage: features.shards, work)


def labels_plan(
    features: FeatureInput, taxonomy: Taxonomy, templates: Sequence[str], top_k: int
) -> dict:
    """The output's ``plan.json``: what its labels depend on (a resume with another plan is
    refused), the options a user sets first so that a refusal names what changed."""
    model = features.model
    return {
        "stage": "labels",
        "input": features.fingerprint,
        "taxonomy": taxonomy.digest,
        "taxonomy_name": taxonomy.name,  # what the report shows: one output, one name
        "templates": templates_digest(templates),
        "top_k": top_k,
        "model": model.name,
        "pretrained": model.pretrained,
        "weights_sha256": model.weights_sha256,
    }


@dataclass
class LabelledShard:
    """One feature shard's labels, to be written: its table, counts and when it began."""

    shard: FeatureShard
    table: pa.Table
    counts: _Counts
    started: float  # time.monotonic()

    def write(self, out: Path) -> None:
        """``NNNNN.parquet``, then the stats marker that makes the shard done."""
        files = ShardFiles(out, self.shard.name)
        write_parquet_atomic(files.parquet, self.table)
        stats = shard_stats(self.shard.name, [], time.monotonic() - self.started,
                            self.shard.marker, data_sizes(files, LABEL_FILES))  # fmt: skip
        # Every row is a success; the label counts are what the totals add up.
        rows = len(self.table)
        stats.update(rows=rows, status={SUCCESS: rows} if rows else {}, **self.counts.as_stats())
        atomic_write_json(files.stats, stats)


def label_shard(
    shard: FeatureShard,
    model: FeatureModel,
    classifier: ZeroShotClassifier,
    batch_size: int,
    progress: Progress,
) -> LabelledShard:
    """Label one feature shard of ``model``, ``batch_size`` embeddings per matrix product."""
    started = time.monotonic()
    tables = []
    counts = _Counts(classifier.taxonomy)
    for start, keys, embeds in _read_chunks(shard, model, batch_size):
        predictions = classifier.predict(torch.from_numpy(embeds))
        tables.append(classifier.table(keys, start, predictions))
        counts.add(predictions)
        progress.record_many(SUCCESS, len(keys))
    table = pa.concat_tables(tables) if tables else LABEL_SCHEMA.empty_table()
    return LabelledShard(shard, table, counts, started)


def _read_chunks(
    shard: FeatureShard, model: FeatureModel, batch_size: int
) -> Iterator[tuple[int, pa.Array, np.ndarray]]:
    """The row, keys and embeddings ``[n, E]`` of each ``batch_size`` rows of the shard's
    ``.h5``; a file of another model is refused, and so is one not laid out as encode writes
    it or that cannot be read (a :class:`UserError` naming the file and how to make it again)."""
    try:
        with h5py.File(shard.h5, "r") as f:
            check_made_with(model, shard.h5, f.attrs)  # open anyway: no pass over every file
            embeds, keys = _layout(f, model.embed_dim)
            # As UTF-8 bytes, checked by Arrow in one call: decoding key by key costs more.
            key_array = pa.array(keys[:], pa.string())
            for start in range(0, len(embeds), batch_size):
                stop = min(start + batch_size, len(embeds))
                yield start, key_array.slice(start, stop - start), embeds[start:stop]
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as e:
        raise _damaged(shard, one_line(e, 120)) from None


def _layout(f: h5py.File, embed_dim: int) -> tuple[h5py.Dataset, h5py.Dataset]:
    """``embeds`` ``[n, embed_dim]`` and ``keys`` ``[n]`` (strings), as encode writes them."""
    embeds, keys = f.get("embeds"), f.get("keys")
    if not isinstance(embeds, h5py.Dataset) or not isinstance(keys, h5py.Dataset):
        raise ValueError("no embeds and keys datasets")
    if embeds.ndim != 2 or embeds.shape[1] != embed_dim:
        raise ValueError(f"embeds of shape {embeds.shape}, not [rows, {embed_dim}]")
    if keys.shape != embeds.shape[:1]:
        raise ValueError(f"{keys.shape} keys for {len(embeds)} embeddings")
    if h5py.check_string_dtype(keys.dtype) is None:
        raise ValueError(f"keys of type {keys.dtype}, not strings")
    return embeds, keys


def _damaged(shard: FeatureShard, reason: str) -> UserError:
    folder = shard.h5.parent
    return UserError(
        f"{shard.h5} is not a whole feature shard ({reason}); rerun the encode of that shard: "
        f"delete {shard.name}.stats.json in {folder} and rerun vlmdata encode"
    )


class _Counts:
    """Per-shard counts of the best descriptions, their categories and the top categories,
    and of the images left unlabelled (a non-finite embedding)."""

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        self.description = np.zeros(len(taxonomy.descriptions), dtype=np.int64)
        self.top_category = np.zeros(len(taxonomy.category_names), dtype=np.int64)
        self.unlabelled = 0

    def add(self, predictions: Predictions) -> None:
        labelled = predictions.labelled
        self.description += np.bincount(predictions.best[labelled],
                                        minlength=len(self.description))  # fmt: skip
        self.top_category += np.bincount(predictions.top_category[labelled],
                                         minlength=len(self.top_category))  # fmt: skip
        self.unlabelled += int(len(labelled) - labelled.sum())

    def as_stats(self) -> dict:
        taxonomy = self.taxonomy
        names = taxonomy.category_names
        category = np.bincount(taxonomy.category_ids, weights=self.description,
                               minlength=len(names))  # fmt: skip
        return {
            "category": _nonzero(names, category),
            "top_category": _nonzero(names, self.top_category),
            "description": _nonzero(taxonomy.descriptions, self.description),
            "unlabelled": self.unlabelled,
        }


def _nonzero(names: Sequence[str], counts: np.ndarray) -> dict[str, int]:
    return {name: int(n) for name, n in zip(names, counts, strict=True) if n}
