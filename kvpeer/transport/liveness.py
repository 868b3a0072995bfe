"""Heartbeat bookkeeping of one peer session: when to ping, when the peer counts as dead, RTT.

Sans-IO: every method takes ``now`` (seconds, any monotonic clock). Any message from the peer
counts as a sign of life, so a busy session needs no extra pings to stay alive.
"""

from __future__ import annotations


class Liveness:
    def __init__(self, *, interval_s: float, dead_after_s: float, now: float) -> None:
        if not 0 < interval_s < dead_after_s:
            raise ValueError("need 0 < interval_s < dead_after_s")
        self.interval_s = interval_s
        self.dead_after_s = dead_after_s
        self._last_heard = now
        self._last_ping = float("-inf")
        self._seq = 0
        self.rtt_s: float | None = None

    def heard(self, now: float) -> None:
        """Anything arrived from the peer."""
        self._last_heard = max(self._last_heard, now)

    def ping_due(self, now: float) -> bool:
        return now - self._last_ping >= self.interval_s

    def next_ping(self, now: float) -> int:
        """Sequence number of the ping sent at *now*."""
        self._last_ping = now
        self._seq += 1
        return self._seq

    def pong(self, sent: float, now: float) -> float:
        """Record the RTT of a pong echoing *sent*; returns the sample."""
        sample = max(0.0, now - sent)
        # RFC 6298-style smoothing: one late pong must not swing the estimate.
        self.rtt_s = sample if self.rtt_s is None else 0.875 * self.rtt_s + 0.125 * sample
        return sample

    def dead(self, now: float) -> bool:
        return now - self._last_heard > self.dead_after_s

    def next_deadline(self, now: float) -> float:
        """When to look again: the next ping or the death deadline, whichever comes first."""
        return min(self._last_ping + self.interval_s, self._last_heard + self.dead_after_s)
