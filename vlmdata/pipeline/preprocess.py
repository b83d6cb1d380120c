"""The preprocess stage: image shards in, ``size`` x ``size`` squares out (DESIGN.md, "preprocess").

Every input sample keeps its key and gets one status row: ``success`` (cropped or padded),
``filtered`` (shorter side below ``--min-side``), ``failed_to_decode``, or ``duplicate`` (a
key repeated in its tar: the first is kept, the others recorded under ``KEY#2``, ...). Shards
are the unit of work: each worker process decodes, squares and encodes whole shards, so image
bytes never cross a process boundary. Output shards follow the download contract and resume
the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import pyarrow as pa

from vlmdata.errors import require_at_least
from vlmdata.pipeline.distributor import Progress, usable_cpus
from vlmdata.pipeline.image_sources import ImageShard, expected_samples
from vlmdata.pipeline.imageops import SquareOptions, decoder_warnings_ignored, square_image
from vlmdata.pipeline.ray_distributor import RayOptions
from vlmdata.pipeline.runner import Stage, input_location, output_location, run_stage
from vlmdata.pipeline.shards import (
    RECORD_SCHEMA,
    STAGE_DATA_FILES,
    ShardFiles,
    ShardWriter,
    duplicate_fields,
)
from vlmdata.pipeline.stats import RunSummary
from vlmdata.pipeline.upstream import (
    ImageInput,
    check_tar_complete,
    expected_keys,
    input_marker,
    open_image_input,
)

_COLUMNS = ["key", "url", "caption", "status", "error_kind", "error", "bytes", "sha256", "format",
            "original_width", "original_height", "width", "height", "ratio", "action"]  # fmt: skip
PREPROCESS_SCHEMA = pa.schema(
    [RECORD_SCHEMA.field(name) for name in _COLUMNS] + [("source", pa.string())]
)


@dataclass
class PreprocessConfig:
    """Everything `vlmdata preprocess` takes; the CLI flags map one to one."""

    input_dir: str
    output_dir: str
    square: SquareOptions = field(default_factory=SquareOptions)
    max_pixels: int = 100_000_000  # larger images are refused before decoding
    shard_size: int = 10_000  # plain image folders only: tars keep their own shards
    processes: int = field(default_factory=usable_cpus)
    allow_incomplete: bool = False  # take the finished shards of an unfinished upstream
    quiet: bool = False
    ray: RayOptions | None = None  # --distributor ray: `processes` Ray workers

    def __post_init__(self) -> None:
        require_at_least(1, max_pixels=self.max_pixels, shard_size=self.shard_size,
                         processes=self.processes)  # fmt: skip

    def plan(self, images: ImageInput) -> dict:
        """The input and the options that change what lands in the output."""
        return {
            "stage": "preprocess",
            "input": images.fingerprint,
            "square": asdict(self.square),
            "max_pixels": self.max_pixels,
            "shard_size": self.shard_size if images.shards[0].tar is None else None,
        }


def run_preprocess(config: PreprocessConfig) -> RunSummary:
    """Square every image of ``config.input_dir`` into shards under ``config.output_dir``."""
    out, remote = output_location(config.output_dir, inputs=(config.input_dir,))
    source, cache = input_location(config.input_dir, "INPUT_DIR", lazy=(".tar", ".parquet"))
    images = open_image_input(source, config.shard_size, config.allow_incomplete)
    stage = Stage(
        name="preprocess",
        output_dir=out,
        plan=config.plan(images),
        inputs=[source],
        data_files=STAGE_DATA_FILES["preprocess"],
        planned_shards=[shard.name for shard in images.shards],
        unit="img",
        total_rows=expected_samples(images.shards),
        processes=min(config.processes, len(images.shards)),
        quiet=config.quiet,
        partial_input=images.partial,
        input_markers={shard.name: input_marker(shard) for shard in images.shards},
        remote=remote,
        input_cache=cache,
        ray=config.ray,
    )
    work = partial(preprocess_shards, replace(config, ray=None), str(out))
    return run_stage(stage, lambda stage: images.shards, work)


def preprocess_shards(
    config: PreprocessConfig, out_dir: str, shards: Iterator[ImageShard], progress: Progress
) -> None:
    """One process's share of the run: square every sample of ``shards``."""
    with decoder_warnings_ignored():
        for shard in shards:
            preprocess_shard(config, Path(out_dir), shard, progress)


def preprocess_shard(
    config: PreprocessConfig, out: Path, shard: ImageShard, progress: Progress
) -> None:
    started = time.monotonic()
    writer = ShardWriter(ShardFiles(out, shard.name))
    expected = expected_keys(shard.tar) if shard.tar is not None else None
    marker = input_marker(shard)  # before reading: a rewrite meanwhile makes it stale
    try:
        keys: list[str] = []
        for sample in shard.samples():
            keys.append(sample.key)
            if sample.key in writer.records:  # done before an interruption
                progress.skip(1)
                continue
            if sample.duplicate:  # a key repeated inside the input: the first is kept
                record = {"key": sample.key, "url": sample.meta.get("url"),
                          "caption": sample.caption, **duplicate_fields(),
                          "source": sample.source}  # fmt: skip
                writer.add(record)
                progress.record(record["status"], record["error_kind"], 0)
                continue
            image = square_image(sample.image, config.square, config.max_pixels)
            record = {
                "key": sample.key,
                "url": sample.meta.get("url"),
                "caption": sample.caption,
                **image.record_fields(),
                "bytes": len(image.data) if image.data is not None else len(sample.image),
                "source": sample.source,
            }
            if image.ok:
                writer.add(record, image.data, image.extension)
            else:
                writer.add(record)
            progress.record(image.status, image.error_kind, record["bytes"] if image.ok else 0)
        check_tar_complete(shard.tar, expected, set(keys))
        # Downloads append samples as they finish: the parquet goes back to key order.
        writer.finish(
            sorted(keys), PREPROCESS_SCHEMA, time.monotonic() - started, input_marker=marker
        )
    except BaseException:
        writer.close()
        raise
