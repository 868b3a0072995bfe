"""What the daemon served, summed up for the log once a minute.

One INFO line per request floods the journal at an engine's rates (a busy node answers
hundreds of lookups and fetches a second; journald keeps ~333 lines/s by default, so the one
ERROR that matters could be dropped). Requests are logged at DEBUG, and this keeps the counts
for one INFO line per interval with anything in it.
"""

from __future__ import annotations

import collections
import statistics


class Activity:
    """Counts of fetches (by outcome) and puts since the last :meth:`take_summary`."""

    LATENCY_SAMPLES = 4096  # the latest fetch times kept for the percentiles

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.fetches: collections.Counter[str] = collections.Counter()
        self.seconds: collections.deque[float] = collections.deque(maxlen=self.LATENCY_SAMPLES)
        self.wire_bytes = 0
        self.puts = 0
        self.put_chunks = 0
        self.put_stored = 0

    def fetch(self, outcome: str, seconds: float, wire_bytes: int = 0) -> None:
        """One fetch ended: ``outcome`` is its reason ("complete", "recompute", "miss", ...)."""
        self.fetches[outcome] += 1
        self.seconds.append(seconds)
        self.wire_bytes += wire_bytes

    def put(self, chunks: int, stored: int) -> None:
        self.puts += 1
        self.put_chunks += chunks
        self.put_stored += stored

    def take_summary(self, interval_s: float) -> str | None:
        """The line for the interval just ended (None if nothing happened); counts restart."""
        fetches = sum(self.fetches.values())
        if not fetches and not self.puts:
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
            parts.append(f"{self.puts} puts, {self.put_stored} of {self.put_chunks} chunks new")
        self._reset()
        return " ".join(parts).rstrip(";")
