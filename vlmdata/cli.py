"""The `vlmdata` command line: one thin command per stage over its ``run_*`` function.

Stage modules are imported inside the commands so that ``vlmdata --help`` stays instant and
no command pays for another's dependencies.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from vlmdata import __version__
from vlmdata.errors import MachineFailure, UserError
from vlmdata.pipeline.distributor import default_download_processes, usable_cpus

E = TypeVar("E", bound=BaseException)
S = TypeVar("S")

# click's usage errors, as the installed typer raises them: newer typers vendor click (as
# typer._click), older ones use click itself, so the classes come from typer, not `import click`.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_NoArgsIsHelp = getattr(sys.modules[_UsageError.__module__], "NoArgsIsHelpError", ())  # click 8.2+


@contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    """A mistake on the command line (unknown command or option, missing argument, a value of
    the wrong type from a flag or from ``--config``) as one line and exit 2, not click's box."""
    try:
        yield
    except _UsageError as e:
        if isinstance(e, _NoArgsIsHelp):  # a bare `vlmdata`: the help, as typer shows it
            raise
        message = e.format_message().strip().removesuffix(".")
        if message[1:2].islower():  # "Missing argument" -> "missing argument", as our errors
            message = message[0].lower() + message[1:]
        param, ctx = getattr(e, "param", None), _context_of(e)
        if param is not None and ctx is not None and param.name is not None:
            source = ctx.get_parameter_source(param.name)
            if source is not None and source.name == "DEFAULT_MAP":
                message += " (in the --config file)"
        if ctx is not None:
            message += f"; see `{ctx.command_path} --help`"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None


def _context_of(error: Exception) -> typer.Context | None:
    """The context of the command whose parsing failed. click leaves some errors without it
    ("option '--llm' requires an argument"): then it is the innermost ``ctx`` on the way up,
    the argument of the failing ``Command.parse_args(ctx, args)``."""
    found = getattr(error, "ctx", None)
    if found is None:
        for frame, _ in traceback.walk_tb(error.__traceback__):
            if hasattr(candidate := frame.f_locals.get("ctx"), "command_path"):
                found = candidate
    return found


# The command list of `vlmdata --help`, panel by panel in this order.
WHOLE_JOB, STAGES, TRAINING, LOOK = "Whole job", "Pipeline stages", "Training", "Look"
_COMMAND_PANELS = (WHOLE_JOB, STAGES, TRAINING, LOOK)


