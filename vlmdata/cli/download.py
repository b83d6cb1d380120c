"""`vlmdata download`: a URL list into image shards."""

from __future__ import annotations

from typing import Annotated

import typer

from vlmdata.cli.failures import run_command
from vlmdata.cli.options import (
    INPUT,
    PERFORMANCE,
    RESIZE,
    SAFETY,
    ConfigFile,
    Distributor,
    MaxPixels,
    MaxShardRetries,
    Quiet,
    RayAddress,
    ResizeFill,
    ResizeFormat,
    ResizeMinSide,
    ResizePadThreshold,
    ResizeQuality,
    ShardSize,
    ray_options,
    square_options,
)
from vlmdata.errors import UserError
from vlmdata.pipeline.distributor import default_download_processes

_NETWORK = "Network"


def download(
    ctx: typer.Context,
    input: Annotated[
        str,
        typer.Argument(help="URL list: parquet/csv/tsv/jsonl/txt (.gz ok), a directory or a glob."),
    ],
    output_dir: Annotated[str, typer.Argument(help="Where the shards go (created if missing).")],
    url_col: Annotated[
        str, typer.Option(help="Column holding the image URL.", rich_help_panel=INPUT)
    ] = "image_url",
    caption_col: Annotated[
        str, typer.Option(help="Column holding the caption ('' for none).", rich_help_panel=INPUT)
    ] = "capsfusion",
    keep_col: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra input column to carry into the parquet (repeatable).",
            rich_help_panel=INPUT,
        ),
    ] = None,
    input_format: Annotated[
        str | None,
        typer.Option(
            help="parquet|csv|tsv|jsonl|txt; default: from the file extension.",
            rich_help_panel=INPUT,
        ),
    ] = None,
    shard_size: ShardSize = 10_000,
    concurrency: Annotated[
        int,
        typer.Option(
            help="Requests in flight (split between --processes; per worker on Ray).",
            rich_help_panel=PERFORMANCE,
        ),
    ] = 256,
    per_host: Annotated[
        int,
        typer.Option(
            help="Requests in flight to one host (split between --processes; per worker on Ray).",
            rich_help_panel=PERFORMANCE,
        ),
    ] = 16,
    timeout: Annotated[
        float,
        typer.Option(
            help="Total seconds per request attempt (connect, redirects, body).",
            rich_help_panel=_NETWORK,
        ),
    ] = 20.0,
    retries: Annotated[
        int,
        typer.Option(
            help="Extra attempts for timeouts, connection errors, 429 and 5xx.",
            rich_help_panel=_NETWORK,
        ),
    ] = 2,
    max_bytes: Annotated[
        int,
        typer.Option(
            help="Largest body accepted; reading stops beyond it.", rich_help_panel=SAFETY
        ),
    ] = 20_000_000,
    max_pixels: MaxPixels = 100_000_000,
    processes: Annotated[
        int,
        typer.Option(
            help="Download processes, each an event loop over whole shards (one loop keeps ~4 "
            "cores busy with --resize). With --distributor ray: the Ray workers, each one such "
            "loop with the whole --concurrency and --per-host (default: one per cluster CPU, "
            "one per 4 with --resize).",
            show_default="a quarter of the usable CPUs",
            rich_help_panel=PERFORMANCE,
        ),
    ] = default_download_processes(),
    limit: Annotated[
        int | None, typer.Option(help="Only the first N rows of the input.", rich_help_panel=INPUT)
    ] = None,
    allow_private_network: Annotated[
        bool,
        typer.Option(
            "--allow-private-network",
            help="Allow private, loopback and link-local destinations.",
            rich_help_panel=SAFETY,
        ),
    ] = False,
    ignore_noai: Annotated[
        bool,
        typer.Option(
            "--ignore-noai",
            help="Download images whose X-Robots-Tag says noai/noimageai.",
            rich_help_panel=SAFETY,
        ),
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Re-attempt the retryable failures of finished shards.",
            rich_help_panel=_NETWORK,
        ),
    ] = False,
    user_agent_token: Annotated[
        str | None,
        typer.Option(
            help="Token added to the User-Agent (and matched in X-Robots-Tag).",
            rich_help_panel=_NETWORK,
        ),
    ] = None,
    resize: Annotated[
        int | None,
        typer.Option(
            help="Store SIZE x SIZE crop/pad squares instead of the original bytes.",
            rich_help_panel=RESIZE,
        ),
    ] = None,
    pad_threshold: ResizePadThreshold = None,
    fill: ResizeFill = None,
    format: ResizeFormat = None,
    quality: ResizeQuality = None,
    min_side: ResizeMinSide = None,
    distributor: Distributor = "local",
    ray_address: RayAddress = "",
    max_shard_retries: MaxShardRetries = 3,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Download a URL list into image shards (tar + parquet + stats), resumably.

    Example: vlmdata download 'capsfusion/*.parquet' shards/ --resize 448
    """
    from vlmdata.pipeline.download import DownloadConfig, run_download
    from vlmdata.pipeline.fetch import FetchPolicy

    def stage():
        given = {"--pad-threshold": pad_threshold, "--fill": fill, "--format": format,
                 "--quality": quality, "--min-side": min_side}  # fmt: skip
        square = None
        if resize is not None:
            square = square_options(resize, **{k[2:].replace("-", "_"): v for k, v in
                                               given.items() if v is not None})  # fmt: skip
        elif stray := [flag for flag, value in given.items() if value is not None]:
            raise UserError(f"{stray[0]} only applies with --resize N; add --resize or drop it")
        return run_download(
            DownloadConfig(
                input=input,
                output_dir=output_dir,
                url_col=url_col,
                caption_col=caption_col or None,
                keep_cols=tuple(keep_col or ()),
                input_format=input_format,
                shard_size=shard_size,
                concurrency=concurrency,
                per_host=per_host,
                processes=processes,
                max_pixels=max_pixels,
                resize=square,
                limit=limit,
                retry_failed=retry_failed,
                quiet=quiet,
                ray=ray_options(ctx, distributor, "processes"),
                fetch=FetchPolicy(
                    timeout=timeout,
                    retries=retries,
                    max_bytes=max_bytes,
                    allow_private_network=allow_private_network,
                    ignore_noai=ignore_noai,
                    user_agent_token=user_agent_token,
                ),
            )
        )

    run_command(stage, record_in=lambda summary: summary.output_dir, ctx=ctx)
