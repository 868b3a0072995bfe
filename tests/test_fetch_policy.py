"""Unit tests of the fetch policies: a fake clock and a tiny link simulator, no sockets."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvpeer.fetch_policy import (
    Assignment,
    ChunkScheduler,
    ControllerConfig,
    FetchAt,
    LinkEvidence,
    RecomputeRest,
    ResolutionController,
    SchedulerConfig,
    prior_bytes_per_token,
)
from tests.conftest import LoadedModel

LEVELS = ("exact", "q8", "q6", "q5", "q4", "q3")
TOKENS = 256
FP16_PER_TOKEN = 23_040  # SmolLM2-135M: 30 layers x 3 kv heads x 64 dims x (k, v) x 2 bytes
# bytes per token at each level (ratios close to the codec's on SmolLM2)
BPT = {"exact": 18_000.0, "q8": 8_500.0, "q6": 6_800.0, "q5": 5_600.0, "q4": 4_600.0, "q3": 3_600.0}
MBIT = 1e6


def controller(
    *,
    chunks: int = 8,
    recompute_rate: float = 400.0,
    deadline: float | None = None,
    min_level: str | None = None,
    start: float = 0.0,
    config: ControllerConfig | None = None,
) -> ResolutionController:
    return ResolutionController(
        levels=LEVELS,
        chunk_count=chunks,
        chunk_tokens=TOKENS,
        recompute_rate=recompute_rate,
        start=start,
        bytes_per_token=BPT,
        min_level=min_level,
        deadline=deadline,
        config=config,
    )


def simulate(
    ctl: ResolutionController,
    bandwidth_at: Callable[[float], float],
    fixed: str | None = None,
    step: float = 1e-3,
    preempt: bool = True,
) -> tuple[float, list[str], bool]:
    """One peer, one chunk at a time; returns (time usable, levels used, recomputed?)."""
    now = ctl.start
    levels: list[str] = []
    for index in range(ctl.chunk_count):
        if fixed is None:
            decision = ctl.decide(index, now, bandwidth_at(now))
            if isinstance(decision, RecomputeRest):
                return ctl.recompute_finish(now), levels, True
            level = decision.level
        else:
            level = fixed
        ctl.chunk_sent(index, level)
        size = ctl.chunk_bytes(index, level)
        received = 0.0
        while received < size:  # integrate the (piecewise) bandwidth over time
            received += bandwidth_at(now) * step / 8
            now += step
            if fixed is None and preempt:
                again = ctl.reconsider(index, level, int(received), now, bandwidth_at(now))
                if again is not None:  # abandon the transfer, start over smaller
                    level, size, received = again.level, ctl.chunk_bytes(index, again.level), 0.0
        ctl.chunk_received(index, level, int(BPT[level] * TOKENS))
        levels.append(level)
    return now, levels, False


def test_prior_bytes_per_token_shrinks_down_the_ladder() -> None:
    prior = prior_bytes_per_token(LEVELS + ("q2",), FP16_PER_TOKEN)
    values = [prior[name] for name in LEVELS + ("q2",)]
    assert values == sorted(values, reverse=True)
    assert prior["q2"] < prior["q3"]


def test_fast_link_gets_the_top_level() -> None:
    ctl = controller()
    decision = ctl.decide(0, 0.0, 10_000 * MBIT)
    assert isinstance(decision, FetchAt)
    assert decision.level == "exact" and decision.meets_deadline


def test_switches_down_when_bandwidth_drops_and_up_when_it_recovers() -> None:
    ctl = controller(chunks=16, deadline=2.0)
    first = ctl.decide(0, 0.0, 1000 * MBIT)
    assert isinstance(first, FetchAt)
    ctl.chunk_sent(0, first.level)
    ctl.chunk_received(0, first.level, int(BPT[first.level] * TOKENS))
    low = ctl.decide(1, 0.05, 40 * MBIT)
    assert isinstance(low, FetchAt)
    assert LEVELS.index(low.level) > LEVELS.index(first.level)
    ctl.chunk_sent(1, low.level)
    ctl.chunk_received(1, low.level, int(BPT[low.level] * TOKENS))
    high = ctl.decide(2, 0.15, 1000 * MBIT)
    assert isinstance(high, FetchAt)
    assert LEVELS.index(high.level) < LEVELS.index(low.level)
    assert ctl.switches == 2


def test_switching_up_needs_a_margin() -> None:
    cfg = ControllerConfig(up_margin=0.5, hedge_factor=1.0)
    ctl = controller(chunks=4, deadline=1.0, config=cfg)
    # bandwidth at which q8 just fits the whole deadline but not with half of it to spare
    bw = 4 * TOKENS * BPT["q8"] * 8 / (0.95 * cfg.safety)
    slow = ctl.decide(0, 0.0, bw / 2)
    assert isinstance(slow, FetchAt) and slow.level != "q8"
    again = ctl.decide(0, 0.0, bw)
    assert isinstance(again, FetchAt)
    assert LEVELS.index(again.level) > LEVELS.index("q8")  # not enough spare budget to go up
    fresh = controller(chunks=4, deadline=1.0, config=cfg).decide(0, 0.0, bw)
    assert isinstance(fresh, FetchAt) and fresh.level == "q8"


def test_respects_the_quality_floor() -> None:
    ctl = controller(deadline=0.01, min_level="q5", recompute_rate=10.0)
    decision = ctl.decide(0, 0.0, 20 * MBIT)  # far too slow for the deadline
    assert isinstance(decision, FetchAt)
    assert decision.level == "q5" and not decision.meets_deadline


def test_chooses_recompute_when_hopeless() -> None:
    ctl = controller(recompute_rate=2000.0)
    decision = ctl.decide(0, 0.0, 1 * MBIT)
    assert isinstance(decision, RecomputeRest)
    assert decision.from_index == 0
    assert decision.predicted_finish > decision.recompute_finish


def test_recompute_keeps_the_prefix_already_fetched() -> None:
    ctl = controller(recompute_rate=2000.0)
    first = ctl.decide(0, 0.0, 500 * MBIT)
    assert isinstance(first, FetchAt)
    ctl.chunk_sent(0, first.level)
    ctl.chunk_received(0, first.level, int(BPT[first.level] * TOKENS))
    decision = ctl.decide(1, 0.1, 0.5 * MBIT)
    assert isinstance(decision, RecomputeRest)
    assert decision.from_index == 1


def test_dead_link_means_recompute() -> None:
    assert isinstance(controller().decide(0, 0.0, 0.0), RecomputeRest)


def test_observed_sizes_replace_the_prior_and_rescale_unseen_levels() -> None:
    ctl = controller()
    ctl.chunk_sent(0, "q8")
    ctl.chunk_received(0, "q8", int(BPT["q8"] * TOKENS * 2))  # twice the prior
    assert ctl.bytes_per_token("q8") == pytest.approx(BPT["q8"] * 2)
    assert ctl.bytes_per_token("q3") == pytest.approx(BPT["q3"] * 2)


def test_stated_sizes_win_over_estimates() -> None:
    ctl = controller(chunks=2)
    ctl.state_sizes(1, {"q4": 1234})
    assert ctl.chunk_bytes(1, "q4") == 1234
    assert ctl.chunk_bytes(1, "q3") == BPT["q3"] * TOKENS


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        controller(min_level="q9")
    with pytest.raises(ValueError):
        controller(recompute_rate=0)
    with pytest.raises(ValueError):
        ResolutionController(
            levels=LEVELS, chunk_count=1, chunk_tokens=TOKENS, recompute_rate=1.0, start=0.0,
            bytes_per_token={"exact": 1.0},
        )


@pytest.mark.parametrize("mbit", [2, 10, 50, 100, 1000])
def test_never_worse_than_recompute_in_simulation(mbit: float) -> None:
    rate = 400.0  # tokens/s
    ctl = controller(chunks=8, recompute_rate=rate)
    usable, _, _ = simulate(ctl, lambda _t: mbit * MBIT)
    recompute_all = 8 * TOKENS / rate
    assert usable <= recompute_all * 1.02


def test_bandwidth_drop_mid_fetch_is_close_to_the_best_fixed_level() -> None:
    """100 -> 10 Mbit/s early in the fetch: within 1.2x of the fastest fixed level, floor kept.

    (A drop late in the fetch costs more: the chunks already fetched above the floor were the
    right choice at 100 Mbit/s and cannot be undone; no online policy can know.)
    """

    def link(t: float) -> float:
        return (100 if t < 0.2 else 10) * MBIT

    chunks, rate = 8, 150.0
    unhedged = ControllerConfig(hedge_factor=1.0)  # so that it starts above the floor
    adaptive, levels, recomputed = simulate(
        controller(chunks=chunks, recompute_rate=rate, min_level="q4", config=unhedged), link
    )
    assert not recomputed
    assert all(LEVELS.index(level) <= LEVELS.index("q4") for level in levels)
    assert levels[0] != levels[-1]  # it did switch down
    fixed = {
        level: simulate(controller(chunks=chunks, recompute_rate=rate), link, fixed=level)[0]
        for level in LEVELS[: LEVELS.index("q4") + 1]
    }
    assert adaptive <= 1.2 * min(fixed.values())


def test_hedge_keeps_the_floor_when_a_drop_would_make_the_prefix_late() -> None:
    """A slack deadline at 100 Mbit/s: the estimate alone would spend it on quality, but a 10x
    drop right after would leave those bytes on a slow link; hedged, it stays at the floor."""
    plain = controller(deadline=1.5, min_level="q5", config=ControllerConfig(hedge_factor=1.0))
    unhedged = plain.decide(0, 0.0, 100 * MBIT)
    assert isinstance(unhedged, FetchAt) and unhedged.level != "q5"
    hedged = controller(deadline=1.5, min_level="q5").decide(0, 0.0, 100 * MBIT)
    assert isinstance(hedged, FetchAt) and hedged.level == "q5" and hedged.meets_deadline


def test_hedge_still_spends_slack_that_a_drop_could_not_waste() -> None:
    ctl = controller(deadline=1.5, min_level="q5")
    decision = ctl.decide(0, 0.0, 1000 * MBIT)  # even at 100 Mbit/s the rest would be on time
    assert isinstance(decision, FetchAt) and decision.level in ("exact", "q8")
    assert ctl.hedged_finish(0.0, 1000 * MBIT, 0, decision.level) <= ctl.deadline


def test_hedged_drop_with_slack_is_close_to_the_best_fixed_level() -> None:
    """100 -> 10 Mbit/s once the floor level would have finished, with a deadline that leaves
    slack (the benchmark's --recompute-rate 114 case): unhedged the controller spends the slack
    on faithful levels just before the drop (2x the best fixed level); hedged it keeps within
    1.2x, floor respected."""
    chunks, floor = 8, "q5"
    floor_s = chunks * TOKENS * BPT[floor] * 8 / (100 * MBIT)

    def link(t: float) -> float:
        return (100 if t < floor_s else 10) * MBIT

    def run(config: ControllerConfig | None) -> tuple[float, list[str]]:
        ctl = controller(
            chunks=chunks, recompute_rate=114.0, deadline=2 * floor_s, min_level=floor,
            config=config,
        )
        usable, levels, recomputed = simulate(ctl, link)
        assert not recomputed
        return usable, levels

    fixed = min(
        simulate(controller(chunks=chunks, min_level=floor), link, fixed=level)[0]
        for level in LEVELS[: LEVELS.index(floor) + 1]
    )
    unhedged, loose = run(ControllerConfig(hedge_factor=1.0))
    hedged, levels = run(None)
    assert any(level != floor for level in loose) and unhedged > 1.5 * fixed
    assert all(LEVELS.index(level) <= LEVELS.index(floor) for level in levels)
    assert hedged <= 1.2 * fixed


@pytest.mark.parametrize("drop_at", [0.05, 0.3, 0.8])
@pytest.mark.parametrize("rate", [150.0, 300.0])
def test_bandwidth_drop_never_worse_than_recompute(drop_at: float, rate: float) -> None:
    def link(t: float) -> float:
        return (100 if t < drop_at else 10) * MBIT

    usable, _, _ = simulate(controller(chunks=8, recompute_rate=rate, min_level="q4"), link)
    assert usable <= 8 * TOKENS / rate


def test_preempts_a_big_chunk_in_flight_when_the_link_collapses() -> None:
    ctl = controller(
        chunks=2, recompute_rate=50.0, deadline=0.5, config=ControllerConfig(hedge_factor=1.0)
    )
    first = ctl.decide(0, 0.0, 1000 * MBIT)
    assert isinstance(first, FetchAt) and first.level == "exact"
    ctl.chunk_sent(0, "exact")
    assert ctl.reconsider(0, "exact", 0, 0.0, 1000 * MBIT) is None  # on time: keep going
    again = ctl.reconsider(0, "exact", 1000, 0.01, 5 * MBIT)
    assert isinstance(again, FetchAt)
    assert LEVELS.index(again.level) > LEVELS.index("exact")
    assert ctl.levels_used[0] == again.level


# --------------------------------------------------------------------------- scheduler
def test_scheduler_splits_by_bandwidth() -> None:
    sched = ChunkScheduler(
        holders=[{"a", "b"}] * 12, now=0.0, config=SchedulerConfig(window=100)
    )
    sched.set_bandwidth("a", 300 * MBIT)
    sched.set_bandwidth("b", 100 * MBIT)
    got = sched.assign(0.0)
    per_peer = {p: sum(1 for a in got if a.peer == p) for p in "ab"}
    assert per_peer == {"a": 9, "b": 3}


def test_scheduler_equal_peers_share_evenly_and_in_order() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}] * 8, now=0.0)
    got = sched.assign(0.0)
    assert [a.index for a in got] == [0, 1, 2, 3]
    assert {a.peer for a in got} == {"a", "b"}
    assert sched.assign(0.0) == []  # windows full


def test_scheduler_waits_for_a_fast_busy_peer_rather_than_a_crawling_one() -> None:
    sched = ChunkScheduler(holders=[{"fast", "slow"}] * 6, now=0.0, config=SchedulerConfig(window=1))
    sched.set_bandwidth("fast", 1000 * MBIT)
    sched.set_bandwidth("slow", 1 * MBIT)
    got = sched.assign(0.0)
    assert got == [Assignment(index=0, peer="fast")]


def test_scheduler_reports_completion_in_prefix_order() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}] * 4, now=0.0)
    sched.assign(0.0)
    assert sched.completed(1, 0.1) == []
    assert sched.completed(0, 0.2) == [0, 1]
    sched.assign(0.2)
    assert sched.completed(3, 0.3) == []
    assert sched.completed(2, 0.4) == [2, 3]
    assert sched.finished


def test_scheduler_reassigns_a_dead_peers_chunks() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}] * 4, now=0.0)
    first = sched.assign(0.0)
    lost = sched.peer_lost("a")
    assert lost == sorted(a.index for a in first if a.peer == "a")
    for index in [a.index for a in first if a.peer == "b"]:
        sched.completed(index, 0.1)
    again = sched.assign(0.1)
    assert {a.peer for a in again} == {"b"}
    assert set(lost) <= {a.index for a in again}
    assert sched.limit == 4


def test_scheduler_detects_a_stalled_peer() -> None:
    cfg = SchedulerConfig(stall_floor_s=1.0, stall_factor=4.0)
    sched = ChunkScheduler(holders=[{"a"}, {"b"}], now=0.0, config=cfg)
    sched.assign(0.0, {0: 1e6, 1: 1e6})
    sched.completed(1, 0.05)
    assert sched.stalled(0.5) == []
    assert sched.stalled(2.0) == ["a"]


def test_scheduler_stops_at_a_chunk_nobody_holds_any_more() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}, {"a"}, {"a", "b"}], now=0.0)
    sched.assign(0.0)
    sched.peer_lost("a")
    assert sched.limit == 1
    assert [a.index for a in sched.assign(0.1)] == [0]
    sched.completed(0, 0.2)
    assert sched.finished


def test_scheduler_chunk_failure_tries_another_holder() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}], now=0.0)
    (first,) = sched.assign(0.0)
    sched.chunk_failed(0, first.peer)
    (second,) = sched.assign(0.1)
    assert second.peer != first.peer
    sched.chunk_failed(0, second.peer)
    assert sched.limit == 0 and sched.finished


def test_scheduler_retry_frees_the_busy_peers_slot_and_keeps_it_as_holder() -> None:
    sched = ChunkScheduler(holders=[{"a"}] * 2, now=0.0, config=SchedulerConfig(window=1))
    (first,) = sched.assign(0.0)
    sched.chunk_retry(first.index, "a")
    assert sched.in_flight() == {} and sched.holders(first.index) == ["a"]
    (again,) = sched.assign(0.1)  # the one slot is free again: the retry goes out
    assert (again.index, again.peer) == (first.index, "a")


def test_scheduler_holds_a_retried_chunk_back_until_its_time() -> None:
    sched = ChunkScheduler(holders=[{"a"}] * 2, now=0.0, config=SchedulerConfig(window=1))
    (first,) = sched.assign(0.0)
    sched.chunk_retry(first.index, "a", not_before=0.5)
    assert sched.retry_wait(0.1) == pytest.approx(0.4)
    (other,) = sched.assign(0.1)  # the free slot serves the next chunk meanwhile
    assert other.index != first.index
    sched.completed(other.index, 0.2)
    assert sched.assign(0.3) == []
    assert sched.retry_wait(0.5) is None  # its time has come: a pending chunk like any other
    (again,) = sched.assign(0.5)
    assert again.index == first.index and sched.retry_wait(0.5) is None


def test_scheduler_working_peers_are_those_holding_chunks_still_to_come() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}, {"b"}, {"b"}], now=0.0, config=SchedulerConfig(window=1))
    assert sorted(sched.working_peers()) == ["a", "b"]
    got = {a.peer: a.index for a in sched.assign(0.0)}
    sched.completed(got["a"], 0.1)
    sched.completed(got["b"], 0.1)  # chunk 0 and 1 done: only b holds chunk 2
    assert sched.working_peers() == ["b"]
    (last,) = sched.assign(0.2)
    assert sched.working_peers() == ["b"]  # in flight
    sched.completed(last.index, 0.3)
    assert sched.working_peers() == []


def test_peers_that_only_back_up_a_local_chunk_are_not_working_for_the_rest() -> None:
    """Chunks this node holds list the peers holding them too (a fallback): counting those
    peers' links made the rest look faster to fetch than the one peer that holds it."""
    local = ""
    sched = ChunkScheduler(holders=[{local, "b"}, {local, "b"}, {"a"}], now=0.0)
    assert sorted(sched.working_peers()) == ["", "a", "b"]
    assert sorted(sched.working_peers(served_by=local)) == ["", "a"]


def test_scheduler_bounds_a_silent_peers_rate_by_what_it_has_in_flight() -> None:
    sched = ChunkScheduler(holders=[{"a"}], now=0.0)
    sched.set_bandwidth("a", 1e9)
    sched.assign(0.0, {0: 1e6})  # 8 Mbit: 8 ms at 1 Gbit/s
    assert sched.silent_bound("a", 0.5, floor_s=1.0) is None  # within the floor
    assert sched.silent_bound("a", 2.0, floor_s=1.0) == pytest.approx(8e6 / 2.0)
    assert sched.silent_bound("a", 4.0, floor_s=1.0) == pytest.approx(8e6 / 4.0)  # falls with it
    sched.completed(0, 4.1)
    assert sched.silent_bound("a", 10.0, floor_s=1.0) is None  # nothing in flight


def test_scheduler_lost_peer_does_not_return_a_chunk_another_peer_finished() -> None:
    """A chunk may stay listed on a peer after another peer delivered it (a retry answered for
    the wrong peer): losing the first peer must not queue the finished chunk again."""
    sched = ChunkScheduler(holders=[{"a", "b"}] * 2, now=0.0, config=SchedulerConfig(window=1))
    got = {a.peer: a.index for a in sched.assign(0.0)}
    x = got["a"]
    sched.chunk_retry(x, "b")  # answered for b: a keeps x in flight, and x is pending again
    sched.completed(got["b"], 0.1)
    (again,) = sched.assign(0.2)
    assert (again.index, again.peer) == (x, "b")
    sched.completed(x, 0.3)
    assert sched.peer_lost("a") == []
    assert sched.finished


def test_scheduler_abandon_cancels_what_is_past_the_cut() -> None:
    sched = ChunkScheduler(holders=[{"a", "b"}] * 6, now=0.0)
    got = sched.assign(0.0)
    cancelled = sched.abandon_from(2)
    assert cancelled == sorted((a.index, a.peer) for a in got if a.index >= 2)
    assert sched.limit == 2
    assert all(a.index < 2 for a in sched.assign(0.0))


def test_a_guessed_recompute_rate_steers_levels_but_never_stops_the_fetch() -> None:
    ctl = ResolutionController(
        levels=LEVELS, chunk_count=8, chunk_tokens=TOKENS, recompute_rate=2000.0, start=0.0,
        bytes_per_token=BPT, allow_recompute=False,
    )
    decision = ctl.decide(0, 0.0, 1 * MBIT)
    assert isinstance(decision, FetchAt) and decision.level == LEVELS[-1]


def test_prior_of_the_lossless_level_follows_the_cache_dtype() -> None:
    fp16 = prior_bytes_per_token(LEVELS, FP16_PER_TOKEN)
    fp32 = prior_bytes_per_token(LEVELS, FP16_PER_TOKEN, dtype_bytes=4)
    assert fp32["exact"] == pytest.approx(2 * fp16["exact"])
    assert fp32["q4"] == pytest.approx(fp16["q4"])


def test_should_recompute_counts_the_chunks_in_flight_and_needs_the_margin() -> None:
    # 2,048 tokens recomputed at 400 tokens/s: 5.1 s. At 10 Mbit/s the floor (q3, 7.4 MB) takes
    # ~6.9 s: 1.35x later than recomputing.
    ctl = controller(recompute_rate=400.0)
    for index in range(2):
        ctl.chunk_sent(index, "q3")  # the window is full: no decide() until one arrives
    decision = ctl.should_recompute(0.0, 10 * MBIT, margin=1.25)
    assert isinstance(decision, RecomputeRest) and decision.from_index == 0
    assert decision.predicted_finish > 1.25 * decision.recompute_finish
    assert ctl.should_recompute(0.0, 10 * MBIT, margin=1.5) is None  # not clear enough
    assert ctl.should_recompute(0.0, 100 * MBIT, margin=1.25) is None


def test_should_recompute_keeps_the_received_prefix_and_obeys_a_guessed_rate() -> None:
    ctl = controller(recompute_rate=400.0)
    ctl.chunk_sent(0, "q3")
    ctl.chunk_received(0, "q3", int(BPT["q3"] * TOKENS))
    ctl.chunk_sent(1, "q3")
    decision = ctl.should_recompute(1.0, 2 * MBIT)
    assert isinstance(decision, RecomputeRest) and decision.from_index == 1
    ctl.allow_recompute = False
    assert ctl.should_recompute(1.0, 2 * MBIT) is None
    with pytest.raises(ValueError):
        controller().should_recompute(0.0, MBIT, margin=0.5)


# --------------------------------------------------------------------------- link evidence
KIB = 1024


def evidence(memory_s: float = 120.0) -> LinkEvidence:
    return LinkEvidence(evidence_bytes=512 * KIB, memory_s=memory_s)


def test_a_first_sample_is_not_evidence_however_many_bytes_follow_it() -> None:
    """The warm-up that gave up at 1 Gbit/s: one sample (set-up and slow start: 5 Mbit/s),
    then the abandoned transfer's rest arrives without a new sample."""
    links = evidence()
    assert links.observe("a", 0.0, None, 0) == (None, False)  # fresh session: nothing yet
    assert links.observe("a", 0.3, 5 * MBIT, 300 * KIB) == (5 * MBIT, False)
    assert links.observe("a", 0.5, 5 * MBIT, 4096 * KIB) == (5 * MBIT, False)
    assert links.remembered("a", 0.5) is None  # nothing for the next fetch to give up on


def test_a_second_sample_over_enough_bytes_is_evidence_and_remembered() -> None:
    """The 10 Mbit/s link: the second sample, after 512 KiB, may condemn it; the transport
    forgets it after 30 s, the fetcher keeps it for memory_s."""
    links = evidence(memory_s=120.0)
    links.observe("a", 0.3, 4 * MBIT, 256 * KIB)
    assert links.observe("a", 0.5, 6 * MBIT, 300 * KIB) == (6 * MBIT, False)  # too few bytes
    assert links.observe("a", 0.7, 7 * MBIT, 560 * KIB) == (7 * MBIT, True)
    assert links.observe("a", 40.0, None, 560 * KIB) == (7 * MBIT, True)  # stale there
    assert links.remembered("a", 0.7 + 120.0) == 7 * MBIT
    assert links.observe("a", 0.7 + 121.0, None, 560 * KIB) == (None, False)


def test_an_estimate_measured_before_we_watched_is_evidence() -> None:
    links = evidence()
    assert links.observe("a", 0.0, 5 * MBIT, 1024 * KIB) == (5 * MBIT, True)


def test_a_new_or_idle_session_starts_over() -> None:
    """A session replaced (its byte count went down) or gone stale may be in slow start again:
    its next first sample is not evidence, and does not replace the remembered rate."""
    links = evidence()
    links.observe("a", 0.0, 50 * MBIT, 1024 * KIB)  # evidence: remembered
    assert links.observe("a", 1.0, 2 * MBIT, 300 * KIB) == (2 * MBIT, False)  # new session
    assert links.observe("a", 2.0, 2 * MBIT, 900 * KIB) == (2 * MBIT, False)
    assert links.remembered("a", 2.0) == 50 * MBIT
    links.observe("a", 40.0, None, 900 * KIB)  # stale: idle, maybe slow start again
    assert links.observe("a", 41.0, 3 * MBIT, 1200 * KIB) == (3 * MBIT, False)
    assert links.observe("a", 41.2, 4 * MBIT, 1500 * KIB) == (4 * MBIT, True)
    links.observe("a", 42.0, None, None)  # no session: the next one is watched from its start
    assert links.observe("a", 43.0, 5 * MBIT, 100 * KIB) == (5 * MBIT, False)
    with pytest.raises(ValueError):
        LinkEvidence(evidence_bytes=-1, memory_s=1.0)


def test_prior_of_the_codecs_own_ladder_shrinks_level_by_level() -> None:
    """q7 was missing from the table: guessed at 3/4 of q8, below q6, so the first chunks of a
    fetch took q7 for smaller than q6."""
    from kvpeer import codec

    prior = prior_bytes_per_token(codec.LEVELS, FP16_PER_TOKEN)
    values = [prior[name] for name in codec.LEVELS]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("nan")])