class _Vlmdata(typer.core.TyperGroup):
    """The `vlmdata` group: command-line mistakes in one line (here, at the top, covers every
    command and subgroup), commands listed by panel."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: typer.Context | None = None,
        **extra: Any,
    ) -> typer.Context:  # fmt: skip
        with _usage_errors_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        with _usage_errors_in_one_line():  # the subcommand's own parsing happens in here
            return super().invoke(ctx)

    def list_commands(self, ctx: typer.Context) -> list[str]:
        order = {panel: i for i, panel in enumerate(_COMMAND_PANELS)}

        def panel(name: str) -> int:
            return order.get(getattr(self.commands[name], "rich_help_panel", None), len(order))

        return sorted(super().list_commands(ctx), key=panel)  # stable: defined order within


app = typer.Typer(
    cls=_Vlmdata,
    help="Web-scale image-text URL lists -> offline CLIP embedding cache -> trained VLM adapters."
    "\n\nExample: vlmdata demo   # the whole job, offline, in a few minutes: start here",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The option panels of the commands' --help; --config, --quiet and --help stay in "Options".
INPUT, OUTPUT, NETWORK, PERFORMANCE, SAFETY = "Input", "Output", "Network", "Performance", "Safety"
MODEL, GENERATION, SQUARES = "Model", "Generation", "Squares"

# Options shared by several stages: one definition, one help text.
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


def _apply_config_file(ctx: typer.Context, value: str | None) -> None:
    """``--config FILE.toml``: the command's options (and arguments) by name, as defaults that
    the flags given override. An unknown key is one line naming the closest valid one."""
    if not value:
        return
    from vlmdata.configfile import options_from_table, read_toml

    try:
        settings = options_from_table(ctx.command, read_toml(value), f"--config {value}")
    except UserError as e:  # a usage error: one line, as a mistake in the flags is
        raise _UsageError(str(e), ctx) from None
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
_RESIZE = "Resize (--resize)"
ResizePadThreshold = Annotated[
    float | None,
    typer.Option(help=_SQUARE_HELP["pad_threshold"] + _WITH_RESIZE, rich_help_panel=_RESIZE),
]
ResizeFill = Annotated[
    str | None, typer.Option(help=_SQUARE_HELP["fill"] + _WITH_RESIZE, rich_help_panel=_RESIZE)
]
ResizeFormat = Annotated[
    str | None,
    typer.Option("--format", help=_SQUARE_HELP["format"] + _WITH_RESIZE, rich_help_panel=_RESIZE),
]
ResizeQuality = Annotated[
    int | None, typer.Option(help=_SQUARE_HELP["quality"] + _WITH_RESIZE, rich_help_panel=_RESIZE)
]
ResizeMinSide = Annotated[
    int | None, typer.Option(help=_SQUARE_HELP["min_side"] + _WITH_RESIZE, rich_help_panel=_RESIZE)
]


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


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    typer.echo(f"warning: {message}", err=True)  # one line, no source excerpt


RESUMES = "rerun the same command to resume"


def run_command(
    stage: Callable[[], S],
    on_interrupt: str = RESUMES,
    record_in: Callable[[S], str | Path] | None = None,
    ctx: typer.Context | None = None,
) -> None:
    """Run a stage and print its summary (or text); ``on_interrupt`` says what a Ctrl-C
    leaves the user to do; ``record_in`` names the output directory that gets the resolved
    options of ``ctx``'s command (``vlmdata.toml``).

    A user mistake is one line on stderr and exit 2; a full disk or a denied write, one line
    and exit 1; an internal failure, one line naming the log file that holds the traceback.
    SIGTERM stops the run like Ctrl-C: one line, and the output resumes on a rerun.
    """
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from vlmdata.pipeline.imageops import ignore_decoder_warnings

        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.showwarning = _show_warning
            ignore_decoder_warnings()
            summary = stage()
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {on_interrupt}", err=True)
        raise typer.Exit(130) from None
    except Exception as e:
        code, message = _explain_failure(e)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code) from None
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    typer.echo(summary if isinstance(summary, str) else summary.format())
    if record_in is not None and ctx is not None:
        _record_options(Path(record_in(summary)), ctx)
    if code := getattr(summary, "exit_code", 0):  # a run stopped by Ctrl-C, after saving
        raise typer.Exit(code)


def _record_options(folder: Path, ctx: typer.Context) -> None:
    """The command's resolved options into ``folder/vlmdata.toml``; a failure to write this
    record is a warning, the run's output stands."""
    from vlmdata.configfile import RECORD, record_options

    try:
        record_options(folder, ctx)
    except OSError as e:
        typer.echo(f"warning: could not record the options in {folder / RECORD} ({e})", err=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Failures of the machine, not of vlmdata or the user's input: one line, and a rerun resumes.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded (ulimit -f)",
    errno.EROFS: "read-only file system",
}


def _explain_failure(error: BaseException) -> tuple[int, str]:
    """The exit code and the one line to print for an exception that ended a command."""
    user = _find(error, UserError)
    if user is not None:
        return 2, str(user)
    machine = _find(error, MachineFailure)
    if machine is not None:
        return 1, str(machine)
    disk = _find(error, OSError)
    if disk is not None and disk.errno in _ENVIRONMENT_ERRNOS:
        where = f" writing {disk.filename}" if disk.filename else ""
        return 1, (f"{_ENVIRONMENT_ERRNOS[disk.errno]}{where}; free space and rerun the same "
                   "command to resume")  # fmt: skip
    log = _write_crash_log(error)
    summary = str(error).splitlines()[0] if str(error) else ""
    return 1, (f"internal error ({type(error).__name__}: {summary[:200]}); the traceback is in "
               f"{log}; please report it")  # fmt: skip


