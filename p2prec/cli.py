"""The ``p2prec`` command: pretrain, data, privacy, keys, topology, report and recommend.

Every sub-command shares the config options (``--config``, ``--set``, ``--data-dir``), and
every user-facing failure is one line on stderr with exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from p2prec.allocator import keep_freed_memory
from p2prec.config import Config, ConfigError, load


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that reads data or trains."""
    parser.add_argument("--config", help="TOML config file (docs/design.md, section 8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--data-dir", help="folder with the data set (default: $P2PREC_DATA, then the cache)")
    parser.add_argument("--dataset", help="data set name: ml-100k, ml-1m, ml-latest or synthetic")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config``, then ``--set``, then the dedicated flags; checked, codec name included."""
    from p2prec.gossip.stack import GossipStack

    overrides = list(args.overrides)
    if getattr(args, "dataset", None):
        overrides.append(f"data.name={args.dataset}")
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={args.data_dir}")
    cfg = load(args.config, overrides)
    GossipStack.from_config(cfg)  # the gossip stack checks its codec names, before any data is loaded
    return cfg


def guarded(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected user errors into one line on stderr and exit status 2, after the process
    setup every command shares (torch threads, :func:`p2prec.allocator.keep_freed_memory`)."""
    def run(args: argparse.Namespace) -> int:
        from p2prec.data.movielens import DataError
        from p2prec.model.store import BackboneError

        if getattr(args, "threads", 0):
            torch.set_num_threads(args.threads)
        keep_freed_memory()
        try:
            return main(args)
        except (ConfigError, DataError, BackboneError, FileNotFoundError, ValueError) as exc:
            print(f"p2prec: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("p2prec: interrupted", file=sys.stderr)
            return 130
    return run


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``--dataset`` names the corpus to pre-train on (every user of it); without it, the
    configured ``pretrain.corpus``, or the public users of ``data.name`` when that is empty."""
    from p2prec.learn.pretrain import pretraining_data, save_pretrained
    from p2prec.run.data import load_data

    if args.dataset:
        args.overrides = [*args.overrides, f"pretrain.corpus={args.dataset}"]
        args.dataset = None
    cfg = config_from_args(args)
    corpus, users, label = pretraining_data(load_data(cfg) if not cfg.pretrain.corpus else None, cfg)
    out, info = save_pretrained(corpus, users, cfg, args.out)
    print(f"backbone saved to {out}: {len(users)} {label} users of {info['corpus']}, {corpus.n_items} items, "
          f"text encoder {cfg.model.text_encoder}; best epoch {info['best_epoch']}, "
          f"validation NDCG@10 {info['val_ndcg@10']:.4f}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "download":
        from p2prec.data.download import download
        from p2prec.data.movielens import default_cache_dir

        dest = Path(args.dest) if args.dest else Path(os.environ.get("P2PREC_DATA") or default_cache_dir() / "data")
        print(f"downloaded and verified: {download(args.name, dest)}")
    else:
        from p2prec.data.synthetic import generate

        folder = generate(args.out, users=args.users, items=args.items, communities=args.communities,
                          seed=args.seed)
        print(f"synthetic data written to {folder} (read it with --dataset synthetic --data-dir {folder})")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from p2prec.gossip.privacy import epsilon, noise_multiplier, snr_bound
    from p2prec.gossip.stack import GossipStack
    from p2prec.learn.factories import adapter_model
    from p2prec.learn.pretrain import fresh_backbone
    from p2prec.run.data import load_data, select_nodes

    cfg = config_from_args(args)
    if cfg.privacy.target_epsilon <= 0 and cfg.privacy.noise_multiplier <= 0:
        raise ConfigError("privacy: set privacy.target_epsilon or privacy.noise_multiplier (> 0)")
    data = load_data(cfg)
    # Only the shapes matter here, so a fresh backbone stands in for the pre-trained one.
    model = adapter_model(fresh_backbone(data, cfg), cfg)
    dim = sum(v.numel() for v in model.shared_state().values())
    nodes, rounds = len(select_nodes(data, cfg)), GossipStack.from_config(cfg).training_rounds(cfg.run.rounds)
    sigma = noise_multiplier(cfg.privacy, rounds)
    bound = snr_bound(sigma, rounds, nodes, dim)
    print(f"{nodes} nodes, {rounds} releases each, shared adapter of {dim:,} floats")
    print(f"noise multiplier {sigma:.3f}: epsilon {epsilon(sigma, rounds, cfg.privacy.delta):.3f} "
          f"at delta {cfg.privacy.delta:g} per node over the run")
    print(f"best-case signal-to-noise of all releases summed: {bound:.3f} (noise {1 / bound:.1f}x the signal)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from p2prec.node.security import generate_keys, key_name

    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    names = [n.strip() for n in args.names.split(",")] if args.names else [key_name(i) for i in range(args.count)]
    for name, public in generate_keys(args.out, names).items():
        print(f"{name} {public.decode()}")
    print(f"keys in {args.out}: NAME.key (public, for the topology file) and NAME.key_secret (mode 0600)",
          file=sys.stderr)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Why the model is imported here only: ``p2prec`` must start fast for every other command too."""
    import json

    from p2prec.serve.recommend import recommend

    found = recommend(args.state, args.user, args.k, args.data_dir, args.backbone)
    if args.json:
        print(json.dumps({"user": args.user, "items": [vars(r) for r in found]}))
    else:
        width = max(len(str(r.item)) for r in found) if found else 1
        for rank, r in enumerate(found, start=1):
            print(f"{rank:>3}. {r.item:>{width}}  {r.score:8.4f}  {r.title}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from p2prec.sim.report import add_parser as add_report
    from p2prec.topology.cli import add_parser as add_topology

    parser = argparse.ArgumentParser(prog="p2prec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a backbone on a public corpus (--dataset) or the public users")
    add_config_options(p)
    p.add_argument("--out", required=True, help="folder to write the backbone to")
    p.set_defaults(func=guarded(cmd_pretrain))

    p = sub.add_parser("data", help="download MovieLens or generate synthetic data")
    actions = p.add_subparsers(dest="action", required=True)
    d = actions.add_parser("download", help="download and verify a data set (needs internet)")
    d.add_argument("name")
    d.add_argument("--dest", help="folder to place it in (default: $P2PREC_DATA or the cache)")
    s = actions.add_parser("synth", help="write a synthetic data set in the ml-100k format")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=200)
    s.add_argument("--items", type=int, default=500)
    s.add_argument("--communities", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=guarded(cmd_data))

    p = sub.add_parser("privacy", help="the noise a privacy budget needs, and how much signal it leaves")
    add_config_options(p)
    p.set_defaults(func=guarded(cmd_privacy))

    p = sub.add_parser("keys", help="CurveZMQ keypairs for secured real nodes")
    actions = p.add_subparsers(dest="action", required=True)
    g = actions.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (0600) per name")
    g.add_argument("--out", required=True, help="folder for the key files (existing keys are never overwritten)")
    who = g.add_mutually_exclusive_group(required=True)
    who.add_argument("--names", help="comma-separated key names")
    who.add_argument("--count", type=int, help="N keys named node0 .. node<N-1>, after the topology's node ids")
    p.set_defaults(func=guarded(cmd_keys))

    p = sub.add_parser("recommend", help="a user's top-k unseen items from a node's or a simulation's state")
    p.add_argument("--state", required=True,
                   help="a node's state folder, or the --out folder of 'p2prec-sim --save-states'")
    p.add_argument("--user", type=int, required=True, help="the data set's own user id (as in u.data)")
    p.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--data-dir", help="folder with the data set (default: where the state's config says)")
    p.add_argument("--backbone", help="backbone folder (default: the one the state names)")
    p.set_defaults(func=guarded(cmd_recommend))

    add_topology(sub)
    add_report(sub)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command with the project's logging format."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