def test_a_dead_or_broken_rate_picks_the_smallest_level(bandwidth: float) -> None:
    """Every finish infinite (and recompute not allowed: its rate a guess): the tie went to the
    biggest level; a NaN rate was said to meet the deadline."""
    ctl = controller()
    ctl.allow_recompute = False
    decision = ctl.decide(0, 0.0, bandwidth)
    assert isinstance(decision, FetchAt)
    assert decision.level == LEVELS[-1] and not decision.meets_deadline
    ctl.allow_recompute = True
    assert ctl.should_recompute(0.0, bandwidth) is not None


def test_chunks_past_the_limit_no_longer_count_against_the_deadline() -> None:
    """Four of eight chunks held by nobody (or cut): the first four got the levels of an
    eight-chunk fetch."""
    four = controller(chunks=4, deadline=0.5)
    eight = controller(chunks=8, deadline=0.5)
    eight.limit_to(4)
    for index in range(4):
        a, b = four.decide(index, 0.0, 20 * MBIT), eight.decide(index, 0.0, 20 * MBIT)
        assert isinstance(a, FetchAt) and isinstance(b, FetchAt)
        assert (a.level, a.predicted_finish, a.recompute_finish) == (b.level, b.predicted_finish, b.recompute_finish)
        four.chunk_sent(index, a.level)
        eight.chunk_sent(index, b.level)
    # Bytes in flight past a cut stop counting too.
    ctl = controller(chunks=8, deadline=0.5)
    for index in range(8):
        ctl.chunk_sent(index, "exact")
    before = ctl.finish_time(0.0, 20 * MBIT, "q3")
    ctl.limit_to(2)
    after = ctl.finish_time(0.0, 20 * MBIT, "q3")
    assert after < before / 3
    assert ctl.recompute_finish(0.0) == pytest.approx(2 * TOKENS / 400.0)


