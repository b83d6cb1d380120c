"""`vlmdata train`: a projector (and the LLM, if asked) from the cached features."""

from __future__ import annotations

from typing import Annotated

import typer

from vlmdata.cli.failures import run_command
from vlmdata.cli.options import (
    INPUT,
    MODEL,
    OUTPUT,
    PERFORMANCE,
    AllowIncomplete,
    ConfigFile,
    Device,
    Precision,
    Quiet,
)
from vlmdata.pipeline.distributor import usable_cpus

_TRAINING, _VALIDATION = "Training", "Validation"  # train's own option panels


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
        float, typer.Option(help="Peak learning rate of the projector.", rich_help_panel=_TRAINING)
    ] = 1e-3,
    llm_lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of the LLM [2e-5 full, 2e-4 LoRA].", rich_help_panel=_TRAINING
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Passes over the training examples.", rich_help_panel=_TRAINING)
    ] = 1,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps to train (overrides --epochs).", rich_help_panel=_TRAINING
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(help="Examples per micro-batch (per process).", rich_help_panel=_TRAINING),
    ] = 16,
    grad_accum: Annotated[
        int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=_TRAINING)
    ] = 1,
    warmup: Annotated[
        float,
        typer.Option(
            help="Warmup: a fraction of the steps (< 1) or a number of steps.",
            rich_help_panel=_TRAINING,
        ),
    ] = 0.03,
    weight_decay: Annotated[
        float,
        typer.Option(help="AdamW weight decay (matrices only).", rich_help_panel=_TRAINING),
    ] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option(help="Gradient clipping norm.", rich_help_panel=_TRAINING)
    ] = 1.0,
    max_length: Annotated[
        int,
        typer.Option(
            help="Longest sequence in tokens (image included).", rich_help_panel=_TRAINING
        ),
    ] = 512,
    padding_side: Annotated[
        str, typer.Option(help="Pad batches on the left or right.", rich_help_panel=_TRAINING)
    ] = "right",
    precision: Precision = "auto",
    device: Device = "auto",
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
            help="Seed of initialisation, shuffling and prompts.", rich_help_panel=_TRAINING
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
