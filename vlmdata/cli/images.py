"""`vlmdata preprocess` and `vlmdata encode`: image shards (or a folder of images) into squares,
and into CLIP features."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from vlmdata.cli.failures import run_command
from vlmdata.cli.options import (
    MODEL,
    PERFORMANCE,
    SQUARES,
    AllowIncomplete,
    ConfigFile,
    Device,
    Distributor,
    Fill,
    Format,
    GpusPerWorker,
    MaxPixels,
    MaxShardRetries,
    MinSide,
    PadThreshold,
    Precision,
    Quality,
    Quiet,
    RayAddress,
    ShardSize,
    ray_options,
    square_options,
)
from vlmdata.pipeline.distributor import usable_cpus


def preprocess(
    ctx: typer.Context,
    input_dir: Annotated[
        str,
        typer.Argument(help="vlmdata or img2dataset shards (*.tar), or a folder of images."),
    ],
    output_dir: Annotated[str, typer.Argument(help="Where the square shards go.")],
    size: Annotated[
        int, typer.Option(help="Side of the output squares.", rich_help_panel=SQUARES)
    ] = 448,
    pad_threshold: PadThreshold = 0.6,
    fill: Fill = "0,0,0",
    format: Format = "jpg",
    quality: Quality = 95,
    min_side: MinSide = 0,
    max_pixels: MaxPixels = 100_000_000,
    shard_size: ShardSize = 10_000,
    processes: Annotated[
        int,
        typer.Option(
            help="Worker processes, each squaring whole shards (with --distributor ray: the Ray "
            "workers, default one per cluster CPU).",
            show_default="the usable CPUs",
            rich_help_panel=PERFORMANCE,
        ),
    ] = usable_cpus(),
    allow_incomplete: AllowIncomplete = False,
    distributor: Distributor = "local",
    ray_address: RayAddress = "",
    max_shard_retries: MaxShardRetries = 3,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Crop or pad every image to a square and resize it (EXIF-oriented, RGB), resumably.

    Example: vlmdata preprocess shards/ squares/ --size 336 --format webp
    """
    from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

    def stage():
        square = square_options(size, pad_threshold, fill, format, quality, min_side)
        return run_preprocess(
            PreprocessConfig(
                input_dir=input_dir,
                output_dir=output_dir,
                square=square,
                max_pixels=max_pixels,
                shard_size=shard_size,
                processes=processes,
                allow_incomplete=allow_incomplete,
                quiet=quiet,
                ray=ray_options(ctx, distributor, "processes"),
            )
        )

    run_command(stage, record_in=lambda summary: summary.output_dir, ctx=ctx)


def encode(
    ctx: typer.Context,
    input_dir: Annotated[
        str,
        typer.Argument(help="preprocess/download/img2dataset shards (*.tar), or an image folder."),
    ],
    output_dir: Annotated[str, typer.Argument(help="Where the HDF5 feature shards go.")],
    model: Annotated[
        str,
        typer.Option(
            help="open_clip model name, or tiny-random-clip for tests.", rich_help_panel=MODEL
        ),
    ] = "ViT-L-14-336",
    pretrained: Annotated[
        str,
        typer.Option(
            help="open_clip tag, a local weights file, or none (random weights).",
            rich_help_panel=MODEL,
        ),
    ] = "openai",
    layer: Annotated[
        int,
        typer.Option(
            help="Transformer block whose output gives the patch tokens.", rich_help_panel=MODEL
        ),
    ] = -2,
    tokens: Annotated[
        str,
        typer.Option(
            help="Pooled tokens per image: a square number <= the grid, or all.",
            rich_help_panel=MODEL,
        ),
    ] = "64",
    batch_size: Annotated[
        int, typer.Option(help="Images per forward pass.", rich_help_panel=PERFORMANCE)
    ] = 64,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Annotated[
        int,
        typer.Option(
            help="DataLoader processes decoding images.",
            show_default="4, at most the usable CPUs",
            rich_help_panel=PERFORMANCE,
        ),
    ] = min(4, usable_cpus()),
    reference: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra placeholder image to filter out (repeatable).",
            rich_help_panel="Placeholder filter",
        ),
    ] = None,
    placeholder_threshold: Annotated[
        float,
        typer.Option(
            help="Cosine similarity to a reference at which an image is dropped.",
            rich_help_panel="Placeholder filter",
        ),
    ] = 0.92,
    no_placeholder_filter: Annotated[
        bool,
        typer.Option(
            "--no-placeholder-filter",
            help="Keep placeholder-like images.",
            rich_help_panel="Placeholder filter",
        ),
    ] = False,
    pad_threshold: PadThreshold = 0.6,
    fill: Fill = "0,0,0",
    max_pixels: MaxPixels = 100_000_000,
    shard_size: ShardSize = 10_000,
    allow_incomplete: AllowIncomplete = False,
    distributor: Distributor = "local",
    ray_address: RayAddress = "",
    max_shard_retries: MaxShardRetries = 3,
    gpus_per_worker: GpusPerWorker = 0.0,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Encode images into CLIP patch-token features + embeddings (HDF5 shards), resumably.

    Example: vlmdata encode shards/ feats/ --model ViT-L-14-336 --pretrained openai --device cuda
    """
    # Before torch loads: OpenMP threads that spin between ops would starve the decoding
    # workers sharing the cores (on 2 CPU cores: 0.82 -> 0.94 of the bare forward's rate).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vlmdata.encode.stage import EncodeConfig, run_encode
    from vlmdata.pipeline.imageops import SquareOptions, parse_fill

    def stage():
        return run_encode(
            EncodeConfig(
                input_dir=input_dir,
                output_dir=output_dir,
                model=model,
                pretrained=pretrained,
                layer=layer,
                tokens=tokens,
                batch_size=batch_size,
                device=device,
                precision=precision,
                workers=workers,
                references=tuple(reference or ()),
                placeholder_threshold=placeholder_threshold,
                placeholder_filter=not no_placeholder_filter,
                square=SquareOptions(pad_threshold=pad_threshold, fill=parse_fill(fill)),
                max_pixels=max_pixels,
                shard_size=shard_size,
                allow_incomplete=allow_incomplete,
                quiet=quiet,
                ray=ray_options(ctx, distributor),
            )
        )

    run_command(stage, record_in=lambda summary: summary.output_dir, ctx=ctx)
