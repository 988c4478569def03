"""Errors of the shard tools."""
from __future__ import annotations


class BuildError(ValueError):
    """Bad flags or an unreadable input: the build stops at once; the message names the problem."""


class StrictFailure(BuildError):
    """``--strict``: the first bad input stops the build; the message names the row and the reason."""
