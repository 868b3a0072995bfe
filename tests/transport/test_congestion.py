"""The delivery-rate congestion control, without sockets: a fake clock and a simulated link."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from kvpeer.transport.aiortc_patches import _restrike, _TsnUnwrapper
from kvpeer.transport.congestion import RateControl, RateControlParams

MSS = 1384


def _control(**overrides: float) -> RateControl:
    return RateControl(RateControlParams(packet_bytes=MSS, **overrides))  # type: ignore[arg-type]


def _steady(rc: RateControl, *, rate: float, rtt: float, rounds: int, t0: float = 0.0) -> float:
    """Feed *rounds* round trips of a path delivering *rate* bytes/s with round trip *rtt*."""
    now, seq = t0, rc._highest_sent
    per_round = max(1, int(rate * rtt / MSS))
    for _ in range(rounds):
        first = seq + 1
        seq += per_round
        rc.on_send(now, seq)
        now += rtt
        for s in range(first, seq + 1):
            rc.on_ack(now, s, (s + 1) * MSS)
    return now


def test_window_is_gain_times_bandwidth_delay_product() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    _steady(rc, rate=12.5e6, rtt=0.040, rounds=20)  # 100 Mbit/s, 40 ms
    assert rc.bandwidth == pytest.approx(12.5e6, rel=0.05)
    assert rc.min_rtt_s == pytest.approx(0.040, rel=0.01)
    bdp = 12.5e6 * 0.040
    assert 2 * bdp * 0.95 <= rc.cwnd <= 2 * bdp * 1.05 + 4 * MSS


def test_small_bdp_keeps_the_floor() -> None:
    rc = _control()
    _steady(rc, rate=12.5e6, rtt=0.0005, rounds=400)
    assert not rc.startup and rc.cwnd == 256 * 1024 + 4 * MSS


def test_bursts_of_late_acknowledgements_are_not_bandwidth() -> None:
    # A receiver that runs every 20 ms acknowledges 20 ms of a 100 Mbit/s link at once.
    rc = _control(min_cwnd_bytes=16 * 1024)
    rate, seq, now = 12.5e6, -1, 0.0
    per_burst = int(rate * 0.020 / MSS)
    for _ in range(50):
        first, seq = seq + 1, seq + per_burst
        rc.on_send(now, seq)
        now += 0.020
        for s in range(first, seq + 1):
            rc.on_ack(now + (s - first) * 1e-6, s, (s + 1) * MSS)
    assert rc.bandwidth is not None and rc.bandwidth <= 1.3 * rate


def test_random_loss_does_not_shrink_the_window() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.040, rounds=20)
    before = rc.cwnd
    assert rc.on_loss(now) is False
    rc.on_retransmit(1)
    now = _steady(rc, rate=12.5e6, rtt=0.040, rounds=1, t0=now)
    assert rc.cwnd >= before * 0.95
    assert rc.random_losses == 1 and rc.congestion_events == 0


def test_loss_with_a_standing_queue_cuts_once_per_round() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.010, rounds=20)
    # The RTT grows sixfold (a queue builds) while the delivery rate stays.
    now = _steady(rc, rate=12.5e6, rtt=0.060, rounds=12, t0=now)
    before_bw, before_cwnd = rc.bandwidth, rc.cwnd
    assert before_bw is not None
    assert rc.on_loss(now) is True
    assert rc.on_loss(now) is True  # same round: no second cut
    assert rc.congestion_events == 1
    assert rc.bandwidth == pytest.approx(before_bw * 0.7)
    assert rc.cwnd < before_cwnd


def test_persistent_loss_is_congestion_even_without_a_queue() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.040, rounds=20)
    rc.on_retransmit(200)  # far more than 10 % of a ~360-packet round
    _steady(rc, rate=12.5e6, rtt=0.040, rounds=2, t0=now)
    assert rc.congestion_events == 1


def test_bandwidth_filter_forgets_old_maxima() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=50e6, rtt=0.010, rounds=20)
    assert rc.bandwidth == pytest.approx(50e6, rel=0.05)
    now = _steady(rc, rate=5e6, rtt=0.010, rounds=5, t0=now)
    assert rc.bandwidth == pytest.approx(50e6, rel=0.05)  # within 10 rounds and 0.25 s
    _steady(rc, rate=5e6, rtt=0.010, rounds=40, t0=now)
    assert rc.bandwidth == pytest.approx(5e6, rel=0.05)


def test_min_rtt_survives_the_window_unless_the_path_really_changed() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.040, rounds=10)
    now = _steady(rc, rate=12.5e6, rtt=0.200, rounds=30, t0=now)  # 6 s with a queue
    assert rc.min_rtt_s == pytest.approx(0.040)  # one half-window later it still counts
    now = _steady(rc, rate=12.5e6, rtt=0.200, rounds=30, t0=now)
    assert rc.min_rtt_s == pytest.approx(0.200)  # a whole window: the path changed


def test_startup_grows_by_acked_bytes_then_ends_on_a_plateau() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    initial = rc.cwnd
    rc.on_send(0.0, 9)
    for s in range(10):
        rc.on_ack(0.01, s, (s + 1) * MSS)
    assert rc.startup and rc.cwnd >= initial + 10 * MSS
    _steady(rc, rate=12.5e6, rtt=0.010, rounds=10, t0=0.01)
    assert not rc.startup


def test_timeout_without_queue_keeps_the_window() -> None:
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.040, rounds=20)
    before = rc.cwnd
    rc.on_timeout(now)
    assert rc.cwnd == before and rc.timeouts == 1 and rc.congestion_events == 0


def test_stale_acks_and_sends_are_ignored() -> None:
    rc = _control()
    rc.on_send(0.0, 10)
    rc.on_send(0.0, 5)  # not new data
    rc.on_ack(0.01, 10, 11 * MSS)
    cwnd = rc.cwnd
    rc.on_ack(0.02, 3, 4 * MSS)
    assert rc.cwnd == cwnd and rc.delivered == 11 * MSS


@pytest.mark.parametrize(
    "bad",
    [{"packet_bytes": 0}, {"min_cwnd_bytes": 0}, {"beta": 1.0}, {"cwnd_gain": 0.5},
     {"persistent_loss": 0.0}, {"bw_rounds": 0}, {"queue_rtt_factor": 2.0}],
)  # fmt: skip
def test_params_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateControlParams(**{"packet_bytes": MSS, **bad})  # type: ignore[arg-type]


def test_tsn_unwrapping_across_the_32_bit_wrap() -> None:
    first = 2**32 - 3
    tsn = _TsnUnwrapper(first)
    assert [tsn.unwrap((first + i) % 2**32) for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert tsn.unwrap((first - 1) % 2**32) == -1  # an acknowledgement below the first TSN
    assert tsn.unwrap(first) == 0


# -- a simulated bottleneck -------------------------------------------------------------------


@dataclass
class _Link:
    """A FIFO bottleneck of *rate* bytes/s holding at most *queue_s* of data, *delay_s* one
    way, dropping *loss* of the packets at random; acknowledgements are never lost."""

    rate: float
    delay_s: float
    loss: float
    queue_s: float
    seed: int = 3
    free_at: float = 0.0
    max_queue_s: float = 0.0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def send(self, now: float) -> float | None:
        """When the acknowledgement of a packet sent at *now* returns; None if dropped."""
        start = max(now, self.free_at)
        if start - now > self.queue_s:
            return None  # tail drop
        self.max_queue_s = max(self.max_queue_s, start - now)
        self.free_at = start + MSS / self.rate
        if self.rng.random() < self.loss:
            return None
        return self.free_at + 2 * self.delay_s


def _simulate(link: _Link, seconds: float) -> tuple[float, RateControl]:
    """Goodput (bytes/s of distinct packets delivered) of one sender over *link*."""
    rc = _control()
    events: list[tuple[float, int, int]] = []  # (time, kind 0 ack / 1 loss found, seq)
    acked: set[int] = set()
    highest = -1
    next_seq = 0
    retransmit: list[int] = []
    in_flight = 0
    now = 0.0

    def fill() -> None:
        nonlocal next_seq, in_flight
        while in_flight * MSS < rc.cwnd:
            if retransmit:
                seq = retransmit.pop()
            else:
                seq, next_seq = next_seq, next_seq + 1
                rc.on_send(now, seq)
            back = link.send(now)
            in_flight += 1
            if back is None:  # found lost about one RTT later (by gap reports)
                heapq.heappush(events, (now + 2 * link.delay_s + 0.002, 1, seq))
            else:
                heapq.heappush(events, (back, 0, seq))

    fill()
    while events and now < seconds:
        now, kind, seq = heapq.heappop(events)
        in_flight -= 1
        if kind == 0:
            acked.add(seq)
            if seq > highest:
                highest = seq
                rc.on_ack(now, highest, (highest + 1) * MSS)
        else:
            rc.on_loss(now)
            rc.on_retransmit(1)
            retransmit.append(seq)
        fill()
    return len(acked) * MSS / now, rc


def test_one_percent_loss_on_a_40_ms_path_keeps_most_of_the_rate() -> None:
    link = _Link(rate=12.5e6, delay_s=0.020, loss=0.01, queue_s=0.050)
    goodput, rc = _simulate(link, seconds=3.0)
    # Reno halving: ~1.22 / sqrt(0.01) x MSS / 40 ms = 0.4 MB/s (3 % of the rate).
    assert goodput >= 0.85 * link.rate, (goodput, rc.random_losses, rc.congestion_events)


def test_shaped_link_is_filled_with_a_bounded_queue_and_no_tail_drops() -> None:
    link = _Link(rate=12.5e6, delay_s=0.002, loss=0.0, queue_s=0.050)
    goodput, rc = _simulate(link, seconds=2.0)
    assert goodput >= 0.9 * link.rate
    # Start-up may overshoot once (its losses are found over up to two rounds: two events);
    # after it the queue stays below the tbf limit.
    assert rc.congestion_events <= 2 and link.max_queue_s < 0.050


# -- lost retransmissions (aiortc_patches._restrike) -------------------------------------------


def _fake_association(first_tsn: int, watch: list[tuple[object, int]]) -> SimpleNamespace:
    decreased: list[object] = []
    return SimpleNamespace(
        _kvpeer_tsn=_TsnUnwrapper(first_tsn), _kvpeer_rtx_watch=watch, _kvpeer_restrikes=0,
        _kvpeer_rtx_pending=False, _maybe_abandon=lambda chunk: False,
        _flight_size_decrease=decreased.append, decreased=decreased,
    )  # fmt: skip


def _sack(cumulative: int, gaps: list[tuple[int, int]]) -> SimpleNamespace:
    return SimpleNamespace(cumulative_tsn=cumulative % 2**32, gaps=gaps)


def test_a_retransmission_is_struck_again_once_later_data_arrives() -> None:
    first = 2**32 - 5  # across the TSN wrap
    lost = SimpleNamespace(tsn=(first + 5) % 2**32, _acked=False, _retransmit=False)
    # Resent when TSN first+10 was the last sent: sequence number 10.
    sctp = _fake_association(first, [(lost, 10)])
    sctp._kvpeer_tsn.unwrap((first + 20) % 2**32)  # the sender has gone on since
    # The peer holds up to first+12: only 2 packets sent after the retransmission.
    assert _restrike(sctp, _sack(first + 4, [(2, 8)])) == 12
    assert not lost._retransmit and sctp._kvpeer_rtx_watch == [(lost, 10)]
    assert _restrike(sctp, _sack(first + 4, [(2, 9)])) == 13
    assert lost._retransmit and sctp._kvpeer_rtx_pending and sctp.decreased == [lost]
    assert sctp._kvpeer_restrikes == 1 and sctp._kvpeer_rtx_watch == []


def test_an_arrived_retransmission_leaves_the_watch() -> None:
    arrived = SimpleNamespace(tsn=105, _acked=False, _retransmit=False)
    sctp = _fake_association(100, [(arrived, 10)])
    _restrike(sctp, _sack(106, [(2, 20)]))  # cumulative ack passed it
    assert not arrived._retransmit and sctp._kvpeer_rtx_watch == []
    gap_acked = SimpleNamespace(tsn=105, _acked=True, _retransmit=False)
    sctp = _fake_association(100, [(gap_acked, 10)])
    _restrike(sctp, _sack(103, [(3, 20)]))
    assert not gap_acked._retransmit and sctp._kvpeer_restrikes == 0


def test_a_retransmission_struck_again_goes_out_with_this_sack_not_the_next() -> None:
    """aiortc transmits at the end of its own SACK handling, before _restrike marks a lost
    retransmission: the patched handler transmits once more, and only then."""
    import asyncio

    from kvpeer.transport.aiortc_patches import _resend_restruck

    transmits: list[int] = []

    async def transmit() -> None:
        transmits.append(1)

    sctp = SimpleNamespace(_kvpeer_restrikes=0, _transmit=transmit)

    async def receive_sack(chunk: object) -> None:
        if chunk == "strikes":
            sctp._kvpeer_restrikes += 1

    receive = _resend_restruck(sctp, receive_sack)
    asyncio.run(receive("plain"))
    assert transmits == []
    asyncio.run(receive("strikes"))
    assert transmits == [1]


# -- why a retransmission timeout fired (aiortc_patches._note_t3_cause) ------------------------


def test_a_timeout_is_put_down_to_what_the_sent_queue_shows() -> None:
    from kvpeer.transport.aiortc_patches import T3_CAUSES, _note_t3_cause

    def cause(*queue: SimpleNamespace) -> str:
        sctp = SimpleNamespace(_sent_queue=list(queue), _kvpeer_t3_causes=dict.fromkeys(T3_CAUSES, 0))
        _note_t3_cause(sctp)
        (found,) = [name for name, count in sctp._kvpeer_t3_causes.items() if count]
        return found

    def chunk(*, sent: int = 1, acked: bool = False) -> SimpleNamespace:
        return SimpleNamespace(_sent_count=sent, _acked=acked)

    assert cause(chunk(sent=2), chunk(acked=True)) == "retransmission"
    assert cause(chunk(), chunk(), chunk(acked=True)) == "few_strikes"
    assert cause(chunk(), chunk()) == "no_report"
    assert cause(chunk(acked=True), chunk(sent=3)) == "retransmission"  # the earliest not acked


def test_a_local_drop_is_congestion_whatever_the_rtt() -> None:
    """The sender's own egress queue dropped packets: start-up ends and the estimate is cut,
    once per round, though no standing queue shows in the RTT."""
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.030, rounds=4)
    assert rc.startup
    before_bw = rc.bandwidth
    assert before_bw is not None
    rc.on_local_drop(now, 30)
    rc.on_local_drop(now, 5)  # the same round: no second cut
    assert not rc.startup
    assert rc.local_drops == 35 and rc.congestion_events == 1
    assert rc.bandwidth == pytest.approx(before_bw * 0.7)


def test_a_local_drop_bounds_the_window_below_what_was_in_flight() -> None:
    """A minimum RTT taken with our own queue standing lets the window outgrow the queue;
    the flight that overflowed it bounds the window (beta of it), raised a packet per round
    without a drop."""
    rc = _control(min_cwnd_bytes=16 * 1024)
    now = _steady(rc, rate=12.5e6, rtt=0.060, rounds=30)  # window ~1.5 MB
    assert rc.cwnd > 1_000_000
    rc.on_local_drop(now, 30, inflight_bytes=800_000)
    assert rc.inflight_hi == pytest.approx(0.7 * 800_000)
    assert rc.cwnd <= 560_000
    rounds = 5
    _steady(rc, rate=12.5e6, rtt=0.060, rounds=rounds, t0=now)
    hi = rc.inflight_hi
    assert hi is not None
    # (_steady's rounds end twice each: the first ack after a round is past its end.)
    assert 560_000 + rounds * MSS <= hi <= 560_000 + 2 * rounds * MSS
    assert rc.cwnd <= rc.inflight_hi  # the new bandwidth samples do not lift it


def test_a_slow_link_is_not_overfilled_by_the_window_floor() -> None:
    """10 Mbit/s behind a 50 ms shaper queue (62 KB): a fixed 256 KiB floor is 210 ms of this
    link, so the queue overflowed for the whole transfer (a first fetch at 10 Mbit/s read
    ~1.4 Mbit/s, retransmissions lost up to 9 times). The floor scales with the measured
    bandwidth: after start-up the queue stays below the shaper's limit."""
    link = _Link(rate=1.25e6, delay_s=0.002, loss=0.0, queue_s=0.050)
    goodput, rc = _simulate(link, seconds=3.0)
    assert goodput >= 0.85 * link.rate, (goodput, rc.congestion_events)
    assert rc.congestion_events <= 2, rc.congestion_events
    assert rc.cwnd < 64 * 1024


def test_the_floor_is_unchanged_on_a_fast_link() -> None:
    rc = _control()
    _steady(rc, rate=125e6, rtt=0.0005, rounds=400)  # 1 Gbit/s, 0.5 ms
    assert not rc.startup and rc.cwnd == 256 * 1024 + 4 * MSS
