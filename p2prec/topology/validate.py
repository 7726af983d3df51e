"""Check that a topology can run: every problem a node or the simulator would trip on later.

Why check up front: a self-loop, a dangling aggregator id or one node too many shows up
hours into a run as a wrong mean or a hung round. Here it is one line naming the node.
Checks run from the cheapest and most basic to the global ones, and the first failure wins.
"""

from __future__ import annotations

import networkx as nx

from p2prec.topology.errors import TopologyError
from p2prec.topology.roles import AGGREGATOR, AGGREGATOR_ONLY, CLIENT, ROLES


def data_nodes(graph: nx.Graph) -> list[int]:
    """Nodes that hold data (clients and training aggregators), sorted by id."""
    return sorted(v for v, role in graph.nodes(data="role") if role != AGGREGATOR_ONLY)


def aggregators(graph: nx.Graph) -> list[int]:
    """Nodes that average for others (training or not), sorted by id."""
    return sorted(v for v, role in graph.nodes(data="role") if role in (AGGREGATOR, AGGREGATOR_ONLY))


def _check_nodes(graph: nx.Graph) -> None:
    if graph.number_of_nodes() == 0:
        raise TopologyError("topology is empty: it has no nodes")
    for node in graph.nodes:
        if isinstance(node, bool) or not isinstance(node, int):
            raise TopologyError(f"node id {node!r} is not an integer")
    loops = sorted(v for v, _ in nx.selfloop_edges(graph))
    if loops:
        raise TopologyError(
            f"{len(loops)} self-loop(s), first on node {loops[0]}: a node keeps its own weight already"
        )


def _check_roles(graph: nx.Graph) -> None:
    for node, attrs in graph.nodes(data=True):
        if "role" not in attrs:
            raise TopologyError(f"node {node} has no 'role' attribute")
        if attrs["role"] not in ROLES:
            raise TopologyError(f"node {node} has unknown role {attrs['role']!r} (known: {', '.join(ROLES)})")
        hub = attrs.get("aggregator")
        if attrs["role"] != CLIENT or hub is None:
            continue
        if hub not in graph:
            raise TopologyError(f"client {node} names aggregator {hub!r}, which is not in the topology")
        if graph.nodes[hub].get("role") not in (AGGREGATOR, AGGREGATOR_ONLY):
            raise TopologyError(
                f"client {node} names aggregator {hub}, whose role is {graph.nodes[hub].get('role')!r}"
            )
        if not graph.has_edge(node, hub):
            raise TopologyError(f"client {node} names aggregator {hub} but has no edge to it")


def _check_connected(graph: nx.Graph) -> None:
    if not nx.is_connected(graph):
        sizes = sorted((len(c) for c in nx.connected_components(graph)), reverse=True)
        shown = ", ".join(map(str, sizes[:5])) + (", ..." if len(sizes) > 5 else "")
        raise TopologyError(f"topology is disconnected: {len(sizes)} components (sizes {shown})")


def _check_partition(graph: nx.Graph, n_data_nodes: int) -> None:
    """Data nodes must be exactly ``0..n-1``, because node ``i`` trains on partition ``i``."""
    held = data_nodes(graph)
    if len(held) != n_data_nodes:
        raise TopologyError(
            f"topology has {len(held)} data nodes but the data partition has {n_data_nodes} nodes"
        )
    if held != list(range(n_data_nodes)):
        stray = next(v for v in held if not 0 <= v < n_data_nodes)
        raise TopologyError(f"data node {stray} is outside the data partition's ids 0..{n_data_nodes - 1}")


def validate(graph: nx.Graph, n_data_nodes: int | None = None) -> None:
    """Raise :class:`TopologyError` on the first problem; return quietly if the topology is usable.

    ``n_data_nodes`` is the size of the data partition; when given, the data nodes must be
    exactly ``0..n_data_nodes-1``.
    """
    if graph.is_directed():
        raise TopologyError("topology is directed; gossip links are two-way, use an undirected graph")
    _check_nodes(graph)
    _check_roles(graph)
    _check_connected(graph)
    if n_data_nodes is not None:
        _check_partition(graph, n_data_nodes)