def test_a_level_the_carrying_peer_cannot_deliver_in_time_is_not_chosen() -> None:
    from kvpeer.fetch_policy import Carrier

    ctl = controller(chunks=8, deadline=0.5)
    fast = ctl.decide(7, 0.0, 10_000 * MBIT)
    slow = ctl.decide(7, 0.0, 10_000 * MBIT, carrier=Carrier(40 * MBIT, 0.0))
    assert isinstance(fast, FetchAt) and isinstance(slow, FetchAt)
    assert fast.level == "exact" and slow.level == "q6"  # q8 would take 0.51 s over 40 Mbit/s
    busy = ctl.decide(7, 0.0, 10_000 * MBIT, carrier=Carrier(10 * MBIT, 400_000.0))
    assert isinstance(busy, FetchAt) and busy.level == LEVELS[-1]  # its queue alone takes 0.38 s


def test_scheduler_silent_bound_ignores_a_peer_with_nothing_known_in_flight() -> None:
    """Chunks in flight stated as 0 bytes (a local copy that could not be read, sent to a peer)
    made a silent peer's bound 0 bits/s, and the fetcher divided by it."""
    sched = ChunkScheduler(holders=[{"a"}], now=0.0)
    sched.assign(0.0, {0: 0.0})
    assert sched.silent_bound("a", 100.0, floor_s=1.0) is None


