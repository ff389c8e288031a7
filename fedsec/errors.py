"""User-facing errors: one line naming the field, the value and the fix.

The CLI turns any `FedsecError` into that line on stderr and exit status 2, with
no traceback. Library callers get an ordinary exception they can catch.
"""

from __future__ import annotations


class FedsecError(Exception):
    """An error caused by the user's input, reported as one line."""


class ConfigError(FedsecError, ValueError):
    """A configuration value is invalid: says which field, what value, what fix."""

    def __init__(self, field: str, value: object, fix: str):
        # a field named by the input (an unknown key) may hold a newline: escaped, the
        # message stays one line
        field = "".join(c if c.isprintable() else repr(c)[1:-1] for c in field)
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field} = {_show(value)}: {fix}")


def _show(value: object) -> str:
    """The value's repr, at most 80 characters: a longer one keeps both ends (a long path
    still names its file) around "..."."""
    text = repr(value)
    return text if len(text) <= 80 else text[:38] + "..." + text[-39:]
