"""Where a node stands in the topology: its role, its peers and their addresses, its mixing weights.

Why derived from the topology file alone: every node reads the same file, so they agree on
who talks to whom and with which weights without a coordinator. The roles follow
docs/design.md, section 2: on a flat topology every node gossips with its neighbours; in an edge hierarchy
a client talks only to its aggregator, and an aggregator (training or aggregator-only)
talks to its member clients and to its neighbouring aggregators.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import scipy.sparse as sp

from p2prec.config import GossipConfig
from p2prec.gossip.aggregate import aggregator_mixing
from p2prec.gossip.rounds import FlatMixing
from p2prec.topology import TopologyError, aggregators, validate
from p2prec.topology.roles import AGGREGATOR_ONLY, CLIENT
from p2prec.wire import MessageType

FLAT = "flat"
"""A data node of a topology without aggregators: it gossips with all its neighbours."""


@dataclass(frozen=True)
class Place:
    """One node's view of the topology.

    ``kind`` is ``flat``, or the node's role in an edge hierarchy (client, aggregator,
    aggregator-only). ``mixing`` is the Metropolis-Hastings matrix this node reads its row
    from: over the data nodes (flat) or over the aggregators (``mixing_ids[k]`` is row k's
    node id); clients do not mix. A flat node's ``rounds`` gives each round's matrix, the
    same as ``mixing`` unless peers are sampled anew every round (``gossip.mixing``).
    ``senders`` says which message type each peer may send.
    """

    node: int
    kind: str
    address: str
    peers: dict[int, str]
    n_nodes: int
    aggregator: int | None = None
    members: tuple[int, ...] = ()
    agg_peers: tuple[int, ...] = ()
    mixing: sp.csr_matrix | None = None
    mixing_ids: tuple[int, ...] = ()
    rounds: FlatMixing | None = None

    @property
    def has_data(self) -> bool:
        return self.kind != AGGREGATOR_ONLY

    @cached_property
    def senders(self) -> dict[MessageType, frozenset[int]]:
        """Which peers may send which message type to this node; anything else is rejected."""
        if self.kind == FLAT:
            peers = frozenset(self.peers)
            return {MessageType.GOSSIP: peers, MessageType.JOIN_REQUEST: peers, MessageType.JOIN_STATE: peers}
        if self.kind == CLIENT:
            return {MessageType.AGGREGATE_DOWN: frozenset({self.aggregator})}
        return {MessageType.AGGREGATE_UP: frozenset(self.members), MessageType.GOSSIP: frozenset(self.agg_peers)}

    @property
    def mixing_row(self) -> int:
        return self.mixing_ids.index(self.node)


def _address(graph: nx.Graph, node: int) -> str:
    address = graph.nodes[node].get("address")
    if not isinstance(address, str) or not address.strip():
        raise TopologyError(f"node {node} has no 'address' attribute: gossip.topology must name a topology "
                            f"file whose nodes carry addresses (see topologies/lan-4.json)")
    return address.strip()


def place(graph: nx.Graph, node: int, n_data_nodes: int, gossip: GossipConfig | None = None, seed: int = 0) -> Place:
    """This node's :class:`Place` under ``gossip`` (the defaults if None) and the run seed that
    draws its rounds' peers; :class:`TopologyError` if the topology cannot run it."""
    validate(graph, n_data_nodes=n_data_nodes)
    if node not in graph:
        raise TopologyError(f"node id {node} is not in the topology (ids 0..{graph.number_of_nodes() - 1})")
    aggs = aggregators(graph)
    n = graph.number_of_nodes()
    if not aggs:
        peers = sorted(graph.neighbors(node))
        rounds = FlatMixing(graph.subgraph(range(n_data_nodes)), gossip or GossipConfig(), seed)
        return Place(node, FLAT, _address(graph, node), {j: _address(graph, j) for j in peers}, n,
                     mixing=rounds.base, mixing_ids=tuple(range(n_data_nodes)), rounds=rounds)
    role = graph.nodes[node]["role"]
    if role == CLIENT:
        hub = graph.nodes[node].get("aggregator")
        if hub is None:
            raise TopologyError(f"client {node} of an edge hierarchy names no 'aggregator'")
        return Place(node, CLIENT, _address(graph, node), {hub: _address(graph, hub)}, n, aggregator=hub)
    members = tuple(sorted(v for v, hub in graph.nodes(data="aggregator") if hub == node and v != node))
    agg_peers = tuple(sorted(v for v in graph.neighbors(node) if v in set(aggs)))
    peers = {j: _address(graph, j) for j in sorted({*members, *agg_peers})}
    return Place(node, role, _address(graph, node), peers, n, members=members, agg_peers=agg_peers,
                 mixing=aggregator_mixing(graph, aggs), mixing_ids=tuple(aggs))
