"""The encode stage: image shards in, HDF5 feature shards out (DESIGN.md, "encode").

Per image shard: DataLoader workers decode and square the images (the crop/pad rule of
preprocess, at the model's input size) while the model runs; one forward pass gives the
pooled patch tokens and the CLIP embedding; images too close to a placeholder reference are
left out; a writer thread appends the rest to ``NNNNN.h5``. ``NNNNN.parquet`` has a row per
input sample (success, placeholder or failed_to_decode, with the placeholder similarity) and
``NNNNN.stats.json`` marks the shard done. A killed run redoes only its unfinished shards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmdata import __version__
from vlmdata.encode.features import PatchFeatures, token_grid_side
from vlmdata.encode.models import LoadedClip, load_clip, resolve_device
from vlmdata.encode.placeholders import builtin_placeholders, load_references
from vlmdata.encode.store import FeatureShardWriter
from vlmdata.errors import MachineFailure, UserError, require_at_least, require_finite
from vlmdata.pipeline.distributor import Progress, die_with_parent
from vlmdata.pipeline.image_sources import ImageShard, expected_samples
from vlmdata.pipeline.imageops import SquareOptions, make_square
from vlmdata.pipeline.runner import (
    Stage,
    check_output_location,
    check_ownership,
    path_argument,
    run_stage,
)
from vlmdata.pipeline.shards import (
    RECORD_SCHEMA,
    STAGE_DATA_FILES,
    SUCCESS,
    ShardFiles,
    atomic_write_json,
    data_sizes,
    duplicate_fields,
    read_state_json,
    shard_stats,
    write_parquet_atomic,
)
from vlmdata.pipeline.stats import RunSummary
from vlmdata.pipeline.upstream import (
    check_tar_complete,
    expected_keys,
    input_marker,
    open_image_input,
)

PLACEHOLDER = "placeholder"
# For real CLIP weights: re-encodings of one image score above ~0.95, unrelated images well
# below 0.9. Tune it from placeholder_similarity_histogram in the stats (README, "Placeholders").
DEFAULT_PLACEHOLDER_THRESHOLD = 0.92

ENCODE_SCHEMA = pa.schema(
    [
        RECORD_SCHEMA.field(name)
        for name in ("key", "url", "caption", "status", "error_kind", "error")
    ]
    + [
        ("placeholder_similarity", pa.float32()),
        ("row", pa.int32()),  # index in NNNNN.h5, for rows that are in it
        ("source", pa.string()),
    ]
)


@dataclass
class EncodeConfig:
    """Everything `vlmdata encode` takes; the CLI flags map one to one."""

    input_dir: str
    output_dir: str
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    layer: int = -2
    tokens: str = "64"
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 4
    references: tuple[str, ...] = ()
    placeholder_threshold: float = DEFAULT_PLACEHOLDER_THRESHOLD
    placeholder_filter: bool = True
    square: SquareOptions = field(default_factory=lambda: SquareOptions(size=448))
    max_pixels: int = 100_000_000
    shard_size: int = 10_000  # plain image folders only
    allow_incomplete: bool = False  # take the finished shards of an unfinished upstream
    quiet: bool = False

    def __post_init__(self) -> None:
        require_at_least(1, batch_size=self.batch_size, max_pixels=self.max_pixels,
                         shard_size=self.shard_size)  # fmt: skip
        require_at_least(0, workers=self.workers)
        require_finite("--placeholder-threshold", self.placeholder_threshold, -1, 1)
        if self.references and not self.placeholder_filter:
            raise UserError("--reference has no effect with --no-placeholder-filter; drop one")


def run_encode(config: EncodeConfig) -> RunSummary:
    """Encode every image of ``config.input_dir`` into HDF5 shards under ``config.output_dir``."""
    source, out = path_argument(config.input_dir, "INPUT_DIR"), path_argument(config.output_dir)
    images = open_image_input(source, config.shard_size, config.allow_incomplete)
    check_output_location(out, [source])  # user mistakes first: before the model loads
    check_ownership(out, "encode")
    device = resolve_device(config.device, config.precision)
    references = {} if not config.placeholder_filter else {
        **builtin_placeholders(), **load_references(list(config.references))
    }  # fmt: skip
    clip = load_clip(config.model, config.pretrained, device, config.precision)
    features = PatchFeatures(clip, config.layer, token_grid_side(config.tokens, clip))
    attrs = _attributes(config, clip, features, references)
    encoder = _ShardEncoder(config, clip, features, attrs, references)
    stage = Stage(
        name="encode",
        output_dir=out,
        # The square options by their flags first: a refused resume names what changed.
        plan={"stage": "encode", "input": images.fingerprint,
              "pad_threshold": config.square.pad_threshold, "fill": list(config.square.fill),
              "max_pixels": config.max_pixels, **attrs},
        inputs=[source],
        data_files=STAGE_DATA_FILES["encode"],
        planned_shards=[shard.name for shard in images.shards],
        unit="img",
        total_rows=expected_samples(images.shards),
        quiet=config.quiet,
        partial_input=images.partial,
        input_markers={shard.name: input_marker(shard) for shard in images.shards},
        before_complete=lambda out, names: _write_manifest(out, names, attrs),
        run_files=("manifest.json",),
    )

    def work(shards: Iterator[ImageShard], progress: Progress) -> None:
        for shard in shards:  # one model in this process: shards one after another
            encoder.encode(shard, out, progress)

    return run_stage(stage, lambda stage: images.shards, work)


def _attributes(
    config: EncodeConfig, clip: LoadedClip, features: PatchFeatures, references: dict
) -> dict:
    """What the HDF5 root attributes (and the plan) record: enough to reuse the cache."""
    return {
        "model": clip.name,
        "pretrained": clip.pretrained,
        "weights_sha256": clip.weights_sha256,
        "layer": features.layer,
        "layer_requested": config.layer,
        "tokens": features.side**2,
        "source_grid": clip.grid,
        "token_grid": features.side,
        "width": clip.width,
        "embed_dim": clip.embed_dim,
        "image_size": clip.image_size,
        "patch_size": clip.patch_size,
        "image_mean": list(clip.mean),
        "image_std": list(clip.std),
        "preprocessing": (
            f"EXIF orientation, RGB (alpha on fill {','.join(map(str, config.square.fill))}), "
            f"crop if min/max side >= {config.square.pad_threshold} else pad, "
            f"Lanczos resize to {clip.image_size}, normalize mean/std"
        ),
        "precision": config.precision,
        "placeholder_threshold": config.placeholder_threshold if references else None,
        "placeholder_references": sorted(references),
        "vlmdata_version": __version__,
    }


class _SquaredImages(IterableDataset):
    """One shard's samples, decoded and squared on DataLoader workers (each takes every n-th)."""

    def __init__(
        self, shard: ImageShard, options: SquareOptions, max_pixels: int, mean, std
    ) -> None:
        self.shard, self.options, self.max_pixels = shard, options, max_pixels
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __iter__(self):
        worker = get_worker_info()
        part, parts = (worker.id, worker.num_workers) if worker else (0, 1)
        for index, sample in enumerate(self.shard.samples()):
            if index % parts != part:
                continue
            item = {"key": sample.key, "caption": sample.caption or "", "image": None,
                    "url": sample.meta.get("url"), "source": sample.source}  # fmt: skip
            if sample.duplicate:  # the first of a repeated key is kept: no decode
                yield {**item, **duplicate_fields()}
                continue
            result, square = make_square(sample.image, self.options, self.max_pixels)
            tensor = None if square is None else normalized(square, self.mean, self.std)
            yield {**item, "image": tensor, "status": result.status,
                   "error_kind": result.error_kind, "error": result.error}  # fmt: skip


