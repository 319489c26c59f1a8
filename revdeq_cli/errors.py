"""Errors that are part of the user interface.

A `UserError` carries one readable line that names the field, file or value at fault and what would fix
it. The command line prints exactly that line on stderr and exits with code 2 (no traceback).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a value, a path or a file. `str(err)` is the one line to show."""


class ConfigError(UserError):
    """A setting is unknown or impossible (names the field and the reason)."""


class DataError(UserError):
    """A dataset, corpus file or tokenizer cannot be used (names the file or field)."""


class CheckpointError(UserError):
    """A checkpoint or model file is missing, corrupt, or not ours (names the file)."""
