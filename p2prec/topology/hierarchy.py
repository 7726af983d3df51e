"""Two-level topologies: clients attached to aggregators that gossip among themselves.

Why clients talk only to their aggregator: this is the edge-computing layout (phones to a
nearby edge server) and, with a single data-less hub, exactly FedAvg with a server. Data
nodes always keep ids ``0..n-1``; data-less aggregators are appended as ``n..n+m-1``, so a
data partition indexes nodes the same way whatever the topology.
"""

from __future__ import annotations

import math
import random
from typing import Any

import networkx as nx

from p2prec.topology.errors import TopologyError
from p2prec.topology.flat import FLAT
from p2prec.topology.roles import AGGREGATOR, AGGREGATOR_ONLY, CLIENT
from p2prec.topology.spec import Key, boolean, choice, integer, resolve, word

SMALL_WORLD_FROM = 12
"""Aggregator count from which the default mesh is a small world rather than a ring: below
two small-world neighbourhoods (2 x 6) the small world is nearly complete anyway."""


def _random_groups(n: int, m: int | None, rng: random.Random) -> list[list[int]]:
    """Deal shuffled nodes round-robin, so group sizes differ by at most one."""
    m = max(1, round(math.sqrt(n))) if m is None else m
    if m > n:
        raise TopologyError(f"edge-hierarchy m={m} exceeds the {n} data nodes")
    order = list(range(n))
    rng.shuffle(order)
    return [sorted(order[i::m]) for i in range(m)]


def _attribute_groups(graph: nx.Graph, attribute: str, m: int | None) -> list[list[int]]:
    """One group per distinct value of a node attribute, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for node in range(graph.number_of_nodes()):
        if attribute not in graph.nodes[node]:
            raise TopologyError(
                f"edge-hierarchy assign={attribute}: node {node} has no attribute {attribute!r}"
            )
        groups.setdefault(graph.nodes[node][attribute], []).append(node)
    if m is not None and m != len(groups):
        raise TopologyError(f"edge-hierarchy m={m} but assign={attribute} gives {len(groups)} groups")
    return list(groups.values())


def _aggregators(graph: nx.Graph, groups: list[list[int]], train: bool, rng: random.Random) -> list[int]:
    """One aggregator per group: a seeded member that keeps training, or a new data-less node."""
    if train:
        chosen = [rng.choice(group) for group in groups]
        for node in chosen:
            graph.nodes[node]["role"] = AGGREGATOR
        return chosen
    first = graph.number_of_nodes()
    added = list(range(first, first + len(groups)))
    graph.add_nodes_from(added, role=AGGREGATOR_ONLY)
    return added


def edge_hierarchy(
    graph: nx.Graph, seed: int, m: int | None, inner: str | None, assign: str, train: bool
) -> None:
    """Group the data nodes of ``graph``, give each group an aggregator, mesh the aggregators.

    ``graph`` arrives holding the data nodes ``0..n-1`` (and any caller attributes, which
    ``assign=<attribute>`` groups by). Clients get ``aggregator`` = their aggregator's id.
    """
    rng = random.Random(seed)
    if assign == "random":
        groups = _random_groups(graph.number_of_nodes(), m, rng)
    else:
        groups = _attribute_groups(graph, assign, m)
    hubs = _aggregators(graph, groups, train, rng)
    for hub, group in zip(hubs, groups, strict=True):
        for node in group:
            if node != hub:
                graph.nodes[node].update(role=CLIENT, aggregator=hub)
                graph.add_edge(node, hub)
    name = inner or ("small-world" if len(hubs) >= SMALL_WORLD_FROM else "ring")
    family = FLAT[name]
    mesh = family.make(len(hubs), seed, **resolve(name, {}, family.keys))
    graph.add_edges_from((hubs[u], hubs[v]) for u, v in mesh.edges)


def star(graph: nx.Graph, seed: int) -> None:
    """FedAvg with a server: one data-less hub, id ``n``, linked to every data node."""
    edge_hierarchy(graph, seed, m=1, inner=None, assign="random", train=False)


HIERARCHY_KEYS = {
    "m": Key(integer(1), None),
    "inner": Key(choice(*FLAT), None),
    "assign": Key(word, "random"),
    "train": Key(boolean, False),
}
