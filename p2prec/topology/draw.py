"""Render a topology to PNG, nodes coloured by role.

Why matplotlib's object API with the Agg canvas instead of pyplot: drawing must work on a
headless node and must not switch the backend of a process that also plots other things.
matplotlib is imported on first use, so ``show`` and ``validate`` stay quick.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import networkx as nx

from p2prec.topology.io import atomic_path
from p2prec.topology.roles import AGGREGATOR, AGGREGATOR_ONLY, CLIENT

COLOURS = {CLIENT: "tab:blue", AGGREGATOR: "tab:orange", AGGREGATOR_ONLY: "tab:red"}

Layout = Callable[[nx.Graph, int], dict[int, tuple[float, float]]]
LAYOUTS: dict[str, Layout] = {
    "spring": lambda graph, seed: nx.spring_layout(graph, seed=seed),
    # Kamada-Kawai starts from a circular layout, so it is deterministic without a seed.
    "kamada-kawai": lambda graph, seed: nx.kamada_kawai_layout(graph),
}


def draw(graph: nx.Graph, out: Path, seed: int = 0, layout: str = "spring", title: str = "") -> None:
    """Write a PNG of ``graph`` to ``out`` (atomically), with a seeded, repeatable layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    position = LAYOUTS[layout](graph, seed)
    size = max(4.0, 300.0 / max(1, graph.number_of_nodes()) ** 0.5)
    figure = Figure(figsize=(8, 8))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    nx.draw_networkx_edges(graph, position, ax=axes, alpha=0.3, width=0.5)
    for role, colour in COLOURS.items():
        nodes = [v for v, r in graph.nodes(data="role") if r == role]
        if nodes:
            # Aggregators are drawn larger so that the hierarchy reads at a glance.
            scale = 1.0 if role == CLIENT else 3.0
            nx.draw_networkx_nodes(
                graph,
                position,
                nodelist=nodes,
                node_color=colour,
                node_size=size * scale,
                label=f"{role} ({len(nodes)})",
                ax=axes,
            )
    axes.legend(loc="upper right")
    axes.set_title(title or f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
    axes.set_axis_off()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
