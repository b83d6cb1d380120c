"""The one exception type for user mistakes (the CLI prints its message on one line and exits
2), and the checks the stages' options share, so each flag is refused in the same words."""

import math


class UserError(Exception):
    """A problem the user can fix (bad flag, missing column, incompatible resume).

    The message is one line that names the problem and the fix. Bad *data* (a dead URL, a broken
    image) is never a UserError: it is recorded with a status and the run goes on.
    """


class MachineFailure(Exception):
    """The machine failed the run (a worker killed for memory, a full disk): not the user's
    input, not a bug. The CLI prints the one-line message and exits 1; a rerun resumes."""


def require_at_least(minimum: int, **flags: int) -> None:
    """Refuse any ``--flag`` value below ``minimum`` (flags given as ``shard_size=0``)."""
    for name, value in flags.items():
        if value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def require_finite(flag: str, value: float, low: float, high: float) -> None:
    """Refuse a ``--flag`` value that is nan, infinite or outside ``(low, high]``."""
    if not (math.isfinite(value) and low < value <= high):
        raise UserError(f"{flag} must be a number in ({low:g}, {high:g}], got {value}")


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (arrow's and HDF5's span several), whitespace
    collapsed, cut to ``limit`` characters when given."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
