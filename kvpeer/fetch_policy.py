"""The fetch policies: which level each chunk travels at, and which peer sends it.

Two sans-IO state machines the fetcher drives (kvpeer/fetcher.py does the I/O):

* :class:`ResolutionController` picks the codec level ("resolution") of the next chunk from the
  measured bandwidth, the bytes each remaining chunk costs at each level, the decode rate, the
  request's deadline, its quality floor and the client's recompute rate; or it decides that even
  the smallest allowed level cannot beat recomputing and answers :class:`RecomputeRest`.
* :class:`ChunkScheduler` assigns the chunks of one prefix to the peers holding them, weighted by
  their bandwidth (earliest estimated finish first), takes back the chunks of a dead or stalled
  peer, and reports completion in prefix order.
* :class:`LinkEvidence` says whether a peer's live bandwidth estimate stands on enough data to
  condemn the link ("recompute the rest"), and remembers the last one that did.

Time is always passed in (``now``, seconds on any monotonic clock); nothing here reads a clock,
sleeps, or imports asyncio, torch or the codec. Level names are constructor input, most
faithful first (as ``kvpeer.codec.LEVELS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

# Bytes per token at each level relative to fp16 KV, used until real sizes are stated or
# observed; the controller replaces them with measured ones as soon as chunks arrive, so they
# steer the first chunks of a model's first fetch (and a split's first head). Measured with the
# codec of format v3 on SmolLM2's KV of 2,048 tokens of the evaluation text, 256-token chunks,
# tail steps on the last (as the daemon stores a prefix; with or without the profile alike);
# the GPT-2 of benchmarks.tiny_model codes within 5% of these. The model test in
# tests/test_fetch_policy.py holds them to the codec. (Until 2026-12-08 the table still had
# the first ladder's figures: q5 0.25, q4 0.21, q3 0.16, 30-50% too large, so a first fetch
# over a slow link gave up or split off a longer head than its sizes called for.)
PRIOR_RATIO_VS_FP16: dict[str, float] = {
    "exact": 0.85,
    "q8": 0.37,
    "q7": 0.32,
    "q6": 0.27,
    "q5": 0.19,
    "q4": 0.14,
    "q3": 0.12,
}
_UNKNOWN_LEVEL_STEP = 0.75  # prior for a level missing from the table: 3/4 of the one above


def prior_bytes_per_token(
    levels: Sequence[str], fp16_bytes_per_token: float, dtype_bytes: int = 2
) -> dict[str, float]:
    """A first guess of encoded bytes per token at each level, before any chunk is seen.

    Quantized levels cost the same whatever the cache dtype; the lossless top level (the first)
    grows with it (fp32 KV: twice the fp16 figure).
    """
    out: dict[str, float] = {}
    previous = fp16_bytes_per_token * dtype_bytes / 2
    for rank, name in enumerate(levels):
        guess = PRIOR_RATIO_VS_FP16.get(name)
        if guess is None:
            value = previous * _UNKNOWN_LEVEL_STEP
        else:
            value = fp16_bytes_per_token * guess * (dtype_bytes / 2 if rank == 0 else 1)
        out[name] = value
        previous = value
    return out


# --------------------------------------------------------------------------- decisions
@dataclass(frozen=True, slots=True, kw_only=True)
class FetchAt:
    """Fetch chunk ``index`` at ``level``; the predictions explain why."""

    index: int
    level: str
    predicted_finish: float  # when the whole prefix would be usable, all remaining at `level`
    recompute_finish: float  # when it would be usable if the rest were recomputed instead
    meets_deadline: bool

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError("index must be >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecomputeRest:
    """Stop fetching: chunks from ``from_index`` on are cheaper to recompute than to fetch."""

    from_index: int
    predicted_finish: float  # the best fetch finish the controller could still promise
    recompute_finish: float

    def __post_init__(self) -> None:
        if self.from_index < 0:
            raise ValueError("from_index must be >= 0")


Decision = FetchAt | RecomputeRest


@dataclass(frozen=True, slots=True)
class Carrier:
    """The peer that will send a chunk: its rate and the bytes queued on it before the chunk."""

    bandwidth_bps: float
    queued_bytes: float


def _rate(bps: float) -> float:
    """A rate as the models take it: NaN or negative (a broken estimate) is no link at all."""
    return bps if bps > 0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerConfig:
    """Knobs of the resolution controller (defaults suit a LAN)."""

    safety: float = 0.85
    """Fraction of the bandwidth estimate trusted when predicting transfer times."""
    up_margin: float = 0.15
    """Switching to a more faithful level needs this fraction of the remaining budget spare."""
    target_speedup: float = 10.0
    """Without a deadline, aim to be usable this many times faster than recomputing."""
    per_chunk_overhead_s: float = 0.002
    """Request round trip and restore cost per chunk that bandwidth does not explain."""
    observe_weight: float = 0.5
    """EWMA weight of a newly observed chunk size in the bytes-per-token estimates."""
    hedge_factor: float = 10.0
    """The link may fall to 1/hedge_factor of its estimate at any moment (a shared LAN link, a
    tbf change): a level above the floor is chosen only if, after such a fall right now, the
    chunks in flight, this chunk at that level and the rest at the floor would still be usable
    by the deadline. Bytes spent on quality before a drop cost hedge_factor times as much after
    it, and a chunk on the wire cannot be recalled. 1: no hedge (trust the estimate)."""
    hedge_slack: float = 0.15
    """...or if, after such a fall, this chunk's extra bytes over the floor would make the
    prefix later by at most this fraction of the time left. Where even the floor would be late
    after a fall (many chunks still to come), the first test alone kept every chunk at the floor
    until few were left: the first chunks, which all later tokens attend to, got the lowest
    level. Only the chunks on the wire suffer a fall, so this bounds its cost to ~window x this."""

    def __post_init__(self) -> None:
        if not 0 < self.safety <= 1:
            raise ValueError("safety must be in (0, 1]")
        if not 0 <= self.up_margin < 1:
            raise ValueError("up_margin must be in [0, 1)")
        if self.target_speedup <= 0:
            raise ValueError("target_speedup must be > 0")
        if self.per_chunk_overhead_s < 0:
            raise ValueError("per_chunk_overhead_s must be >= 0")
        if not 0 < self.observe_weight <= 1:
            raise ValueError("observe_weight must be in (0, 1]")
        if self.hedge_factor < 1:
            raise ValueError("hedge_factor must be >= 1")
        if not 0 <= self.hedge_slack < 1:
            raise ValueError("hedge_slack must be in [0, 1)")


class ResolutionController:
    """Chooses each chunk's level for one fetch of ``chunk_count`` chunks.

    The fetch is modelled as a pipeline: transfer at the measured bandwidth overlapped with
    decode at ``decode_rate`` (compressed bytes/s), plus the decode of the last chunk and a small
    per-chunk overhead. The level of the next chunk is the most faithful allowed level at which
    *all* remaining chunks would still be usable by the deadline (CacheGen's rule, which keeps
    levels steady instead of spending the whole budget on the first chunks), hedged: a level above
    the floor must also leave the deadline reachable if the link fell by ``hedge_factor`` right
    now (the rest then at the floor), or cost at most ``hedge_slack`` of the time left over the
    floor after such a fall, so slack is spent on quality only where a drop could not turn it
    into a much later prefix. With no level meeting the deadline it picks the fastest allowed
    level, as long as that still beats recomputing the rest at ``recompute_rate`` tokens/s;
    otherwise it answers :class:`RecomputeRest`.
    """

    def __init__(
        self,
        *,
        levels: Sequence[str],
        chunk_count: int,
        chunk_tokens: int,
        recompute_rate: float,
        start: float,
        bytes_per_token: Mapping[str, float],
        min_level: str | None = None,
        deadline: float | None = None,
        decode_rate: float = math.inf,
        sizes: Sequence[Mapping[str, int] | None] | None = None,
        config: ControllerConfig | None = None,
        allow_recompute: bool = True,
        busy_until: float | None = None,
    ) -> None:
        if not levels:
            raise ValueError("at least one level is needed")
        if len(set(levels)) != len(levels):
            raise ValueError("level names must be unique")
        if chunk_count < 0 or chunk_tokens <= 0:
            raise ValueError("chunk_count must be >= 0 and chunk_tokens > 0")
        if recompute_rate <= 0:
            raise ValueError("recompute_rate must be > 0 tokens/s")
        if decode_rate <= 0:
            raise ValueError("decode_rate must be > 0 bytes/s")
        if min_level is not None and min_level not in levels:
            raise ValueError(f"min_level {min_level!r} is not one of {list(levels)}")
        missing = [name for name in levels if bytes_per_token.get(name, 0) <= 0]
        if missing:
            raise ValueError(f"bytes_per_token needs a positive estimate for {missing}")
        if sizes is not None and len(sizes) != chunk_count:
            raise ValueError("sizes must have one entry per chunk")
        self.levels = tuple(levels)
        floor = self.levels.index(min_level) if min_level is not None else len(self.levels) - 1
        self.allowed = self.levels[: floor + 1]
        self.chunk_count = chunk_count
        self.chunk_tokens = chunk_tokens
        self.recompute_rate = float(recompute_rate)
        self.decode_rate = float(decode_rate)
        self.start = start
        self.config = config or ControllerConfig()
        # False when the recompute rate is only a guess: then it steers levels, never stops.
        self.allow_recompute = allow_recompute
        # A split fetch: the client prefills the prefix's head until then, so it can recompute
        # these chunks only after it, and the fetch gains nothing by being done before it.
        self.busy_until = start if busy_until is None else busy_until
        self._default_deadline = deadline is None
        self.deadline = deadline if deadline is not None else self._aim(chunk_count)
        self._bpt = {name: float(bytes_per_token[name]) for name in self.levels}
        self._observed: set[str] = set()
        self._sizes: list[Mapping[str, int] | None] = (
            list(sizes) if sizes is not None else [None] * chunk_count
        )
        self._state: list[str | None] = [None] * chunk_count  # None / "flight" / "done" / "cut"
        self._limit = chunk_count  # chunks from here on will not be fetched (limit_to)
        self._flight_bytes: dict[int, float] = {}
        self._last_level: str | None = None
        self.levels_used: list[str | None] = [None] * chunk_count
        self.switches = 0

    # ----------------------------------------------------------------- inputs
    def state_sizes(self, index: int, sizes: Mapping[str, int] | None) -> None:
        """A serving peer stated chunk ``index``'s encoded size at some levels (None: forget
        what was stated, e.g. the free local copy that could not be read after all)."""
        self._sizes[index] = dict(sizes) if sizes is not None else None

    def chunk_sent(self, index: int, level: str) -> None:
        """Chunk ``index`` was requested at ``level`` (by this controller's decision or not)."""
        if index >= self._limit:
            return
        self._state[index] = "flight"
        self._flight_bytes[index] = self.chunk_bytes(index, level)
        self.levels_used[index] = level

    def chunk_received(self, index: int, level: str, nbytes: int) -> None:
        """Chunk ``index`` arrived: ``nbytes`` encoded bytes at ``level``; sizes are learned."""
        self._state[index] = "done"
        self._flight_bytes.pop(index, None)
        self.levels_used[index] = level
        self._observe(level, nbytes)

    def _aim(self, chunks: int) -> float:
        """Without a deadline: usable ``target_speedup`` times sooner than recomputing these, or
        when the client's own prefill of a split fetch's head ends, whichever is later."""
        soon = self.start + chunks * self.chunk_tokens / self.recompute_rate / self.config.target_speedup
        return max(soon, self.busy_until)

    def limit_to(self, count: int) -> None:
        """Only the first ``count`` chunks will be fetched (a chunk no live peer holds, a cut):
        the rest, and their bytes in flight, no longer count against the deadline, and past
        them the client recomputes whatever it decides (so the recompute side stops there too;
        so does the aim when the client set no deadline)."""
        if count >= self._limit:
            return
        self._limit = max(0, count)
        if self._default_deadline:
            self.deadline = self._aim(self._limit)
        for index in range(self._limit, self.chunk_count):
            self._state[index] = "cut"
            self._flight_bytes.pop(index, None)

    def chunk_returned(self, index: int) -> None:
        """Chunk ``index`` is to be fetched again (its peer died or stalled)."""
        if index >= self._limit:
            return
        self._state[index] = None
        self._flight_bytes.pop(index, None)
        self.levels_used[index] = None

    def _observe(self, level: str, nbytes: int) -> None:
        if level not in self._bpt or nbytes <= 0:
            return
        measured = nbytes / self.chunk_tokens
        old = self._bpt[level]
        weight = self.config.observe_weight if level in self._observed else 1.0
        new = old + weight * (measured - old)
        self._observed.add(level)
        # Levels not seen yet keep their ratio to this one: the prior's shape is more reliable
        # than its scale (the codec's ratio depends on the model far more than the ladder does).
        scale = new / old
        for name in self.levels:
            if name not in self._observed:
                self._bpt[name] *= scale
        self._bpt[level] = new

    # ----------------------------------------------------------------- estimates
    def chunk_bytes(self, index: int, level: str) -> float:
        """Encoded bytes of chunk ``index`` at ``level``: stated by the peer, else estimated."""
        stated = self._sizes[index]
        if stated is not None and level in stated:
            return float(stated[level])
        return self._bpt[level] * self.chunk_tokens

    def bytes_per_token(self, level: str) -> float:
        return self._bpt[level]

    def finish_time(self, now: float, bandwidth_bps: float, level: str, rtt_s: float = 0.0) -> float:
        """When the whole prefix would be usable if every unrequested chunk went at ``level``."""
        return self._finish(now, bandwidth_bps, lambda i: self.chunk_bytes(i, level), rtt_s)

    def _finish(
        self, now: float, bandwidth_bps: float, size: Callable[[int], float], rtt_s: float
    ) -> float:
        todo = [i for i, s in enumerate(self._state) if s is None]
        if not todo and not self._flight_bytes:
            return now
        if bandwidth_bps <= 0:
            return math.inf
        bytes_left = sum(self._flight_bytes.values()) + sum(size(i) for i in todo)
        transfer = bytes_left * 8.0 / (bandwidth_bps * self.config.safety)
        decode = bytes_left / self.decode_rate
        last = size(todo[-1]) if todo else 0.0
        tail = min(last / self.decode_rate, decode)
        overhead = rtt_s + self.config.per_chunk_overhead_s * (len(todo) + len(self._flight_bytes))
        return now + max(transfer, decode) + tail + overhead

    def hedged_finish(
        self, now: float, bandwidth_bps: float, index: int, level: str, rtt_s: float = 0.0
    ) -> float:
        """When the prefix would be usable if the link fell to 1/``hedge_factor`` now, chunk
        ``index`` went at ``level`` and every other unrequested chunk at the floor."""
        floor = self.allowed[-1]
        return self._finish(
            now,
            bandwidth_bps / self.config.hedge_factor,
            lambda i: self.chunk_bytes(i, level if i == index else floor),
            rtt_s,
        )

    def recompute_finish(self, now: float) -> float:
        """When the prefix would be usable if everything after the restored prefix were
        recomputed (after the head of a split fetch: the client prefills one thing at a time)."""
        first_missing = self.prefix_done()
        tokens = max(0, self._limit - first_missing) * self.chunk_tokens
        return max(now, self.busy_until) + tokens / self.recompute_rate

    def prefix_done(self) -> int:
        """Number of leading chunks already received."""
        n = 0
        for state in self._state[: self._limit]:
            if state != "done":
                break
            n += 1
        return n

    # ----------------------------------------------------------------- the decision
    def decide(
        self,
        index: int,
        now: float,
        bandwidth_bps: float,
        rtt_s: float = 0.0,
        carrier: Carrier | None = None,
    ) -> Decision:
        """The level for chunk ``index`` (not yet requested), or :class:`RecomputeRest`.
        ``bandwidth_bps``: what all peers deliver together; ``carrier``: the one peer that
        will send this chunk, when the fetch has several (a level its link cannot deliver by
        the deadline is not chosen because the others are fast)."""
        if not 0 <= index < self.chunk_count:
            raise ValueError(f"chunk {index} outside 0..{self.chunk_count - 1}")
        decision = self._choose(index, now, _rate(bandwidth_bps), rtt_s, carrier)
        if isinstance(decision, FetchAt):
            if self._last_level is not None and decision.level != self._last_level:
                self.switches += 1
            self._last_level = decision.level
        return decision

    def _choose(
        self, index: int, now: float, bandwidth_bps: float, rtt_s: float, carrier: Carrier | None
    ) -> Decision:
        recompute = self.recompute_finish(now)
        finishes = {name: self.finish_time(now, bandwidth_bps, name, rtt_s) for name in self.allowed}
        # Ties (an unknown or dead link: every finish infinite) go to the smallest level.
        fastest = min(self.allowed, key=lambda name: (finishes[name], -self.allowed.index(name)))
        if self.allow_recompute and finishes[fastest] >= recompute:
            return RecomputeRest(
                from_index=self.prefix_done(),
                predicted_finish=finishes[fastest],
                recompute_finish=recompute,
            )
        limit = min(self.deadline, recompute) if self.allow_recompute else self.deadline
        chosen = None
        floor = self.allowed[-1]
        # After a fall now: on time, or later than the floor by at most hedge_slack of the time left.
        hedge_limit = max(
            limit,
            self.hedged_finish(now, bandwidth_bps, index, floor, rtt_s)
            + self.config.hedge_slack * max(0.0, limit - now),
        )
        for name in self.allowed:  # most faithful first
            if finishes[name] > self._budget_for(name, now, limit):
                continue
            if name != floor and self.hedged_finish(now, bandwidth_bps, index, name, rtt_s) > hedge_limit:
                # Fits the estimate, but a drop now would leave its extra bytes on a slow link.
                continue
            if name != floor and carrier is not None and self._carried_by(carrier, now, index, name) > limit:
                continue  # the whole fetch is fast enough, this chunk's own peer is not
            chosen = name
            break
        meets = chosen is not None
        if chosen is None:
            chosen = fastest
        elif carrier is not None and self._carried_by(carrier, now, index, chosen) > limit:
            meets = False  # even the floor is late over this chunk's own peer
        return FetchAt(
            index=index,
            level=chosen,
            predicted_finish=finishes[chosen],
            recompute_finish=recompute,
            meets_deadline=meets,
        )

    def should_recompute(
        self, now: float, bandwidth_bps: float, rtt_s: float = 0.0, margin: float = 1.0
    ) -> RecomputeRest | None:
        """Between decisions (all chunks requested, or the window full): would the chunks in
        flight plus the rest at the fastest allowed level finish more than ``margin`` times later
        than recomputing from the first missing chunk? Then :class:`RecomputeRest`, else None.
        Lets a fetch give up as soon as the bytes arriving show the link too slow, instead of
        waiting for the next chunk to be requested."""
        if margin < 1:
            raise ValueError("margin must be >= 1")
        if not self.allow_recompute:
            return None
        bandwidth_bps = _rate(bandwidth_bps)
        recompute = self.recompute_finish(now)
        if recompute <= now:
            return None  # the whole prefix is in: nothing left to recompute
        best = min(self.finish_time(now, bandwidth_bps, name, rtt_s) for name in self.allowed)
        if best - now <= margin * (recompute - now):
            return None
        return RecomputeRest(
            from_index=self.prefix_done(), predicted_finish=best, recompute_finish=recompute
        )

    def reconsider(
        self, index: int, level: str, received: int, now: float, bandwidth_bps: float
    ) -> FetchAt | None:
        """Chunk ``index`` is in flight at ``level`` with ``received`` bytes in: after a bandwidth
        drop, is it better to abandon it and ask again at a smaller level? Returns the new
        decision (already recorded as sent), or None to keep going. Only for a clear cut: the bytes
        already in are lost, and the fetcher must cancel the transfer so the sender stops."""
        if not bandwidth_bps > 0 or level not in self.allowed or self._state[index] != "flight":
            return None
        saved = self._flight_bytes.pop(index)
        self._state[index] = None
        choice = self._choose(index, now, bandwidth_bps, 0.0, None)
        self._state[index] = "flight"
        self._flight_bytes[index] = saved
        if not isinstance(choice, FetchAt):
            return None  # the next decide() says "recompute"; nothing to gain by restarting
        if self.allowed.index(choice.level) <= self.allowed.index(level):
            return None
        left = max(0.0, self.chunk_bytes(index, level) - received)
        if self.chunk_bytes(index, choice.level) >= left * (1.0 - self.config.up_margin):
            return None
        self.switches += 1
        self._last_level = choice.level
        self.chunk_sent(index, choice.level)
        return choice

    def _carried_by(self, carrier: Carrier, now: float, index: int, level: str) -> float:
        """When chunk ``index`` at ``level`` would be in if ``carrier`` sends it after what it
        has queued."""
        rate = _rate(carrier.bandwidth_bps) * self.config.safety
        if rate <= 0:
            return math.inf
        bits = (carrier.queued_bytes + self.chunk_bytes(index, level)) * 8.0
        return now + bits / rate + self.chunk_bytes(index, level) / self.decode_rate

    def _budget_for(self, name: str, now: float, limit: float) -> float:
        """The latest acceptable finish for ``name``: stricter when it means switching up."""
        last = self._last_level
        if last is not None and self.allowed.index(name) < self.allowed.index(last):
            return limit - self.config.up_margin * max(0.0, limit - now)
        return limit


# --------------------------------------------------------------------------- split fetches
def head_to_recompute(
    fetch_s: Sequence[float], recompute_s: float, *, startup_s: float = 0.0, min_gain: float = 1.0,
    max_head: int | None = None,
) -> int:
    """How many leading chunks a client should prefill itself while the rest is fetched.

    The client recomputes chunks ``[0, s)`` at ``recompute_s`` seconds each while chunks
    ``[s, n)`` arrive one after the other, chunk ``i`` taking ``fetch_s[i]`` after
    ``startup_s``; the prefix is usable when both are done. Returns the ``s`` that makes that
    soonest, or 0 when it beats fetching everything by less than ``min_gain`` times. At least
    one chunk is left to fetch: recomputing the whole prefix is :class:`RecomputeRest`'s to say.
    ``max_head``: at most this many (a deadline the client's prefill must end by).
    """
    if recompute_s <= 0 or min_gain < 1:
        raise ValueError("recompute_s must be > 0 and min_gain >= 1")
    if not all(math.isfinite(t) and t >= 0 for t in (startup_s, *fetch_s)):
        return 0  # a dead or unknown link: whether to fetch at all is RecomputeRest's to judge
    count = len(fetch_s)
    left = startup_s + sum(fetch_s)  # fetching chunks [s, n)
    everything = left
    best, best_finish = 0, everything
    for head in range(1, count if max_head is None else min(count, max_head + 1)):
        left -= fetch_s[head - 1]
        finish = max(head * recompute_s, left)
        if finish < best_finish:
            best, best_finish = head, finish
    return best if best_finish * min_gain <= everything else 0


# --------------------------------------------------------------------------- scheduling
@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """Request chunk ``index`` from ``peer``."""

    index: int
    peer: str


@dataclass(slots=True)
class _Peer:
    bandwidth_bps: float
    window: int
    alive: bool = True
    inflight: dict[int, float] = field(default_factory=dict)  # chunk -> expected bytes
    last_progress: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Knobs of the chunk scheduler."""

    window: int = 2
    """Chunks in flight per peer: one transferring, one queued behind it, so the link never idles."""
    default_bandwidth_bps: float = 100e6
    """Weight of a peer whose bandwidth is not known yet."""
    stall_factor: float = 4.0
    """A peer is stalled after this many times its expected time for the chunk at its head."""
    stall_floor_s: float = 5.0
    """...and never before this long without progress (RTOs, GC pauses, a sender draining the
    buffered bytes of a cancelled transfer). A dead peer is the transport's to detect, faster."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.default_bandwidth_bps <= 0:
            raise ValueError("default_bandwidth_bps must be > 0")
        if self.stall_factor < 1 or self.stall_floor_s < 0:
            raise ValueError("stall_factor must be >= 1 and stall_floor_s >= 0")


class ChunkScheduler:
    """Spreads the chunks of one prefix over the peers holding them.

    ``holders[i]`` names the peers that hold chunk i. A prefix is only useful up to its first
    gap, so chunks past a chunk no live peer holds are never requested (:attr:`limit`).
    Each call to :meth:`assign` walks the pending chunks in order and gives each to the holder
    that would finish it earliest (its queued bytes plus this chunk, over its bandwidth); a chunk
    whose best holder is busy waits for it rather than going to a much slower free peer.
    """

    def __init__(
        self,
        *,
        holders: Sequence[Collection[str]],
        now: float,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self._holders = [set(h) for h in holders]
        self._peers: dict[str, _Peer] = {}
        for peers in self._holders:
            for peer in peers:
                if peer not in self._peers:
                    self._peers[peer] = _Peer(
                        self.config.default_bandwidth_bps, self.config.window, last_progress=now
                    )
        self._pending: set[int] = set(range(len(holders)))
        self._not_before: dict[int, float] = {}  # pending chunk -> when it may be asked again
        self._owner: dict[int, str] = {}
        self._done: set[int] = set()
        self._reported = 0  # chunks [0, _reported) were reported complete in order
        self._limit = len(holders)
        self._update_limit()

    # ----------------------------------------------------------------- state
    @property
    def chunk_count(self) -> int:
        return len(self._holders)

    @property
    def limit(self) -> int:
        """Chunks at or past this index cannot be fetched (no live holder of some earlier one)."""
        return self._limit

    @property
    def finished(self) -> bool:
        """Every fetchable chunk is done."""
        return self._reported >= self._limit

    def in_flight(self) -> dict[int, str]:
        return dict(self._owner)

    def peers(self) -> list[str]:
        return [name for name, p in self._peers.items() if p.alive]

    def set_bandwidth(self, peer: str, bandwidth_bps: float) -> None:
        if peer in self._peers and bandwidth_bps > 0:
            self._peers[peer].bandwidth_bps = bandwidth_bps

    def set_window(self, peer: str, window: int) -> None:
        """Chunks in flight allowed for ``peer`` (1 while its bandwidth is still unmeasured, so
        a wrong first guess commits one chunk, not a window of them)."""
        if peer in self._peers and window >= 1:
            self._peers[peer].window = window

    def working_peers(self, served_by: str | None = None) -> list[str]:
        """Live peers with chunks in flight or holding a chunk still to request; with
        ``served_by``, chunks that holder has count for it alone (this node's own store: the
        peers that hold them too are only its fallback, not a link the rest comes over)."""
        names = set(self._owner.values())
        for index in self._pending:
            if index < self._limit:
                holders = self._holders[index]
                names.update((served_by,) if served_by in holders else holders)
        return [name for name, p in self._peers.items() if p.alive and name in names]

    def retry_wait(self, now: float) -> float | None:
        """Seconds until the first chunk still held back after a retry may be asked again; None
        when none is (one whose time has come waits for a slot like any pending chunk)."""
        waits = [
            t for i, t in self._not_before.items() if t > now and i in self._pending and i < self._limit
        ]
        return min(waits) - now if waits else None

    def silent_bound(self, peer: str, now: float, floor_s: float) -> float | None:
        """An upper bound on ``peer``'s rate (bits/s) once it has gone silent: nothing arrived for
        longer than its chunks in flight should take (twice that, and at least ``floor_s``), so
        at most all of them arrive right now. None while it is not silent."""
        state = self._peers.get(peer)
        if state is None or not state.alive or not state.inflight:
            return None
        silent = now - state.last_progress
        queued_bits = sum(state.inflight.values()) * 8.0
        if queued_bits <= 0 or silent <= max(floor_s, 2.0 * queued_bits / state.bandwidth_bps):
            return None
        return queued_bits / silent

    def holders(self, index: int) -> list[str]:
        """Live peers holding chunk ``index``."""
        return [p for p in self._holders[index] if self._peers[p].alive]

    def _update_limit(self) -> None:
        for index in range(self._reported, len(self._holders)):
            if index in self._done or index in self._owner:
                continue
            if not any(self._peers[p].alive for p in self._holders[index]):
                self._limit = min(self._limit, index)
                return

    # ----------------------------------------------------------------- decisions
    def assign(self, now: float, size_of: Mapping[int, float] | None = None) -> list[Assignment]:
        """Chunks to request now; ``size_of`` gives expected bytes (missing: all equal)."""
        sizes = size_of or {}
        queued = {
            name: sum(p.inflight.values()) for name, p in self._peers.items() if p.alive
        }
        slots = {name: p.window - len(p.inflight) for name, p in self._peers.items() if p.alive}
        out: list[Assignment] = []
        mean = (sum(sizes.values()) / len(sizes)) if sizes else 1.0
        for index in sorted(i for i in self._pending if i < self._limit):
            if not any(v > 0 for v in slots.values()):
                break
            if self._not_before.get(index, now) > now:
                continue  # backing off after a retry
            candidates = [p for p in self._holders[index] if p in queued]
            if not candidates:
                continue
            size = sizes.get(index, mean)
            best = min(
                candidates,
                key=lambda p: ((queued[p] + size) / self._peers[p].bandwidth_bps, p),
            )
            queued[best] += size  # reserved for `best` even if it must wait for a slot
            if slots[best] <= 0:
                continue
            slots[best] -= 1
            self._pending.discard(index)
            self._not_before.pop(index, None)
            self._owner[index] = best
            peer = self._peers[best]
            if not peer.inflight:
                peer.last_progress = now  # an idle peer's clock starts with its first request
            peer.inflight[index] = size
            out.append(Assignment(index=index, peer=best))
        return out

    def completed(self, index: int, now: float) -> list[int]:
        """Chunk ``index`` arrived; returns the chunks now complete in prefix order."""
        owner = self._owner.pop(index, None)
        if owner is not None:
            peer = self._peers[owner]
            peer.inflight.pop(index, None)
            peer.last_progress = now
        self._pending.discard(index)
        self._done.add(index)
        newly: list[int] = []
        while self._reported < self._limit and self._reported in self._done:
            newly.append(self._reported)
            self._reported += 1
        return newly

    def chunk_failed(self, index: int, peer: str) -> None:
        """``peer`` could not serve chunk ``index`` (not held any more, corrupt): try another."""
        self._holders[index].discard(peer)
        self.chunk_retry(index, peer)

    def chunk_retry(self, index: int, peer: str, not_before: float | None = None) -> None:
        """``peer`` could not serve chunk ``index`` just now (busy): ask again, it still holds it,
        not before ``not_before`` if given (a busy peer asked again at once is busy still).

        The peer's slot is freed: a retry must not wait on the failed transfer's window.
        """
        if self._owner.get(index) == peer:
            del self._owner[index]
            self._peers[peer].inflight.pop(index, None)
        if index not in self._done:
            self._pending.add(index)
            if not_before is not None:
                self._not_before[index] = not_before
        self._update_limit()

    def peer_lost(self, peer: str) -> list[int]:
        """``peer`` died or stalled: its chunks go back to pending; returns them."""
        state = self._peers.get(peer)
        if state is None or not state.alive:
            return []
        state.alive = False
        returned = sorted(i for i in state.inflight if i not in self._done)
        for index in returned:
            self._owner.pop(index, None)
            self._pending.add(index)
        state.inflight.clear()
        self._update_limit()
        return returned

    def stalled(self, now: float) -> list[str]:
        """Live peers with chunks in flight and no progress for too long."""
        out = []
        for name, peer in self._peers.items():
            if not peer.alive or not peer.inflight:
                continue
            # Everything queued on the peer counts: its chunks travel one after the other.
            expected = sum(peer.inflight.values()) * 8.0 / peer.bandwidth_bps
            allowed = max(self.config.stall_floor_s, self.config.stall_factor * expected)
            if now - peer.last_progress > allowed:
                out.append(name)
        return out

    def abandon_from(self, index: int) -> list[tuple[int, str]]:
        """Stop at ``index`` (recompute the rest): returns in-flight (chunk, peer) to cancel."""
        self._limit = min(self._limit, index)
        cancelled = [(i, p) for i, p in self._owner.items() if i >= self._limit]
        for i, p in cancelled:
            del self._owner[i]
            self._peers[p].inflight.pop(i, None)
        self._pending = {i for i in self._pending if i < self._limit}
        return sorted(cancelled)


# --------------------------------------------------------------------------- link evidence
@dataclass(slots=True)
class _Sighting:
    bps: float | None  # the estimate as last seen; None: awaiting a first sample (after idle)
    total_bytes: int  # the session's delivered bytes when last seen
    new_samples: int  # times the estimate changed while watched (each change: a new sample)
    stood_before: bool  # first seen already standing on evidence_bytes (measured before us)


class LinkEvidence:
    """Which live bandwidth estimates may condemn a link, and the last of them per peer.

    The transport's estimate is an EWMA of samples of delivered bytes over busy time; its first
    sample on a session spans the request's set-up, the first byte's wait and slow start, so over
    a 1 Gbit/s link it can read 5 Mbit/s. Bytes the session delivers without a new sample (the
    rest of a transfer abandoned after a give-up) do not correct it. So an estimate is evidence
    only when the session delivered ``evidence_bytes`` *and* the estimate is not the first sample
    seen: it changed at least once while watched (a later sample came in), or it stood on
    ``evidence_bytes`` already when first seen (measured before this watcher, e.g. by another
    fetcher). A session that went stale (no estimate) starts over: its next sample may be slow
    start again after the idle time.

    Evidence is remembered for ``memory_s`` after the transport forgot the estimate (it drops it
    30 s after its last sample, and a client recomputing after a given-up fetch can ask again
    later than that); a peer's remembered rate is replaced by the next evidence, never by a
    non-evidence estimate.
    """

    def __init__(self, *, evidence_bytes: int, memory_s: float) -> None:
        if evidence_bytes < 0 or memory_s < 0:
            raise ValueError("evidence_bytes and memory_s must be >= 0")
        self.evidence_bytes = evidence_bytes
        self.memory_s = memory_s
        self._seen: dict[str, _Sighting] = {}
        self._remembered: dict[str, tuple[float, float]] = {}  # peer -> (bits/s, when)

    def observe(
        self, peer: str, now: float, bps: float | None, total_bytes: int | None
    ) -> tuple[float | None, bool]:
        """The estimate to use for ``peer`` and whether it is evidence. ``bps``/``total_bytes``:
        the session's live estimate and delivered bytes now (None: no session or no estimate)."""
        seen = self._seen.get(peer)
        if total_bytes is None:  # no session: the next one is new
            self._seen.pop(peer, None)
        elif bps is None or not bps > 0:
            if seen is not None:  # stale: the next sample is a first one again
                seen.bps, seen.new_samples, seen.stood_before = None, 0, False
        if bps is None or not bps > 0 or total_bytes is None:
            remembered = self.remembered(peer, now)
            return remembered, remembered is not None
        if seen is None or total_bytes < seen.total_bytes:  # first sight, or a new session
            seen = _Sighting(bps, total_bytes, 0, total_bytes >= self.evidence_bytes)
            self._seen[peer] = seen
        elif seen.bps is not None and bps != seen.bps:
            seen.new_samples += 1
        seen.bps = bps
        seen.total_bytes = total_bytes
        evidence = total_bytes >= self.evidence_bytes and (seen.new_samples > 0 or seen.stood_before)
        if evidence:
            self._remembered[peer] = (bps, now)
        return bps, evidence

    def remembered(self, peer: str, now: float) -> float | None:
        """The last evidence estimate of ``peer`` if still within ``memory_s``."""
        entry = self._remembered.get(peer)
        if entry is None or now - entry[1] > self.memory_s:
            return None
        return entry[0]
