"""One node's local update for the median ML-100K user, and what the node sends per round.

Prints the median time of a local update (``train.local_steps`` steps of the real node's
code path, :func:`p2prec.learn.local.local_step`) for the federated user with the median
history length, and the parameter and byte counts of the shared adapter against the whole
backbone (and beside the language model that embeds item texts, when the backbone has a text
path). Run: ``python benchmarks/bench_local_step.py [--data-dir DIR] [--backbone DIR] [--set k=v]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_time, parser, setup  # noqa: E402

from p2prec.data.sampler import NegativeSampler  # noqa: E402
from p2prec.learn.factories import adapter_model, step_settings  # noqa: E402
from p2prec.learn.batches import train_batch  # noqa: E402
from p2prec.learn.local import init_opt_state, local_step  # noqa: E402
from p2prec.model.text import encoder_parameters  # noqa: E402
from p2prec.rng import seeded_rng  # noqa: E402
from p2prec.sim.engine import message_bytes  # noqa: E402


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg, data, backbone = setup(args)
    model = adapter_model(backbone, cfg)
    lengths = np.asarray([len(data.train[u]) for u in data.federated_users])
    user = int(data.federated_users[np.argsort(lengths)[len(lengths) // 2]])
    sampler = NegativeSampler(data)
    settings = step_settings(cfg)
    t = cfg.train

    def update() -> None:
        params, state = model.trainable_state(), init_opt_state(model.trainable_state())
        model.train(t.backbone_dropout)
        for step in range(t.local_steps):
            b = train_batch(data, sampler, np.asarray([user]), t.batch_size, cfg.model.max_len, t.negatives,
                            seeded_rng(0, step))
            params, state, _ = local_step(model, params, state, b.inputs, b.targets, b.negatives, settings)
        model.eval()

    seconds = median_time(update, args.repeats, warmup=2)
    counts = model.parameter_counts()
    shared_bytes = message_bytes(model.shared_state())
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    backbone_bytes = message_bytes(frozen)
    print(f"median user: {len(data.train[user])} training interactions; {t.local_steps} local step(s), "
          f"batch {t.batch_size}, {t.negatives} negatives, max_len {cfg.model.max_len}, {args.threads} thread(s)")
    print(f"local update: median {seconds * 1000:.1f} ms over {args.repeats} runs")
    print("| part | parameters | bytes on the wire (fp32, real encoder) |\n|---|---|---|")
    print(f"| shared adapter | {counts['shared']:,} | {shared_bytes:,} |")
    print(f"| personal adapter + gate (never sent) | {counts['personal'] + counts['gate']:,} | - |")
    print(f"| whole backbone | {counts['backbone']:,} | {backbone_bytes:,} |")
    text = encoder_parameters(backbone.config.text_encoder)
    if text:
        print(f"| text encoder {backbone.config.text_encoder} (frozen; embeds the catalogue once) | {text:,} | - |")
        print(f"shared / (backbone + text encoder): {counts['shared'] / (counts['backbone'] + text):.4f} "
              "of the parameters")
    print(f"shared / backbone: {counts['shared'] / counts['backbone']:.3f} of the parameters, "
          f"{shared_bytes / backbone_bytes:.3f} of the bytes")


if __name__ == "__main__":
    main()
