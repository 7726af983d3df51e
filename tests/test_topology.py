"""Topologies: builders, files, validation, mixing weights and the `p2prec topology` CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from p2prec.topology import (
    TopologyError,
    aggregators,
    build,
    cli,
    data_nodes,
    load,
    metropolis_hastings,
    mixing,
    predicted_rate,
    read,
    spectral_gap,
    validate,
    write,
)

REPO = Path(__file__).resolve().parents[1]
FLAT_SPECS = ["ring", "torus", "small-world", "erdos-renyi", "random-regular", "complete", "torus:rows=5"]
N = 30


def edges(graph: nx.Graph) -> set[frozenset[int]]:
    return {frozenset(e) for e in graph.edges}


# --- builders -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", FLAT_SPECS)
def test_flat_builders_are_connected_all_client(spec: str) -> None:
    graph = build(spec, N, seed=3)
    validate(graph, N)
    assert sorted(graph.nodes) == list(range(N))
    assert {role for _, role in graph.nodes(data="role")} == {"client"}


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("spec", ["ring", "torus", "complete", "star", "edge-hierarchy"])
def test_tiny_graphs_are_valid(spec: str, n: int) -> None:
    validate(build(spec, n), n)


def test_torus_with_rows_is_four_regular() -> None:
    assert {d for _, d in build("torus:rows=5", N).degree} == {4}


def test_star_hub_is_extra_node_without_data() -> None:
    graph = build("star", N)
    validate(graph, N)
    assert graph.nodes[N]["role"] == "aggregator-only"
    assert data_nodes(graph) == list(range(N)) and aggregators(graph) == [N]
    assert all(graph.nodes[v]["aggregator"] == N for v in range(N))
    assert graph.number_of_edges() == N


def test_edge_hierarchy_aggregator_only() -> None:
    graph = build("edge-hierarchy:m=5,inner=complete", N, seed=1)
    validate(graph, N)
    hubs = list(range(N, N + 5))
    assert aggregators(graph) == hubs
    assert graph.subgraph(hubs).number_of_edges() == 10
    sizes = [sum(graph.nodes[v]["aggregator"] == hub for v in range(N)) for hub in hubs]
    assert sizes == [6] * 5
    for v in range(N):
        assert graph.nodes[v]["role"] == "client" and graph.has_edge(v, graph.nodes[v]["aggregator"])


def test_edge_hierarchy_training_aggregators_are_data_nodes() -> None:
    graph = build("edge-hierarchy:m=4,train=true", N, seed=2)
    validate(graph, N)
    assert graph.number_of_nodes() == N
    hubs = aggregators(graph)
    assert len(hubs) == 4 and all(graph.nodes[h]["role"] == "aggregator" for h in hubs)
    assert all("aggregator" not in graph.nodes[h] for h in hubs)


def test_edge_hierarchy_defaults_scale_with_n() -> None:
    graph = build("edge-hierarchy", 400)
    validate(graph, 400)
    assert len(aggregators(graph)) == 20
    inner = graph.subgraph(aggregators(graph))
    assert inner.number_of_edges() == 60  # small world, k=6, on 20 aggregators


def test_edge_hierarchy_groups_by_attribute() -> None:
    regions = {v: {"region": "north" if v < 10 else "south"} for v in range(N)}
    graph = build("edge-hierarchy:assign=region", N, node_attrs=regions)
    validate(graph, N)
    north, south = aggregators(graph)
    assert all(graph.nodes[v]["aggregator"] == (north if v < 10 else south) for v in range(N))


def test_edge_hierarchy_attribute_missing_names_node() -> None:
    with pytest.raises(TopologyError, match="node 0 has no attribute 'region'"):
        build("edge-hierarchy:assign=region", N)


@pytest.mark.parametrize("spec", ["small-world", "erdos-renyi", "random-regular", "edge-hierarchy", "star"])
def test_deterministic_by_seed(spec: str) -> None:
    a, b = build(spec, 50, seed=7), build(spec, 50, seed=7)
    assert edges(a) == edges(b) and dict(a.nodes(data=True)) == dict(b.nodes(data=True))
    if spec != "star":
        assert edges(a) != edges(build(spec, 50, seed=8))


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ("hypercube", N, "unknown topology 'hypercube'"),
        ("ring:k=3", N, "unknown key 'k'"),
        ("small-world:k=six", N, "k='six' is invalid"),
        ("small-world:k=5", N, "k=5 must be even"),
        ("small-world:p=2", N, "p='2' is invalid"),
        ("edge-hierarchy:train=maybe", N, "train='maybe'"),
        ("edge-hierarchy:inner=star", N, "inner='star'"),
        ("edge-hierarchy:m=40", N, "m=40 exceeds the 30 data nodes"),
        ("torus:rows=7", N, "rows=7 does not divide n=30"),
        ("random-regular:d=3", 31, "n\\*d even"),
        ("erdos-renyi:p=0", 5, "no connected graph in 100 seeded draws"),
        ("ring:", 0, "at least one node"),
        ("ring:k", N, "'k' is not key=value"),
        (":k=1", N, "has no name"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, n: int, message: str) -> None:
    with pytest.raises(TopologyError, match=message) as caught:
        build(spec, n)
    assert "\n" not in str(caught.value)


# --- files ----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["edgelist", "txt", "graphml", "json"])
def test_round_trip_keeps_attributes(tmp_path: Path, ext: str) -> None:
    attrs = {
        v: {
            "address": f"tcp://10.0.0.{v}:5555",
            "key": "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" if v else "",
        }
        for v in range(N)
    }
    graph = build("edge-hierarchy:m=3", N, seed=4, node_attrs=attrs)
    path = tmp_path / f"topology.{ext}"
    write(graph, path)
    back = read(path)
    assert dict(back.nodes(data=True)) == dict(graph.nodes(data=True))
    assert edges(back) == edges(graph)
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


def test_json_string_ids_become_ints(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        '{"nodes": [{"id": "0"}, {"id": "1", "role": "client"}], "edges": [{"source": "0", "target": "1"}]}'
    )
    graph = read(path)
    assert sorted(graph.nodes) == [0, 1] and graph.nodes[0]["role"] == "client"


def test_json_written_by_older_networkx_uses_links(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text('{"nodes": [{"id": 0}, {"id": 1}], "links": [{"source": 0, "target": 1}]}')
    assert edges(read(path)) == {frozenset((0, 1))}


def test_plain_edgelist_is_a_flat_topology(tmp_path: Path) -> None:
    path = tmp_path / "plain.edgelist"
    path.write_text("# a hand-written ring\n0 1\n1 2\n\n2 0\n")
    graph = read(path)
    validate(graph, 3)
    assert edges(graph) == edges(nx.cycle_graph(3))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("g.edgelist", "0 1\n1 two\n", "node id 'two' is not an integer"),
        ("g.edgelist", "0 1 2\n", "line 1: expected two node ids"),
        ("g.edgelist", "# node 0 [1]\n", "must be a JSON object"),
        ("g.graphml", "<graphml><graph", "cannot read topology file .*g.graphml"),
        ("g.json", "{not json", "cannot read topology file .*g.json"),
        ("g.json", "[1, 2]", "cannot read topology file .*g.json"),
    ],
)
def test_garbage_files_name_the_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TopologyError, match=message) as caught:
        read(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_binary_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.edgelist"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TopologyError, match="cannot read topology file"):
        read(path)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"missing\.json does not exist"):
        read(tmp_path / "missing.json")
    with pytest.raises(TopologyError, match=r"unknown extension '\.csv'"):
        read(tmp_path / "t.csv")


def test_load_reads_files_and_builds_specs(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write(build("ring", 5), path)
    assert edges(load(str(path))) == edges(build("ring", 5))
    assert edges(load("small-world", 40, seed=2)) == edges(build("small-world", 40, seed=2))
    with pytest.raises(TopologyError, match="needs the number of data nodes"):
        load("ring", None, 0)
    with pytest.raises(TopologyError, match="does not exist"):
        load(str(tmp_path / "absent.graphml"), 5, 0)


@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("small-world-754.json", 754),
        ("ring-754.edgelist", 754),
        ("edge-hierarchy-754.graphml", 754),
        ("lan-4.json", 4),
    ],
)
def test_shipped_topologies_are_valid(name: str, n: int) -> None:
    graph = read(REPO / "topologies" / name)
    validate(graph, n)
    assert (REPO / "topologies" / name).stat().st_size < 1_000_000


def test_shipped_files_match_their_specs() -> None:
    shipped = read(REPO / "topologies" / "edge-hierarchy-754.graphml")
    assert edges(shipped) == edges(build("edge-hierarchy:m=30,inner=small-world", 754, seed=0))
    lan = read(REPO / "topologies" / "lan-4.json")
    assert [lan.nodes[v]["address"] for v in range(4)] == [f"tcp://192.168.1.{11 + v}:5555" for v in range(4)]


# --- validation -----------------------------------------------------------------------


def client_graph(graph: nx.Graph) -> nx.Graph:
    nx.set_node_attributes(graph, "client", "role")
    return graph


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (nx.Graph(), "topology is empty"),
        (client_graph(nx.relabel_nodes(nx.path_graph(3), {2: "c"})), "node id 'c' is not an integer"),
        (client_graph(nx.Graph([(0, 1), (1, 1)])), "self-loop.*node 1"),
        (
            client_graph(nx.Graph([(0, 1), (2, 3), (4, 5), (5, 6)])),
            "disconnected: 3 components \\(sizes 3, 2, 2\\)",
        ),
        (nx.path_graph(3), "node 0 has no 'role' attribute"),
        (client_graph(nx.DiGraph([(0, 1), (1, 0)])), "topology is directed"),
    ],
)
def test_validation_errors(graph: nx.Graph, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        validate(graph)


def test_unknown_role_and_aggregator_references() -> None:
    graph = build("star", 4)
    graph.nodes[1]["role"] = "server"
    with pytest.raises(TopologyError, match="node 1 has unknown role 'server'"):
        validate(graph)
    graph = build("star", 4)
    graph.nodes[2]["aggregator"] = 99
    with pytest.raises(TopologyError, match="client 2 names aggregator 99, which is not in the topology"):
        validate(graph)
    graph.nodes[2]["aggregator"] = 3
    with pytest.raises(TopologyError, match="client 2 names aggregator 3, whose role is 'client'"):
        validate(graph)
    graph = build("edge-hierarchy:m=2", 6)
    graph.nodes[0]["aggregator"] = 7 if graph.nodes[0]["aggregator"] == 6 else 6
    with pytest.raises(TopologyError, match=r"client 0 names aggregator . but has no edge to it"):
        validate(graph)


def test_data_node_count_must_match_partition() -> None:
    with pytest.raises(
        TopologyError, match="topology has 120 data nodes but the data partition has 754 nodes"
    ):
        validate(build("edge-hierarchy", 120), 754)
    graph = nx.relabel_nodes(build("ring", 4), {3: 9})
    with pytest.raises(TopologyError, match="data node 9 is outside"):
        validate(graph, 4)


# --- mixing ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [*FLAT_SPECS, "star", "edge-hierarchy", "edge-hierarchy:train=true"])
def test_metropolis_hastings_is_doubly_stochastic_and_keeps_the_mean(spec: str) -> None:
    w = metropolis_hastings(build(spec, N, seed=5))
    dense = w.toarray()
    assert np.allclose(dense, dense.T)
    assert np.allclose(dense.sum(axis=0), 1) and np.allclose(dense.sum(axis=1), 1)
    assert dense.min() >= 0
    x = np.random.default_rng(0).normal(size=(w.shape[0], 3))
    assert np.allclose((w @ x).mean(axis=0), x.mean(axis=0))


def test_mixing_needs_contiguous_ids() -> None:
    with pytest.raises(TopologyError, match=r"node ids 0\.\.2"):
        metropolis_hastings(nx.Graph([(0, 1), (1, 5)]))


def test_complete_graph_has_gap_one() -> None:
    assert spectral_gap(metropolis_hastings(build("complete", 25))) == pytest.approx(1.0, abs=1e-9)
    assert spectral_gap(metropolis_hastings(build("complete", 1))) == 1.0


@pytest.mark.parametrize("n", [5, 12, 51])
def test_ring_gap_matches_closed_form(n: int) -> None:
    w = metropolis_hastings(build("ring", n))
    assert np.allclose(w.diagonal(), 1 / 3)
    spectrum = 1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(1, n) / n)
    assert predicted_rate(w) == pytest.approx(np.abs(spectrum).max(), abs=1e-10)
    assert spectral_gap(w) == pytest.approx(1 - np.abs(spectrum).max(), abs=1e-10)


def test_sparse_eigensolver_agrees_with_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    w = metropolis_hastings(build("small-world", 200, seed=1))
    dense = predicted_rate(w)
    monkeypatch.setattr(mixing, "DENSE_UP_TO", 10)
    assert predicted_rate(w) == pytest.approx(dense, abs=1e-8)


def test_consensus_shrinks_at_the_predicted_rate() -> None:
    w = metropolis_hastings(build("small-world", 100, seed=1))
    rate = predicted_rate(w)
    x = np.random.default_rng(0).normal(size=100)
    mean = x.mean()
    distance = []
    for _ in range(50):
        distance.append(np.linalg.norm(x - mean))
        x = w @ x
    rounds = np.arange(50)
    # W is symmetric, so its second eigenvalue modulus bounds every round's contraction.
    assert np.all(distance <= rate**rounds * distance[0] * (1 + 1e-9))
    fitted = math.exp(np.polyfit(rounds, np.log(distance), 1)[0])
    assert fitted == pytest.approx(rate, rel=0.10)
    assert abs(x.mean() - mean) < 1e-12


# --- CLI ------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="p2prec")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("topology", "show", "edge-hierarchy:m=4", "--nodes", "40") == 0
    out = capsys.readouterr().out
    assert "nodes         44 (40 data nodes, 4 aggregators)" in out
    assert "aggregator-only=4, client=40" in out
    assert "diameter" in out and "spectral gap" in out


def test_cli_validate_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.graphml"
    write(build("small-world", 40), path)
    assert run_cli("topology", "validate", str(path), "--nodes", "40") == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert run_cli("topology", "validate", str(path), "--nodes", "41") == 2
    assert "40 data nodes but the data partition has 41" in capsys.readouterr().err


def test_cli_draw_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "star.png"
    assert run_cli("topology", "draw", "star", "--nodes", "12", "--out", str(out)) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 1000
    assert (
        run_cli("topology", "draw", "ring", "--nodes", "8", "--out", str(out), "--layout", "kamada-kawai")
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star.png"]


def test_cli_draw_into_missing_directory_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("topology", "draw", "ring", "--nodes", "5", "--out", str(tmp_path / "no" / "r.png")) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_bad_spec_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("topology", "show", "ring:k=3", "--nodes", "10") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and "'k'" in captured.err
