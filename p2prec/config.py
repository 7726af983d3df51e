"""One typed configuration for the simulator, the real node and the baselines.

Why one schema: a study must be able to switch between simulated and real networking
without translating settings, so both read the same TOML sections. Every field can be
overridden with ``--set section.key=value``; unknown keys and out-of-range values are
errors that name the key, because a silently ignored typo invalidates a whole experiment.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, get_args, get_origin, get_type_hints

import tomli_w

from p2prec.wire.message import MAX_EXCHANGES


class ConfigError(ValueError):
    """A configuration problem; the message always names the offending key or file."""


def _check(
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Field metadata read by :func:`validate`: inclusive bounds or allowed values."""
    return {"lo": lo, "hi": hi, "choices": choices}


def _field(default: Any, **check: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=_check(**check))
    return field(default=default, metadata=_check(**check))


DATASETS = ("ml-100k", "ml-1m", "ml-latest", "synthetic")
"""The data sets :mod:`p2prec.data` reads, by name."""

METHODS = ("p2prec", "local-only", "fedavg-server", "centralized", "backbone-only")
"""What a run trains: p2prec's gossip (the default), or one of the baselines it is compared with.

The one list of baselines: the config checks ``run.method`` against it, and the command line
offers exactly these names."""


@dataclass
class RunConfig:
    """What a run is, read alike by the simulator and every real node: its method, its rounds
    and its one seed.

    ``seed`` keys every seeded draw of the run: the user split and the cold items, the backbone's
    and the adapters' initialisation, pre-training, each node's batches, evaluation negatives, the
    gossip peers of each round, faults, joiners, attackers and the simulator's privacy noise. Each
    draw adds its own tag from :class:`p2prec.rng.Stream` (or has keys of its own length), so one
    seed gives independent streams; changing it gives an independent replicate of the whole run.

    ``train_rounds`` > 0 stops local training after that many rounds and keeps gossiping,
    so the decay of the consensus distance can be compared with the spectral prediction.
    """

    method: str = _field("p2prec", choices=METHODS)
    rounds: int = _field(250, lo=1)
    train_rounds: int = _field(0, lo=0)
    seed: int = 0


@dataclass
class DataConfig:
    """Which data set, where it is, and how users become public or federated nodes.

    ``cold_items`` holds a seeded fraction of the items out of all training, pre-training
    included: they stand for new items, known only by their text, and evaluation reports the
    test users whose held-out item is one of them (``test_at_best.cold``).
    """

    name: str = _field("ml-100k", choices=DATASETS)
    dir: str = ""
    public_fraction: float = _field(0.2, lo=0.0, hi=0.9)
    users_per_node: int = _field(1, lo=1)
    min_interactions: int = _field(3, lo=3)
    cold_items: float = _field(0.0, lo=0.0, hi=0.9)


@dataclass
class ModelConfig:
    """Shape of the frozen backbone: item vectors feeding a small BERT encoder.

    ``text_encoder`` grounds items in text (:mod:`p2prec.model.text`): ``wordllama``, a
    local Hugging Face encoder folder, or ``none`` for an id-only backbone.
    ``id_embedding`` adds a learned id vector to the projected text (always on without text).

    The default is ``none``, chosen on validation: in-domain on ML-100K (754 nodes) the id-only
    backbone reaches validation NDCG@10 0.487 at round 250, while the text-grounded one peaks at
    0.452 by round 30-50 and then declines (docs/experiments.md, "Item text"). Text is what
    cold items and a backbone from another catalogue need (``sim/foundation/``).
    """

    hidden: int = _field(64, lo=8)
    layers: int = _field(2, lo=1, hi=24)
    heads: int = _field(2, lo=1)
    intermediate: int = _field(256, lo=8)
    max_len: int = _field(50, lo=2, hi=4096)
    dropout: float = _field(0.35, lo=0.0, hi=0.9)
    causal: bool = True
    text_encoder: str = "none"
    id_embedding: bool = True


@dataclass
class PretrainConfig:
    """Central pre-training of the backbone on public data (see :mod:`p2prec.learn.pretrain`).

    ``corpus`` empty: the federated data set's own public users (``data.public_fraction``).
    A data set name (``ml-latest``): every user of that corpus, read from ``corpus_dir``
    (default: ``data.dir``).
    """

    epochs: int = _field(200, lo=1)
    lr: float = _field(1e-3, lo=0.0)
    batch_size: int = _field(64, lo=1)
    negatives: int = _field(1, lo=1)
    loss: str = _field("bce", choices=("bce", "bpr", "ce"))
    weight_decay: float = _field(0.0, lo=0.0)
    corpus: str = _field("", choices=("", *DATASETS))
    corpus_dir: str = ""


