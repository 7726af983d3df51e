"""Build a topology from a spec string: ``build("small-world:k=8", n=754, seed=0)``.

Known names: ring, torus, small-world, erdos-renyi, random-regular, complete, star and
edge-hierarchy. Data nodes are always the ints ``0..n-1`` and start with role ``client``;
star and edge-hierarchy may append data-less aggregators after them. The same spec, ``n``
and seed always give the same graph, so a simulation and the real nodes agree on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from p2prec.topology.errors import TopologyError
from p2prec.topology.flat import FLAT
from p2prec.topology.hierarchy import HIERARCHY_KEYS, edge_hierarchy, star
from p2prec.topology.roles import CLIENT
from p2prec.topology.spec import Family, parse_spec, resolve


def _wire_flat(family: Family) -> Family:
    """Adapt a bare flat maker to wire edges into a graph that already holds the data nodes."""

    def wire(graph: nx.Graph, seed: int, **values: Any) -> None:
        graph.add_edges_from(family.make(graph.number_of_nodes(), seed, **values).edges)

    return Family(family.keys, wire)


FAMILIES: dict[str, Family] = {name: _wire_flat(family) for name, family in FLAT.items()} | {
    "star": Family({}, star),
    "edge-hierarchy": Family(HIERARCHY_KEYS, edge_hierarchy),
}


def build(
    spec: str, n: int, seed: int = 0, node_attrs: Mapping[int, Mapping[str, Any]] | None = None
) -> nx.Graph:
    """The topology named by ``spec`` on ``n`` data nodes.

    ``node_attrs`` (optional) sets attributes on data nodes before the topology is wired,
    e.g. an ``address`` per node, or the attribute that ``edge-hierarchy:assign=<name>``
    groups by.
    """
    name, raw = parse_spec(spec)
    if name not in FAMILIES:
        raise TopologyError(f"unknown topology {name!r} in spec {spec!r} (known: {', '.join(FAMILIES)})")
    family = FAMILIES[name]
    values = resolve(spec, raw, family.keys)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TopologyError(f"topology spec {spec!r} needs at least one node, got n={n!r}")
    graph = nx.Graph()
    graph.add_nodes_from(range(n), role=CLIENT)
    for node, attrs in (node_attrs or {}).items():
        if node not in graph:
            raise TopologyError(f"node_attrs names node {node!r}, which is not a data node 0..{n - 1}")
        graph.nodes[node].update(attrs)
    try:
        family.make(graph, seed, **values)
    except TopologyError as exc:
        raise TopologyError(f"topology spec {spec!r}: {exc}") from None
    return graph
