"""``p2prec topology show|validate|draw FILE_OR_SPEC``: inspect a topology before running it.

Why in the main CLI: the same file is handed to the simulator and to every real node, so
a mistake in it should be caught, and its mixing speed known, before anything starts.
Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import networkx as nx

from p2prec.topology.errors import TopologyError
from p2prec.topology.io import load
from p2prec.topology.mixing import metropolis_hastings, predicted_rate
from p2prec.topology.validate import aggregators, data_nodes, validate

DIAMETER_UP_TO = 2000
"""Largest topology whose diameter ``show`` computes (all-pairs BFS is O(N * E))."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``topology`` and its actions; the parser's ``func`` default is :func:`run`."""
    parser = subparsers.add_parser("topology", help="show, validate or draw a topology file or spec")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "show": "print size, degrees, roles, diameter and spectral gap",
        "validate": "check connectivity, roles, aggregators and node ids",
        "draw": "write a PNG coloured by role",
    }
    for action, help_text in helps.items():
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument(
            "source", metavar="FILE_OR_SPEC", help="a topology file, or a spec such as small-world:k=6"
        )
        sub.add_argument("--nodes", type=int, help="data nodes: required for a spec, checked for a file")
        sub.add_argument("--seed", type=int, default=0, help="seed for building a spec (and the draw layout)")
        if action == "draw":
            sub.add_argument(
                "--out", type=Path, required=True, metavar="PNG", help="where to write the picture"
            )
            sub.add_argument("--layout", choices=("spring", "kamada-kawai"), default="spring")
    parser.set_defaults(func=run)


def _census(graph: nx.Graph) -> str:
    return f"{len(data_nodes(graph))} data nodes, {len(aggregators(graph))} aggregators"


def _summary(graph: nx.Graph) -> str:
    degrees = [d for _, d in graph.degree]
    roles = Counter(role for _, role in graph.nodes(data="role"))
    if graph.number_of_nodes() <= DIAMETER_UP_TO:
        diameter = str(nx.diameter(graph))
    else:
        diameter = f"skipped (more than {DIAMETER_UP_TO} nodes)"
    rate = predicted_rate(metropolis_hastings(graph))
    return "\n".join(
        [
            f"nodes         {graph.number_of_nodes()} ({_census(graph)})",
            f"edges         {graph.number_of_edges()}",
            f"degree        min {min(degrees)}  mean {sum(degrees) / len(degrees):.2f}  max {max(degrees)}",
            f"roles         {', '.join(f'{role}={count}' for role, count in sorted(roles.items()))}",
            f"diameter      {diameter}",
            f"spectral gap  {1.0 - rate:.6f} (Metropolis-Hastings; consensus error x{rate:.6f} per round)",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """Carry out ``args.action``; return the exit status (0, or 2 on a topology error)."""
    try:
        graph = load(args.source, args.nodes, args.seed)
        validate(graph, args.nodes)
        if args.action == "show":
            print(f"topology      {args.source}")
            print(_summary(graph))
        elif args.action == "validate":
            print(f"ok: {args.source}: {_census(graph)}, {graph.number_of_edges()} edges, connected")
        else:
            from p2prec.topology.draw import draw

            draw(graph, args.out, seed=args.seed, layout=args.layout, title=args.source)
            print(f"wrote {args.out}")
    except (TopologyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
