"""Wire format throughput, measured side by side with its references in one run.

For each payload size, one thread pushes a message through a PUSH/PULL pair on
tcp://127.0.0.1 and pulls it back before sending the next, so every method pays the
same per-message round trip and the numbers differ only by what each method does:

* ours:     ``encode`` + multipart send + ``validate_and_decode`` (every check, NaN scan),
            with one WireSpec kept across messages as a node keeps it, so the sender's
            unchanging tensor table is recognised by its bytes after the first message
* pickle:   pickle protocol 5 with out-of-band buffers sent as frames, no checks; the
            fast reference, banned on the wire because unpickling runs code
* raw:      the same bytes as one frame viewed with ``np.frombuffer``; the physical limit
* raw+scan: the raw frame plus the NaN/Inf scan ours runs (:mod:`p2prec.wire.finite`)

A throughput bar's "ceiling" is raw+scan's ratio to the same reference: a receiver that
rejects NaN and Inf must read every float, and raw+scan does only that, with no
encoder, no header, no checks and one frame. No implementation keeping the rule can
beat it by more than noise; the gap between ours and the ceiling is what ours adds.

Each trial times every method in turn, in an order rotated from trial to trial, so load
from other processes hits them alike; a ratio is the median over trials of the ratio
within one trial, and MB/s (1e6 payload bytes per second) the median over trials.

Run: ``python benchmarks/bench_wire.py [--trials N] [--check]``; ``--check`` exits 1 when
one of the wire format's bars (:func:`bars`) is missed.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from p2prec.wire import Message, MessageType, WireSpec, encode, validate_and_decode
from p2prec.wire.finite import first_non_finite

SIZES = {
    "16 KB": (16_000, 16, 400),
    "100 KB": (100_000, 64, 200),
    "1 MB": (1_000_000, 256, 40),
    "16 MB": (16_000_000, 1024, 4),
}
"""Label -> (target payload bytes, hidden size, messages per method per trial). 16 KB is
the real ML-100K adapter without its tracker (docs/design.md, section 6); the bars are set at
the larger sizes, and the pickle bar is held at 16 KB too."""
METHODS = ("ours", "pickle", "raw", "raw+scan")
RANK = 8
HWM = 64
WARMUP = 3
"""Untimed messages per method and size: connects the sockets, fills allocator caches."""


def adapter_tensors(target_bytes: int, hidden: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A shared LoRA adapter's tensors: query/value A and B for two layers plus the item
    embedding's A and B, with the item count chosen so the total is about ``target_bytes``."""
    shapes = {
        f"layer{layer}.{proj}.lora_{ab}": (RANK, hidden) if ab == "A" else (hidden, RANK)
        for layer in range(2)
        for proj in ("query", "value")
        for ab in ("A", "B")
    }
    shapes["item_emb.lora_B"] = (hidden, RANK)
    fixed = sum(a * b for a, b in shapes.values()) * 4
    shapes["item_emb.lora_A"] = (RANK, max(1, (target_bytes - fixed) // (4 * RANK)))
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


@dataclass
class Loopback:
    """A PUSH/PULL pair on a random loopback port; bounded queues, no lingering."""

    push: zmq.Socket
    pull: zmq.Socket

    @classmethod
    def open(cls, ctx: zmq.Context) -> Loopback:
        pull = ctx.socket(zmq.PULL)
        push = ctx.socket(zmq.PUSH)
        for sock in (pull, push):
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = HWM
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        return cls(push, pull)

    def close(self) -> None:
        self.push.close()
        self.pull.close()


def ours(link: Loopback, msg: Message, spec: WireSpec) -> Callable[[], object]:
    """One message through the wire format, validated as a receiving node would."""

    def once() -> object:
        link.push.send_multipart(encode(msg), copy=False)
        return validate_and_decode(link.pull.recv_multipart(copy=False), spec)

    return once


def pickled(link: Loopback, msg: Message) -> Callable[[], object]:
    """The same message pickled, its arrays out of band as zero-copy frames, unchecked."""

    def once() -> object:
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
        link.push.send_multipart([head, *(b.raw() for b in buffers)], copy=False)
        frames = link.pull.recv_multipart(copy=False)
        return pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])

    return once


def raw(link: Loopback, flat: np.ndarray, scan: bool) -> Callable[[], object]:
    """The payload's bytes as one frame, optionally scanned for NaN and Inf like ours."""
    run = [("float32", 0, 0, flat.nbytes)]

    def once() -> object:
        link.push.send(flat, copy=False)
        view = link.pull.recv(copy=False).buffer
        if scan and first_non_finite([view], run) is not None:
            raise AssertionError("the benchmark payload is finite")
        return np.frombuffer(view, dtype=np.float32)

    return once


