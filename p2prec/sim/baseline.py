"""``p2prec baseline``: run one baseline and write the results folder of DESIGN section 7."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from p2prec.config import Config
from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.baselines import (
    BaselineResult,
    adapter_model,
    federated_eval_set,
    run_backbone_only,
    run_centralized,
    selection_score,
    step_settings,
)
from p2prec.learn.evaluate import evaluate
from p2prec.learn.population import Population
from p2prec.model.pretrain import ensure_backbone
from p2prec.sim.results import make_record, summarize_run, write_run



def run_local_only(model, data: Dataset, cfg: Config, rounds: int) -> BaselineResult:  # noqa: ANN001
    """Every node trains its own adapters, vectorized across nodes, with no communication."""
    start = time.perf_counter()
    sampler = NegativeSampler(data)
    nodes = data.nodes(cfg.data.users_per_node)
    es = federated_eval_set(data, cfg, nodes)
    t = cfg.train
    pop = Population(model, data, sampler, nodes, step_settings(cfg), local_steps=t.local_steps,
                     batch_size=t.batch_size, max_len=cfg.model.max_len, negatives=t.negatives, seed=t.seed,
                     dropout=t.backbone_dropout)
    records: list[dict] = []
    best = (float("-inf"), 0)
    bar = tqdm(range(1, rounds + 1), desc="local-only", unit="round", dynamic_ncols=True)
    for rnd in bar:
        loss = pop.train_round(rnd)
        if rnd % cfg.eval.every and rnd != rounds:
            continue
        result = evaluate(model, pop.params, es, tuple(cfg.eval.protocols), stacked=True, k=cfg.eval.k)
        records.append(make_record(rnd, result, loss, None, 0, time.perf_counter() - start))
        best = max(best, (selection_score(result, cfg), -rnd))
        bar.set_postfix(loss=f"{loss:.4f}", val=f"{selection_score(result, cfg):.4f}", best_round=-best[1])
    return BaselineResult(records, -best[1], time.perf_counter() - start)


def run_baseline(kind: str, cfg: Config, data: Dataset, out: str | Path, backbone_dir: str | None = None,
                 epochs: int = 0) -> dict:
    """Train and evaluate one baseline, write ``out``, and return the summary."""
    model = adapter_model(ensure_backbone(data, cfg, backbone_dir), cfg)
    if kind == "backbone-only":
        result = run_backbone_only(model, data, cfg)
    elif kind == "centralized":
        result = run_centralized(model, data, cfg, epochs)
    else:
        result = run_local_only(model, data, cfg, epochs or cfg.sim.rounds)
    nodes = len(data.nodes(cfg.data.users_per_node))
    records = [r if "bytes_sent_total" in r else
               make_record(r["round"], r, r.get("loss"), None, 0, result.wall_s) for r in result.records]
    summary = summarize_run(records, cfg, nodes=nodes, rounds=max(r["round"] for r in records),
                            bytes_per_node_per_round=0.0, wall_s=result.wall_s, baseline=kind, label=kind,
                            users=int(np.sum([len(n) for n in data.nodes(cfg.data.users_per_node)])))
    write_run(out, cfg, records, summary)
    return summary
