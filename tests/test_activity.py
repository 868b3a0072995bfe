"""The once-a-minute summary of served requests (requests themselves log at DEBUG)."""

from __future__ import annotations

from kvpeer.activity import Activity


def test_nothing_served_says_nothing() -> None:
    assert Activity().take_summary(60) is None


def test_the_summary_counts_outcomes_bytes_and_times_and_then_starts_over() -> None:
    activity = Activity()
    for seconds in (0.1, 0.2, 0.3):
        activity.fetch("complete", seconds, wire_bytes=2_000_000)
    activity.fetch("miss", 0.001)
    activity.put(chunks=4, stored=3)
    line = activity.take_summary(60)
    assert line == (
        "last 60 s: 4 fetches (complete 3, miss 1), 6.0 MB from peers, p50 150 ms, p99 300 ms; "
        "1 puts, 3 of 4 chunks new"
    )
    assert activity.take_summary(60) is None


def test_only_puts() -> None:
    activity = Activity()
    activity.put(chunks=2, stored=0)
    assert activity.take_summary(60) == "last 60 s: 1 puts, 0 of 2 chunks new"


def test_the_fetchers_events_are_summed_up_per_interval_not_logged_one_by_one() -> None:
    """Retries, restarts and lost peers log at DEBUG each; the line says how many there were."""
    counters = {"retry": 3, "peer_lost": 1}
    activity = Activity(events=lambda: counters)
    activity.fetch("cancelled", 0.2, wire_bytes=1_000_000)
    assert activity.take_summary(60) == (
        "last 60 s: 1 fetches (cancelled 1), 1.0 MB from peers, p50 200 ms, p99 200 ms; "
        "fetcher: peer_lost 1, retry 3"
    )
    assert activity.take_summary(60) is None  # nothing grew
    counters.update(retry=5, preempt=2)
    assert activity.take_summary(60) == "last 60 s: fetcher: preempt 2, retry 2"


def test_a_node_that_only_serves_peers_says_so() -> None:
    """A node serving others logged nothing at INFO: its minute line covered local requests only."""
    activity = Activity()
    activity.served("peer-a", 1_500_000)
    activity.served("peer-b", 500_000)
    activity.served("peer-a", 1_000_000)
    assert activity.take_summary(60) == "last 60 s: served 3 chunks, 3.0 MB, to 2 peers"
    assert activity.take_summary(60) is None
