"""The `vlmdata` command line: one thin command per stage over its ``run_*`` function.

Stage modules are imported inside the commands so that ``vlmdata --help`` stays instant and
no command pays for another's dependencies.
"""

from __future__ import annotations

import difflib
import errno
import os
import signal
import sys
import tempfile
import time
import tomllib
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

from vlmdata import __version__
from vlmdata.errors import MachineFailure, UserError
from vlmdata.pipeline.distributor import default_download_processes, usable_cpus

E = TypeVar("E", bound=BaseException)

app = typer.Typer(
    help="Web-scale image-text URL lists -> offline CLIP embedding cache -> trained VLM adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by several stages: one definition, one help text.
AllowIncomplete = Annotated[
    bool,
    typer.Option(
        "--allow-incomplete",
        help="Take the finished shards of an unfinished input now, the rest on a later run.",
    ),
]
ShardSize = Annotated[int, typer.Option(help="Rows (or images) per shard.")]
MaxPixels = Annotated[
    int, typer.Option(help="Largest image (width x height) accepted; checked before decoding.")
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


def _apply_config_file(ctx: typer.Context, value: str | None) -> None:
    """``--config FILE.toml``: the command's options (and arguments) by name, as defaults that
    the flags given override. An unknown key is one line naming the closest valid one."""
    if not value:
        return
    try:
        with open(value, "rb") as f:
            options = tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        _refuse_config(f"cannot read --config {value} ({e}); pass a TOML file")
    known = {p.name for p in ctx.command.params if p.name and p.expose_value}
    settings = {}
    for key, setting in options.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            if isinstance(setting, dict):
                hint = f" (a [{key}] table: put {ctx.command.name}'s options at the top level)"
            _refuse_config(f"--config {value}: {ctx.command.name} has no option {key!r}{hint}")
        settings[name] = setting
    ctx.default_map = {**(ctx.default_map or {}), **settings}


def _refuse_config(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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
PadThreshold = Annotated[float, typer.Option(help=_SQUARE_HELP["pad_threshold"])]
Fill = Annotated[str, typer.Option(help=_SQUARE_HELP["fill"])]
Format = Annotated[str, typer.Option("--format", help=_SQUARE_HELP["format"])]
Quality = Annotated[int, typer.Option(help=_SQUARE_HELP["quality"])]
MinSide = Annotated[int, typer.Option(help=_SQUARE_HELP["min_side"])]
# download takes them only with --resize: unset unless given, so a stray one is caught.
_WITH_RESIZE = " Only with --resize; default as in preprocess."
ResizePadThreshold = Annotated[
    float | None, typer.Option(help=_SQUARE_HELP["pad_threshold"] + _WITH_RESIZE)
]
ResizeFill = Annotated[str | None, typer.Option(help=_SQUARE_HELP["fill"] + _WITH_RESIZE)]
ResizeFormat = Annotated[
    str | None, typer.Option("--format", help=_SQUARE_HELP["format"] + _WITH_RESIZE)
]
ResizeQuality = Annotated[int | None, typer.Option(help=_SQUARE_HELP["quality"] + _WITH_RESIZE)]
ResizeMinSide = Annotated[int | None, typer.Option(help=_SQUARE_HELP["min_side"] + _WITH_RESIZE)]


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


def run_command(stage: Callable[[], object], on_interrupt: str = RESUMES) -> None:
    """Run a stage and print its summary (or text); ``on_interrupt`` says what a Ctrl-C
    leaves the user to do.

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
    if code := getattr(summary, "exit_code", 0):  # a run stopped by Ctrl-C, after saving
        raise typer.Exit(code)


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
    shard_size: ShardSize = 10_000,
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
    max_pixels: MaxPixels = 100_000_000,
    processes: Annotated[
        int,
        typer.Option(
            help="Download processes, each an event loop over whole shards; default: a quarter "
            "of the usable CPUs (one loop keeps ~4 cores busy with --resize)."
        ),
    ] = default_download_processes(),
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
    resize: Annotated[
        int | None,
        typer.Option(help="Store SIZE x SIZE crop/pad squares instead of the original bytes."),
    ] = None,
    pad_threshold: ResizePadThreshold = None,
    fill: ResizeFill = None,
    format: ResizeFormat = None,
    quality: ResizeQuality = None,
    min_side: ResizeMinSide = None,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Download a URL list into image shards (tar + parquet + stats), resumably."""
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

    run_command(stage)


@app.command()
def preprocess(
    input_dir: Annotated[
        str,
        typer.Argument(help="vlmdata or img2dataset shards (*.tar), or a folder of images."),
    ],
    output_dir: Annotated[str, typer.Argument(help="Where the square shards go.")],
    size: Annotated[int, typer.Option(help="Side of the output squares.")] = 448,
    pad_threshold: PadThreshold = 0.6,
    fill: Fill = "0,0,0",
    format: Format = "jpg",
    quality: Quality = 95,
    min_side: MinSide = 0,
    max_pixels: MaxPixels = 100_000_000,
    shard_size: ShardSize = 10_000,
    processes: Annotated[
        int, typer.Option(help="Worker processes, each squaring whole shards.")
    ] = usable_cpus(),
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Crop or pad every image to a square and resize it (EXIF-oriented, RGB), resumably."""
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

    run_command(stage)


@app.command()
def encode(
    input_dir: Annotated[
        str,
        typer.Argument(help="preprocess/download/img2dataset shards (*.tar), or an image folder."),
    ],
    output_dir: Annotated[str, typer.Argument(help="Where the HDF5 feature shards go.")],
    model: Annotated[
        str, typer.Option(help="open_clip model name, or tiny-random-clip for tests.")
    ] = "ViT-L-14-336",
    pretrained: Annotated[
        str, typer.Option(help="open_clip tag, a local weights file, or none (random weights).")
    ] = "openai",
    layer: Annotated[
        int, typer.Option(help="Transformer block whose output gives the patch tokens.")
    ] = -2,
    tokens: Annotated[
        str, typer.Option(help="Pooled tokens per image: a square number <= the grid, or all.")
    ] = "64",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="auto (GPU: bf16 autocast where native, else fp16; CPU: fp32), fp32, "
            "fp16 (GPU) or bf16."
        ),
    ] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader processes decoding images.")] = min(
        4, usable_cpus()
    ),
    reference: Annotated[
        list[str] | None,
        typer.Option(help="Extra placeholder image to filter out (repeatable)."),
    ] = None,
    placeholder_threshold: Annotated[
        float, typer.Option(help="Cosine similarity to a reference at which an image is dropped.")
    ] = 0.92,
    no_placeholder_filter: Annotated[
        bool, typer.Option("--no-placeholder-filter", help="Keep placeholder-like images.")
    ] = False,
    pad_threshold: PadThreshold = 0.6,
    fill: Fill = "0,0,0",
    max_pixels: MaxPixels = 100_000_000,
    shard_size: ShardSize = 10_000,
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Encode images into CLIP patch-token features + embeddings (HDF5 shards), resumably."""
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

    run_command(stage)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="An output directory, or one .h5, .tar or .parquet.")],
    config: ConfigFile = None,
) -> None:
    """Show what a stage output or a shard file holds: rows, shapes, attributes, statuses."""
    from vlmdata.describe import describe

    run_command(lambda: describe(path))


# --- train: a projector (+ LLM) from the cached features ------------------------------------


@app.command()
def train(
    features: Annotated[
        list[str], typer.Argument(help="Encode outputs (HDF5 feature shards); several at once.")
    ],
    llm: Annotated[
        str,
        typer.Option(help="Causal LM: a hub id, a local directory, or tiny-random-llama (tests)."),
    ],
    out: Annotated[str, typer.Option(help="The run directory (config, checkpoints, metrics).")],
    projector: Annotated[
        str, typer.Option(help="linear, mlp2x_gelu (LLaVA-1.5), swiglu or resampler (Qwen-VL).")
    ] = "mlp2x_gelu",
    queries: Annotated[
        int, typer.Option(help="Resampler: learnable queries (image tokens the LLM sees).")
    ] = 64,
    train_llm: Annotated[
        str, typer.Option(help="none (frozen), full, or lora (needs the lora extra).")
    ] = "none",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 2 x rank).")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the projector.")] = 1e-3,
    llm_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the LLM [2e-5 full, 2e-4 LoRA].")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training examples.")] = 1,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps to train (overrides --epochs).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch (per process).")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    warmup: Annotated[
        float, typer.Option(help="Warmup: a fraction of the steps (< 1) or a number of steps.")
    ] = 0.03,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.")] = 1.0,
    max_length: Annotated[
        int, typer.Option(help="Longest sequence in tokens (image included).")
    ] = 512,
    padding_side: Annotated[str, typer.Option(help="Pad batches on the left or right.")] = "right",
    precision: Annotated[
        str,
        typer.Option(help="auto (GPU: bf16 where native, else fp16; CPU: fp32), fp32, fp16, bf16."),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    prompt: Annotated[
        list[str] | None,
        typer.Option(help="Instruction before each caption (repeatable; one sampled per example)."),
    ] = None,
    prompts: Annotated[
        str | None, typer.Option(help="A file of instructions, one per line.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Instruction data in LLaVA's conversation format (JSON or JSON lines)."),
    ] = None,
    no_captions: Annotated[
        bool, typer.Option("--no-captions", help="Train on --data alone, not on the captions.")
    ] = False,
    init: Annotated[
        str | None, typer.Option(help="Start from an earlier run's weights (a second stage).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of keys held out.")] = 0.01,
    val_samples: Annotated[int, typer.Option(help="Held-out examples per validation.")] = 1024,
    eval_every: Annotated[int, typer.Option(help="Validation loss every N steps.")] = 200,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept (the newest).")] = 2,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling and prompts.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader processes reading HDF5.")] = min(
        2, usable_cpus()
    ),
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Train a projector (and the LLM, with --train-llm) from cached features.

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

    run_command(stage, "rerun with --resume to continue from the last checkpoint")


