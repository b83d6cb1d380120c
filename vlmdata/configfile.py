"""TOML option files: ``--config FILE.toml``, the stage tables of ``vlmdata run``, and the
``vlmdata.toml`` each command leaves in its output directory.

One spelling everywhere: a key is a command's option (or argument) name as its flag has it,
``batch-size`` (``batch_size`` works too). So the record a run leaves is itself a config file:
``vlmdata encode --config OUT/vlmdata.toml`` runs the same command again.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import shlex
import tomllib
from pathlib import Path

import tomli_w
import typer

from vlmdata import __version__
from vlmdata.errors import UserError

RECORD = "vlmdata.toml"  # in every output directory: the options of the run that wrote it
NOT_RECORDED = {"config", "quiet"}  # how a run was shown, not what it made


def read_toml(path: str, what: str = "--config") -> dict:
    """A TOML file (a path, or an object-store URL: the record of a run that wrote to one) as
    a dict; an unreadable or invalid one is one line naming it."""
    from vlmdata.pipeline.storage import is_url, open_filesystem

    try:
        if is_url(path):
            fs, key = open_filesystem(path)
            return tomllib.loads(fs.cat_file(key).decode())
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read {what} {path} ({e}); pass a TOML file") from None


def option_names(command: typer.core.TyperCommand) -> set[str]:
    """The names a config file may set for ``command`` (python spelling: ``batch_size``)."""
    return {p.name for p in command.params if p.name and p.expose_value}


def options_from_table(
    command: typer.core.TyperCommand, table: dict, where: str, wired: dict[str, str] | None = None
) -> dict:
    """``table``'s settings for ``command`` by python name, checked: a key the command lacks is
    one line naming the closest one (``where`` says which file or table); a key in ``wired``
    (name -> why) is one the caller sets itself."""
    known = option_names(command)
    normalised_table(table, where)  # refuses an option set twice
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if wired and name in wired:
            raise UserError(f"{where}: {key!r} is set by {wired[name]}; remove it")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {_flag_name(close[0])!r}?" if close else ""
            if isinstance(value, dict):
                hint = f" (a [{key}] table: put {command.name}'s options at the top level)"
            raise UserError(f"{where}: {command.name} has no option {key!r}{hint}")
        param = next(p for p in command.params if p.name == name)
        if (wrong := _wrong_shape(param, value)) is not None:
            raise UserError(f"{where}: {key} is {wrong}")
        settings[name] = value
    return settings


def _wrong_shape(param: object, value: object) -> str | None:
    """What is wrong with ``value`` for ``param`` in TOML terms (click would turn a list or a
    table into its text and use it: a directory named ``['x', 'y']``), or None."""
    many = getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1
    scalar = (str, int, float)  # bool is an int: told apart below
    if isinstance(value, dict):
        return "a table; give it a value"
    if isinstance(value, dt.date | dt.time):
        return "a date or time; give it in quotes, as text"
    if many:
        if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
            return None
        return 'not a list of values; give one, e.g. ["a", "b"]'
    if isinstance(value, list):
        return "a list; give it one value"
    if getattr(param, "is_flag", False) != isinstance(value, bool):
        return "a flag: give true or false" if param.is_flag else "true/false; give it a value"
    return None


def normalised_table(table: dict, where: str) -> dict:
    """``table`` with its keys in python spelling (``batch-size`` -> ``batch_size``); an option
    set twice (both spellings) is refused."""
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in settings:
            raise UserError(f"{where}: {key!r} is set twice; keep one")
        settings[name] = value
    return settings


def record_options(folder: Path, ctx: typer.Context, shown_as: str | None = None) -> None:
    """Write ``folder/vlmdata.toml``: the resolved options of the command that just wrote
    ``folder`` (defaults included), the vlmdata version, and how to run it again (with the
    record named ``shown_as``: where it ends up, when that is not ``folder``)."""
    values = {
        _flag_name(p.name): list(value) if isinstance(value, tuple) else value
        for p in ctx.command.params  # in the order --help lists them
        if p.name not in NOT_RECORDED
        and (value := ctx.params.get(p.name)) is not None  # TOML has no null: None is a default
    }
    command = _command_line(ctx)
    again = f"{command} --config {shlex.quote(shown_as or str(folder / RECORD))}"
    write_record(folder / RECORD, command, again, values,
                 "The resolved options of the last run that wrote this directory (defaults "
                 "included).")  # fmt: skip


def write_record(path: Path, command: str, again: str, values: dict, what: str) -> None:
    """``values`` as a TOML file under a header naming the vlmdata version, the ``command``
    that ran, when and where, ``what`` the file holds and the command line that runs it
    ``again``."""
    from vlmdata.pipeline.shards import atomic_write_bytes

    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    header = "".join(f"# {_comment(line)}\n" for line in (
        f"vlmdata {__version__}: `{command}`, {now}, run in {os.getcwd()}", what,
        f"Run it again: {again}"))  # fmt: skip
    atomic_write_bytes(path, (header + tomli_w.dumps(values)).encode())


def _comment(text: str) -> str:
    """``text`` fit for one TOML comment line: a path may hold a newline (or any control
    character), which would end the comment and corrupt the file."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _command_line(ctx: typer.Context) -> str:
    """``vlmdata labels classify``, however the program was started (``python -m vlmdata``, a
    test runner) or the context made (``vlmdata run`` names its steps in full)."""
    words = []
    while ctx.parent is not None:
        words.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["vlmdata", *reversed(words)]) if words else str(ctx.info_name)


def _flag_name(name: str) -> str:
    return name.replace("_", "-")