def test_without_a_deadline_the_aim_follows_the_chunks_still_fetched() -> None:
    """The aim (10x sooner than recomputing) was set for the whole prefix: after a gap at chunk
    1 that one chunk got the budget of eight."""
    one = controller(chunks=1)
    eight = controller(chunks=8)
    eight.limit_to(1)
    assert eight.deadline == pytest.approx(one.deadline)
    a, b = one.decide(0, 0.0, 1000 * MBIT), eight.decide(0, 0.0, 1000 * MBIT)
    assert isinstance(a, FetchAt) and isinstance(b, FetchAt) and a.level == b.level
    given = controller(chunks=8, deadline=3.0)
    given.limit_to(1)
    assert given.deadline == 3.0  # a client's deadline stays


def test_a_floor_its_own_peer_cannot_deliver_in_time_does_not_meet_the_deadline() -> None:
    from kvpeer.fetch_policy import Carrier

    ctl = controller(chunks=8, deadline=0.5)
    decision = ctl.decide(7, 0.0, 10_000 * MBIT, carrier=Carrier(0.1 * MBIT, 0.0))
    assert isinstance(decision, FetchAt) and decision.level == LEVELS[-1]
    assert not decision.meets_deadline


def test_where_even_the_floor_would_be_late_after_a_drop_the_first_chunks_still_get_quality() -> None:
    """Steady 1 Gbit/s, no deadline (aim 0.51 s; all at exact would take 0.35 s): the drop
    hedge rejected every level above the floor while the rest at the floor would miss the aim
    after a 10x fall, so the first chunks went q3, q3, q3 and quality rose toward the end."""

    def levels(slack: float) -> list[str]:
        ctl = controller(chunks=8, config=ControllerConfig(hedge_slack=slack))
        _, used, recomputed = simulate(ctl, lambda _t: 1000 * MBIT, step=1e-4)
        assert not recomputed
        return used

    before, now = levels(0.0), levels(ControllerConfig().hedge_slack)
    assert before[0] == LEVELS[-1]  # the old rule
    assert now[0] != LEVELS[-1]
    ranks = [LEVELS.index(level) for level in now]
    assert ranks == sorted(ranks, reverse=True)  # never back down on a steady link


