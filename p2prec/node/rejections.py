"""Refused messages and handshakes, counted per peer and reason, logged so that a person can read them.

Why: a node under attack (or beside a misconfigured peer) refuses the same thing thousands
of times a second; one WARNING line per refusal buries everything else and fills the disk.
So the first refusal of each (peer, reason) is one WARNING line with its detail, later ones
are only counted, and every :data:`SUMMARY_S` seconds that something was refused one line
sums up the period, per peer and reason. The keys are bounded: the peer is a neighbour's id
or ``"an unknown connection"`` (a stranger cannot mint new keys by varying its claimed id),
and reasons are a fixed vocabulary. Thread-safe: the ZAP handler reports from its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter

log = logging.getLogger(__name__)

SUMMARY_S = 30.0
"""Seconds between two summaries of what was refused (only when something was)."""

UNKNOWN = "an unknown connection"


def peer_label(peer: int | str) -> str:
    return f"node {peer}" if isinstance(peer, int) else str(peer)


class Rejections:
    """Counts of refusals by (peer, reason) for the node called ``name``; see the module docstring."""

    def __init__(self, name: str, summary_s: float = SUMMARY_S) -> None:
        self.name = name
        self.summary_s = summary_s
        self.total: Counter[tuple[str, str]] = Counter()
        self._period: Counter[tuple[str, str]] = Counter()
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def count(self, peer: int | str, reason: str, detail: str = "") -> None:
        """Record one refusal; log it if its (peer, reason) is new, and the summary if one is due."""
        key = (peer_label(peer), reason)
        with self._lock:
            first = key not in self.total
            self.total[key] += 1
            self._period[key] += 1
        if first:
            log.warning("%s: refused %s from %s%s; further ones are counted and summarised every %.0f s",
                        self.name, reason, key[0], f" ({detail})" if detail else "", self.summary_s)
        self.summarise()

    def summarise(self, force: bool = False) -> None:
        """Log what was refused since the last summary, if anything was and one is due (or ``force``)."""
        now = time.monotonic()
        with self._lock:
            if not self._period or (not force and now - self._last < self.summary_s):
                return
            period, self._period = self._period, Counter()
            seconds, self._last = now - self._last, now
        parts = ", ".join(f"{n} x {reason} from {peer}" for (peer, reason), n in sorted(period.items()))
        log.warning("%s: refused in the last %.0f s: %s (%d in all)", self.name, seconds, parts, len(self))

    def __len__(self) -> int:
        with self._lock:
            return sum(self.total.values())

    async def summarise_every(self) -> None:
        """Summarise every ``summary_s`` seconds (when something was refused), until cancelled."""
        while True:
            await asyncio.sleep(self.summary_s)
            self.summarise()