@dataclass
class AdapterConfig:
    """The two LoRA adapters. Target names are module-name suffixes inside the backbone.

    The personal adapter defaults to attention only: with one user per node, a personal
    LoRA on the item embedding memorises that user's history within a few rounds (measured:
    validation NDCG@10 falls from round 6 on), while the shared one is regularised by gossip.
    The shared adapter is wide (rank 16 on every projection and the item embedding): with
    gradient tracking and the training defaults of :class:`TrainConfig`, ML-100K small-world
    test NDCG@10 rose from 0.409 (rank 8 on query/value/item_emb, BCE, Adam 3e-3) to 0.434
    (docs/experiments.md, "What the test score depends on"), at 3.6x the bytes per round.
    The text projection (``item_proj``) may carry LoRA too, but not by default: a node's ``A``
    on it meets every item's 256-d text in every step, which costs more arithmetic per round
    than the frozen encoder's layers at ML-100K's size, while ``item_emb``'s LoRA already
    adapts each item the nodes train on.
    """

    rank_personal: int = _field(8, lo=1)
    rank_shared: int = _field(16, lo=1)
    alpha_personal: float = _field(8.0, lo=0.0)
    alpha_shared: float = _field(16.0, lo=0.0)
    targets_personal: list = _field(["query", "value"])
    targets_shared: list = _field(["query", "key", "value", "dense", "item_emb"])
    dropout: float = _field(0.0, lo=0.0, hi=0.9)


@dataclass
class TrainConfig:
    """One node's local update: E steps on a sampled-softmax (or BCE, or BPR) loss.

    The defaults (softmax over the positive and 32 sampled negatives, Adam) beat BCE over 4
    negatives at 3e-3 on validation and test NDCG@10 (docs/experiments.md, "What the test score depends on"): the larger step made
    nodes overfit their own users between gossip rounds.

    Personal adapter and gate take Adam at ``lr``; the shared adapter takes its own
    optimizer (Adam, or SGD with ``momentum``) at ``shared_lr``, because averaging across
    nodes cancels its gradient noise (see :class:`p2prec.learn.local.StepSettings`). The
    personal rate is the smaller (3e-4 against 1e-3): it sees one user's history, which it
    memorises at 1e-3 while the shared adapter still improves (docs/experiments.md, "Learning rates").

    ``lr_schedule`` scales both learning rates by round over ``run.rounds``: ``constant``
    or ``cosine`` decay (see :mod:`p2prec.learn.schedule`). Cosine is not the default:
    it smoothed validation but lowered test NDCG@10 on ML-100K (docs/experiments.md, "Learning rates").

    ``backbone_dropout`` keeps the frozen backbone's dropout active during local steps: it
    regularises the adapters. Set it false for bit-for-bit comparisons between code paths.

    ``moments_dtype`` holds Adam's moments in ``bfloat16`` instead of ``float32`` (steps still
    compute in float32): a node's adapters and optimizer state shrink by a fifth (1,946 to
    1,551 KiB on a catalogue of ML-1M's 3,706 items; ``benchmarks/bench_sim.py --nodes``).
    On the default ML-100K run it leaves quality where it was (test 0.7268 / 0.4488 against
    0.7268 / 0.4483, validation 0.4870 both; docs/experiments.md, "Speed and memory"); float32
    stays the default so that every recorded run keeps its digits.
    """

    local_steps: int = _field(1, lo=0)
    lr: float = _field(3e-4, lo=0.0)
    lr_schedule: str = _field("constant", choices=("constant", "cosine"))
    loss: str = _field("ce", choices=("bce", "bpr", "ce"))
    negatives: int = _field(32, lo=1)
    batch_size: int = _field(1, lo=1)
    weight_decay: float = _field(0.0, lo=0.0)
    shared_optimizer: str = _field("adam", choices=("adam", "sgd"))
    shared_lr: float = _field(1e-3, lo=0.0)
    momentum: float = _field(0.9, lo=0.0, hi=0.999)
    backbone_dropout: bool = True
    moments_dtype: str = _field("float32", choices=("float32", "bfloat16"))


