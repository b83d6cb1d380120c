"""The whole job (`vlmdata run`, `vlmdata demo`) and the commands that look at what it made
(`vlmdata report`, `vlmdata inspect`)."""

from __future__ import annotations

from typing import Annotated

import typer

from vlmdata.cli.failures import run_command
from vlmdata.cli.options import ConfigFile, Quiet
from vlmdata.demo import DemoConfig

_DEMO = DemoConfig()  # the demo's defaults, as run_demo takes them


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
    config: ConfigFile = None,
) -> None:
    """Run a pipeline file's stages, each resuming where it stopped, then write its report.

    Stages with a table run in order: download, preprocess, encode, labels, train, eval.

    Then OUTPUT/report.html. A rerun after a kill or a failure continues where it stopped.

    Example: vlmdata run pipeline.toml   # start one with: vlmdata run --print-config
    """
    from vlmdata.workflow import RunConfig, pipeline_template
    from vlmdata.workflow import run_pipeline as run_stages

    if print_config:
        typer.echo(pipeline_template(_vlmdata()), nl=False)
        return
    if pipeline is None:
        typer.echo("error: pass a PIPELINE.toml (vlmdata run --print-config writes one)", err=True)
        raise typer.Exit(2)
    run = RunConfig(pipeline, input=input, output=output, dry_run=dry_run, quiet=quiet)
    run_command(lambda: run_stages(run, _vlmdata()), "rerun the same vlmdata run to continue")


def demo(
    out_dir: Annotated[
        str, typer.Argument(help="Where the corpus, every stage and the report go.")
    ] = _DEMO.out,
    images: Annotated[int, typer.Option(help="Pictures in the generated corpus.")] = _DEMO.images,
    steps: Annotated[
        int | None, typer.Option(help="Training steps; default: the demo pipeline's.")
    ] = _DEMO.steps,
    quiet: Quiet = False,
    config: ConfigFile = None,
) -> None:
    """Run the whole job offline on generated data, from URLs to captions and a report.

    A corpus served on 127.0.0.1, tiny random models: download, encode, labels, train, eval.

    Then images it never saw are captioned, and DIR/report.html shows it all.

    Example: vlmdata demo   # a few minutes on 2 CPU cores; then open vlmdata-demo/report.html
    """
    from vlmdata.demo import demo_command, run_demo

    def stage():
        settings = DemoConfig(out=out_dir, images=images, steps=steps, quiet=quiet)
        return run_demo(settings, _vlmdata())

    run_command(stage, f"rerun {demo_command(out_dir, images, steps)} to continue")


def _vlmdata() -> typer.core.TyperGroup:
    """The `vlmdata` command group: the commands a pipeline's stages run as."""
    from vlmdata.cli import app  # the package imports this module, so not at the top

    return typer.main.get_command(app)


def inspect(
    path: Annotated[str, typer.Argument(help="An output directory, or one .h5, .tar or .parquet.")],
    config: ConfigFile = None,
) -> None:
    """Show what a stage output or a shard file holds: rows, shapes, attributes, statuses.

    Example: vlmdata inspect feats/00000.h5
    """
    from vlmdata.describe import describe

    run_command(lambda: describe(path))


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
