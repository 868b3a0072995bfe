"""Trust and failure with real daemons in network namespaces (issue 6).

The scenarios live in benchmarks/faults.py (one implementation for the figures and for these
assertions); here they run at test size. Each builds its own cluster and tears it down.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import faults

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_wrong_key_is_refused_and_namespaces_are_isolated(tmp_path: Path) -> None:
    figures = faults.scenario_trust(tmp_path)
    assert figures["unauthenticated_accepted"] == 0
    assert figures["wrong_key_refusals"] >= 1 and figures["wrong_key_refusal_logged"]
    # The raw rogue client got a challenge and a reject: no proof, no SDP, no node id.
    assert figures["rogue_client_saw"][:1] == ["challenge"]
    assert set(figures["rogue_client_saw"]) <= {"challenge", "reject"}
    assert figures["rogue_sdp_bytes_seen"] == 0
    assert figures["rogue_matched_tokens"] == 0
    assert figures["cross_namespace_matched_tokens"] == 0, figures["cross_namespace_detail"]
    assert figures["same_namespace_fetch_ok"]


def test_poisoned_chunks_are_never_stored_or_handed_over(tmp_path: Path) -> None:
    figures = faults.scenario_poisoned(tmp_path)
    detail = figures["poison_detail"]
    assert detail["p_matched"] == faults.CHUNK and detail["p_equal"], detail
    assert detail["p_recompute_from"] == faults.CHUNK
    assert detail["q_matched"] == 0, detail
    assert figures["poisoned_handed_over"] == 0
    assert figures["poisoned_stored_corrupt"] == 0
    assert figures["poisoned_stored_wrong_shape"] == 0  # refused before it could be cached
    assert figures["poisoned_chunks"] == 0


def test_serving_peer_killed_during_20_concurrent_fetches(tmp_path: Path) -> None:
    figures = faults.scenario_kill(tmp_path, fetches=20, chunks=3)
    assert figures["fetches_failed_incorrectly"] == 0, figures["kill_outcomes"]
    assert figures["kill_fetches_full"] + figures["kill_fetches_shorter_prefix"] == 20
    assert figures["fetcher_alive_after_kill"]


def test_garbage_then_50_clients_leak_nothing(tmp_path: Path) -> None:
    figures = faults.scenario_clients(
        tmp_path, clients=50, seconds=12.0, garbage_rounds=25, signalling_rounds=5
    )
    assert figures["still_serving_after_garbage"]
    assert figures["corrupt_chunks_stored"] == 0
    assert figures["client_errors"] == 0, figures["client_error_detail"]
    assert figures["client_ops"] > 50
    assert figures["leaked_segments"] == 0, (figures["leaked_segment_names"], figures["live_segments_at_end"])
    assert figures["leaked_fds"] == 0
