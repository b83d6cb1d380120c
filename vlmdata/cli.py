"""The `vlmdata` command line: one thin command per stage over its ``run_*`` function.

Stage modules are imported inside the commands so that ``vlmdata --help`` stays instant and
no command pays for another's dependencies.
"""

from __future__ import annotations

from typing import Annotated

import typer

from vlmdata import __version__
from vlmdata.errors import UserError

app = typer.Typer(
    help="Web-scale image-text URL lists -> offline CLIP embedding cache -> trained VLM adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlmdata {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """vlmdata: download, preprocess, encode, label and train from CapsFusion-scale data."""


def fail(message: str) -> typer.Exit:
    """Print a user error on one line and return the exit to raise (code 2, no traceback)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.command()
def download(
    input: Annotated[
        str,
        typer.Argument(help="URL list: parquet/csv/tsv/jsonl/txt (.gz ok), a directory or a glob."),
    ],
    output_dir: Annotated[str, typer.Argument(help="Where the shards go (created if missing).")],
    url_col: Annotated[str, typer.Option(help="Column holding the image URL.")] = "image_url",
    caption_col: Annotated[
        str, typer.Option(help="Column holding the caption ('' for none).")
    ] = "capsfusion",
    keep_col: Annotated[
        list[str] | None,
        typer.Option(help="Extra input column to carry into the parquet (repeatable)."),
    ] = None,
    input_format: Annotated[
        str | None,
        typer.Option(help="parquet|csv|tsv|jsonl|txt; default: from the file extension."),
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Rows per shard.")] = 10_000,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 256,
    per_host: Annotated[int, typer.Option(help="Requests in flight to one host.")] = 16,
    timeout: Annotated[
        float, typer.Option(help="Total seconds per request attempt (connect, redirects, body).")
    ] = 20.0,
    retries: Annotated[
        int, typer.Option(help="Extra attempts for timeouts, connection errors, 429 and 5xx.")
    ] = 2,
    max_bytes: Annotated[
        int, typer.Option(help="Largest body accepted; reading stops beyond it.")
    ] = 20_000_000,
    max_pixels: Annotated[
        int, typer.Option(help="Largest image (width x height) accepted; checked before decoding.")
    ] = 100_000_000,
    processes: Annotated[
        int, typer.Option(help="Download processes, each an event loop over whole shards.")
    ] = 1,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows of the input.")] = None,
    allow_private_network: Annotated[
        bool,
        typer.Option(
            "--allow-private-network", help="Allow private, loopback and link-local destinations."
        ),
    ] = False,
    ignore_noai: Annotated[
        bool,
        typer.Option(
            "--ignore-noai", help="Download images whose X-Robots-Tag says noai/noimageai."
        ),
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed", help="Re-attempt the retryable failures of finished shards."
        ),
    ] = False,
    user_agent_token: Annotated[
        str | None,
        typer.Option(help="Token added to the User-Agent (and matched in X-Robots-Tag)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Download a URL list into image shards (tar + parquet + stats), resumably."""
    from vlmdata.pipeline.download import DownloadConfig, run_download
    from vlmdata.pipeline.fetch import FetchPolicy

    try:
        config = DownloadConfig(
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
            limit=limit,
            retry_failed=retry_failed,
            quiet=quiet,
            fetch=FetchPolicy(
                timeout=timeout,
                retries=retries,
                max_bytes=max_bytes,
                allow_private_network=allow_private_network,
                ignore_noai=ignore_noai,
                user_agent_token=user_agent_token,
            ),
        )
        summary = run_download(config)
    except UserError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(summary.format())


if __name__ == "__main__":
    app()
