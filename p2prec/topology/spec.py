"""Parse topology specs such as ``small-world`` or ``small-world:k=8,p=0.2``.

Why a tiny grammar instead of JSON or TOML: specs travel on command lines and in config
fields, where a name with optional ``key=value`` pairs is what people type. Each topology
family declares its keys with a parser and a default, so an unknown key or a bad value is
rejected before any graph is drawn, with a message naming the spec and the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from p2prec.topology.errors import TopologyError


@dataclass(frozen=True)
class Key:
    """One spec key: how to read its text, and the value used when the spec omits it.

    A default of ``None`` means "derived from the node count" by the family itself.
    """

    parse: Callable[[str], Any]
    default: Any


@dataclass(frozen=True)
class Family:
    """A named topology: the keys its spec accepts and the function that makes it.

    Flat makers return a bare graph on ``range(n)``; the families :func:`build` dispatches
    to wire edges (and aggregators) into a graph that already holds the data nodes.
    """

    keys: Mapping[str, Key]
    make: Callable[..., Any]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name:key=value,...`` into the name and the raw key texts."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise TopologyError(f"topology spec {spec!r} has no name")
    raw: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (s.strip() for s in pair.partition("="))
        if not eq or not key:
            raise TopologyError(f"topology spec {spec!r}: {pair!r} is not key=value")
        if key in raw:
            raise TopologyError(f"topology spec {spec!r}: key {key!r} is given twice")
        raw[key] = value
    return name, raw


def resolve(spec: str, raw: Mapping[str, str], keys: Mapping[str, Key]) -> dict[str, Any]:
    """Typed values for every declared key: parsed from ``raw`` or taken from the default."""
    for key in raw:
        if key not in keys:
            known = ", ".join(keys) or "none"
            raise TopologyError(f"topology spec {spec!r}: unknown key {key!r} (known keys: {known})")
    values: dict[str, Any] = {}
    for key, declared in keys.items():
        if key not in raw:
            values[key] = declared.default
            continue
        try:
            values[key] = declared.parse(raw[key])
        except ValueError as exc:
            raise TopologyError(f"topology spec {spec!r}: {key}={raw[key]!r} is invalid: {exc}") from None
    return values


def integer(lo: int) -> Callable[[str], int]:
    """Parser for an integer no smaller than ``lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer >= {lo}") from None
        if value < lo:
            raise ValueError(f"expected an integer >= {lo}")
        return value

    return parse


def probability(text: str) -> float:
    """Parser for a probability in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a probability in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a probability in [0, 1]")
    return value


def boolean(text: str) -> bool:
    """Parser for true/false (also yes/no, 1/0)."""
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError("expected true or false")


def choice(*options: str) -> Callable[[str], str]:
    """Parser for one of a fixed set of words."""

    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text

    return parse


def word(text: str) -> str:
    """Parser for a non-empty word, such as a node attribute name."""
    if not text:
        raise ValueError("expected a non-empty word")
    return text