@dataclass
class CentralConfig:
    """The centralized baseline: one set of adapters trained on the pooled federated users.

    It has its own learning rate and batch size because a pooled mini-batch of 64 users is
    a different optimisation problem from one node's step on its own history.
    """

    lr: float = _field(5e-4, lo=0.0)
    batch_size: int = _field(64, lo=1)
    epochs: int = _field(100, lo=1)
    patience: int = _field(10, lo=0)


@dataclass
class EvalConfig:
    """The evaluation protocols of docs/design.md, section 4; ``select`` picks the best-validation round."""

    protocols: list = _field(["sampled", "full"])
    k: int = _field(10, lo=1)
    sampled_negatives: int = _field(99, lo=1)
    every: int = _field(10, lo=1)
    select_protocol: str = _field("sampled", choices=("sampled", "full"))
    select_metric: str = _field("ndcg@10", choices=("hr@10", "ndcg@10", "mrr"))


@dataclass
class GossipConfig:
    """Who talks to whom each round.

    ``topology`` is a spec (``small-world``, ``ring:...``, ``edge-hierarchy:m=30``) or a
    topology file. ``mixing``: ``metropolis`` (static Metropolis-Hastings weights on the
    topology), ``peers`` (each round every node pushes to ``peers`` random nodes, as in
    Epidemic Learning), ``matching`` (a random matching over the topology's edges) or
    ``hypercube`` (one partner per exchange, the pairs of a hypercube's dimension in turn,
    :class:`p2prec.gossip.rounds.FlatMixing`).

    ``codec`` compresses what is sent: ``none`` (float32), ``fp16``, ``bf16``, ``int8``,
    ``int4``, ``topk`` or a pipeline such as ``topk+int8`` (see :mod:`p2prec.gossip.codecs`,
    which checks the name: the schema names codecs without importing them, since gossip sits above it);
    ``topk_fraction`` is the share of entries top-k keeps and ``quant_block`` the number of
    entries that share one scale in the integer quantisers, int8 and int4 (0: one scale per tensor).
    ``wire_names``: payload tensors travel under their ``peft`` names or, with ``index``, numbered
    with a digest of the layout (4.4 KB less per message of the default adapter; :mod:`p2prec.gossip.codecs`).

    ``tracking`` (the default) gossips, with the shared adapter, each node's tracker of the
    network's average gradient, and steps the shared adapter along it
    (:mod:`p2prec.learn.tracking`); messages are twice as large. Measured on ML-100K
    small-world: validation NDCG@10 0.446 with it, 0.430 without (docs/experiments.md, "Gradient tracking").
    ``tracking_fraction`` < 1 lets only that seeded share of the nodes fold a fresh gradient
    into its tracker each round: partial participation, which gives the shared step
    mini-batch noise (:func:`p2prec.learn.tracking.participation`; at 0.1 it lowered
    ML-100K small-world test NDCG@10 from 0.409 to 0.398).
    ``tracking_weight`` is what each node's gradient counts for in the tracked average:
    ``samples`` (the default: in proportion to the node's training interactions, the
    weighting FedAvg's server average applies; :func:`p2prec.learn.tracking.gradient_weights`)
    or ``node`` (every node alike). Where an aggregator averages the nodes (edge hierarchy,
    FedAvg server) its count weights already do this, and the key is not applied again.
    Measured on ML-100K small-world: validation NDCG@10 0.481 with ``samples``, 0.471 with ``node``.
    ``exchanges`` is how many times a round's mixing is repeated after the local update
    (multi-consensus gradient tracking): each exchange sends the state the previous one
    produced, so ``k`` exchanges mix with about the ``k``-th power of the round's matrix and
    cost ``k`` times the bytes. Measured on ML-100K small-world (``sim/tracking/``): validation NDCG@10
    0.481 with one exchange, 0.487 with two (the default), 0.487 with three.
    ``mode``: ``sync`` (rounds with a barrier or a deadline) or ``async`` (no rounds: each node
    trains, sends and mixes the freshest state it holds from each neighbour on its own clock;
    :mod:`p2prec.gossip.async_rule`, which also says what async mode requires). A held state
    is mixed in at most ``max_staleness`` of the receiver's own updates after it arrived.
    """

    topology: str = "small-world"
    mixing: str = _field("metropolis", choices=("metropolis", "peers", "matching", "hypercube"))
    peers: int = _field(2, lo=1)
    codec: str = "none"
    topk_fraction: float = _field(0.1, lo=1e-6, hi=1.0)
    quant_block: int = _field(0, lo=0)
    tracking: bool = True
    tracking_fraction: float = _field(1.0, lo=1e-3, hi=1.0)
    tracking_weight: str = _field("samples", choices=("node", "samples"))
    exchanges: int = _field(2, lo=1, hi=MAX_EXCHANGES)
    mode: str = _field("sync", choices=("sync", "async"))
    max_staleness: int = _field(16, lo=1)
    wire_names: str = _field("peft", choices=("peft", "index"))


