"""Wire format throughput, measured side by side with its two references in one run.

For each payload size, one thread pushes a message through a PUSH/PULL pair on
tcp://127.0.0.1 and pulls it back before sending the next, so every method pays the
same per-message round trip and the numbers differ only by what each method does:

* ours:   ``encode`` + multipart send + ``validate_and_decode`` (all checks, NaN scan)
* pickle: pickle protocol 5 with out-of-band buffers, no checks; the fast reference,
          banned on the wire because unpickling runs code
* raw:    the same bytes as one frame viewed with ``np.frombuffer``; the physical limit

Run: ``python benchmarks/bench_wire.py``. Exits 1 if a bar the project set is missed.
"""

from __future__ import annotations

import os
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from p2prec.wire import Message, MessageType, WireSpec, encode, validate_and_decode

SIZES = {
    "16 KB": (16_000, 16, 1000),
    "100 KB": (100_000, 64, 400),
    "1 MB": (1_000_000, 256, 100),
    "16 MB": (16_000_000, 1024, 8),
}
"""Label -> (target payload bytes, hidden size, messages per repeat). 16 KB is the real
ML-100K adapter (DESIGN section 6); the bars are set at 100 KB, 1 MB and 16 MB."""
REPEATS = 15
RANK = 8
HWM = 64


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
    def once() -> object:
        link.push.send_multipart(encode(msg), copy=False)
        return validate_and_decode(link.pull.recv_multipart(copy=False), spec)

    return once


def pickled(link: Loopback, msg: Message) -> Callable[[], object]:
    def once() -> object:
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
        link.push.send_multipart([head, *(b.raw() for b in buffers)], copy=False)
        frames = link.pull.recv_multipart(copy=False)
        return pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])

    return once


def raw(link: Loopback, flat: np.ndarray) -> Callable[[], object]:
    def once() -> object:
        link.push.send(flat, copy=False)
        return np.frombuffer(link.pull.recv(copy=False).buffer, dtype=np.float32)

    return once


def median_rates(methods: list[Callable[[], object]], nbytes: int, count: int) -> list[float]:
    """Median over repeats of payload megabytes (1e6 bytes) per second, per method.

    The methods take turns within each repeat, so load from other processes on the
    machine hits them alike instead of skewing whichever ran at a bad moment.
    """
    for once in methods:
        once()  # connect and warm up outside the clock
    rates: list[list[float]] = [[] for _ in methods]
    for _ in range(REPEATS):
        for once, samples in zip(methods, rates):
            start = time.perf_counter()
            for _ in range(count):
                once()
            samples.append(nbytes * count / (time.perf_counter() - start) / 1e6)
    return [statistics.median(samples) for samples in rates]


def main() -> int:
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
            wire = sum(len(f) for f in frames) / nbytes
            rates = median_rates([ours(link, msg, spec), pickled(link, msg), raw(link, flat)], nbytes, count)
            rows[label] = (nbytes, len(tensors), len(frames), *rates, wire)
    finally:
        link.close()
        ctx.term()

    print(f"lockstep PUSH/PULL on tcp://127.0.0.1, median of {REPEATS}; load average {os.getloadavg()[0]:.1f}"
          f" on {os.cpu_count()} CPUs")
    print(f"{'payload':>8} {'tensors':>7} {'frames':>6} {'ours MB/s':>10} {'pickle MB/s':>11} {'raw MB/s':>9}"
          f" {'ours/pickle':>11} {'ours/raw':>8} {'wire/raw':>8}")
    for label, (nbytes, n, f, ours_r, pickle_r, raw_r, wire) in rows.items():
        print(f"{label:>8} {n:>7} {f:>6} {ours_r:>10.0f} {pickle_r:>11.0f} {raw_r:>9.0f}"
              f" {ours_r / pickle_r:>11.2f} {ours_r / raw_r:>8.2f} {wire:>8.4f}")

    bars = [(f"ours >= 0.9x pickle at {label}", r[3] >= 0.9 * r[4]) for label, r in rows.items()]
    one_mb = rows["1 MB"]
    bars += [("ours >= 0.8x raw frame at 1 MB", one_mb[3] >= 0.8 * one_mb[5]),
             ("bytes on wire / raw <= 1.01 at 1 MB", one_mb[6] <= 1.01)]
    for name, ok in bars:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in bars) else 1


if __name__ == "__main__":
    raise SystemExit(main())
