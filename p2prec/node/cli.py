"""``p2prec-node``: run one real node of a topology file, from its last checkpoint to the last round.

Bad input (a malformed config, a missing topology file, an id that is not in the topology,
an unreadable checkpoint) is one line on stderr and exit status 2, never a traceback.
SIGINT and SIGTERM stop the node cleanly, keeping its last checkpoint, with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from p2prec.cli import add_config_options, config_from_args, guarded, run_cli
from p2prec.config import Config, ConfigError, load

log = logging.getLogger("p2prec.node")


def check_config(cfg: Config) -> None:
    """Refuse settings a real node does not implement yet, rather than ignore them silently."""
    if cfg.gossip.mixing == "peers":
        raise ConfigError("gossip.mixing: real nodes support 'metropolis' and 'matching' so far, got 'peers' "
                          "(pushing to random nodes of the whole network)")


def build_node(cfg: Config, node_id: int, backbone_dir: str | None):  # noqa: ANN201 - a Node; imported lazily
    """Everything node ``node_id`` needs: its keys, its data, its place in the topology, its model and state.

    The keys are read before the backbone is loaded (or pre-trained, which takes a minute),
    so a secured node without them stops at once. The node's state folder gets the serving
    manifest (:mod:`p2prec.serve.state`), so ``p2prec recommend --state`` can serve its users.
    """
    from p2prec.learn.factories import adapter_model
    from p2prec.learn.population import gossip_template
    from p2prec.learn.pretrain import ensure_backbone
    from p2prec.node.learner import Learner
    from p2prec.node.place import FLAT, place
    from p2prec.node.runtime import Node
    from p2prec.node.security import node_keys
    from p2prec.run import checkpoint
    from p2prec.run.data import load_data, select_nodes
    from p2prec.serve.state import fingerprint, write_manifest
    from p2prec.topology import load

    check_config(cfg)
    data = load_data(cfg)
    nodes = select_nodes(data, cfg)
    graph = load(cfg.gossip.topology, len(nodes), cfg.run.seed)
    where = place(graph, node_id, len(nodes), cfg.gossip, cfg.run.seed)
    keys = node_keys(cfg.security, node_id, graph) if cfg.security.enabled else None
    backbone = ensure_backbone(data, cfg, backbone_dir)
    backbone_sha = fingerprint(backbone)  # before the adapters wrap it
    model = adapter_model(backbone, cfg)
    learner = Learner(cfg, data, model, nodes[node_id], node_id, gossiped=where.kind == FLAT) if where.has_data \
        else None
    template = {k: v.numpy() for k, v in gossip_template(model, cfg.gossip.tracking).items()}
    state_dir = Path(cfg.node.dir) / f"node-{node_id}"
    served = nodes[node_id] if where.has_data else []
    users = {int(data.user_ids[u]): (node_id, checkpoint.FILE_NAME) for u in served}
    write_manifest(state_dir, cfg, data, backbone_dir, backbone_sha, users, None)
    return Node(cfg, where, learner, template, state_dir, keys)


PATH_KEYS = (("data", "dir"), ("gossip", "topology"), ("node", "dir"), ("security", "key_dir"),
             ("security", "secret_key"))
"""The config keys that name files or folders a node reads or writes."""


def resolve_paths(cfg: Config, config_file: str | Path | None) -> Config:
    """Read the relative paths the config *file* gives against the file's folder, not the
    working directory: an operator copies a node's folder (config, topology, keys) to a
    device and starts it from anywhere. Values given with ``--set`` or flags stay relative
    to the working directory, as a shell user expects; so does a named topology (``ring``)."""
    if not config_file:
        return cfg
    folder = Path(config_file).resolve().parent
    from_file = load(config_file)
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if not value or value != getattr(getattr(from_file, section), key) or Path(value).is_absolute():
            continue
        if (section, key) == ("gossip", "topology") and not (folder / value).exists():
            continue  # a topology spec such as "small-world", not a file
        setattr(getattr(cfg, section), key, str(folder / value))
    return cfg


def _interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_node(args: argparse.Namespace) -> int:
    cfg = resolve_paths(config_from_args(args), args.config)
    if args.join and cfg.gossip.mode == "async":
        raise ConfigError("--join: an async node needs no join; it starts at once and mixes its neighbours' "
                          "states as they arrive (gossip.mode = 'async')")
    try:
        node = build_node(cfg, args.id, args.backbone)
        node.resume(fresh=args.fresh)
    except KeyboardInterrupt:
        log.info("node %d: stopped before its first round", args.id)
        return 0
    asyncio.run(node.run(join=args.join))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2prec-node", description=__doc__.splitlines()[0])
    add_config_options(parser)
    parser.add_argument("--id", type=int, required=True, help="this node's id in the topology file")
    parser.add_argument("--backbone", help="backbone folder (default: pre-train on public users, cached)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard this node's checkpoint and metrics and start from round 0")
    parser.add_argument("--join", action="store_true",
                        help="joining a running network: first take the most advanced neighbour's shared state")
    parser.set_defaults(func=guarded(cmd_node), threads=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
