"""`vlmdata labels`: zero-shot CLIP labels over the embeddings encode cached, and their report."""

from __future__ import annotations

from pathlib import Path
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
    Distributor,
    GpusPerWorker,
    MaxShardRetries,
    Quiet,
    RayAddress,
    ray_options,
)
from vlmdata.errors import UserError
from vlmdata.labels import PLACEHOLDER_CATEGORY

labels_app = typer.Typer(
    help="Zero-shot CLIP labels for a dataset, from the embeddings `vlmdata encode` cached."
    "\n\nExample: vlmdata labels classify feats/ labels/",
    no_args_is_help=True,
)


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
    device: Device = "auto",
    allow_incomplete: AllowIncomplete = False,
    distributor: Distributor = "local",
    ray_address: RayAddress = "",
    max_shard_retries: MaxShardRetries = 3,
    gpus_per_worker: GpusPerWorker = 0.0,
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
                ray=ray_options(ctx, distributor),
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
    ] = PLACEHOLDER_CATEGORY,
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
