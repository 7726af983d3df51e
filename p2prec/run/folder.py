"""The output-directory contract of docs/design.md section 7, written atomically.

``DIR/config.toml`` (resolved config), ``DIR/metrics.jsonl`` (one object per evaluated
round), ``DIR/summary.json`` and ``DIR/convergence.png``. Scripts rely on these names
and keys, so baselines, the simulator, real nodes and their launcher all write through
here, which is why it sits below all of them. Each file goes through
:func:`p2prec.atomic.write_text_atomic`, so a reader never sees half a file, even after a crash.

Beyond :data:`RECORD_KEYS`, a simulator record carries ``epsilon`` (each node's privacy
loss so far at the configured delta; null without privacy) and ``bound_dropped_total``
(messages the norm bound dropped so far), and its summary carries ``codec``, ``epsilon``,
``delta``, ``noise_multiplier``, ``robust_rule``, ``attack``, ``byzantine`` (how many nodes
attack), ``evaluated_nodes`` (the honest nodes, over which every metric is computed),
``norm_bound``, ``bound_dropped`` and ``bound_cut_links`` (links cut for the run,
``robust.quarantine``). ``bytes_sent_total`` and ``bytes_per_node_per_round``
count messages at the size the real encoder gives the configured codec's payload;
``bytes_received_total`` counts the messages that reached a node that was up, and
``bytes_sent_received_per_node_per_round`` is a node's whole traffic, both directions
(:func:`traffic`). Records carry both rates so far; the summary carries them over the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from p2prec.atomic import write_text_atomic
from p2prec.config import Config

RECORD_KEYS = ("round", "val", "test", "loss", "consensus_distance", "bytes_sent_total", "wall_s")


def make_record(round_: int, result: dict, loss: float | None, consensus: float | None,
                bytes_sent_total: int, wall_s: float, **extra: Any) -> dict[str, Any]:
    """One ``metrics.jsonl`` line: evaluation result of a round plus its training figures."""
    return {"round": round_, "val": result["val"], "test": result["test"], "loss": loss,
            "consensus_distance": consensus, "bytes_sent_total": bytes_sent_total,
            "wall_s": wall_s, **extra}


def traffic(sent_total: int, received_total: int, nodes: int, rounds: int) -> dict[str, Any]:
    """The byte keys of a record or summary: totals, and per node per round sent and sent
    plus received. Why both: a node's link carries what it receives as well as what it
    sends, and the byte budget (PFedRec's ~430 KB a client a round, up and down) counts both."""
    per = max(nodes * rounds, 1)
    return {"bytes_received_total": int(received_total), "bytes_per_node_per_round": sent_total / per,
            "bytes_sent_received_per_node_per_round": (sent_total + received_total) / per}


def best_record(records: list[dict], protocol: str, metric: str) -> dict:
    """The record with the best *validation* score (earliest on ties); never chosen by test."""
    return max(records, key=lambda r: (r["val"][protocol][metric], -r["round"]))


def summarize_run(records: list[dict], cfg: Config, nodes: int, rounds: int,
                  bytes_per_node_per_round: float, bytes_sent_received_per_node_per_round: float, wall_s: float,
                  method: str, **extra: Any) -> dict[str, Any]:
    """The ``summary.json`` object: the round validation chose, what it scored, the run's costs and ``extra``."""
    best = best_record(records, cfg.eval.select_protocol, cfg.eval.select_metric)
    return {
        "nodes": nodes,
        "rounds": rounds,
        "best_round": best["round"],
        "selected_by": f"val/{cfg.eval.select_protocol}/{cfg.eval.select_metric}",
        "val_at_best": best["val"],
        "test_at_best": best["test"],
        "bytes_per_node_per_round": bytes_per_node_per_round,
        "bytes_sent_received_per_node_per_round": bytes_sent_received_per_node_per_round,
        "wall_s": wall_s,
        "method": method,
        **extra,
    }


def write_run(out: str | Path, cfg: Config, records: list[dict], summary: dict[str, Any]) -> Path:
    """Write config.toml, metrics.jsonl, summary.json and convergence.png into ``out``."""
    from p2prec.run.plots import plot_convergence

    out = Path(out)
    write_text_atomic(out / "config.toml", cfg.to_toml())
    write_metrics(out, records)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    plot_convergence({summary.get("label") or out.name: records}, out / "convergence.png",
                     protocol=cfg.eval.select_protocol, best_rounds={summary.get("label") or out.name: summary["best_round"]})
    return out


def write_metrics(out: str | Path, records: list[dict]) -> Path:
    """Write ``metrics.jsonl`` (one record a line) into ``out``; during a run, the records so far."""
    return write_text_atomic(Path(out) / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_run(folder: str | Path) -> tuple[dict[str, Any], list[dict]]:
    """Read a results folder's summary and records, with errors that name the file."""
    folder = Path(folder)
    summary_path, metrics_path = folder / "summary.json", folder / "metrics.jsonl"
    for p in (summary_path, metrics_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; is {folder} a p2prec results folder?")
    try:
        summary = json.loads(summary_path.read_text())
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder}: corrupt results file ({exc})") from None
    return summary, records
