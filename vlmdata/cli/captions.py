"""`vlmdata caption` and `vlmdata eval`: a trained run on new images, and on its held-out
features."""

from __future__ import annotations

from typing import Annotated

import typer

from vlmdata.cli.failures import run_command
from vlmdata.cli.options import (
    MODEL,
    OUTPUT,
    PERFORMANCE,
    SAFETY,
    AllowIncomplete,
    ConfigFile,
    Device,
    Precision,
    Quiet,
)

_GENERATION = "Generation"
RunDir = Annotated[str, typer.Argument(help="A training run (the --out of vlmdata train).")]
Checkpoint = Annotated[
    int | None,
    typer.Option(help="The checkpoint's step; default: the latest.", rich_help_panel=MODEL),
]
MaxNewTokens = Annotated[
    int, typer.Option(help="Longest caption, in tokens.", rich_help_panel=_GENERATION)
]
GeneratePrompt = Annotated[
    str | None,
    typer.Option(
        help="The instruction; default: the run's first training prompt.",
        rich_help_panel=_GENERATION,
    ),
]
GenerateBatch = Annotated[
    int, typer.Option(help="Images per generation batch.", rich_help_panel=PERFORMANCE)
]


def caption(
    run_dir: RunDir,
    images: Annotated[list[str], typer.Argument(help="Image files or http(s) URLs.")],
    prompt: GeneratePrompt = None,
    num: Annotated[
        int, typer.Option(help="Captions per image (sampling only).", rich_help_panel=_GENERATION)
    ] = 1,
    temperature: Annotated[
        float,
        typer.Option(
            help="0: greedy; above 0: sample with this temperature.", rich_help_panel=_GENERATION
        ),
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(help="Sample from the top-p probability mass.", rich_help_panel=_GENERATION),
    ] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the sampling.", rich_help_panel=_GENERATION)
    ] = 0,
    max_new_tokens: MaxNewTokens = 64,
    batch_size: GenerateBatch = 16,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    precision: Precision = "auto",
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


def evaluate(
    ctx: typer.Context,
    run_dir: RunDir,
    features_dir: Annotated[
        str, typer.Argument(help="Encode output holding the run's held-out keys.")
    ],
    samples: Annotated[
        int,
        typer.Option(help="Held-out images to caption and score.", rich_help_panel=_GENERATION),
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
    device: Device = "auto",
    precision: Precision = "auto",
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
