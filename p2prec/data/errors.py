"""The data layer's one error type, in a module of its own so every reader can raise it."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem; the message names the file (and line, where there is one)."""
