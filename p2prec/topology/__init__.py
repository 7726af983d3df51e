"""Topologies for peer-to-peer learning: build or read a NetworkX graph, check it, mix on it.

Data nodes are the ints ``0..n-1`` (node ``i`` trains on data partition ``i``); every node
has a ``role`` (client, aggregator, aggregator-only) and may have ``address`` and ``key``;
clients of an edge hierarchy name their ``aggregator``.
"""

from p2prec.topology.build import build
from p2prec.topology.errors import TopologyError
from p2prec.topology.io import load, read, write
from p2prec.topology.mixing import metropolis_hastings, predicted_rate, spectral_gap
from p2prec.topology.validate import aggregators, data_nodes, validate

__all__ = [
    "TopologyError",
    "aggregators",
    "build",
    "data_nodes",
    "load",
    "metropolis_hastings",
    "predicted_rate",
    "read",
    "spectral_gap",
    "validate",
    "write",
]