@dataclass
class SimConfig:
    """The simulator's own knobs: node subsampling, chunking, seeded faults, attacks and joiners.

    Real nodes ignore this section; what a run is (rounds, method, seed) lives in ``[run]``.
    ``down`` lists scheduled outages as ``"FIRST-LAST:NODE,NODE"`` (inclusive rounds).
    Stragglers' updates arrive one round late (``straggler_mode = "late"``) or never (``"lost"``).
    ``byzantine`` nodes (a count if >= 1, else a fraction of the nodes) send ``attack``
    instead of their state, with ``attack_scale`` as its size (see :mod:`p2prec.sim.attacks`).
    ``join`` lists late joiners as ``"ROUND:COUNT"`` or ``"ROUND:PERCENT%"`` (``"100:5%"``):
    those nodes are absent until that round, then start from one present neighbour's shared
    adapter (``join_mode = "neighbour"``) or from a fresh one (``"zero"``, for comparison), or
    are present from round 1 and only measured as a cohort (``"present"``, the control arm);
    they are evaluated every round for ``join_window`` rounds after joining (``join.jsonl``,
    see :mod:`p2prec.sim.plan`).
    ``backend`` picks the engine (:mod:`p2prec.sim.backend`): ``local`` (one process), or the
    population split into ``shards`` blocks (0: two) run in this process (``shards``) or on
    Ray actors (``ray``, at ``ray_address`` or on a local instance). ``device`` is where the
    local engine's tensors live: ``auto`` (CUDA when present, else the CPU), ``cpu`` or ``cuda``.
    Simulated time (:mod:`p2prec.sim.clock`), in units of a median node's local update: node
    speeds are log-normal with ``speed_sigma``, a ``slow`` fraction of nodes is 10x slower, each
    link's latency is about ``latency``. A sync round waits for everyone, or with ``deadline``
    > 0 lasts that long and a node whose update takes longer trains only in the rounds its
    update completes. With ``gossip.mode = "async"``, ``rounds`` is the simulated time to run.
    """

    nodes: int = _field(0, lo=0)
    chunk: int = _field(128, lo=1)
    drop_prob: float = _field(0.0, lo=0.0, hi=1.0)
    churn: float = _field(0.0, lo=0.0, hi=1.0)
    down: list = _field([])
    stragglers: float = _field(0.0, lo=0.0, hi=1.0)
    straggler_mode: str = _field("late", choices=("late", "lost"))
    byzantine: float = _field(0.0, lo=0.0)
    attack: str = _field("none", choices=("none", "sign-flip", "noise", "constant"))
    attack_scale: float = 1.0
    join: list = _field([])
    join_mode: str = _field("neighbour", choices=("neighbour", "zero", "present"))
    join_window: int = _field(20, lo=0)
    backend: str = _field("local", choices=("local", "shards", "ray"))
    shards: int = _field(0, lo=0)
    ray_address: str = ""
    device: str = _field("auto", choices=("auto", "cpu", "cuda"))
    slow: float = _field(0.0, lo=0.0, hi=1.0)
    speed_sigma: float = _field(0.25, lo=0.0, hi=3.0)
    latency: float = _field(0.2, lo=0.0)
    deadline: float = _field(0.0, lo=0.0)


