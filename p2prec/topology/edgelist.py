"""The edge-list format: ``u v`` per line, with node attributes riding in comment lines.

Why comments: a plain edge list has nowhere to put a node's role, address or key, and
inventing extra columns would break every other edge-list reader. Lines of the form
``# node ID {json}`` carry a node's attributes as a JSON object; other readers skip them
as comments, and a hand-written file without them is a valid flat topology.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

NODE_PREFIX = "# node "
HEADER = (
    "# p2prec topology: one 'u v' edge per line.\n"
    "# Lines '# node ID {json}' carry node attributes; other lines starting with '#' are comments.\n"
)


def read_edgelist(path: Path) -> nx.Graph:
    """Parse the file; node ids are kept as text for the caller to convert and check."""
    graph = nx.Graph()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if text.startswith(NODE_PREFIX):
                node, _, attrs = text[len(NODE_PREFIX) :].strip().partition(" ")
                parsed = json.loads(attrs or "{}")
                if not isinstance(parsed, dict):
                    raise ValueError(f"line {number}: node attributes must be a JSON object")
                graph.add_node(node, **parsed)
            elif text and not text.startswith("#"):
                ends = text.split()
                if len(ends) != 2:
                    raise ValueError(f"line {number}: expected two node ids, got {len(ends)} fields")
                graph.add_edge(*ends)
    return graph


def write_edgelist(graph: nx.Graph, path: Path) -> None:
    """Write node attribute lines first, then edges, both in node order."""
    with path.open("w", encoding="utf-8") as out:
        out.write(HEADER)
        for node, attrs in graph.nodes(data=True):
            out.write(f"{NODE_PREFIX}{node} {json.dumps(attrs, sort_keys=True)}\n")
        for u, v in graph.edges:
            out.write(f"{u} {v}\n")
