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

import tomli_w
import typer

from vlmdata.configfile import (
    NOT_RECORDED,
    option_names,
    options_from_table,
    read_toml,
    write_record,
)
from vlmdata.errors import UserError
from vlmdata.pipeline.runner import path_argument

# The stages in the order they run; a pipeline runs those it has a table for.
STAGES = ("download", "preprocess", "encode", "labels", "train", "eval")
IMAGE_STAGES = ("download", "preprocess")  # what the later stages read images from
PIPELINE_RECORD = "pipeline.toml"  # OUT/pipeline.toml: the pipeline last run into OUT


@dataclass(frozen=True)
class RunConfig:
    pipeline: str  # the PIPELINE.toml file
    input: str | None = None  # overrides the file's
    output: str | None = None  # overrides the file's
    dry_run: bool = False  # print the commands, run none
    quiet: bool = False
    overrides: dict[str, dict] = field(default_factory=dict)  # table -> options over the file's

    def again(self) -> str:
        """The command line that continues this run."""
        words = ["vlmdata", "run", self.pipeline]
        words += ["--input", self.input] if self.input else []
        words += ["--output", self.output] if self.output else []
        return shlex.join(words)


@dataclass
class Step:
    """One command of a pipeline: its words, its parsed options, where it writes."""

    name: str  # "labels report"
    ctx: typer.Context
    shown: str  # the equivalent command line


@dataclass
class RunSummary:
    output: Path
    again: str  # the command that continues the run
    done: list[tuple[str, int, float]] = field(default_factory=list)  # (step, exit code, s)
    stopped: str | None = None  # the step that failed, if one did
    exit_code: int = 0

    def format(self) -> str:
        lines = [f"\npipeline {self.output}:"]
        lines += [f"  {name:<15} {'ok' if code == 0 else f'exit {code}':<8} {seconds:7.1f} s"
                  for name, code, seconds in self.done]  # fmt: skip
        if self.exit_code == 130:
            lines.append(f"interrupted at {self.stopped}: rerun {self.again} to continue "
                         "(finished stages are not redone)")  # fmt: skip
        elif self.stopped:
            lines.append(f"stopped at {self.stopped}: fix what it said, then rerun {self.again} "
                         "to continue (finished stages are not redone)")  # fmt: skip
        elif (self.output / "report.html").exists():
            lines.append(f"report: {self.output / 'report.html'}")
        return "\n".join(lines)


@dataclass
class Pipeline:
    steps: list[Step]
    out: Path  # the output root
    resolved: dict  # the file with --input, --output and the overrides applied
    notes: list[str]  # what the pipeline leaves out, and why


