"""How a command ends badly: a command-line mistake, a user mistake, a failure of the machine or
an internal error each become one line on stderr and an exit code, never a traceback.

Light on purpose (typer and vlmdata.errors only): ``vlmdata.workflow`` imports it to word the
mistakes in a pipeline file's tables as the CLI words them.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import typer

from vlmdata import __version__
from vlmdata.errors import MachineFailure, UserError

E = TypeVar("E", bound=BaseException)
S = TypeVar("S")

# click's usage errors, as the installed typer raises them: newer typers vendor click (as
# typer._click), older ones use click itself, so the classes come from typer, not `import click`.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_NoArgsIsHelp = getattr(sys.modules[UsageError.__module__], "NoArgsIsHelpError", ())  # click 8.2+


def usage_error_line(error: Exception) -> str:
    """A :data:`UsageError`'s message worded as vlmdata's errors are: click's "Missing argument
    'X'." becomes "missing argument 'X'". Where it came from and where to look for help (the
    CLI adds "; see `vlmdata COMMAND --help`") are the caller's to add."""
    message = error.format_message().strip().removesuffix(".")
    if message[1:2].islower():  # "Missing argument" -> "missing argument", as our errors
        message = message[0].lower() + message[1:]
    return message


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A mistake on the command line (unknown command or option, missing argument, a value of
    the wrong type from a flag or from ``--config``) as one line and exit 2, not click's box."""
    try:
        yield
    except UsageError as e:
        if isinstance(e, _NoArgsIsHelp):  # a bare `vlmdata`: the help, as typer shows it
            raise
        message = usage_error_line(e)
        param, ctx = getattr(e, "param", None), _context_of(e)
        if param is not None and ctx is not None and param.name is not None:
            source = ctx.get_parameter_source(param.name)
            if source is not None and source.name == "DEFAULT_MAP":
                message += " (in the --config file)"
        if ctx is not None:
            message += f"; see `{ctx.command_path} --help`"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None


def _context_of(error: Exception) -> typer.Context | None:
    """The context of the command whose parsing failed. click leaves some errors without it
    ("option '--llm' requires an argument"): then it is the innermost ``ctx`` on the way up,
    the argument of the failing ``Command.parse_args(ctx, args)``."""
    found = getattr(error, "ctx", None)
    if found is None:
        for frame, _ in traceback.walk_tb(error.__traceback__):
            if hasattr(candidate := frame.f_locals.get("ctx"), "command_path"):
                found = candidate
    return found


RESUMES = "rerun the same command to resume"


def run_command(
    stage: Callable[[], S],
    on_interrupt: str = RESUMES,
    record_in: Callable[[S], str | Path] | None = None,
    ctx: typer.Context | None = None,
) -> None:
    """Run a stage and print its summary (or text); ``on_interrupt`` says what a Ctrl-C
    leaves the user to do; ``record_in`` names the output directory that gets the resolved
    options of ``ctx``'s command (``vlmdata.toml``).

    A user mistake is one line on stderr and exit 2; a full disk or a denied write, one line
    and exit 1; an internal failure, one line naming the log file that holds the traceback.
    SIGTERM stops the run like Ctrl-C: one line, and the output resumes on a rerun.
    """
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from vlmdata.pipeline.imageops import ignore_decoder_warnings

        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.showwarning = _show_warning
            ignore_decoder_warnings()
            summary = stage()
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {on_interrupt}", err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _closed_output(on_interrupt)
    except Exception as e:
        code, message = _explain_failure(e)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code) from None
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    if record_in is not None and ctx is not None:  # before the summary: a `| head` may end it
        _record_options(str(record_in(summary)), ctx)
    try:
        typer.echo(summary if isinstance(summary, str) else summary.format())
    except BrokenPipeError:
        _closed_output(on_interrupt)
    if code := getattr(summary, "exit_code", 0):  # a run stopped by Ctrl-C, after saving
        raise typer.Exit(code)


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    typer.echo(f"warning: {message}", err=True)  # one line, no source excerpt


def _closed_output(on_interrupt: str) -> NoReturn:
    """The reader of our output went away (``vlmdata ... | head``): stop as a shell's
    commands do, with one line on stderr instead of a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush
    typer.echo(f"stopped: the output was closed; {on_interrupt}", err=True)
    raise typer.Exit(141)


def _record_options(location: str, ctx: typer.Context) -> None:
    """The command's resolved options into ``location/vlmdata.toml`` (a directory or an
    object-store URL); a failure to write this record is a warning, the run's output stands."""
    from vlmdata.configfile import RECORD, record_options
    from vlmdata.pipeline.storage import RemoteOutput, is_url

    try:
        if not is_url(location):
            record_options(Path(location), ctx)
            return
        remote = RemoteOutput(location)
        record_options(remote.staging, ctx, shown_as=f"{remote.url}/{RECORD}")
        remote.push(RECORD)
    except (OSError, UserError) as e:
        typer.echo(f"warning: could not record the options in {location}/{RECORD} ({e})",
                   err=True)  # fmt: skip


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Failures of the machine, not of vlmdata or the user's input: one line, and a rerun resumes.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded (ulimit -f)",
    errno.EROFS: "read-only file system",
}


def _explain_failure(error: BaseException) -> tuple[int, str]:
    """The exit code and the one line to print for an exception that ended a command."""
    user = _find(error, UserError)
    if user is not None:
        return 2, str(user)
    machine = _find(error, MachineFailure)
    if machine is not None:
        return 1, str(machine)
    disk = _find(error, OSError)
    if disk is not None and disk.errno in _ENVIRONMENT_ERRNOS:
        where = f" writing {disk.filename}" if disk.filename else ""
        return 1, (f"{_ENVIRONMENT_ERRNOS[disk.errno]}{where}; free space and rerun the same "
                   "command to resume")  # fmt: skip
    log = _write_crash_log(error)
    summary = str(error).splitlines()[0] if str(error) else ""
    return 1, (f"internal error ({type(error).__name__}: {summary[:200]}); the traceback is in "
               f"{log}; please report it")  # fmt: skip


def _find(error: BaseException, kind: type[E]) -> E | None:
    """``error`` itself or the first ``kind`` inside it (task groups and worker processes wrap
    what they raise)."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    from vlmdata.pipeline.distributor import WorkerError  # only on the way out: no cost

    if isinstance(error, WorkerError) and error.__cause__ is not None:
        return _find(error.__cause__, kind)  # what a worker process raised
    return None


def _write_crash_log(error: BaseException) -> Path:
    """Save the full traceback (and a worker's, when a worker process failed) to a log file in
    TMPDIR/vlmdata-logs, or straight in TMPDIR when that folder cannot take it (another user
    made it, or it is not a folder)."""
    text = "".join(traceback.format_exception(error))
    worker = getattr(error, "traceback", None)
    if isinstance(worker, str):
        text += "\nIn the worker process:\n" + worker
    data = f"vlmdata {__version__}\n{' '.join(sys.argv)}\n\n{text}".encode()
    folder = Path(tempfile.gettempdir()) / "vlmdata-logs"
    path = folder / f"vlmdata-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError:
        fd, name = tempfile.mkstemp(prefix="vlmdata-", suffix=".log")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = Path(name)
    return path