@dataclass
class NodeConfig:
    """One real node's runtime (``p2prec-node``): where it keeps state, how long it waits, its sockets.

    Rounds, the seed, training and evaluation come from the same ``[run]``, ``[train]`` and
    ``[eval]`` keys the simulator reads, so a study switches between simulated and real
    networking without translating anything. ``deadline_s`` bounds one exchange (a client
    of an edge aggregator waits for up to three: up, across, down); ``start_timeout_s``
    bounds the wait for neighbours that are still starting. Messages for up to
    ``future_rounds`` rounds ahead are buffered; later ones are dropped. ``bind`` overrides
    the endpoint the node binds (default: its topology ``address``), e.g. ``tcp://*:5555``.
    Why 15 s: a crashed neighbour costs one deadline, and the longest wait measured for a
    live one was 5.6 s (four real ML-100K nodes of 188 users, 240 node-rounds, two cores at
    load 14; median 0.1 s), where a node's local update took 0.1-0.2 s.
    Refused messages and handshakes are logged once per peer and reason, then summarised
    every ``summary_s`` seconds (:mod:`p2prec.node.rejections`). Relative paths in a node's
    config file (``dir``, ``gossip.topology``, ``data.dir``, the security keys) are read
    from the config file's folder.
    ``slowdown`` (a test knob, 1 = off) makes the node that many times slower: after each local
    update it idles (slowdown - 1) times the update's duration.
    """

    dir: str = "node-state"
    bind: str = ""
    deadline_s: float = _field(15.0, lo=0.01)
    start_timeout_s: float = _field(120.0, lo=0.0)
    future_rounds: int = _field(2, lo=0, hi=64)
    hwm: int = _field(64, lo=1)
    linger_ms: int = _field(1000, lo=0)
    summary_s: float = _field(30.0, lo=0.01)
    slowdown: float = _field(1.0, lo=1.0)


@dataclass
class PrivacyConfig:
    """Local differential privacy of the shared update (see :mod:`p2prec.gossip.privacy`).

    Each round's update is clipped to L2 norm ``clip`` and gets Gaussian noise of std
    ``noise_multiplier * clip``. ``target_epsilon`` > 0 replaces ``noise_multiplier`` by
    the noise that reaches that epsilon at ``delta`` after all rounds.

    Where the noise comes from: a real node draws it from the operating system's randomness,
    which no one else can regenerate. ``run.seed`` keys the simulator's noise, which is seeded so
    that a simulated study reproduces; a real node uses it only with ``seeded_noise = true``,
    a reproducibility switch for comparing real nodes with the simulator. Seeded noise gives
    no privacy: anyone holding this shared config regenerates it and subtracts it.
    """

    enabled: bool = False
    clip: float = _field(1.0, lo=1e-12)
    noise_multiplier: float = _field(1.0, lo=0.0)
    target_epsilon: float = _field(0.0, lo=0.0)
    delta: float = _field(1e-5, lo=1e-300, hi=0.5)
    seeded_noise: bool = False


ROBUST_RULES = ("mean", "median", "trimmed-mean", "clipped", "clipped-adaptive")
"""The aggregation rules :mod:`p2prec.gossip.robust` implements, by name."""


@dataclass
class RobustConfig:
    """The aggregation rule (see :mod:`p2prec.gossip.robust`): ``trim`` is the trimmed
    mean's fraction cut at each end, ``tau`` ClippedGossip's clipping radius (``clipped``) or
    that radius as a multiple of each node's median neighbour distance (``clipped-adaptive``).
    ``tracker_rule`` aggregates gradient tracking's trackers; ``same`` applies ``rule`` to them
    too, aggregated together with the adapter as one vector.

    ``norm_bound`` applies before any rule, in the simulator and in real nodes alike: a
    received state whose shared adapter's L2 norm exceeds ``norm_bound`` times the median of
    that norm over the node's own and received states is dropped, as if it had not arrived
    (:func:`p2prec.gossip.robust.within_norm_bound`); 0 turns the check off. Honest states
    of one network share a scale, so the default never drops one in a clean run, while an
    outrageous one (an adapter filled with 50.0) cannot move a node at all. With
    ``quarantine`` (the default) a link whose message was dropped stays cut for the rest of
    the run, which keeps gradient tracking exact (:class:`p2prec.gossip.robust.NormBound`)."""

    rule: str = _field("mean", choices=ROBUST_RULES)
    tracker_rule: str = _field("same", choices=("same", *ROBUST_RULES))
    trim: float = _field(0.1, lo=0.0, hi=0.49)
    tau: float = _field(1.0, lo=1e-12)
    norm_bound: float = _field(3.0, lo=0.0)
    quarantine: bool = True


@dataclass
class SecurityConfig:
    """CurveZMQ for real nodes (see :mod:`p2prec.node.security`). When ``enabled``, a node
    reads its keypair from ``secret_key``, or ``key_dir/node<id>.key_secret``, and its
    peers' public keys from the topology file; it refuses to start without them."""

    enabled: bool = False
    key_dir: str = ""
    secret_key: str = ""