def _find(error: BaseException, kind: type[E]) -> E | None:
    """``error`` itself or the first ``kind`` inside it (task groups and worker processes wrap
    what they raise)."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    from vlmdata.pipeline.distributor import WorkerError  # only on the way out: no cost

    if isinstance(error, WorkerError) and error.__cause__ is not None:
        return _find(error.__cause__, kind)  # what a worker process raised
    return None


def _write_crash_log(error: BaseException) -> Path:
    """Save the full traceback (and a worker's, when a worker process failed) to a log file."""
    folder = Path(tempfile.gettempdir()) / "vlmdata-logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vlmdata-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(error))
    worker = getattr(error, "traceback", None)
    if isinstance(worker, str):
        text += "\nIn the worker process:\n" + worker
    path.write_text(f"vlmdata {__version__}\n{' '.join(sys.argv)}\n\n{text}")
    return path


def square_options(
    size: int, pad_threshold: float = 0.6, fill: str = "0,0,0", format: str = "jpg",
    quality: int = 95, min_side: int = 0,
):  # fmt: skip
    from vlmdata.pipeline.imageops import SquareOptions, parse_fill

    return SquareOptions(size, pad_threshold, parse_fill(fill), format, quality, min_side)


@app.command(rich_help_panel=STAGES)
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
        int, typer.Option(help="Requests in flight.", rich_help_panel=PERFORMANCE)
    ] = 256,
    per_host: Annotated[
        int, typer.Option(help="Requests in flight to one host.", rich_help_panel=PERFORMANCE)
    ] = 16,
    timeout: Annotated[
        float,
        typer.Option(
            help="Total seconds per request attempt (connect, redirects, body).",
            rich_help_panel=NETWORK,
        ),
    ] = 20.0,
    retries: Annotated[
        int,
        typer.Option(
            help="Extra attempts for timeouts, connection errors, 429 and 5xx.",
            rich_help_panel=NETWORK,
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
            "cores busy with --resize).",
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
            rich_help_panel=NETWORK,
        ),
    ] = False,
    user_agent_token: Annotated[
        str | None,
        typer.Option(
            help="Token added to the User-Agent (and matched in X-Robots-Tag).",
            rich_help_panel=NETWORK,
        ),
    ] = None,
    resize: Annotated[
        int | None,
        typer.Option(
            help="Store SIZE x SIZE crop/pad squares instead of the original bytes.",
            rich_help_panel=_RESIZE,
        ),
    ] = None,
    pad_threshold: ResizePadThreshold = None,
    fill: ResizeFill = None,
    format: ResizeFormat = None,
    quality: ResizeQuality = None,
    min_side: ResizeMinSide = None,
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


@app.command(rich_help_panel=STAGES)
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
            help="Worker processes, each squaring whole shards.",
            show_default="the usable CPUs",
            rich_help_panel=PERFORMANCE,
        ),
    ] = usable_cpus(),
    allow_incomplete: AllowIncomplete = False,
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
            )
        )

    run_command(stage, record_in=lambda summary: summary.output_dir, ctx=ctx)


@app.command(rich_help_panel=STAGES)
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
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=PERFORMANCE)
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="auto (GPU: bf16 autocast where native, else fp16; CPU: fp32), fp32, "
            "fp16 (GPU) or bf16.",
            rich_help_panel=PERFORMANCE,
        ),
    ] = "auto",
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
            )
        )

    run_command(stage, record_in=lambda summary: summary.output_dir, ctx=ctx)


