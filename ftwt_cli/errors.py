"""Errors the CLI turns into a one-line message and an exit code."""


class BadInput(Exception):
    """Anything the user can fix (a bad value, a missing file, a mismatched checkpoint): exit code 2."""

    exit_code = 2
