"""Per-peer bandwidth and RTT estimation: what the fetcher's resolution controller reads.

Sans-IO. Time only counts while at least one transfer from the peer is in flight ("busy
time"), so idle gaps between fetches do not dilute the estimate; delivered bytes over busy
time gives one sample every ``min_sample_s`` / ``min_sample_bytes``, smoothed with an EWMA.
The estimate is what a fetch actually gets from this peer (request latency included), which
is what choosing a chunk's level needs.
"""

from __future__ import annotations


class BandwidthEstimator:
    def __init__(
        self,
        *,
        alpha: float = 0.3,
        min_sample_s: float = 0.05,
        min_sample_bytes: int = 256 * 1024,
        stale_after_s: float = 30.0,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.min_sample_s = min_sample_s
        self.min_sample_bytes = min_sample_bytes
        self.stale_after_s = stale_after_s
        self._active = 0
        self._mark = 0.0  # start of the busy time not yet accounted
        self._busy_s = 0.0
        self._bytes = 0
        self._bps: float | None = None
        self._updated_at: float | None = None
        self.rtt_s: float | None = None
        self.total_bytes = 0

    def transfer_started(self, now: float) -> None:
        if self._active == 0:
            self._mark = now
        self._active += 1

    def transfer_finished(self, now: float) -> None:
        if self._active == 0:
            return
        self._accrue(now)
        self._active -= 1
        self._maybe_sample(now)

    def on_bytes(self, nbytes: int, now: float) -> None:
        """*nbytes* delivered by the peer at *now* (count payload as it arrives)."""
        self.total_bytes += nbytes
        if self._active == 0:
            return  # not part of a measured transfer
        self._bytes += nbytes
        self._accrue(now)
        self._maybe_sample(now)

    def on_rtt(self, sample_s: float) -> None:
        self.rtt_s = sample_s if self.rtt_s is None else 0.875 * self.rtt_s + 0.125 * sample_s

    def bandwidth_bps(self, now: float) -> float | None:
        """Smoothed goodput in bits per second; None before the first sample or when stale."""
        if self._bps is None or self._updated_at is None:
            return None
        if now - self._updated_at > self.stale_after_s:
            return None
        return self._bps

    def _accrue(self, now: float) -> None:
        if self._active and now > self._mark:
            self._busy_s += now - self._mark
        self._mark = max(self._mark, now)

    def _maybe_sample(self, now: float) -> None:
        if self._busy_s < self.min_sample_s or self._bytes < self.min_sample_bytes:
            return
        sample = self._bytes * 8 / self._busy_s
        self._bps = (
            sample if self._bps is None else (1 - self.alpha) * self._bps + self.alpha * sample
        )
        self._updated_at = now
        self._bytes = 0
        self._busy_s = 0.0
