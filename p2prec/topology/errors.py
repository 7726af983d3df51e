"""The one exception every topology problem becomes."""

from __future__ import annotations


class TopologyError(ValueError):
    """A topology that cannot be built, read or used; the message names the spec, file or node.

    Why a ``ValueError``: callers that already treat bad input as a value problem (argument
    parsing, config loading) catch it without importing this package. Messages are folded
    onto one line because the CLI prints them as its whole answer and logs are grepped.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))
