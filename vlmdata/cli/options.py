"""The options several commands share: one definition and one help text each, and the names of
the panels their --help groups options under (--config, --quiet and --help stay in "Options")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from vlmdata.cli.failures import UsageError
from vlmdata.errors import UserError

if TYPE_CHECKING:
    from vlmdata.pipeline.imageops import SquareOptions
    from vlmdata.pipeline.ray_distributor import RayOptions

INPUT, OUTPUT, PERFORMANCE, SAFETY = "Input", "Output", "Performance", "Safety"
MODEL, SQUARES, RESIZE = "Model", "Squares", "Resize (--resize)"
SCALE = "Scale-out"

AllowIncomplete = Annotated[
    bool,
    typer.Option(
        "--allow-incomplete",
        help="Take the finished shards of an unfinished input now, the rest on a later run.",
        rich_help_panel=INPUT,
    ),
]
ShardSize = Annotated[int, typer.Option(help="Rows (or images) per shard.", rich_help_panel=OUTPUT)]
MaxPixels = Annotated[
    int,
    typer.Option(
        help="Largest image (width x height) accepted; checked before decoding.",
        rich_help_panel=SAFETY,
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=PERFORMANCE)]
Precision = Annotated[
    str,
    typer.Option(
        help="auto (GPU: bf16 where native, else fp16; CPU: fp32), fp32, fp16 (GPU only) or bf16.",
        rich_help_panel=PERFORMANCE,
    ),
]

Distributor = Annotated[
    str,
    typer.Option(
        help="local: processes on this machine; ray: workers on a Ray cluster, one task per "
        "shard (pip install 'vlmdata\\[ray]').",
        rich_help_panel=SCALE,
    ),
]
RayAddress = Annotated[
    str,
    typer.Option(
        help="With --distributor ray: the cluster to join (auto, host:6379, ray://host:10001).",
        show_default="RAY_ADDRESS, else a cluster running here, else a local one",
        rich_help_panel=SCALE,
    ),
]
MaxShardRetries = Annotated[
    int,
    typer.Option(
        help="With --distributor ray: times a shard is retried when its worker dies (Ray "
        "restarts the worker).",
        rich_help_panel=SCALE,
    ),
]
GpusPerWorker = Annotated[
    float,
    typer.Option(
        help="With --distributor ray: GPUs each worker reserves (0.5: two share one GPU; 0: CPU "
        "workers). With 0 the workers are as many as the cluster's CPUs, else its GPUs fit.",
        rich_help_panel=SCALE,
    ),
]
_RAY_ONLY = ("ray_address", "max_shard_retries", "gpus_per_worker")


def ray_options(
    ctx: typer.Context, distributor: str, workers_from: str | None = None
) -> RayOptions | None:
    """The Ray options of a stage command, None with --distributor local; ``workers_from``
    names the option that sets the Ray workers (--processes), when given on the command."""
    from vlmdata.pipeline.ray_distributor import RayOptions

    def given(name: str) -> bool:  # by name: typer may carry its own copy of click's enum
        source = ctx.get_parameter_source(name)
        return source is not None and source.name != "DEFAULT"

    defaults = {param.name: param.default for param in ctx.command.params}
    if distributor == "local":  # a Ray option set to anything but its default is a mistake
        if stray := [name for name in _RAY_ONLY
                     if name in ctx.params and ctx.params[name] != defaults[name]]:  # fmt: skip
            flag = "--" + stray[0].replace("_", "-")
            raise UserError(f"{flag} only applies with --distributor ray; add it or drop {flag}")
        return None
    if distributor != "ray":
        raise UserError(f"--distributor must be local or ray, got {distributor!r}")
    return RayOptions(
        address=ctx.params.get("ray_address") or None,
        workers=ctx.params[workers_from] if workers_from and given(workers_from) else None,
        gpus_per_worker=ctx.params.get("gpus_per_worker") or 0.0,
        max_shard_retries=ctx.params.get("max_shard_retries", 3),
    )


def _apply_config_file(ctx: typer.Context, value: str | None) -> None:
    """``--config FILE.toml``: the command's options (and arguments) by name, as defaults that
    the flags given override. An unknown key is one line naming the closest valid one."""
    if not value:
        return
    from vlmdata.configfile import options_from_table, read_toml

    try:
        settings = options_from_table(ctx.command, read_toml(value), f"--config {value}")
    except UserError as e:  # a usage error: one line, as a mistake in the flags is
        raise UsageError(str(e), ctx) from None
    ctx.default_map = {**(ctx.default_map or {}), **settings}


ConfigFile = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="A TOML file of this command's options (names as the flags); flags override it.",
        callback=_apply_config_file,
        is_eager=True,
        expose_value=False,
    ),
]

# How preprocess and encode make squares; download takes the same options with --resize.
_SQUARE_HELP = {
    "pad_threshold": "min(w,h)/max(w,h) at or above which the image is cropped, else padded.",
    "fill": "Padding and transparency colour as R,G,B.",
    "format": "Output image format: jpg, png or webp.",
    "quality": "JPEG/WebP quality of the squares.",
    "min_side": "Images whose shorter side is below N are recorded as filtered.",
}
PadThreshold = Annotated[
    float, typer.Option(help=_SQUARE_HELP["pad_threshold"], rich_help_panel=SQUARES)
]
Fill = Annotated[str, typer.Option(help=_SQUARE_HELP["fill"], rich_help_panel=SQUARES)]
Format = Annotated[
    str, typer.Option("--format", help=_SQUARE_HELP["format"], rich_help_panel=SQUARES)
]
Quality = Annotated[int, typer.Option(help=_SQUARE_HELP["quality"], rich_help_panel=SQUARES)]
MinSide = Annotated[int, typer.Option(help=_SQUARE_HELP["min_side"], rich_help_panel=SQUARES)]
# download takes them only with --resize: unset unless given, so a stray one is caught.
_WITH_RESIZE = " Only with --resize; default as in preprocess."
ResizePadThreshold = Annotated[
    float | None,
    typer.Option(help=_SQUARE_HELP["pad_threshold"] + _WITH_RESIZE, rich_help_panel=RESIZE),
]
ResizeFill = Annotated[
    str | None, typer.Option(help=_SQUARE_HELP["fill"] + _WITH_RESIZE, rich_help_panel=RESIZE)
]
ResizeFormat = Annotated[
    str | None,
    typer.Option("--format", help=_SQUARE_HELP["format"] + _WITH_RESIZE, rich_help_panel=RESIZE),
]
ResizeQuality = Annotated[
    int | None, typer.Option(help=_SQUARE_HELP["quality"] + _WITH_RESIZE, rich_help_panel=RESIZE)
]
ResizeMinSide = Annotated[
    int | None, typer.Option(help=_SQUARE_HELP["min_side"] + _WITH_RESIZE, rich_help_panel=RESIZE)
]


def square_options(
    size: int, pad_threshold: float = 0.6, fill: str = "0,0,0", format: str = "jpg",
    quality: int = 95, min_side: int = 0,
) -> SquareOptions:  # fmt: skip
    """The square options as the image code takes them, from their flags' values."""
    from vlmdata.pipeline.imageops import SquareOptions, parse_fill

    return SquareOptions(size, pad_threshold, parse_fill(fill), format, quality, min_side)
