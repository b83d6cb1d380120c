"""`vlmdata --help` and each command's help: option panels, an example that parses, readable
defaults; and every mistake on the command line is one `error:` line with exit 2."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from vlmdata.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # rich help would wrap flags
CLI = typer.main.get_command(app)

# The option panels each command's --help shows (besides Arguments and Options).
PANELS = {
    "download": ["Input", "Output", "Performance", "Network", "Safety", "Resize (--resize)",
                 "Scale-out"],
    "preprocess": ["Squares", "Safety", "Output", "Performance", "Input", "Scale-out"],
    "encode": ["Model", "Performance", "Placeholder filter", "Squares", "Safety", "Output",
               "Input", "Scale-out"],
    "inspect": [],
    "report": [],
    "run": [],
    "demo": [],
    "train": ["Model", "Output", "Training", "Performance", "Input", "Validation"],
    "labels classify": ["Labels", "Model", "Performance", "Input", "Scale-out"],
    "labels taxonomy": [],
    "labels report": ["Input", "Output", "What the page shows"],
    "caption": ["Generation", "Performance", "Model", "Safety", "Output"],
    "eval": ["Generation", "Output", "Performance", "Model", "Input"],
}  # fmt: skip
GROUPS = ["", "labels"]


def _commands(group: object = CLI, path: str = "") -> list[str]:
    """Every command's words below ``group``, subcommands of subgroups included."""
    found = []
    for name, command in group.commands.items():
        words = f"{path} {name}".strip()
        found += _commands(command, words) if hasattr(command, "commands") else [words]
    return found


def _command(words: list[str]) -> tuple[object, list[str]]:
    """The command that ``vlmdata WORDS...`` names, and the words left for it to parse."""
    command = CLI
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command, words = command.commands[words[0]], words[1:]
    return command, words


def _help(words: str) -> str:
    result = runner.invoke(app, [*words.split(), "--help"], prog_name="vlmdata")
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_has_its_panels():
    assert sorted(_commands()) == sorted(PANELS)


@pytest.mark.parametrize("words", sorted(PANELS))
def test_help_shows_the_panels_in_order(words):
    output = _help(words)
    titles = [line.split("─ ", 1)[1].split(" ─")[0] for line in output.splitlines()
              if line.startswith("╭─ ")]  # fmt: skip
    assert [title for title in titles if title not in ("Arguments", "Options")] == PANELS[words]


@pytest.mark.parametrize("words", [*sorted(PANELS), *GROUPS])
def test_the_example_in_each_help_parses(words):
    examples = [line.strip() for line in _help(words).splitlines()
                if line.strip().startswith("Example: ")]  # fmt: skip
    assert len(examples) == 1, f"vlmdata {words} --help: one Example: line"
    example = shlex.split(examples[0].removeprefix("Example: "), comments=True)
    assert example[0] == "vlmdata" and " ".join(example[1:]).startswith(words)
    command, arguments = _command(example[1:])
    assert not hasattr(command, "commands"), f"{examples[0]} names no command"
    with command.make_context(f"vlmdata {words}", arguments, resilient_parsing=False) as ctx:
        assert ctx.params  # options exist and their values convert, or make_context raised


def test_top_level_help_lists_the_commands_by_panel():
    output = _help("")
    panels = ["Whole job", "Pipeline stages", "Training", "Look"]
    starts = [output.index(f"╭─ {panel} ") for panel in panels]
    assert starts == sorted(starts)
    panel_of = {"demo": 0, "run": 0, "download": 1, "preprocess": 1, "encode": 1, "labels": 1,
                "train": 2, "caption": 2, "eval": 2, "inspect": 3, "report": 3}  # fmt: skip
    for name, panel in panel_of.items():
        at = output.index(f"│ {name} ")
        assert starts[panel] < at < (starts[panel + 1] if panel + 1 < len(starts) else len(output))


def test_machine_dependent_defaults_read_as_rules():
    assert "[default: (a quarter of the usable CPUs)]" in _help("download")
    assert "[default: (the usable CPUs)]" in _help("preprocess")
    assert "[default: (4, at most the usable CPUs)]" in _help("encode")
    assert "[default: (2, at most the usable CPUs)]" in _help("train")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["encode", "a", "b", "--batch-size", "abc"],
         ["invalid value for '--batch-size'", "see `vlmdata encode --help`"]),
        (["encode", "a"], ["missing argument", "see `vlmdata encode --help`"]),
        (["encode", "a", "b", "c"], ["unexpected extra argument", "(c)"]),
        (["encode", "a", "b", "--bach-size", "3"], ["--bach-size", "--batch-size"]),
        (["encod"], ["no such command 'encod'", "see `vlmdata --help`"]),  # newer: "Did you.."
        (["--bogus"], ["--bogus", "see `vlmdata --help`"]),
        (["train", "x", "--out", "o"], ["missing option '--llm'", "see `vlmdata train --help`"]),
        (["train", "x", "--llm"], ["'--llm' requires an argument", "`vlmdata train --help`"]),
        (["labels", "classifyy"], ["'classifyy'", "see `vlmdata labels --help`"]),
        (["labels", "report", "l", "--images", "i", "--example", "3"],
         ["--example", "see `vlmdata labels report --help`"]),
        (["labels", "classify", "a", "b", "--top-k", "many"],
         ["invalid value for '--top-k'", "see `vlmdata labels classify --help`"]),
    ],
)  # fmt: skip
def test_a_command_line_mistake_is_one_line_exit_2(args, expected):
    result = runner.invoke(app, args, prog_name="vlmdata")
    _assert_one_error_line(result, expected)


def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('batch-size = "many"\n')
    args = ["train", "x", "--llm", "l", "--out", "o", "--config", str(config)]
    result = runner.invoke(app, args, prog_name="vlmdata")
    _assert_one_error_line(result, ["'--batch-size'", "(in the --config file)", "train --help"])


def _assert_one_error_line(result: object, expected: list[str]) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_bare_command_group_still_shows_its_help():
    for args in ([], ["labels"]):
        result = runner.invoke(app, args, prog_name="vlmdata")
        assert "Usage:" in result.output and "error:" not in result.output, result.output


def test_help_stays_light():
    # --help loads no stage dependency: each command imports its own when it runs.
    code = "import sys, vlmdata.cli; print(*sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    assert not loaded & {"torch", "polars", "numpy", "pyarrow", "PIL", "aiohttp", "h5py"}
