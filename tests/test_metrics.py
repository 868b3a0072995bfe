"""Metrics: recorded values scraped over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import logging
import math
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvpeer import metrics as metrics_mod
from kvpeer.metrics import HttpEndpoint, Metrics
from kvpeer.store import ChunkStore


def scrape(endpoint: HttpEndpoint, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served() -> Iterator[tuple[Metrics, HttpEndpoint, list[bool]]]:
    metrics = Metrics(node_id="n1", version="0.1.0")
    state = [False]
    endpoint = metrics.start_http("127.0.0.1", 0, lambda: state[0])
    try:
        yield metrics, endpoint, state
    finally:
        endpoint.close()


def test_scrape_parses_and_carries_recorded_values(served) -> None:  # type: ignore[no-untyped-def]
    metrics, endpoint, _state = served
    store = ChunkStore(ram_bytes=1 << 20)
    store.put_blocking(b"k" * 32, "q8", b"x" * 100)
    store.get_blocking(b"z" * 32)
    metrics.watch_store(store.stats)
    metrics.watch_peers(lambda: 3, sessions=lambda: 2, unreachable=lambda: 1)
    metrics.watch_counters("transport", lambda: {"auth_failures": 2, "sessions_opened": 5})
    metrics.fetches.labels("complete").inc()
    metrics.chunk_hits.labels("peer").inc(2)
    metrics.received("peer-a", "q8", 1000)
    metrics.sent("peer-b", "exact", 50)
    metrics.encode_seconds.labels("q8").observe(0.003)
    metrics.transfer_seconds.labels("q8").observe(0.2)

    status, text = scrape(endpoint)
    assert status == 200
    got = samples(text)
    assert got[("kvpeer_fetches_total", (("outcome", "complete"),))] == 1
    assert got[("kvpeer_fetches_total", (("outcome", "miss"),))] == 0
    assert got[("kvpeer_chunk_hits_total", (("source", "peer"),))] == 2
    assert got[("kvpeer_peer_received_bytes_total", (("level", "q8"), ("peer", "peer-a")))] == 1000
    assert got[("kvpeer_peer_sent_bytes_total", (("level", "exact"), ("peer", "peer-b")))] == 50
    assert got[("kvpeer_codec_encode_seconds_count", (("level", "q8"),))] == 1
    assert got[("kvpeer_transfer_seconds_bucket", (("le", "0.25"), ("level", "q8")))] == 1
    assert got[("kvpeer_transfer_seconds_bucket", (("le", "0.1"), ("level", "q8")))] == 0
    assert got[("kvpeer_store_bytes", (("tier", "ram"),))] == 100
    assert got[("kvpeer_store_chunks", ())] == 1
    assert got[("kvpeer_store_events_total", (("event", "misses"),))] == 1
    assert got[("kvpeer_store_events_total", (("event", "ram_only_puts"),))] == 0
    assert got[("kvpeer_store_disk_unavailable", ())] == 0
    assert got[("kvpeer_store_disk_failing", ())] == 0
    assert got[("kvpeer_store_disk_stuck_files", ())] == 0
    assert got[("kvpeer_peer_sessions", ())] == 2 and got[("kvpeer_peers_unreachable", ())] == 1
    assert got[("kvpeer_peers_up", ())] == 3
    assert got[("kvpeer_transport_events_total", (("event", "auth_failures"),))] == 2
    # Auth failures are counted by the transport, above; no family that nothing feeds (an
    # always-zero kvpeer_auth_failures_total read as "no failed handshakes" on a dashboard).
    assert "kvpeer_rejected_inputs" not in text and "kvpeer_auth_failures" not in text
    assert got[("kvpeer_info", (("node_id", "n1"), ("version", "0.1.0")))] == 1
    assert ("process_cpu_seconds_total", ()) in got


def test_no_created_twins(served) -> None:  # type: ignore[no-untyped-def]
    """Every counter and histogram had a `_created` series with the same help text."""
    metrics, endpoint, _state = served
    metrics.fetches.labels("complete").inc()
    metrics.encode_seconds.labels("q8").observe(0.003)
    _status, text = scrape(endpoint)
    names = {name for name, _labels in samples(text)}
    assert "kvpeer_chunk_misses_total" in names and "kvpeer_codec_encode_seconds_count" in names
    assert not [n for n in names if n.endswith("_created")]


def test_healthz_is_503_until_ready(served) -> None:  # type: ignore[no-untyped-def]
    _metrics, endpoint, state = served
    assert scrape(endpoint, "/healthz") == (503, "not ready\n")
    state[0] = True
    assert scrape(endpoint, "/healthz") == (200, "ok\n")
    assert scrape(endpoint, "/nope")[0] == 404


def test_healthz_stays_200_when_degraded_and_says_why() -> None:
    metrics = Metrics(process=False)
    reasons: list[str] = []
    endpoint = metrics.start_http("127.0.0.1", 0, lambda: True, lambda: reasons)
    try:
        assert scrape(endpoint, "/healthz") == (200, "ok\n")
        reasons[:] = ["store: disk writes failing", "peers: 1 of 2 listed peers cannot be connected to"]
        assert scrape(endpoint, "/healthz") == (
            200,
            "ok, degraded:\n- store: disk writes failing\n"
            "- peers: 1 of 2 listed peers cannot be connected to\n",
        )
    finally:
        endpoint.close()


def test_healthz_is_still_answered_when_its_details_fail() -> None:
    def broken() -> list[str]:
        raise RuntimeError("boom")

    metrics = Metrics(process=False)
    endpoint = metrics.start_http("127.0.0.1", 0, lambda: True, broken)
    try:
        status, body = scrape(endpoint, "/healthz")
        assert status == 200 and body.startswith("ok, degraded:\n- health details unavailable")
    finally:
        endpoint.close()


def test_registries_are_per_instance_and_peer_labels_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_PEER_LABELS", 2)
    a, b = Metrics(process=False), Metrics(process=False)
    for peer in ("p1", "p2", "p3", "p4"):
        a.received(peer, "q8", 1)
    assert a.registry.get_sample_value("kvpeer_peer_received_bytes_total", {"peer": "other", "level": "q8"}) == 2
    assert b.registry.get_sample_value("kvpeer_peer_received_bytes_total", {"peer": "p1", "level": "q8"}) is None


def test_record_fetch_from_an_outcome_timeline() -> None:
    from kvpeer.fetcher import FetchEvent, FetchOutcome

    events = (
        FetchEvent(t=0.0, kind="request", index=1, level="q8", peer="b"),
        FetchEvent(t=0.3, kind="received", index=1, level="q8", peer="b", nbytes=4000),
        FetchEvent(t=0.3, kind="decode_start", index=1, level="q8"),
        FetchEvent(t=0.31, kind="decode_end", index=1, level="q8"),
    )
    outcome = FetchOutcome(chunks=2, requested=2, levels=("exact", "q8"), bytes_moved=4000,
                           elapsed_s=0.4, reason="complete", events=events)
    metrics = Metrics(process=False)
    metrics.record_fetch(outcome, wanted_chunks=3, chunk_tokens=256)
    metrics.record_miss(wanted_chunks=2, chunk_tokens=256)
    value = metrics.registry.get_sample_value
    assert value("kvpeer_fetches_total", {"outcome": "complete"}) == 1
    assert value("kvpeer_fetches_total", {"outcome": "miss"}) == 1
    assert value("kvpeer_chunk_hits_total", {"source": "peer"}) == 1
    assert value("kvpeer_chunk_hits_total", {"source": "local"}) == 1
    assert value("kvpeer_chunk_misses_total", {}) == 3
    assert value("kvpeer_peer_received_bytes_total", {"peer": "b", "level": "q8"}) == 4000
    assert value("kvpeer_transfer_seconds_bucket", {"level": "q8", "le": "0.5"}) == 1
    assert value("kvpeer_transfer_seconds_bucket", {"level": "q8", "le": "0.25"}) == 0
    assert value("kvpeer_codec_decode_seconds_count", {"level": "q8"}) == 1
    assert value("kvpeer_prefix_tokens_total", {"result": "matched"}) == 512
    assert value("kvpeer_prefix_tokens_total", {"result": "recompute"}) == 768


def test_a_failing_gauge_reads_nan_and_the_scrape_still_answers() -> None:
    """kvpeer_peer_sessions is read in the HTTP thread while the loop changes the sessions: a
    read that fails must cost that gauge, not the whole scrape (a 500)."""

    def broken() -> int:
        raise RuntimeError("dictionary changed size during iteration")

    metrics = Metrics(process=False)
    metrics.watch_peers(lambda: 3, sessions=broken, unreachable=lambda: 1)
    endpoint = metrics.start_http("127.0.0.1", 0, lambda: True)
    try:
        status, text = scrape(endpoint)
    finally:
        endpoint.close()
    assert status == 200
    got = samples(text)
    assert got[("kvpeer_peers_up", ())] == 3 and got[("kvpeer_peers_unreachable", ())] == 1
    assert math.isnan(got[("kvpeer_peer_sessions", ())])


def test_listening_on_every_interface_is_warned_about_whatever_host_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """"" binds 0.0.0.0 like "0.0.0.0" does; the warning follows the address bound."""
    caplog.set_level(logging.WARNING, logger="kvpeer.metrics")
    for host in ("", "0.0.0.0", "127.0.0.1"):
        Metrics(process=False).start_http(host, 0, lambda: True).close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["metrics listen on 0.0.0.0, beyond localhost: firewall the port"] * 2


def test_chunks_held_but_not_fetched_are_skips_by_reason_not_misses() -> None:
    """Every chunk was held by a peer and the fetch chose to recompute: those used to count as
    misses ("no node held"), so a slow link read as a cold cache."""
    from kvpeer.fetcher import FetchOutcome

    metrics = Metrics(process=False)
    # 6 chunks wanted, 4 held (the fetch asked for those), 1 restored, the rest recomputed.
    recompute = FetchOutcome(chunks=1, requested=4, levels=("q8",), bytes_moved=0, elapsed_s=0.2,
                             reason="recompute")
    metrics.record_fetch(recompute, wanted_chunks=6, chunk_tokens=256, seconds=1.5)
    deadline = FetchOutcome(chunks=0, requested=2, levels=(), bytes_moved=0, elapsed_s=0.5,
                            reason="deadline")
    metrics.record_fetch(deadline, wanted_chunks=2, chunk_tokens=256, seconds=0.5)
    value = metrics.registry.get_sample_value
    assert value("kvpeer_chunk_misses_total", {}) == 2
    assert value("kvpeer_chunk_skips_total", {"reason": "recompute"}) == 3
    assert value("kvpeer_chunk_skips_total", {"reason": "deadline"}) == 2
    assert value("kvpeer_chunk_skips_total", {"reason": "unavailable"}) == 0
    assert value("kvpeer_prefix_tokens_total", {"result": "recompute"}) == (5 + 2) * 256
    # The request's own time (finding the holders included), not the fetcher's part of it.
    assert value("kvpeer_fetch_seconds_sum", {}) == 2.0


def test_a_split_fetchs_head_counts_as_skipped_for_the_split_not_missed() -> None:
    from kvpeer.fetcher import FetchOutcome

    metrics = Metrics(process=False)
    # 6 chunks wanted, 5 held: the client prefilled the first 2, the fetch restored 3.
    split = FetchOutcome(chunks=3, requested=3, levels=("q5",) * 3, bytes_moved=0, elapsed_s=1.0,
                         reason="complete", head=2)
    metrics.record_fetch(split, wanted_chunks=6, chunk_tokens=256, seconds=1.0)
    value = metrics.registry.get_sample_value
    assert value("kvpeer_chunk_skips_total", {"reason": "split"}) == 2
    assert value("kvpeer_chunk_misses_total", {}) == 1
    assert value("kvpeer_prefix_tokens_total", {"result": "matched"}) == 3 * 256
    assert value("kvpeer_prefix_tokens_total", {"result": "recompute"}) == 3 * 256


def test_a_cancelled_fetch_counts_its_time_and_bytes_but_no_chunks() -> None:
    from kvpeer.fetcher import FetchEvent, FetchOutcome

    events = (
        FetchEvent(t=0.0, kind="request", index=0, level="q8", peer="b"),
        FetchEvent(t=0.2, kind="received", index=0, level="q8", peer="b", nbytes=4000),
    )
    outcome = FetchOutcome(chunks=1, requested=3, levels=("q8",), bytes_moved=4000,
                           elapsed_s=0.3, reason="cancelled", events=events)
    metrics = Metrics(process=False)
    metrics.record_fetch(outcome, wanted_chunks=3, chunk_tokens=256, seconds=0.4)
    metrics.record_miss(wanted_chunks=2, chunk_tokens=256, seconds=0.1)
    value = metrics.registry.get_sample_value
    assert value("kvpeer_fetches_total", {"outcome": "cancelled"}) == 1
    assert value("kvpeer_fetch_seconds_count", {}) == 2  # the miss too
    assert value("kvpeer_peer_received_bytes_total", {"peer": "b", "level": "q8"}) == 4000
    assert value("kvpeer_chunk_hits_total", {"source": "peer"}) in (None, 0)
    assert value("kvpeer_chunk_misses_total", {}) == 2
    assert value("kvpeer_prefix_tokens_total", {"result": "matched"}) in (None, 0)
