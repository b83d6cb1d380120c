"""``vlmdata run PIPELINE.toml``: the stages a pipeline file names, in order, each run as its
own command would run it.

A pipeline file has the input, the output root, and one table per stage holding that command's
options (the keys ``--config`` takes). Each stage writes ``OUTPUT/<stage>`` and resumes there
as it does alone, so rerunning the pipeline after a kill or a failure continues where it
stopped and finished stages say "nothing to do". The file is checked whole (every key and
value of every table) before the first stage starts: a typo in ``[train]`` is not found hours
into the download.
"""

from __future__ import annotations

import difflib
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from vlmdata.configfile import option_names, options_from_table, read_toml
from vlmdata.errors import UserError

# The stages in the order they run; a pipeline runs those it has a table for.
STAGES = ("download", "preprocess", "encode", "labels", "train", "eval")
IMAGE_STAGES = ("download", "preprocess")  # what the later stages read images from


@dataclass(frozen=True)
class RunConfig:
    pipeline: str | None  # the PIPELINE.toml file; None with input and output given
    input: str | None = None  # overrides the file's
    output: str | None = None  # overrides the file's
    dry_run: bool = False  # print the commands, run none
    quiet: bool = False
    overrides: dict[str, dict] = field(default_factory=dict)  # table -> options over the file's


@dataclass
class Step:
    """One command of a pipeline: its words, its parsed options, where it writes."""

    name: str  # "labels report"
    ctx: typer.Context
    shown: str  # the equivalent command line


@dataclass
class RunSummary:
    output: Path
    done: list[tuple[str, int, float]] = field(default_factory=list)  # (step, exit code, s)
    stopped: str | None = None  # the step that failed, if one did
    exit_code: int = 0
    again: str = "the same vlmdata run"  # the command that continues it

    def format(self) -> str:
        lines = [f"\npipeline {self.output}:"]
        lines += [f"  {name:<15} {'ok' if code == 0 else f'exit {code}':<8} {seconds:7.1f} s"
                  for name, code, seconds in self.done]  # fmt: skip
        if self.stopped:
            lines.append(f"stopped at {self.stopped}: fix what it said, then rerun {self.again} "
                         "to continue (finished stages are not redone)")  # fmt: skip
        elif (self.output / "report.html").exists():
            lines.append(f"report: {self.output / 'report.html'}")
        return "\n".join(lines)


