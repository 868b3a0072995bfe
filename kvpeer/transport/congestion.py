"""Delivery-rate congestion control for one SCTP association (sans-IO, BBR-like).

Owns the congestion window of ``transport.congestion_control = "rate"``: the window follows
what the path delivers, not how often it loses. aiortc's SCTP (RFC 9260, Reno-like) halves
its window on every loss event, so 1 % random loss on a 40 ms path caps it at a few Mbit/s
(Mathis et al.), and on a shaped link the window saw-tooths below the rate. Here:

* the bottleneck bandwidth is the largest delivery rate seen over the last ``bw_rounds``
  round trips (and at least ``bw_window_s``), a sample being the bytes acknowledged over the
  last ``rate_interval_s`` (at least two minimum RTTs: longer than BBR's one round trip, which
  on a busy host counted bursts of delayed acknowledgements as bandwidth);
* the minimum RTT is the smallest sample over the last ``min_rtt_window_s`` (two halves);
* ``cwnd = max(floor, cwnd_gain x bandwidth x min RTT) + headroom``: gain 2 lets the
  estimate double per round when the path has more to give, and bounds the queue this
  association builds at a bottleneck to about one bandwidth-delay product; the floor is
  ``min_cwnd_bytes`` or ``min_cwnd_s`` of the measured bandwidth, whichever is smaller (a
  fixed 256 KiB is 210 ms of a 10 Mbit/s link: four times a 50 ms shaper queue), and before
  any bandwidth sample the initial window, grown by slow start;
* start-up grows the window by the bytes acknowledged (slow start) until the bandwidth stops
  growing by 25 % for three rounds, a queue stands, or congestion is seen;
* a loss is congestion only when the RTT shows a standing queue (the smallest sample of this
  round so far, else of the last one, > ``queue_rtt_factor`` x min RTT + ``queue_rtt_slack_s``) or losses persist (more than
  ``persistent_loss`` of the packets of a round, judged over 100 packets at least). Then the
  bandwidth estimate is cut to ``beta`` of itself, once per round. Random loss changes nothing: its retransmission is the
  only response it needs.

The caller counts in *sequence numbers* that only grow (unwrapped SCTP TSNs) and in delivered
bytes; time is passed in. Nothing here knows SCTP or asyncio: ``aiortc_patches`` feeds it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True, frozen=True, kw_only=True)
class RateControlParams:
    """Tuning of :class:`RateControl`; sizes in bytes, times in seconds."""

    #: Bytes of one full packet's payload: the unit of the window's headroom.
    packet_bytes: int
    #: Smallest window. On this project's CPU-bound hosts RTT samples under load are mostly
    #: the receiver's scheduling, so bandwidth x min RTT alone would starve a fast LAN.
    min_cwnd_bytes: int = 256 * 1024
    #: ...but never more than this much of the measured bandwidth (at least
    #: ``min_cwnd_packets``): on a slow link the fixed floor alone overfilled the bottleneck's
    #: queue for a whole transfer. 30 ms covers the scheduling delays above; the floor stays
    #: ``min_cwnd_bytes`` from about 70 Mbit/s up.
    min_cwnd_s: float = 0.030
    min_cwnd_packets: int = 16
    #: Largest window (the peer's receive window still bounds what is in flight).
    max_cwnd_bytes: int = 64 * 1024 * 1024
    initial_cwnd_bytes: int | None = None
    cwnd_gain: float = 2.0
    headroom_packets: int = 4
    bw_rounds: int = 10
    bw_window_s: float = 0.25
    min_rtt_window_s: float = 10.0
    rate_interval_s: float = 0.05
    startup_growth: float = 1.25
    startup_rounds: int = 3
    #: Above cwnd_gain: a full window of cwnd_gain x BDP alone makes the RTT up to cwnd_gain x
    #: the minimum (no pacing here), and that queue is our own, not congestion.
    queue_rtt_factor: float = 2.5
    queue_rtt_slack_s: float = 0.010
    persistent_loss: float = 0.10
    beta: float = 0.7

    def __post_init__(self) -> None:
        if self.packet_bytes < 1:
            raise ValueError("packet_bytes must be >= 1")
        if not 0 < self.min_cwnd_bytes <= self.max_cwnd_bytes:
            raise ValueError("need 0 < min_cwnd_bytes <= max_cwnd_bytes")
        if self.min_cwnd_s <= 0 or self.min_cwnd_packets < 1:
            raise ValueError("need min_cwnd_s > 0 and min_cwnd_packets >= 1")
        if self.cwnd_gain < 1 or not 0 < self.beta < 1 or self.startup_growth <= 1:
            raise ValueError("need cwnd_gain >= 1, 0 < beta < 1, startup_growth > 1")
        if self.queue_rtt_factor <= self.cwnd_gain:
            raise ValueError("queue_rtt_factor must exceed cwnd_gain (the window's own queue)")
        if self.bw_rounds < 1 or self.startup_rounds < 1:
            raise ValueError("bw_rounds and startup_rounds must be >= 1")
        if not 0 < self.persistent_loss <= 1:
            raise ValueError("persistent_loss must be in (0, 1]")


@dataclass(slots=True)
class _Sent:
    """When the data up to *seq* was sent (for RTT samples)."""

    seq: int
    time: float


@dataclass(slots=True)
class _BwSample:
    rate: float  # bytes per second
    time: float
    round: int


class RateControl:
    """Congestion window from measured delivery rate and minimum RTT (see the module doc)."""

    #: Send records kept at most; an association that stops acknowledging stops sending.
    MAX_SENT_RECORDS = 65_536
    #: Packets over which persistent loss is judged, at least.
    LOSS_SAMPLE_PACKETS = 100

    def __init__(self, params: RateControlParams) -> None:
        self.params = params
        p = params
        self._initial_cwnd = float(p.initial_cwnd_bytes or min(p.min_cwnd_bytes, 10 * p.packet_bytes))
        self._cwnd = self._initial_cwnd
        self._sent: deque[_Sent] = deque()
        self._acks: deque[tuple[float, int]] = deque()  # (time, delivered) of recent acks
        self._bw: deque[_BwSample] = deque()  # sliding maximum: rates decrease front to back
        # Minimum RTT over the last half window and the one before: a sample taken while a
        # queue stood never replaces a true minimum only because the window expired.
        self._rtt_min_now = math.inf
        self._rtt_min_before = math.inf
        self._rtt_bucket_start = 0.0
        self.srtt_s: float | None = None
        self.delivered = 0
        self._delivered_seq = -1
        self._highest_sent = -1
        self.round = 0
        self._round_end_seq = -1
        self._round_lost = 0
        self._round_delivered_at_start = 0
        # Smallest RTT sample of this round and of the last one: the queue signal. A standing
        # queue raises even the smallest sample of a round; a busy host's scheduling delays,
        # which inflate the smoothed RTT here by 2-5x, mostly do not.
        self._round_rtt_min = math.inf
        self._last_round_rtt_min = math.inf
        self._reduced_round = -1
        self.startup = True
        self._startup_best = 0.0
        self._startup_flat = 0
        #: Counters for stats: losses judged random / congestion, retransmission timeouts.
        self.random_losses = 0
        self.congestion_events = 0
        self.queue_congestion = 0  # of which a loss with a standing queue
        self.timeouts = 0
        self.local_drops = 0  # packets the sender's own egress queue dropped
        #: Bound on the window from the last local drop (see on_local_drop), raised by a packet
        #: per round without one.
        self._inflight_hi = math.inf
        self._round_local_drop = False

    # -- inputs -----------------------------------------------------------------------------

    def on_send(self, now: float, seq: int) -> None:
        """New data up to sequence number *seq* (inclusive) went on the wire at *now*."""
        if seq <= self._highest_sent:
            return
        self._highest_sent = seq
        if len(self._sent) >= self.MAX_SENT_RECORDS:
            self._sent.popleft()
        self._sent.append(_Sent(seq=seq, time=now))

    def on_ack(self, now: float, seq: int, delivered_bytes: int) -> None:
        """The peer has now received everything up to *seq* bar a few holes, and in all
        *delivered_bytes* (both only grow; a SACK's highest TSN is a fine *seq*)."""
        if seq <= self._delivered_seq:
            return
        newly = max(0, delivered_bytes - self.delivered)
        self.delivered = max(self.delivered, delivered_bytes)
        self._delivered_seq = seq
        record: _Sent | None = None
        while self._sent and self._sent[0].seq <= seq:
            record = self._sent.popleft()
        if record is not None:
            self._on_rtt(now, max(now - record.time, 1e-6))
        self._sample_rate(now)
        if seq >= self._round_end_seq:
            self._end_round()
        if self.startup:
            self._cwnd += newly
        self._cwnd = self._clamp(max(self._cwnd, self.target_cwnd()) if self.startup
                                 else self.target_cwnd())  # fmt: skip
        self._cwnd = min(self._cwnd, self._inflight_hi)

    def on_loss(self, now: float) -> bool:
        """A SACK reported a new loss. True if taken as congestion (the window shrank)."""
        if self._queue_standing():
            self.queue_congestion += 1
            self._congestion()
            return True
        self.random_losses += 1
        return False

    def on_retransmit(self, packets: int) -> None:
        """*packets* were sent again: counted toward this round's loss (persistent loss)."""
        self._round_lost += packets

    def on_local_drop(self, now: float, packets: int, inflight_bytes: int | None = None) -> None:
        """*packets* never left this host: its egress queue (a qdisc) was full. That is
        congestion for certain, whatever the RTT says (TCP's local congestion): start-up
        ends and the bandwidth estimate is cut, once per round. With *inflight_bytes* (what
        was in flight when the queue overflowed) the window is also held below ``beta`` of
        that until rounds without a drop raise the bound again (BBRv2's ``inflight_hi``): a
        minimum RTT taken while our own queue stood (no drain phase here) makes the window
        outgrow the queue, and the cut alone is undone by the next bandwidth sample."""
        self.local_drops += packets
        self._round_local_drop = True
        if inflight_bytes is not None and self._reduced_round != self.round:
            self._inflight_hi = max(self.floor(), self.params.beta * inflight_bytes)
        self._congestion()
        self._cwnd = min(self._cwnd, self._inflight_hi)

    def on_timeout(self, now: float) -> None:
        """The retransmission timer expired (a lost retransmission, a tail loss or a dead
        path). Only a standing queue makes it congestion; the window is kept otherwise."""
        self.timeouts += 1
        if self._queue_standing():
            self._congestion()

    # -- outputs ----------------------------------------------------------------------------

    @property
    def cwnd(self) -> int:
        return int(self._cwnd)

    @property
    def inflight_hi(self) -> float | None:
        """The window's bound from local drops (None: none seen)."""
        return None if math.isinf(self._inflight_hi) else self._inflight_hi

    @property
    def bandwidth(self) -> float | None:
        """Bottleneck bandwidth estimate in bytes per second (None before any sample)."""
        return self._bw[0].rate if self._bw else None

    @property
    def _min_rtt(self) -> float:
        return min(self._rtt_min_now, self._rtt_min_before)

    @property
    def min_rtt_s(self) -> float | None:
        return None if math.isinf(self._min_rtt) else self._min_rtt

    def floor(self) -> float:
        """The smallest window now: ``min_cwnd_bytes``, or less on a link measured slow;
        before any bandwidth sample the initial window (slow start finds the rest)."""
        p = self.params
        bw = self.bandwidth
        if bw is None:
            return self._initial_cwnd
        return max(p.min_cwnd_packets * p.packet_bytes, min(p.min_cwnd_bytes, bw * p.min_cwnd_s))

    def target_cwnd(self) -> float:
        p = self.params
        bw, rtt = self.bandwidth, self.min_rtt_s
        bdp = 0.0 if bw is None or rtt is None else p.cwnd_gain * bw * rtt
        return max(self.floor(), bdp) + p.headroom_packets * p.packet_bytes

    # -- internals --------------------------------------------------------------------------

    def _clamp(self, cwnd: float) -> float:
        return min(max(cwnd, self.floor()), self.params.max_cwnd_bytes)

    def _on_rtt(self, now: float, rtt: float) -> None:
        self.srtt_s = rtt if self.srtt_s is None else 0.875 * self.srtt_s + 0.125 * rtt
        self._round_rtt_min = min(self._round_rtt_min, rtt)
        half = self.params.min_rtt_window_s / 2
        if now - self._rtt_bucket_start >= half:
            gap = now - self._rtt_bucket_start
            self._rtt_min_before = self._rtt_min_now if gap < 2 * half else math.inf
            self._rtt_min_now = math.inf
            self._rtt_bucket_start = now
        self._rtt_min_now = min(self._rtt_min_now, rtt)

    def _sample_rate(self, now: float) -> None:
        # Delivered bytes over the last rate_interval_s (at least two min RTTs). Over a single
        # round trip, a receiver or relay that was descheduled for a few ms and then acked in a
        # burst showed up as twice the bottleneck rate (ack compression).
        acks = self._acks
        acks.append((now, self.delivered))
        rtt = self.min_rtt_s or 0.0
        interval = max(self.params.rate_interval_s, 2 * rtt)
        while len(acks) > 2 and acks[1][0] <= now - interval:
            acks.popleft()
        then, delivered_then = acks[0]
        if now - then >= interval:
            self._on_bw(now, (self.delivered - delivered_then) / (now - then))

    def _on_bw(self, now: float, rate: float) -> None:
        p = self.params
        while self._bw and self._bw[-1].rate <= rate:
            self._bw.pop()
        self._bw.append(_BwSample(rate=rate, time=now, round=self.round))
        while (
            len(self._bw) > 1
            and self._bw[0].round < self.round - p.bw_rounds
            and self._bw[0].time < now - p.bw_window_s
        ):
            self._bw.popleft()

    def _end_round(self) -> None:
        p = self.params
        delivered_packets = (self.delivered - self._round_delivered_at_start) / p.packet_bytes
        # Judged over at least LOSS_SAMPLE_PACKETS: a LAN round can be a handful of packets.
        if delivered_packets >= self.LOSS_SAMPLE_PACKETS:
            if self._round_lost > p.persistent_loss * delivered_packets:
                self._congestion()
            self._round_lost = 0
            self._round_delivered_at_start = self.delivered
        if not self._round_local_drop and not math.isinf(self._inflight_hi):
            self._inflight_hi += p.packet_bytes
        self._round_local_drop = False
        self.round += 1
        self._round_end_seq = self._highest_sent
        self._last_round_rtt_min, self._round_rtt_min = self._round_rtt_min, math.inf
        if self.startup and self._queue_standing():
            self.startup = False  # the path is full: growing further only fills its queue
        if self.startup:
            bw = self.bandwidth or 0.0
            if bw >= self._startup_best * p.startup_growth:
                self._startup_best, self._startup_flat = bw, 0
            else:
                self._startup_flat += 1
                if self._startup_flat >= p.startup_rounds:
                    self.startup = False

    def _queue_standing(self) -> bool:
        p = self.params
        recent = self._round_rtt_min
        if math.isinf(recent):  # no sample yet this round
            recent = self._last_round_rtt_min
        if math.isinf(recent) or math.isinf(self._min_rtt):
            return False
        return recent > p.queue_rtt_factor * self._min_rtt + p.queue_rtt_slack_s

    def _congestion(self) -> None:
        self.startup = False
        if self._reduced_round == self.round:
            return  # once per round: one queue overflow drops a burst of packets
        self._reduced_round = self.round
        self.congestion_events += 1
        for sample in self._bw:
            sample.rate *= self.params.beta
        self._cwnd = self._clamp(min(self._cwnd * self.params.beta, self.target_cwnd()))
