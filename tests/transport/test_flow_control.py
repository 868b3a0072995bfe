"""DrainBound: the send-buffer bound follows the measured drain rate (sans-IO)."""

from __future__ import annotations

from kvpeer.transport.session import DrainBound

MIB = 1024 * 1024


def test_bound_is_target_seconds_of_the_drain_rate() -> None:
    bound = DrainBound(ceiling=4 * MIB, target_s=0.1)
    # 12.5 MB/s (100 Mbit/s) drained for 0.2 s: 0.1 s of it is 1.25 MB.
    bound.drained(before=3_000_000, after=500_000, elapsed_s=0.2)
    assert bound.high == 1_250_000
    assert bound.low == bound.high // 2


def test_a_slower_link_shrinks_the_bound_to_the_floor() -> None:
    bound = DrainBound(ceiling=4 * MIB, target_s=0.1)
    bound.drained(before=3_000_000, after=500_000, elapsed_s=0.2)
    # The link drops to 10 Mbit/s: one drain of 0.1 s or more replaces the old rate.
    bound.drained(before=1_250_000, after=625_000, elapsed_s=0.5)
    assert bound.high == 4 * MIB // 16


def test_fast_link_is_capped_at_the_ceiling() -> None:
    bound = DrainBound(ceiling=4 * MIB, target_s=0.1)
    bound.drained(before=100 * MIB, after=MIB, elapsed_s=0.1)
    assert bound.high == 4 * MIB


def test_a_wait_that_found_the_buffer_empty_doubles_the_bound() -> None:
    bound = DrainBound(ceiling=4 * MIB, target_s=0.1)
    first = bound.high
    bound.drained(before=first, after=0, elapsed_s=0.05)
    assert bound.high == min(4 * MIB, first * 2)


def test_short_drains_move_the_rate_only_partly() -> None:
    bound = DrainBound(ceiling=64 * MIB, target_s=0.1)
    bound.drained(before=20_000_000, after=10_000_000, elapsed_s=0.1)  # 100 MB/s
    bound.drained(before=1_100_000, after=1_000_000, elapsed_s=0.01)  # 10 MB/s, briefly
    assert bound.rate is not None and 80e6 < bound.rate < 100e6


def test_without_a_target_the_fixed_marks_stay() -> None:
    bound = DrainBound(ceiling=4 * MIB, target_s=None)
    bound.drained(before=3 * MIB, after=MIB, elapsed_s=1.0)
    assert bound.high == 4 * MIB
