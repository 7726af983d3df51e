"""Flat gossip graphs on data nodes ``0..n-1``: every node is a peer and there is no hub.

Each maker returns a bare ``nx.Graph`` on ``range(n)``; roles and attributes are added by
:func:`p2prec.topology.build.build`. Makers stay bare so that the edge hierarchy can reuse
them as the aggregators' own mesh. Every maker takes a seed, even the deterministic ones,
so all families are called the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import networkx as nx

from p2prec.topology.errors import TopologyError
from p2prec.topology.spec import Family, Key, integer, probability

TRIES = 100
"""Seeded redraws allowed before a random family gives up on drawing a connected graph."""


def _first_connected(draw: Callable[[random.Random], nx.Graph], seed: int, what: str) -> nx.Graph:
    """The first connected graph among seeded draws.

    Why redraw instead of adding bridges: patching edges in would bias the degree law the
    family promises; redrawing keeps it, conditioned on connectivity.
    """
    rng = random.Random(seed)
    for _ in range(TRIES):
        graph = draw(rng)
        if nx.is_connected(graph):
            return graph
    raise TopologyError(f"{what}: no connected graph in {TRIES} seeded draws; use denser parameters")


def ring(n: int, seed: int) -> nx.Graph:
    """Each node talks to the two next to it: the sparsest connected regular graph, slow to mix."""
    return nx.cycle_graph(n) if n > 2 else nx.path_graph(n)


def torus(n: int, seed: int, rows: int | None) -> nx.Graph:
    """A wrap-around grid, ``rows x (n / rows)``; by default the most nearly square one.

    Built directly rather than with ``grid_2d_graph`` so that node ``r * cols + c`` is an
    int from the start and a side of length 1 or 2 gives no self-loops or double edges.
    """
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    elif n % rows:
        raise TopologyError(f"torus rows={rows} does not divide n={n}")
    cols = n // rows
    graph = nx.empty_graph(n)
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            for neighbour in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                if neighbour != node:
                    graph.add_edge(node, neighbour)
    return graph


def small_world(n: int, seed: int, k: int, p: float) -> nx.Graph:
    """Watts–Strogatz: a ring lattice of ``k`` neighbours, each edge rewired with chance ``p``."""
    if k % 2 or k >= n:
        raise TopologyError(f"small-world k={k} must be even and smaller than n={n}")
    return _first_connected(lambda rng: nx.watts_strogatz_graph(n, k, p, seed=rng), seed, "small-world")


def erdos_renyi(n: int, seed: int, p: float | None) -> nx.Graph:
    """G(n, p). The default ``p = 2 ln(n) / n`` is twice the connectivity threshold, so a
    connected draw comes within a few tries."""
    if p is None:
        p = min(1.0, 2.0 * math.log(n) / n)
    return _first_connected(
        lambda rng: nx.fast_gnp_random_graph(n, p, seed=rng), seed, f"erdos-renyi p={p:.4g}"
    )


def random_regular(n: int, seed: int, d: int) -> nx.Graph:
    """Every node has exactly ``d`` neighbours, drawn uniformly among such graphs."""
    if d >= n or (n * d) % 2:
        raise TopologyError(f"random-regular d={d} needs d < n and n*d even, got n={n}")
    return _first_connected(
        lambda rng: nx.random_regular_graph(d, n, seed=rng), seed, f"random-regular d={d}"
    )


def complete(n: int, seed: int) -> nx.Graph:
    """Everyone talks to everyone: one round of averaging reaches exact consensus."""
    return nx.complete_graph(n)


FLAT: dict[str, Family] = {
    "ring": Family({}, ring),
    "torus": Family({"rows": Key(integer(1), None)}, torus),
    "small-world": Family({"k": Key(integer(2), 6), "p": Key(probability, 0.1)}, small_world),
    "erdos-renyi": Family({"p": Key(probability, None)}, erdos_renyi),
    "random-regular": Family({"d": Key(integer(2), 4)}, random_regular),
    "complete": Family({}, complete),
}
