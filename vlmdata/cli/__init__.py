"""The `vlmdata` command line: one thin command per stage over its ``run_*`` function.

Stage modules are imported inside the commands so that ``vlmdata --help`` stays instant and
no command pays for another's dependencies. The commands live in this package's modules, by
subject; this one makes the group and lists them, panel by panel.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vlmdata import __version__
from vlmdata.cli import captions, download, images, labels, training, whole
from vlmdata.cli.failures import one_line_usage_errors

# The command list of `vlmdata --help`, panel by panel in this order.
WHOLE_JOB, STAGES, TRAINING, LOOK = "Whole job", "Pipeline stages", "Training", "Look"
_COMMANDS = {
    WHOLE_JOB: {"run": whole.run_pipeline, "demo": whole.demo},
    STAGES: {"download": download.download, "preprocess": images.preprocess,
             "encode": images.encode},  # and the labels group
    TRAINING: {"train": training.train, "caption": captions.caption, "eval": captions.evaluate},
    LOOK: {"inspect": whole.inspect, "report": whole.report},
}  # fmt: skip


class _Vlmdata(typer.core.TyperGroup):
    """The `vlmdata` group: command-line mistakes in one line (here, at the top, covers every
    command and subgroup), commands listed by panel."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: typer.Context | None = None,
        **extra: Any,
    ) -> typer.Context:  # fmt: skip
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        with one_line_usage_errors():  # the subcommand's own parsing happens in here
            return super().invoke(ctx)

    def list_commands(self, ctx: typer.Context) -> list[str]:
        order = {panel: i for i, panel in enumerate(_COMMANDS)}

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


def _add_commands() -> None:
    # typer lists a group's subgroups after its commands: labels comes last of its panel.
    for panel, commands in _COMMANDS.items():
        for name, function in commands.items():
            app.command(name, rich_help_panel=panel)(function)
    app.add_typer(labels.labels_app, name="labels", rich_help_panel=STAGES)


_add_commands()


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
