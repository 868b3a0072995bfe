"""Sans-IO liveness and bandwidth/RTT estimation, driven by a fake clock."""

from __future__ import annotations

import pytest

from kvpeer.transport.estimator import BandwidthEstimator
from kvpeer.transport.liveness import Liveness


def test_liveness_pings_and_declares_death() -> None:
    live = Liveness(interval_s=0.5, dead_after_s=2.0, now=0.0)
    assert live.ping_due(0.0)
    live.next_ping(0.0)
    assert not live.ping_due(0.2)
    assert live.next_deadline(0.2) == pytest.approx(0.5)
    live.heard(1.9)
    assert not live.dead(3.8)
    assert live.dead(3.95)
    assert live.pong(sent=1.0, now=1.02) == pytest.approx(0.02)
    assert live.rtt_s == pytest.approx(0.02)


def test_bandwidth_counts_busy_time_only() -> None:
    est = BandwidthEstimator(alpha=1.0, min_sample_s=0.01, min_sample_bytes=1000)
    assert est.bandwidth_bps(0.0) is None
    est.transfer_started(0.0)
    for i in range(1, 11):
        est.on_bytes(125_000, i * 0.1)  # 1.25 MB/s = 10 Mbit/s
    est.transfer_finished(1.0)
    assert est.bandwidth_bps(1.0) == pytest.approx(10e6)
    # A long idle gap, then the same rate again: the estimate is not diluted.
    est.transfer_started(100.0)
    for i in range(1, 11):
        est.on_bytes(125_000, 100.0 + i * 0.1)
    est.transfer_finished(101.0)
    assert est.bandwidth_bps(101.0) == pytest.approx(10e6)
    assert est.bandwidth_bps(200.0) is None  # stale


def test_bandwidth_smooths_and_rtt() -> None:
    est = BandwidthEstimator(alpha=0.5, min_sample_s=0.01, min_sample_bytes=1)
    est.transfer_started(0.0)
    est.on_bytes(1000, 1.0)  # 8 kbit/s
    est.on_bytes(3000, 2.0)  # 24 kbit/s
    assert est.bandwidth_bps(2.0) == pytest.approx(16_000)
    est.on_rtt(0.010)
    est.on_rtt(0.018)
    assert est.rtt_s == pytest.approx(0.011)
