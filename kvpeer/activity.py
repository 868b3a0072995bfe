"""What the daemon served, summed up for the log once a minute.

One INFO line per request floods the journal at an engine's rates (a busy node answers
hundreds of lookups and fetches a second; journald keeps ~333 lines/s by default, so the one
ERROR that matters could be dropped). Requests are logged at DEBUG, and this keeps the counts
for one INFO line per interval with anything in it. The fetcher's own events (chunks retried
or restarted, peers lost: also DEBUG one by one) are read from its counters, and the line says
how much each grew.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable, Mapping


class Activity:
    """Counts of fetches (by outcome), puts and chunks served to peers since the last
    :meth:`take_summary`.

    ``events``: counters that only grow (the fetcher's, since start); each summary says how much
    they grew since the previous one.
    """

    LATENCY_SAMPLES = 4096  # the latest fetch times kept for the percentiles

    def __init__(self, events: Callable[[], Mapping[str, int]] | None = None) -> None:
        self._events = events
        self._events_seen: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self.fetches: collections.Counter[str] = collections.Counter()
        self.seconds: collections.deque[float] = collections.deque(maxlen=self.LATENCY_SAMPLES)
        self.wire_bytes = 0
        self.puts = 0
        self.put_chunks = 0
        self.put_stored = 0
        self.served_chunks = 0
        self.served_bytes = 0
        self.served_to: set[str] = set()

    def fetch(self, outcome: str, seconds: float, wire_bytes: int = 0) -> None:
        """One fetch ended: ``outcome`` is its reason ("complete", "recompute", "miss",
        "cancelled", ...); ``seconds`` from the request's arrival."""
        self.fetches[outcome] += 1
        self.seconds.append(seconds)
        self.wire_bytes += wire_bytes

    def put(self, chunks: int, stored: int) -> None:
        self.puts += 1
        self.put_chunks += chunks
        self.put_stored += stored

    def served(self, peer: str, nbytes: int) -> None:
        """A chunk of ``nbytes`` reached ``peer`` whole (a node serving others logged nothing)."""
        self.served_chunks += 1
        self.served_bytes += nbytes
        if len(self.served_to) < 1024:  # a count for the line, bounded
            self.served_to.add(peer)

    def take_summary(self, interval_s: float) -> str | None:
        """The line for the interval just ended (None if nothing happened); counts restart."""
        fetches = sum(self.fetches.values())
        grown = self._events_grown()
        if not fetches and not self.puts and not self.served_chunks and not grown:
            return None
        parts = [f"last {interval_s:.0f} s:"]
        if fetches:
            outcomes = ", ".join(f"{name} {count}" for name, count in sorted(self.fetches.items()))
            times = sorted(self.seconds)
            p50 = statistics.median(times)
            p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
            parts.append(
                f"{fetches} fetches ({outcomes}), {self.wire_bytes / 1e6:.1f} MB from peers, "
                f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms;"
            )
        if self.puts:
            parts.append(f"{self.puts} puts, {self.put_stored} of {self.put_chunks} chunks new;")
        if self.served_chunks:
            peers = len(self.served_to)
            parts.append(
                f"served {self.served_chunks} chunks, {self.served_bytes / 1e6:.1f} MB, to "
                f"{peers} peer{'s' if peers != 1 else ''};"
            )
        if grown:
            events = ", ".join(f"{name} {count}" for name, count in sorted(grown.items()))
            parts.append(f"fetcher: {events}")
        self._reset()
        return " ".join(parts).rstrip(";")

    def _events_grown(self) -> dict[str, int]:
        if self._events is None:
            return {}
        now = {str(name): int(count) for name, count in dict(self._events()).items()}
        grown = {n: c - self._events_seen.get(n, 0) for n, c in now.items() if c > self._events_seen.get(n, 0)}
        self._events_seen = now
        return grown