def plan_pipeline(config: RunConfig, app: typer.core.TyperGroup) -> tuple[list[Step], Path]:
    """The steps of ``config``'s pipeline with their options parsed and checked, and the
    output root. Every mistake in the file is found here, before any stage runs."""
    pipeline = read_toml(config.pipeline, "the pipeline file") if config.pipeline else {}
    for table, options in config.overrides.items():
        pipeline[table] = {**pipeline.get(table, {}), **options}
    where = config.pipeline or "the pipeline"
    for key, value in pipeline.items():
        if key in ("input", "output"):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: {key} must be a path in quotes")
        elif key not in STAGES:
            close = difflib.get_close_matches(key, ["input", "output", *STAGES], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; stages: {', '.join(STAGES)}"
            raise UserError(f"{where}: unknown key {key!r}{hint}")
        elif not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a table ([{key}]) of its options")
    source = config.input or pipeline.get("input")
    root = config.output or pipeline.get("output")
    if not root:
        raise UserError(f'{where} has no output; add output = "DIR" or pass --output DIR')
    stages = [name for name in STAGES if name in pipeline]
    if not stages:
        raise UserError(f"{where} names no stage; add tables such as [download] and [encode] "
                        "(vlmdata run --print-config shows them all)")  # fmt: skip
    if not source and stages[0] not in ("labels", "train", "eval"):
        raise UserError(f'{where} has no input; add input = "PATH" or pass --input PATH')
    out = Path(root)
    images = _image_dir(stages, source, out)
    steps = []
    for name, arguments, wired, table in _commands(stages, pipeline, source, out, images):
        command = _command(app, name)
        options = options_from_table(command, table, f"{where} [{_table_of(name)}]", wired)
        if config.quiet and "quiet" in option_names(command):
            options["quiet"] = True
        steps.append(_step(command, name, arguments, options))
    return steps, out


def run_pipeline(config: RunConfig, app: typer.core.TyperGroup) -> RunSummary | str:
    """Run the pipeline's steps in order, stopping at the first that fails."""
    steps, out = plan_pipeline(config, app)
    if config.dry_run:
        return "\n".join(step.shown for step in steps)
    again = f"vlmdata run {shlex.quote(config.pipeline)}" if config.pipeline else "vlmdata run"
    return run_steps(steps, RunSummary(out, again=again))


def run_steps(steps: list[Step], summary: RunSummary) -> RunSummary:
    """Run ``steps`` in order into ``summary``, stopping at the first that fails."""
    for number, step in enumerate(steps, 1):
        typer.secho(f"\n[{number}/{len(steps)}] {step.shown}", bold=True)
        started = time.monotonic()
        code = _invoke(step.ctx)
        summary.done.append((step.name, code, time.monotonic() - started))
        if code:
            summary.stopped, summary.exit_code = step.name, code
            break
    return summary


def _invoke(ctx: typer.Context) -> int:
    """Run one command as the CLI would; its exit code (it prints its own errors)."""
    try:
        with ctx:
            ctx.command.invoke(ctx)
    except typer.Exit as e:
        return e.exit_code
    return 0


def _image_dir(stages: list[str], source: str | None, out: Path) -> str | None:
    """Where the stages after download/preprocess read images: the last of those, or the
    input itself (a folder of images or image shards) when the pipeline has neither."""
    made = [name for name in stages if name in IMAGE_STAGES]
    return str(out / made[-1]) if made else source


def _has_shards(stages: list[str], images: str | None) -> bool:
    """Whether the images are shards (made by the pipeline, or given), not a plain folder."""
    return any(name in IMAGE_STAGES for name in stages) or (
        images is not None and any(Path(images).glob("*.tar"))
    )


Command = tuple[str, list[str], dict[str, str], dict]  # name, arguments, wired options, table


def _commands(
    stages: list[str], pipeline: dict, source: str | None, out: Path, images: str | None
) -> list[Command]:
    """Each stage's command with its wired arguments (what the pipeline decides, which its
    table may not set) and its table; labels adds its report, and the run ends in one."""
    wiring = "vlmdata run"
    commands = []
    previous_images = source
    for name in stages:
        table = dict(pipeline[name])
        here = str(out / name)
        if name in IMAGE_STAGES:
            arguments = [str(previous_images), here]
            wired = {"input": wiring, "input_dir": wiring, "output_dir": wiring}
            previous_images = here
        elif name == "encode":
            arguments, wired = [str(images), here], {"input_dir": wiring, "output_dir": wiring}
        elif name == "labels":
            report = table.pop("report", {})
            if not isinstance(report, dict):
                raise UserError("[labels] report must be a table ([labels.report]) of options")
            commands.append(("labels classify", [str(out / "encode"), here],
                             {"features_dir": wiring, "output_dir": wiring}, table))  # fmt: skip
            if _has_shards(stages, images):  # its thumbnails come from image shards
                arguments = [here, "--images", str(images)]
                wired = {"labels_dir": wiring, "images": wiring, "out": wiring}
                commands.append(("labels report", arguments, wired, report))
            continue
        elif name == "train":
            # --resume: a rerun continues the run (a new or empty directory starts one).
            arguments = [str(out / "encode"), "--out", here, "--resume"]
            wired = {"features": wiring, "out": wiring, "resume": wiring}
        else:  # eval
            arguments = [str(out / "train"), str(out / "encode"), "--images", str(images)]
            wired = {"run_dir": wiring, "features_dir": wiring, "images": wiring}
        commands.append((name, arguments, wired, table))
    commands.append(("report", [str(out)], {"path": wiring}, {}))
    return commands


def _command(app: typer.core.TyperGroup, name: str) -> typer.core.TyperCommand:
    command = app
    for word in name.split():
        command = command.commands[word]
    return command


def _table_of(name: str) -> str:
    return {"labels classify": "labels", "labels report": "labels.report"}.get(name, name)


def command_step(
    app: typer.core.TyperGroup, name: str, arguments: list[str], options: dict
) -> Step:
    """A step running ``vlmdata NAME ARGUMENTS`` with ``options`` (python names)."""
    return _step(_command(app, name), name, arguments, options)


def _step(command: typer.core.TyperCommand, name: str, arguments: list[str], options: dict) -> Step:
    """The command's context, parsed now so a wrong value fails before any stage runs."""
    try:
        ctx = command.make_context(f"vlmdata {name}", list(arguments), default_map=options)
    except Exception as e:  # click's usage errors (typer vendors click: matched by shape)
        if not hasattr(e, "format_message"):
            raise
        message = e.format_message().strip().removesuffix(".")
        raise UserError(f"[{_table_of(name)}] {message[:1].lower()}{message[1:]}") from None
    return Step(name, ctx, _shown(command, name, arguments, options))


def _shown(command: typer.core.TyperCommand, name: str, arguments: list[str], options: dict) -> str:
    """The command line that does what this step does."""
    words = ["vlmdata", *name.split(), *arguments]
    flags = {p.name: p for p in command.params}
    for key, value in options.items():
        flag = max(flags[key].opts, key=len)
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                words.append(flag)
            elif item is not False:
                words += [flag, str(item)]
    return shlex.join(words)


TEMPLATE_HEAD = """\
# A vlmdata pipeline: `vlmdata run pipeline.toml`. Rerun it after a kill or a failure: every
# stage resumes, finished ones say "nothing to do". Stages run in this order, those with a
# table here: download -> preprocess -> encode -> labels -> train -> eval, then a report.
# Each table takes that command's options by their flag names (see `vlmdata COMMAND --help`);
# inputs and outputs are wired for you: stage X writes OUTPUT/X. Paths are relative to the
# directory you run from.

input = "urls.parquet"  # the URL list (or, without [download], images or image shards)
output = "pipeline"     # the root of every stage's output
"""


def pipeline_template(app: typer.core.TyperGroup) -> str:
    """A commented pipeline file listing every stage's options with their defaults."""
    parts = [TEMPLATE_HEAD]
    shown = {"download": ["download"], "preprocess": ["preprocess"], "encode": ["encode"],
             "labels": ["labels classify", "labels report"], "train": ["train"],
             "eval": ["eval"]}  # fmt: skip
    required = {"llm": '"Qwen/Qwen2.5-0.5B"'}
    for table, names in shown.items():
        for name in names:
            command = _command(app, name)
            header = f"[{_table_of(name)}]"
            if table == "preprocess":
                header = "# [preprocess]  # optional: download --resize squares images already"
            parts.append(f"\n{header}\n")
            for param in command.params:
                if param.name in _WIRED or param.name in ("config", "quiet"):
                    continue
                key = param.name.replace("_", "-")
                if param.name in required:
                    parts.append(f"{key} = {required[param.name]}\n")
                    continue
                default = param.default if not callable(param.default) else None
                value = _toml_value(default)
                helptext = " ".join((getattr(param, "help", None) or "").split())
                parts.append(f"# {key} = {value}  # {helptext}\n")
    return "".join(parts)


# Set by `vlmdata run` itself, never in a table.
_WIRED = {"input", "input_dir", "output_dir", "features_dir", "labels_dir", "images", "features",
          "out", "resume", "run_dir", "path"}  # fmt: skip


def _toml_value(value: object) -> str:
    import tomli_w

    if value is None:
        return "(unset)"
    return tomli_w.dumps({"v": list(value) if isinstance(value, tuple) else value})[4:].strip()
