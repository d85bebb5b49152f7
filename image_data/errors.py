"""The one error type for unusable input: arguments, data, checkpoints, logs."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, explained in the message (what was given, what was expected); a command prints it without a
    traceback and exits non-zero."""