# --- labels: zero-shot CLIP labels over the embeddings encode cached -------------------------

labels_app = typer.Typer(
    help="Zero-shot CLIP labels for a dataset, from the embeddings `vlmdata encode` cached.",
    no_args_is_help=True,
)
app.add_typer(labels_app, name="labels")


@labels_app.command("classify")
def labels_classify(
    features_dir: Annotated[str, typer.Argument(help="The output directory of vlmdata encode.")],
    output_dir: Annotated[str, typer.Argument(help="Where the label shards go.")],
    taxonomy: Annotated[
        str | None,
        typer.Option(
            help="Your taxonomy (JSON or YAML: category -> descriptions); default: "
            "the shipped one (`vlmdata labels taxonomy`)."
        ),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(
            help="Prompt templates, each with one {} for the description; default: "
            "the shipped ones."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Checked against the features' model; default: theirs.")
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Where the features' weights file is now, if it moved (its sha256 must match)."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Most probable descriptions kept per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Embeddings per matrix product.")] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Label every cached embedding with a taxonomy's descriptions and categories, resumably."""
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

    run_command(stage)


@labels_app.command("taxonomy")
def labels_taxonomy(
    out: Annotated[
        str | None, typer.Option(help="Write it to this file instead of printing it.")
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Print (or export) the default taxonomy as JSON, to edit and pass back with --taxonomy."""
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


@labels_app.command("report")
def labels_report(
    labels_dir: Annotated[
        str, typer.Argument(help="The output directory of vlmdata labels classify.")
    ],
    images: Annotated[
        str,
        typer.Option(
            help="The image shards the features were made from (download or preprocess output)."
        ),
    ],
    out: Annotated[
        str | None, typer.Option(help="Where the report goes; default: LABELS_DIR/report.")
    ] = None,
    categories: Annotated[
        int, typer.Option(help="Most frequent categories shown with example thumbnails.")
    ] = 8,
    examples: Annotated[int, typer.Option(help="Example thumbnails per category.")] = 12,
    least_confident: Annotated[
        int, typer.Option(help="Thumbnails of the least confident labels.")
    ] = 24,
    placeholders: Annotated[
        int, typer.Option(help="Thumbnails of the placeholder category, at most.")
    ] = 48,
    placeholder_category: Annotated[
        str, typer.Option(help="The taxonomy's category for 'image not available' stand-ins.")
    ] = "image not available",
    allow_incomplete: AllowIncomplete = False,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Write an HTML report (charts, thumbnails by category) of a labelled dataset."""
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

    run_command(stage)


# --- caption and eval: a trained run on new images, and on its held-out features -------------

RunDir = Annotated[str, typer.Argument(help="A training run (the --out of vlmdata train).")]
Checkpoint = Annotated[int | None, typer.Option(help="The checkpoint's step; default: the latest.")]
RunDevice = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
RunPrecision = Annotated[
    str,
    typer.Option(help="auto (GPU: bf16 where native, else fp16; CPU: fp32), fp32, fp16, bf16."),
]
MaxNewTokens = Annotated[int, typer.Option(help="Longest caption, in tokens.")]
GenerateBatch = Annotated[int, typer.Option(help="Images per generation batch.")]


@app.command()
def caption(
    run_dir: RunDir,
    images: Annotated[list[str], typer.Argument(help="Image files or http(s) URLs.")],
    prompt: Annotated[
        str | None, typer.Option(help="The instruction; default: the run's first training prompt.")
    ] = None,
    num: Annotated[int, typer.Option(help="Captions per image (sampling only).")] = 1,
    temperature: Annotated[
        float, typer.Option(help="0: greedy; above 0: sample with this temperature.")
    ] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sample from the top-p probability mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    max_new_tokens: MaxNewTokens = 64,
    batch_size: GenerateBatch = 16,
    checkpoint: Checkpoint = None,
    device: RunDevice = "auto",
    precision: RunPrecision = "auto",
    pretrained: Annotated[
        str | None,
        typer.Option(help="Where the features' CLIP weights file is now, if it moved."),
    ] = None,
    allow_private_network: Annotated[
        bool,
        typer.Option(
            "--allow-private-network", help="Allow URLs on private, loopback and link-local hosts."
        ),
    ] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Also write the captions to this JSON file.")
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Caption images with a trained run, encoding them as its features were made.

    Exits 1 when an image could not be read, fetched or decoded (the others are captioned).
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


@app.command("eval")
def evaluate(
    run_dir: RunDir,
    features_dir: Annotated[
        str, typer.Argument(help="Encode output holding the run's held-out keys.")
    ],
    samples: Annotated[int, typer.Option(help="Held-out images to caption and score.")] = 100,
    prompt: Annotated[
        str | None, typer.Option(help="The instruction; default: the run's first training prompt.")
    ] = None,
    images: Annotated[
        str | None,
        typer.Option(
            help="The image shards (or image folder) the features came from: adds an HTML page "
            "with thumbnails."
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Where eval.json goes; default: RUN_DIR/eval/CHECKPOINT.")
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
    """Score a run on its held-out images: loss, perplexity, BLEU-1..4, CIDEr-D."""
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

    run_command(stage, "rerun the same command")


if __name__ == "__main__":
    app()