def normalized(square: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """An RGB Pillow image -> the model's input tensor ``[3, H, W]``."""
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    return (pixels.view(square.height, square.width, 3).permute(2, 0, 1) / 255.0 - mean) / std


def _collate(items: list[dict]) -> dict:
    """Keep per-sample metadata as lists; stack the images that decoded (the rest: failures
    and repeated keys)."""
    decoded = [item for item in items if item["image"] is not None]
    return {
        "failed": [item for item in items if item["image"] is None],
        "decoded": decoded,
        "images": torch.stack([item["image"] for item in decoded]) if decoded else None,
    }


def _decoding_worker(worker_id: int) -> None:
    die_with_parent()  # a killed encode must not leave its decoders running
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


class _ShardEncoder:
    def __init__(self, config: EncodeConfig, clip: LoadedClip, features: PatchFeatures, attrs: dict,
                 references: dict[str, bytes]) -> None:  # fmt: skip
        self.config, self.clip, self.features, self.attrs = config, clip, features, attrs
        # The square rule at the model's input size: a 448 preprocess output is just resized.
        self.options = SquareOptions(
            size=clip.image_size, pad_threshold=config.square.pad_threshold, fill=config.square.fill
        )
        self.references = _reference_embeds(references, clip, features, self.options)

    def encode(self, shard: ImageShard, out: Path, progress: Progress) -> None:
        config, clip = self.config, self.clip
        started = time.monotonic()
        files = ShardFiles(out, shard.name)
        loader = DataLoader(
            _SquaredImages(shard, self.options, config.max_pixels, clip.mean, clip.std),
            batch_size=config.batch_size, num_workers=config.workers, collate_fn=_collate,
            worker_init_fn=_decoding_worker, pin_memory=clip.device == "cuda",
            prefetch_factor=4 if config.workers else None,
        )  # fmt: skip
        writer = FeatureShardWriter(
            out / f"{shard.name}.h5", self.features.side**2, clip.width, clip.embed_dim, self.attrs
        )
        records: list[dict] = []
        expected = expected_keys(shard.tar) if shard.tar is not None else None
        marker = input_marker(shard)  # before reading: a rewrite meanwhile makes it stale
        try:
            for batch in _batches(loader, shard):
                for item in batch["failed"]:
                    records.append(_record(item, item["status"]))
                    progress.record(item["status"], item["error_kind"], 0)
                if batch["images"] is not None:
                    records += self._encode_batch(batch, writer, progress)
            check_tar_complete(shard.tar, expected, {r["key"] for r in records})
            writer.close()
        except BaseException:
            writer.abort()
            raise
        records.sort(key=lambda r: r["key"])
        write_parquet_atomic(files.parquet, pa.Table.from_pylist(records, schema=ENCODE_SCHEMA))
        sizes = data_sizes(files, STAGE_DATA_FILES["encode"])
        stats = shard_stats(shard.name, records, time.monotonic() - started, marker, sizes)
        atomic_write_json(files.stats, stats)

    def _encode_batch(
        self, batch: dict, writer: FeatureShardWriter, progress: Progress
    ) -> list[dict]:
        images = batch["images"].to(self.clip.device, self.clip.dtype, non_blocking=True)
        tokens, embeds = self.features(images)
        if self.references is not None:
            similarity = (embeds @ self.references.T).max(dim=1).values.cpu().tolist()
        else:
            similarity = [None] * len(embeds)
        keep = [s is None or s < self.config.placeholder_threshold for s in similarity]
        kept = [i for i, k in enumerate(keep) if k]
        first = writer.append(
            [batch["decoded"][i]["key"] for i in kept],
            [batch["decoded"][i]["caption"] for i in kept],
            tokens[kept].to(torch.float16).cpu().numpy(),
            embeds[kept].to(torch.float16).cpu().numpy(),
        )
        records = []
        rows = iter(range(first, first + len(kept)))
        for item, is_kept, score in zip(batch["decoded"], keep, similarity, strict=True):
            status = SUCCESS if is_kept else PLACEHOLDER
            records.append(_record(item, status, score, next(rows) if is_kept else None))
            progress.record(status, None if is_kept else "placeholder", 0)
        return records


def _batches(loader: DataLoader, shard: ImageShard) -> Iterator[dict]:
    """The loader's batches; a decoding worker that dies (the OOM killer) stops the run with
    one line instead of a DataLoader traceback. The shard is redone on the rerun."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise MachineFailure(
            f"a decoding worker died while encoding shard {shard.name} "
            f"({str(e).splitlines()[0][:120]}); it was likely killed for memory: lower "
            "--workers or --batch-size and rerun the same command to resume"
        ) from None


def _record(
    item: dict, status: str, similarity: float | None = None, row: int | None = None
) -> dict:
    return {
        "key": item["key"], "url": item["url"], "caption": item["caption"] or None,
        "status": status, "error_kind": item["error_kind"] if status != SUCCESS else None,
        "error": item["error"] if status != SUCCESS else None,
        "placeholder_similarity": similarity, "row": row, "source": item["source"],
    }  # fmt: skip


def _reference_embeds(
    references: dict[str, bytes], clip: LoadedClip, features: PatchFeatures, options: SquareOptions
) -> torch.Tensor | None:
    """Unit CLIP embeddings of the references, made exactly like the data's."""
    if not references:
        return None
    mean, std = torch.tensor(clip.mean).view(3, 1, 1), torch.tensor(clip.std).view(3, 1, 1)
    squares = [make_square(data, options, _REFERENCE_MAX_PIXELS)[1] for data in references.values()]
    batch = torch.stack([normalized(square, mean, std) for square in squares])
    return features(batch.to(clip.device, clip.dtype))[1]


_REFERENCE_MAX_PIXELS = 10**9  # references are the user's own files


def _write_manifest(out: Path, names: list[str], attrs: dict) -> None:
    """``manifest.json``: the attributes, and every shard's file and row count."""
    shards = []
    for name in names:
        stats = read_state_json(ShardFiles(out, name).stats)
        shards.append({"name": name, "file": f"{name}.h5", "rows": stats["status"].get(SUCCESS, 0)})
    atomic_write_json(out / "manifest.json", {"attrs": attrs, "shards": shards,
                                              "rows": sum(s["rows"] for s in shards)})  # fmt: skip
