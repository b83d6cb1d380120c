"""The README's commands stay true: every `vlmdata ...` line of its shell blocks parses against
the CLI (the command exists, its options exist, their values convert), so a renamed flag
fails here and not in a reader's terminal. What the commands do is tested stage by stage and
by the demo (tests/test_demo.py runs the README's Python snippets on the demo's output)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from vlmdata.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def vlmdata_commands(block: str) -> list[list[str]]:
    """The argument lists of every vlmdata command in a shell block (continuations joined,
    comments dropped, `torchrun ... -m vlmdata` included)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for segment in _segments(words):
            if segment[:1] == ["vlmdata"]:
                commands.append(segment[1:])
            elif segment[:1] == ["torchrun"] and "vlmdata" in segment:
                commands.append(segment[segment.index("vlmdata") + 1 :])
    return commands


def _segments(words: list[str]) -> list[list[str]]:
    segments, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        elif word.startswith(">"):
            current.append(None)  # the redirection and its target end the command
        else:
            current.append(word)
    segments.append(current)
    return [[w for w in s[: s.index(None)] if w] if None in s else s for s in segments]


COMMANDS = [args for block in shell_blocks(README.read_text()) for args in vlmdata_commands(block)]


def test_the_readme_shows_the_commands_of_every_stage():
    shown = {args[0] for args in COMMANDS if args}
    assert {"demo", "download", "preprocess", "encode", "labels", "train", "caption", "eval",
            "run", "report", "inspect"} <= shown  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_readme_command_parses(args):
    command = typer.main.get_command(app)
    words = list(args)
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    assert not hasattr(command, "commands"), f"no such command: vlmdata {' '.join(args)}"
    if "--help" in words:
        return
    command.make_context("vlmdata", words)  # raises on an unknown option or a bad value
