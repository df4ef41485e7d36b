"""The one exception type that launchers turn into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or a missing file; the message says what to do about it."""