@dataclass
class Config:
    """The whole configuration; sections mirror the TOML tables."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    node: NodeConfig = field(default_factory=NodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or name the key in an error."""
    origin = get_origin(kind) or kind
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if origin is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if origin is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


MOVED = {
    "sim.rounds": "run.rounds", "sim.train_rounds": "run.train_rounds", "sim.baseline": "run.method",
    "gossip.int8_block": "gossip.quant_block",
    **{f"{section}.seed": "run.seed" for section in ("sim", "gossip", "train", "eval", "pretrain", "adapter", "privacy")},
    "data.split_seed": "run.seed",
}
"""Keys of earlier versions and where they live now: named in the error, never read as aliases."""


def _apply_section(section_name: str, section: Any, values: dict[str, Any]) -> None:
    hints = get_type_hints(type(section))
    known = {f.name: f for f in fields(section)}
    for key, value in values.items():
        full = f"{section_name}.{key}"
        if full in MOVED:
            raise ConfigError(f"unknown config key '{full}': it is now '{MOVED[full]}'")
        if key not in known:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(known))})")
        setattr(section, key, _coerce(full, value, hints[key]))


def validate(cfg: Config) -> Config:
    """Check every bounded or enumerated field; raise :class:`ConfigError` naming the key."""
    for sec_field in fields(cfg):
        section = getattr(cfg, sec_field.name)
        for f in fields(section):
            value = getattr(section, f.name)
            meta = f.metadata
            key = f"{sec_field.name}.{f.name}"
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
            if meta.get("lo") is not None and value < meta["lo"]:
                raise ConfigError(f"{key}: {value!r} is below the minimum {meta['lo']}")
            if meta.get("hi") is not None and value > meta["hi"]:
                raise ConfigError(f"{key}: {value!r} is above the maximum {meta['hi']}")
    if cfg.model.hidden % cfg.model.heads:
        raise ConfigError(f"model.hidden: {cfg.model.hidden} is not divisible by model.heads={cfg.model.heads}")
    bad = [p for p in cfg.eval.protocols if p not in ("sampled", "full")]
    if bad or not cfg.eval.protocols:
        raise ConfigError(f"eval.protocols: {cfg.eval.protocols!r} must be a non-empty subset of sampled, full")
    if cfg.eval.select_protocol not in cfg.eval.protocols:
        raise ConfigError(f"eval.select_protocol: {cfg.eval.select_protocol!r} is not in eval.protocols")
    _validate_trust(cfg)
    return cfg


def _validate_trust(cfg: Config) -> None:
    """Cross-field checks of the Byzantine and security settings."""
    if cfg.sim.byzantine >= 1 and not float(cfg.sim.byzantine).is_integer():
        raise ConfigError(f"sim.byzantine: {cfg.sim.byzantine!r} must be a whole count (>= 1) or a fraction (< 1)")
    # security.enabled without key_dir or secret_key is complete for the launcher, which makes
    # the keys; a node without them refuses to start (p2prec.node.security.secret_key_path).


def parse_override(text: str) -> tuple[str, str, str]:
    """Split ``section.key=value`` into its parts, or say what is wrong with it."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, value = text.split("=", 1)
    if path.count(".") != 1:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    section, key = path.split(".")
    return section.strip(), key.strip(), value.strip()


def merge(cfg: Config, values: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested ``{section: {key: value}}`` mapping onto ``cfg`` in place."""
    sections = {f.name for f in fields(cfg)}
    for name, section_values in values.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown config section '{name}' (known: {', '.join(sorted(sections))})")
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: '{name}' must be a table of keys")
        _apply_section(name, getattr(cfg, name), section_values)
    return cfg


def _read(p: Path) -> dict[str, Any]:
    """The values of the TOML file ``p``, or a :class:`ConfigError` naming it."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         defaults: Callable[[], Config] = Config) -> Config:
    """Build a validated config: defaults, then the TOML file, then ``--set`` overrides."""
    cfg = defaults()
    if path is not None:
        merge(cfg, _read(Path(path)), source=str(path))
    for text in overrides or []:
        section, key, value = parse_override(text)
        merge(cfg, {section: {key: value}}, source=f"--set {text}")
    return validate(cfg)
