"""User-facing errors.

An :class:`IPGError` is a problem the user can fix (a bad path, a wrong layer, an
empty dataset). Its message is one line that names the problem and the fix. The CLI
prints it without a traceback and exits with code 2; library callers can catch it.
"""


class IPGError(Exception):
    """A problem with the user's input, stated in one line with its fix."""

    exit_code = 2
