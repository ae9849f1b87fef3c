"""Errors a user can act on.

`UserError` is raised for bad input to a command (missing file, malformed data, options that do not
fit). The CLI prints its message on one line and exits with status 2; it never shows a traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names what is wrong and how to fix it."""