def measure(methods: list[Callable[[], object]], nbytes: int, count: int, trials: int) -> list[list[float]]:
    """Per method, payload MB/s in each trial; trial ``t`` runs the methods rotated by ``t``."""
    for once in methods:
        for _ in range(WARMUP):
            once()
    rates: list[list[float]] = [[] for _ in methods]
    for trial in range(trials):
        for i in range(len(methods)):
            index = (i + trial) % len(methods)
            once = methods[index]
            start = time.perf_counter()
            for _ in range(count):
                once()
            rates[index].append(nbytes * count / (time.perf_counter() - start) / 1e6)
    return rates


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over trials of the within-trial ratio, so drifting load cancels out."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


@dataclass
class Row:
    """One payload size: what ours sends, and every method's MB/s in every trial."""

    nbytes: int
    tensors: int
    frames: int
    wire_ratio: float
    """Bytes ours puts on the wire, header included, over the raw tensor bytes."""
    rates: dict[str, list[float]]

    def mbps(self, method: str) -> float:
        return statistics.median(self.rates[method])

    def ratio(self, method: str, reference: str) -> float:
        return paired_ratio(self.rates[method], self.rates[reference])

    def ceiling(self, reference: str) -> float:
        """The best ratio to ``reference`` that a receiver rejecting NaN and Inf can reach."""
        return self.ratio("raw+scan", reference)


def run(trials: int) -> dict[str, Row]:
    rng = np.random.default_rng(0)
    ctx = zmq.Context()
    link = Loopback.open(ctx)
    rows = {}
    try:
        for label, (target, hidden, count) in SIZES.items():
            tensors = adapter_tensors(target, hidden, rng)
            nbytes = sum(a.nbytes for a in tensors.values())
            msg = Message(MessageType.GOSSIP, sender=1, round=1, codec="none", tensors=tensors)
            spec = WireSpec({k: v.shape for k, v in tensors.items()}, max_bytes=nbytes)
            flat = np.concatenate([a.ravel() for a in tensors.values()])
            frames = encode(msg)
            wire = sum(memoryview(f).nbytes for f in frames) / nbytes
            methods = [ours(link, msg, spec), pickled(link, msg), raw(link, flat, False), raw(link, flat, True)]
            for decode in methods[:2]:  # what is timed must also be right
                decoded = decode()
                assert isinstance(decoded, Message)
                assert all(np.array_equal(decoded.tensors[k], v) for k, v in tensors.items())
            rates = measure(methods, nbytes, count, trials)
            rows[label] = Row(nbytes, len(tensors), len(frames), wire, dict(zip(METHODS, rates)))
    finally:
        link.close()
        ctx.term()
    return rows


def bars(rows: dict[str, Row]) -> list[tuple[str, float, bool, float]]:
    """The wire format's bars as (bar, measured, passed, ceiling); the wire-size bar has none (nan).

    Why these bars: validation must cost little beside the fastest unsafe transfer (pickle,
    at least 0.9x) and beside one raw frame at 1 MB (at least 0.8x), and the header must
    stay small (at most 1% over the raw bytes). The README records which hold on 2 cores.
    """
    checks = []
    for label, row in rows.items():
        measured = row.ratio("ours", "pickle")
        checks.append((f"ours/pickle at {label} >= 0.9", measured, measured >= 0.9, row.ceiling("pickle")))
    one_mb = rows["1 MB"]
    measured = one_mb.ratio("ours", "raw")
    checks.append(("ours/raw at 1 MB >= 0.8", measured, measured >= 0.8, one_mb.ceiling("raw")))
    checks.append(("wire bytes/raw bytes at 1 MB <= 1.01", one_mb.wire_ratio, one_mb.wire_ratio <= 1.01, math.nan))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=21, help="interleaved trials per size (median taken)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a bar is missed")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = run(args.trials)

    print(f"lockstep PUSH/PULL on tcp://127.0.0.1, {args.trials} interleaved trials; load average"
          f" {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("MB/s: median over trials; ratios: median of within-trial ratios")
    print(f"{'':>8} {'':>7} {'':>6} {'MB/s':-^{8 * len(METHODS) + 2}}  {'ours/pickle':-^18} {'ours/raw':-^18}")
    print(f"{'payload':>8} {'tensors':>7} {'frames':>6} " + "".join(f" {m:>7}" for m in METHODS)
          + f"  {'ratio':>8} {'ceiling':>9} {'ratio':>8} {'ceiling':>9} {'wire/raw':>9}")
    for label, row in rows.items():
        print(f"{label:>8} {row.tensors:>7} {row.frames:>6} " + "".join(f" {row.mbps(m):>7.0f}" for m in METHODS)
              + f"  {row.ratio('ours', 'pickle'):>8.2f} {row.ceiling('pickle'):>9.2f}"
              f" {row.ratio('ours', 'raw'):>8.2f} {row.ceiling('raw'):>9.2f} {row.wire_ratio:>9.4f}")
    missed = 0
    for name, measured, ok, ceiling in bars(rows):
        missed += not ok
        context = "" if math.isnan(ceiling) else f"  (ceiling {ceiling:.2f})"
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured:.3f}{context}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
