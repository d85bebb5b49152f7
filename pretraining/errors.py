"""The one error type for unusable input (arguments, data, checkpoints, logs) to pre-training."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, explained in the message: the script prints it and exits non-zero, without a traceback."""