@pytest.mark.model
@pytest.mark.slow
def test_priors_match_the_codecs_sizes_on_real_kv(smollm2: LoadedModel) -> None:
    """The priors steer a model's first fetch before any size is seen. They had stayed at the
    first ladder's figures (q5 0.25, q4 0.21, q3 0.16 of fp16) while the codec moved to ~0.19,
    0.14 and 0.12, so a first fetch over a slow link gave up or split off too long a head."""
    import torch

    from benchmarks import _kv
    from kvpeer import codec
    from kvpeer.fetch_policy import PRIOR_RATIO_VS_FP16

    torch.set_num_threads(2)
    chunks = 4
    (window,) = _kv.windows(smollm2.tokenizer, _kv.evaluation_text(), chunks * TOKENS, 1, 1)
    k, v = (x.half() for x in _kv.prefix_kv(smollm2.model, window.prefix))
    fp16_bytes = (k.numel() + v.numel()) * 2
    measured = {}
    for level in codec.LEVELS:
        blobs = [
            codec.encode(
                k[:, :, i * TOKENS:(i + 1) * TOKENS].contiguous(),
                v[:, :, i * TOKENS:(i + 1) * TOKENS].contiguous(),
                level,
                profile=smollm2.fingerprint.hex,  # as the daemon stores: the model's profile,
                tail=i == chunks - 1,  # tail steps on the prefix's last chunk only
            )
            for i in range(chunks)
        ]
        measured[level] = sum(map(len, blobs)) / fp16_bytes
    off = {level: round(measured[level] / PRIOR_RATIO_VS_FP16[level], 3) for level in codec.LEVELS}
    assert all(0.85 <= ratio <= 1.15 for ratio in off.values()), off