def plan_pipeline(config: RunConfig, app: typer.core.TyperGroup) -> Pipeline:
    """The steps of ``config``'s pipeline with their options parsed and checked. Every mistake
    in the file is found here, before any stage runs."""
    where = config.pipeline
    pipeline = read_toml(config.pipeline, "the pipeline file")
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
    for table, options in config.overrides.items():  # replacing the file's, either spelling
        kept = {k: v for k, v in pipeline.get(table, {}).items()
                if k.replace("-", "_") not in options}  # fmt: skip
        pipeline[table] = {**kept, **options}
    source = config.input if config.input is not None else pipeline.get("input")
    root = config.output if config.output is not None else pipeline.get("output")
    for flag, value in (("--input", config.input), ("--output", config.output)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty; pass a path")
    if not root:
        raise UserError(f'{where} has no output; add output = "DIR" or pass --output DIR')
    stages = [name for name in STAGES if name in pipeline]
    if not stages:
        raise UserError(f"{where} names no stage; add tables such as [download] and [encode] "
                        "(vlmdata run --print-config shows them all)")  # fmt: skip
    if not source and stages[0] in (*IMAGE_STAGES, "encode"):
        raise UserError(f'{where} has no input; add input = "PATH" or pass --input PATH')
    # The pipeline directory is local (train, eval and the report need one); the first stage
    # may read an object-store URL when it is a stage that can.
    out = path_argument(root, "output", written=True)
    if source and stages[0] in ("train", "eval"):
        path_argument(source, "input")
    wiring = Wiring.of(stages, source, out)
    steps = []
    for name, arguments, wired, table in _commands(stages, pipeline, wiring):
        command = _command(app, name)
        options = options_from_table(command, table, f"{where} [{_table_of(name)}]", wired)
        if config.quiet and "quiet" in option_names(command):
            options["quiet"] = True
        steps.append(_step(command, name, arguments, options))
    resolved = {"input": source, "output": root, **{name: pipeline[name] for name in stages}}
    resolved = {key: value for key, value in resolved.items() if value is not None}
    return Pipeline(steps, out, resolved, wiring.notes(stages, pipeline))


def record_pipeline(pipeline: Pipeline) -> None:
    """``OUT/pipeline.toml``: the pipeline as it runs, itself a pipeline file."""
    pipeline.out.mkdir(parents=True, exist_ok=True)
    path = pipeline.out / PIPELINE_RECORD
    what = "The pipeline last run into this directory, with its --input and --output."
    again = f"vlmdata run {shlex.quote(str(path))}"
    write_record(path, "vlmdata run", again, pipeline.resolved, what)


def run_pipeline(config: RunConfig, app: typer.core.TyperGroup) -> RunSummary | str:
    """Run the pipeline's steps in order, stopping at the first that fails."""
    pipeline = plan_pipeline(config, app)
    if config.dry_run:
        return "\n".join([*(f"# {note}" for note in pipeline.notes),
                          *(step.shown for step in pipeline.steps)])  # fmt: skip
    for note in pipeline.notes:
        typer.echo(f"note: {note}")
    record_pipeline(pipeline)
    return run_steps(pipeline.steps, RunSummary(pipeline.out, again=config.again()))


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


@dataclass(frozen=True)
class Wiring:
    """Where the stages of a pipeline read: the image stages read the input, each the one
    before; encode reads the last image stage's output (or the input: a folder of images or
    image shards); labels, train and eval read encode's output, or the input when the
    pipeline starts after encode (the input is then features)."""

    source: str | None
    out: Path
    images: str | None  # image shards or folder, where known
    image_shards: bool  # the images are shards (labels report takes thumbnails from those)
    features: str

    @staticmethod
    def of(stages: list[str], source: str | None, out: Path) -> Wiring:
        made = [name for name in stages if name in IMAGE_STAGES]
        if made:
            images, shards = str(out / made[-1]), True
        else:  # encode reads the input: images, as a folder or as shards
            images = source if "encode" in stages else None
            shards = images is not None and any(Path(images).glob("*.tar"))
        starts_after_encode = not made and "encode" not in stages and source
        features = source if starts_after_encode else str(out / "encode")
        return Wiring(source, out, images, shards, features)

    def notes(self, stages: list[str], pipeline: dict) -> list[str]:
        notes = []
        if "labels" in stages and not self.image_shards:
            notes.append("no labels report: it shows thumbnails from image shards, and this "
                         "pipeline has none (run download or preprocess in it)")  # fmt: skip
        if "eval" in stages and self.images is None and "images" not in pipeline["eval"]:
            notes.append("eval without thumbnails: the pipeline does not know the images "
                         "(set images = \"DIR\" under [eval])")  # fmt: skip
        return notes


Command = tuple[str, list[str], dict[str, str], dict]  # name, arguments, wired options, table
_BY_RUN = "vlmdata run"  # who sets a wired option


def _commands(stages: list[str], pipeline: dict, wiring: Wiring) -> list[Command]:
    """Each stage's command with its wired arguments (what the pipeline decides, which its
    table may not set) and its table; labels adds its report, and the run ends in one."""
    out, commands = wiring.out, []
    previous = wiring.source
    for name in stages:
        table = dict(pipeline[name])
        here = str(out / name)
        if name in IMAGE_STAGES:
            wired = _wired("input", "input_dir", "output_dir")  # download's INPUT, the others'
            commands.append((name, [str(previous), here], wired, table))
            previous = here
        elif name == "encode":
            arguments = [str(wiring.images), here]
            commands.append((name, arguments, _wired("input_dir", "output_dir"), table))
        elif name == "labels":
            report = table.pop("report", {})
            if not isinstance(report, dict):
                raise UserError("[labels] report must be a table ([labels.report]) of options")
            if other := next((k for k, v in table.items() if isinstance(v, dict)), None):
                raise UserError(f"[labels.{other}] is no table vlmdata run knows; the labels "
                                "report's options go under [labels.report]")  # fmt: skip
            commands.append(("labels classify", [wiring.features, here],
                             _wired("features_dir", "output_dir"), table))  # fmt: skip
            if wiring.image_shards:
                arguments = [here, "--images", str(wiring.images)]
                wired = _wired("labels_dir", "images", "out")
                commands.append(("labels report", arguments, wired, report))
        elif name == "train":
            # --resume: a rerun continues the run (a new or empty directory starts one).
            arguments = [wiring.features, "--out", here, "--resume"]
            commands.append((name, arguments, _wired("features", "out", "resume"), table))
        else:  # eval
            arguments = [str(out / "train"), wiring.features]
            wired = _wired("run_dir", "features_dir")
            if wiring.images is not None:
                arguments += ["--images", wiring.images]
                wired = _wired("run_dir", "features_dir", "images")
            commands.append((name, arguments, wired, table))
    commands.append(("report", [str(out)], _wired("path"), {}))
    return commands


def _wired(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, _BY_RUN)


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
    from vlmdata.cli.failures import UsageError, usage_error_line

    try:
        ctx = command.make_context(f"vlmdata {name}", list(arguments), default_map=options)
    except UsageError as e:
        raise UserError(f"[{_table_of(name)}] {usage_error_line(e)}") from None
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
_EXAMPLES = {"llm": '"Qwen/Qwen2.5-0.5B"'}  # required options, uncommented in the template


def pipeline_template(app: typer.core.TyperGroup) -> str:
    """A commented pipeline file listing every stage's options with their defaults."""
    wiring = Wiring.of(list(STAGES), "input", Path("out"))
    every = _commands(list(STAGES), {name: {} for name in STAGES}, wiring)
    parts = [TEMPLATE_HEAD]
    for name, _, wired, _ in every[:-1]:  # the closing report takes no options
        header = f"[{_table_of(name)}]"
        if name == "preprocess":
            header = "# [preprocess]  # optional: download --resize squares images already"
        parts.append(f"\n{header}\n")
        for param in _command(app, name).params:
            if param.name in wired or param.name in NOT_RECORDED:
                continue
            key = param.name.replace("_", "-")
            if param.name in _EXAMPLES:
                parts.append(f"{key} = {_EXAMPLES[param.name]}\n")
                continue
            helptext = " ".join((getattr(param, "help", None) or "").split())
            if isinstance(param.show_default, str):  # a default that depends on the machine
                helptext += f" [default: {param.show_default.strip('()')}]"
            parts.append(f"# {key} = {_toml_value(param)}  # {helptext}\n")
    return "".join(parts)


def _toml_value(param: object) -> str:
    """The parameter's default as TOML (an empty value of its type when it has none)."""
    default = param.default
    if default is None or callable(default):
        default = [] if param.multiple else ""
    elif isinstance(default, tuple):
        default = list(default)
    return tomli_w.dumps({"v": default})[4:].strip()
