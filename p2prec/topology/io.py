"""Read and write topology files, choosing the format by extension.

Formats: ``.edgelist``/``.txt`` (see :mod:`p2prec.topology.edgelist`), ``.graphml``, and
``.json`` (NetworkX node-link data with an ``edges`` list). Node attributes ``role``,
``address``, ``key`` and ``aggregator`` survive a round trip in all three. Files are read
as undirected simple graphs, because every gossip link carries messages both ways, and
node ids become ints, because node ``i`` trains on data partition ``i``.
"""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import networkx as nx

from p2prec.topology.build import build
from p2prec.topology.edgelist import read_edgelist, write_edgelist
from p2prec.topology.errors import TopologyError
from p2prec.topology.roles import CLIENT


def _read_json(path: Path) -> nx.Graph:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("expected a node-link JSON object with 'nodes' and 'edges'")
    # NetworkX before 3.4 wrote the edge list under "links"; accept such files too.
    edges = "links" if "links" in data and "edges" not in data else "edges"
    return nx.node_link_graph(data, edges=edges)


def _write_json(graph: nx.Graph, path: Path) -> None:
    """Node-link JSON with one node or edge per line, ``id`` first, so that people can edit
    addresses by hand and diffs stay one line per change."""
    data = nx.node_link_data(graph, edges="edges")
    data["nodes"] = [
        {"id": node["id"], **{k: v for k, v in node.items() if k != "id"}} for node in data["nodes"]
    ]
    parts = []
    for key, value in data.items():
        if isinstance(value, list):
            rows = ",\n".join(f"  {json.dumps(item)}" for item in value)
            parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")


FORMATS: dict[str, tuple[Callable[[Path], nx.Graph], Callable[[nx.Graph, Path], None]]] = {
    ".edgelist": (read_edgelist, write_edgelist),
    ".txt": (read_edgelist, write_edgelist),
    ".graphml": (nx.read_graphml, nx.write_graphml),
    ".json": (_read_json, _write_json),
}


def _format(path: Path) -> tuple[Callable[[Path], nx.Graph], Callable[[nx.Graph, Path], None]]:
    if path.suffix not in FORMATS:
        raise TopologyError(
            f"topology file {path}: unknown extension {path.suffix!r} (known: {', '.join(FORMATS)})"
        )
    return FORMATS[path.suffix]


def _as_int(value: Any, path: Path, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise TopologyError(f"topology file {path}: {what} {value!r} is not an integer") from None


def _normalise(graph: nx.Graph, path: Path) -> nx.Graph:
    """Undirected, int ids, int ``aggregator`` references, and ``client`` as the default role."""
    graph = nx.Graph(graph)
    ids = {node: _as_int(node, path, "node id") for node in graph.nodes}
    if len(set(ids.values())) != len(ids):
        raise TopologyError(f"topology file {path}: two node ids denote the same integer")
    graph = nx.relabel_nodes(graph, ids)
    for node, attrs in graph.nodes(data=True):
        attrs.setdefault("role", CLIENT)
        if "aggregator" in attrs:
            attrs["aggregator"] = _as_int(attrs["aggregator"], path, f"node {node}'s aggregator")
    return graph


def read(path: str | os.PathLike[str]) -> nx.Graph:
    """The topology stored at ``path``; :class:`TopologyError` names the file on any failure."""
    path = Path(path)
    reader, _ = _format(path)
    if not path.is_file():
        raise TopologyError(f"topology file {path} does not exist")
    try:
        graph = reader(path)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError, nx.NetworkXError) as exc:
        raise TopologyError(f"cannot read topology file {path}: {type(exc).__name__}: {exc}") from None
    return _normalise(graph, path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it only if the block succeeds.

    Why: a crash or a full disk mid-write must leave the previous file intact, never half a
    file that a node would later fail to parse.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write(graph: nx.Graph, path: str | os.PathLike[str]) -> None:
    """Store ``graph`` at ``path`` in the format its extension names, atomically."""
    path = Path(path)
    _, writer = _format(path)
    with atomic_path(path) as tmp:
        writer(graph, tmp)


def load(spec_or_path: str, n: int | None = None, seed: int = 0) -> nx.Graph:
    """Read ``spec_or_path`` if it names a file (existing, or with a topology extension),
    otherwise build it as a spec on ``n`` data nodes."""
    path = Path(spec_or_path)
    if path.is_file() or path.suffix in FORMATS:
        return read(path)
    if n is None:
        raise TopologyError(f"topology spec {spec_or_path!r} needs the number of data nodes (--nodes)")
    return build(spec_or_path, n, seed)