@app.command(rich_help_panel=LOOK)
def inspect(
    path: Annotated[str, typer.Argument(help="An output directory, or one .h5, .tar or .parquet.")],
    config: ConfigFile = None,
) -> None:
    """Show what a stage output or a shard file holds: rows, shapes, attributes, statuses.

    Example: vlmdata inspect feats/00000.h5
    """
    from vlmdata.describe import describe

    run_command(lambda: describe(path))


@app.command(rich_help_panel=LOOK)
def report(
    path: Annotated[
        str,
        typer.Argument(
            help="A stage output, a training run, or a pipeline/demo directory holding several."
        ),
    ],
    out: Annotated[
        str | None, typer.Option(help="Where the page goes; default: PATH/report.html.")
    ] = None,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Write one self-contained HTML page (charts, tables, thumbnails) of what PATH holds.

    Example: vlmdata report shards/   # then open shards/report.html
    """
    from vlmdata.report import ReportConfig, write_report

    run_command(lambda: write_report(ReportConfig(path=path, out=out, quiet=quiet)))


@app.command("run", rich_help_panel=WHOLE_JOB)
def run_pipeline(
    pipeline: Annotated[
        str | None, typer.Argument(help="The pipeline file (TOML); see --print-config.")
    ] = None,
    input: Annotated[str | None, typer.Option(help="The input, instead of the file's.")] = None,
    output: Annotated[
        str | None, typer.Option(help="The output root, instead of the file's.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print each stage's command; run none.")
    ] = False,
    print_config: Annotated[
        bool,
        typer.Option("--print-config", help="Print a commented pipeline file to start from."),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Run a pipeline file's stages, each resuming where it stopped, then write its report.

    The stages run in this order, those the file has a table for: download, preprocess,
    encode, labels, train, eval; then OUTPUT/report.html. Rerun after a kill to continue.

    Example: vlmdata run pipeline.toml   # start one with: vlmdata run --print-config
    """
    from vlmdata.workflow import RunConfig, pipeline_template
    from vlmdata.workflow import run_pipeline as run_stages

    group = typer.main.get_command(app)
    if print_config:
        typer.echo(pipeline_template(group), nl=False)
        return
    if pipeline is None and not (input and output):
        typer.echo("error: pass a PIPELINE.toml (vlmdata run --print-config writes one)", err=True)
        raise typer.Exit(2)
    config = RunConfig(pipeline, input=input, output=output, dry_run=dry_run, quiet=quiet)
    run_command(lambda: run_stages(config, group), "rerun the same vlmdata run to continue")


@app.command(rich_help_panel=WHOLE_JOB)
def demo(
    out_dir: Annotated[
        str, typer.Argument(help="Where the corpus, every stage and the report go.")
    ] = "vlmdata-demo",
    images: Annotated[int, typer.Option(help="Pictures in the generated corpus.")] = 300,
    steps: Annotated[
        int | None, typer.Option(help="Training steps; default: the demo pipeline's.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Run the whole job offline on generated data, from URLs to captions and a report.

    A generated corpus served on 127.0.0.1 -> download --resize 448 -> encode -> labels ->
    train -> eval -> caption -> report.html, with tiny random models.

    Example: vlmdata demo   # a few minutes on 2 CPU cores; then open vlmdata-demo/report.html
    """
    from vlmdata.demo import DemoConfig, run_demo

    config = DemoConfig(out=out_dir, images=images, steps=steps, quiet=quiet)
    group = typer.main.get_command(app)
    run_command(lambda: run_demo(config, group), f"rerun vlmdata demo {out_dir} to continue")


# --- train: a projector (+ LLM) from the cached features ------------------------------------

_VALIDATION = "Validation"


@app.command(rich_help_panel=TRAINING)
def train(
    ctx: typer.Context,
    features: Annotated[
        list[str], typer.Argument(help="Encode outputs (HDF5 feature shards); several at once.")
    ],
    llm: Annotated[
        str,
        typer.Option(
            help="Causal LM: a hub id, a local directory, or tiny-random-llama (tests).",
            rich_help_panel=MODEL,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="The run directory (config, checkpoints, metrics).", rich_help_panel=OUTPUT
        ),
    ],
    projector: Annotated[
        str,
        typer.Option(
            help="linear, mlp2x_gelu (LLaVA-1.5), swiglu or resampler (Qwen-VL).",
            rich_help_panel=MODEL,
        ),
    ] = "mlp2x_gelu",
    queries: Annotated[
        int,
        typer.Option(
            help="Resampler: learnable queries (image tokens the LLM sees).",
            rich_help_panel=MODEL,
        ),
    ] = 64,
    train_llm: Annotated[
        str,
        typer.Option(
            help="none (frozen), full, or lora (needs the lora extra).", rich_help_panel=MODEL
        ),
    ] = "none",
    lora_rank: Annotated[
        int, typer.Option(help="LoRA rank (alpha = 2 x rank).", rich_help_panel=MODEL)
    ] = 16,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate of the projector.", rich_help_panel=TRAINING)
    ] = 1e-3,
    llm_lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of the LLM [2e-5 full, 2e-4 LoRA].", rich_help_panel=TRAINING
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Passes over the training examples.", rich_help_panel=TRAINING)
    ] = 1,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps to train (overrides --epochs).", rich_help_panel=TRAINING
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(help="Examples per micro-batch (per process).", rich_help_panel=TRAINING),
    ] = 16,
    grad_accum: Annotated[
        int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=TRAINING)
    ] = 1,
    warmup: Annotated[
        float,
        typer.Option(
            help="Warmup: a fraction of the steps (< 1) or a number of steps.",
            rich_help_panel=TRAINING,
        ),
    ] = 0.03,
    weight_decay: Annotated[
        float,
        typer.Option(help="AdamW weight decay (matrices only).", rich_help_panel=TRAINING),
    ] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option(help="Gradient clipping norm.", rich_help_panel=TRAINING)
    ] = 1.0,
    max_length: Annotated[
        int,
        typer.Option(help="Longest sequence in tokens (image included).", rich_help_panel=TRAINING),
    ] = 512,
    padding_side: Annotated[
        str, typer.Option(help="Pad batches on the left or right.", rich_help_panel=TRAINING)
    ] = "right",
    precision: Annotated[
        str,
        typer.Option(
            help="auto (GPU: bf16 where native, else fp16; CPU: fp32), fp32, fp16, bf16.",
            rich_help_panel=PERFORMANCE,
        ),
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=PERFORMANCE)
    ] = "auto",
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Instruction before each caption (repeatable; one sampled per example).",
            rich_help_panel=INPUT,
        ),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(help="A file of instructions, one per line.", rich_help_panel=INPUT),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Instruction data in LLaVA's conversation format (JSON or JSON lines).",
            rich_help_panel=INPUT,
        ),
    ] = None,
    no_captions: Annotated[
        bool,
        typer.Option(
            "--no-captions",
            help="Train on --data alone, not on the captions.",
            rich_help_panel=INPUT,
        ),
    ] = False,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from an earlier run's weights (a second stage).", rich_help_panel=MODEL
        ),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of keys held out.", rich_help_panel=_VALIDATION)
    ] = 0.01,
    val_samples: Annotated[
        int, typer.Option(help="Held-out examples per validation.", rich_help_panel=_VALIDATION)
    ] = 1024,
    eval_every: Annotated[
        int, typer.Option(help="Validation loss every N steps.", rich_help_panel=_VALIDATION)
    ] = 200,
    save_every: Annotated[
        int, typer.Option(help="Checkpoint every N steps.", rich_help_panel=OUTPUT)
    ] = 500,
    keep_checkpoints: Annotated[
        int, typer.Option(help="Checkpoints kept (the newest).", rich_help_panel=OUTPUT)
    ] = 2,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last checkpoint.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of initialisation, shuffling and prompts.", rich_help_panel=TRAINING
        ),
    ] = 0,
    workers: Annotated[
        int,
        typer.Option(
            help="DataLoader processes reading HDF5.",
            show_default="2, at most the usable CPUs",
            rich_help_panel=PERFORMANCE,
        ),
    ] = min(2, usable_cpus()),
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Train a projector (and the LLM, with --train-llm) from cached features, resumably.

    Example: vlmdata train feats/ --llm meta-llama/Llama-3.2-1B --out runs/projector
    """
    from vlmdata.train.trainer import DEFAULT_PROMPTS, TrainConfig, read_prompts, run_train

    def stage():
        return run_train(
            TrainConfig(
                features=tuple(features), llm=llm, out=out, projector=projector, queries=queries,
                train_llm=train_llm, lora_rank=lora_rank, lr=lr, llm_lr=llm_lr, epochs=epochs,
                max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, warmup=warmup,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_length=max_length,
                padding_side=padding_side, precision=precision, device=device,
                prompts=read_prompts(prompt, prompts) or DEFAULT_PROMPTS, data=data,
                captions=not no_captions, init=init, val_fraction=val_fraction,
                val_samples=val_samples, eval_every=eval_every, save_every=save_every,
                keep_checkpoints=keep_checkpoints, resume=resume, seed=seed, workers=workers,
                allow_incomplete=allow_incomplete, quiet=quiet,
            )
        )  # fmt: skip

    run_command(
        stage,
        "rerun with --resume to continue from the last checkpoint",
        record_in=lambda summary: summary.run_dir,
        ctx=ctx,
    )


# --- labels: zero-shot CLIP labels over the embeddings encode cached -------------------------

labels_app = typer.Typer(
    help="Zero-shot CLIP labels for a dataset, from the embeddings `vlmdata encode` cached."
    "\n\nExample: vlmdata labels classify feats/ labels/",
    no_args_is_help=True,
)
app.add_typer(labels_app, name="labels", rich_help_panel=STAGES)


_LABELS = "Labels"


@labels_app.command("classify")
def labels_classify(
    ctx: typer.Context,
    features_dir: Annotated[str, typer.Argument(help="The output directory of vlmdata encode.")],
    output_dir: Annotated[str, typer.Argument(help="Where the label shards go.")],
    taxonomy: Annotated[
        str | None,
        typer.Option(
            help="Your taxonomy (JSON or YAML: category -> descriptions); default: "
            "the shipped one (`vlmdata labels taxonomy`).",
            rich_help_panel=_LABELS,
        ),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(
            help="Prompt templates, each with one {} for the description; default: "
            "the shipped ones.",
            rich_help_panel=_LABELS,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Checked against the features' model; default: theirs.", rich_help_panel=MODEL
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Where the features' weights file is now, if it moved (its sha256 must match).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    top_k: Annotated[
        int,
        typer.Option(help="Most probable descriptions kept per image.", rich_help_panel=_LABELS),
    ] = 5,
    batch_size: Annotated[
        int, typer.Option(help="Embeddings per matrix product.", rich_help_panel=PERFORMANCE)
    ] = 4096,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=PERFORMANCE)
    ] = "auto",
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Label every cached embedding with a taxonomy's descriptions and categories, resumably.

    Example: vlmdata labels classify feats/ labels/ --taxonomy my-taxonomy.json
    """
    from vlmdata.labels.classify import ClassifyConfig, run_classify

    def stage():
        return run_classify(
            ClassifyConfig(
                features_dir=features_dir,
                output_dir=output_dir,
                taxonomy=taxonomy,
                templates=templates,
                model=model,
                pretrained=pretrained,
                top_k=top_k,
                batch_size=batch_size,
                device=device,
                allow_incomplete=allow_incomplete,
                quiet=quiet,
            )
        )

    run_command(stage, record_in=lambda summary: summary.output_dir, ctx=ctx)


@labels_app.command("taxonomy")
def labels_taxonomy(
    out: Annotated[
        str | None, typer.Option(help="Write it to this file instead of printing it.")
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Print (or export) the default taxonomy as JSON, to edit and pass back with --taxonomy.

    Example: vlmdata labels taxonomy --out my-taxonomy.json
    """
    run_command(lambda: _export_default_taxonomy(out))


def _export_default_taxonomy(out: str | None) -> str:
    """The default taxonomy's JSON, or the line saying where it was written."""
    from vlmdata.labels.taxonomy import load_taxonomy, taxonomy_json
    from vlmdata.pipeline.shards import write_named_file

    taxonomy = load_taxonomy(None)
    text = taxonomy_json(taxonomy).rstrip("\n")
    if out is None:
        return text
    if not out:
        raise UserError("--out is empty; pass a file path such as taxonomy.json, or drop --out")
    if Path(out).is_dir():
        example = Path(out) / "taxonomy.json"
        raise UserError(f"--out {out} is a directory; pass a file path such as {example}")
    try:
        write_named_file(Path(out), text.encode() + b"\n")
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass a writable path") from None
    return (f"wrote the default taxonomy ({len(taxonomy.categories)} categories, "
            f"{len(taxonomy.descriptions)} descriptions) to {out}")  # fmt: skip


_PAGE = "What the page shows"


@labels_app.command("report")
def labels_report(
    ctx: typer.Context,
    labels_dir: Annotated[
        str, typer.Argument(help="The output directory of vlmdata labels classify.")
    ],
    images: Annotated[
        str,
        typer.Option(
            help="The image shards the features were made from (download or preprocess output).",
            rich_help_panel=INPUT,
        ),
    ],
    out: Annotated[
        str | None,
        typer.Option(
            help="Where the report goes; default: LABELS_DIR/report.", rich_help_panel=OUTPUT
        ),
    ] = None,
    categories: Annotated[
        int,
        typer.Option(
            help="Most frequent categories shown with example thumbnails.", rich_help_panel=_PAGE
        ),
    ] = 8,
    examples: Annotated[
        int, typer.Option(help="Example thumbnails per category.", rich_help_panel=_PAGE)
    ] = 12,
    least_confident: Annotated[
        int, typer.Option(help="Thumbnails of the least confident labels.", rich_help_panel=_PAGE)
    ] = 24,
    placeholders: Annotated[
        int,
        typer.Option(
            help="Thumbnails of the placeholder category, at most.", rich_help_panel=_PAGE
        ),
    ] = 48,
    placeholder_category: Annotated[
        str,
        typer.Option(
            help="The taxonomy's category for 'image not available' stand-ins.",
            rich_help_panel=_PAGE,
        ),
    ] = "image not available",
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Write an HTML report (charts, thumbnails by category) of a labelled dataset.

    Example: vlmdata labels report labels/ --images shards/   # then open labels/report/index.html
    """
    from vlmdata.labels.report import ReportConfig, run_report

    def stage():
        return run_report(
            ReportConfig(
                labels_dir=labels_dir,
                images=images,
                out=out,
                categories=categories,
                examples=examples,
                least_confident=least_confident,
                placeholders=placeholders,
                placeholder_category=placeholder_category,
                allow_incomplete=allow_incomplete,
                quiet=quiet,
            )
        )

    run_command(stage, record_in=lambda summary: summary.html.parent, ctx=ctx)


# --- caption and eval: a trained run on new images, and on its held-out features -------------

RunDir = Annotated[str, typer.Argument(help="A training run (the --out of vlmdata train).")]
Checkpoint = Annotated[
    int | None,
    typer.Option(help="The checkpoint's step; default: the latest.", rich_help_panel=MODEL),
]
RunDevice = Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=PERFORMANCE)]
RunPrecision = Annotated[
    str,
    typer.Option(
        help="auto (GPU: bf16 where native, else fp16; CPU: fp32), fp32, fp16, bf16.",
        rich_help_panel=PERFORMANCE,
    ),
]
MaxNewTokens = Annotated[
    int, typer.Option(help="Longest caption, in tokens.", rich_help_panel=GENERATION)
]
GeneratePrompt = Annotated[
    str | None,
    typer.Option(
        help="The instruction; default: the run's first training prompt.",
        rich_help_panel=GENERATION,
    ),
]
GenerateBatch = Annotated[
    int, typer.Option(help="Images per generation batch.", rich_help_panel=PERFORMANCE)
]


@app.command(rich_help_panel=TRAINING)
def caption(
    run_dir: RunDir,
    images: Annotated[list[str], typer.Argument(help="Image files or http(s) URLs.")],
    prompt: GeneratePrompt = None,
    num: Annotated[
        int, typer.Option(help="Captions per image (sampling only).", rich_help_panel=GENERATION)
    ] = 1,
    temperature: Annotated[
        float,
        typer.Option(
            help="0: greedy; above 0: sample with this temperature.", rich_help_panel=GENERATION
        ),
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(help="Sample from the top-p probability mass.", rich_help_panel=GENERATION),
    ] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the sampling.", rich_help_panel=GENERATION)
    ] = 0,
    max_new_tokens: MaxNewTokens = 64,
    batch_size: GenerateBatch = 16,
    checkpoint: Checkpoint = None,
    device: RunDevice = "auto",
    precision: RunPrecision = "auto",
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Where the features' CLIP weights file is now, if it moved.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    allow_private_network: Annotated[
        bool,
        typer.Option(
            "--allow-private-network",
            help="Allow URLs on private, loopback and link-local hosts.",
            rich_help_panel=SAFETY,
        ),
    ] = False,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json", help="Also write the captions to this JSON file.", rich_help_panel=OUTPUT
        ),
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Caption images with a trained run, encoding them as its features were made.

    Exits 1 when an image could not be read, fetched or decoded (the others are captioned).

    Example: vlmdata caption runs/projector photo.jpg https://example.com/cat.jpg --json caps.json
    """
    from vlmdata.train.caption import CaptionConfig, run_caption

    def stage():
        return run_caption(
            CaptionConfig(
                run_dir=run_dir, images=tuple(images), prompt=prompt, num=num,
                temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
                batch_size=batch_size, checkpoint=checkpoint, device=device, precision=precision,
                pretrained=pretrained, allow_private_network=allow_private_network,
                json_out=json_out,
            )
        )  # fmt: skip

    run_command(stage, "nothing was written")


@app.command("eval", rich_help_panel=TRAINING)
def evaluate(
    ctx: typer.Context,
    run_dir: RunDir,
    features_dir: Annotated[
        str, typer.Argument(help="Encode output holding the run's held-out keys.")
    ],
    samples: Annotated[
        int,
        typer.Option(help="Held-out images to caption and score.", rich_help_panel=GENERATION),
    ] = 100,
    prompt: GeneratePrompt = None,
    images: Annotated[
        str | None,
        typer.Option(
            help="The image shards (or image folder) the features came from: adds an HTML page "
            "with thumbnails.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Where eval.json goes; default: RUN_DIR/eval/CHECKPOINT.", rich_help_panel=OUTPUT
        ),
    ] = None,
    max_new_tokens: MaxNewTokens = 64,
    batch_size: GenerateBatch = 16,
    checkpoint: Checkpoint = None,
    device: RunDevice = "auto",
    precision: RunPrecision = "auto",
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Score a run on its held-out images: loss, perplexity, BLEU-1..4, CIDEr-D.

    Example: vlmdata eval runs/projector feats/ --images shards/
    """
    from vlmdata.train.evaluate import EvalConfig, run_eval

    def stage():
        return run_eval(
            EvalConfig(
                run_dir=run_dir, features_dir=features_dir, samples=samples, prompt=prompt,
                images=images, out=out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                checkpoint=checkpoint, device=device, precision=precision,
                allow_incomplete=allow_incomplete, quiet=quiet,
            )
        )  # fmt: skip

    run_command(stage, "rerun the same command", record_in=lambda summary: summary.out, ctx=ctx)


if __name__ == "__main__":
    app()
