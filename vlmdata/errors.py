"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing column, incompatible resume).

    The message is one line that names the problem and the fix. Bad *data* (a dead URL, a broken
    image) is never a UserError: it is recorded with a status and the run goes on.
    """
