"""The fetch pipeline: chunks of a prefix flow receive -> decode -> restore, overlapped.

Owns the asyncio side of fetching one prefix (:class:`Fetcher`) and of serving levels to peers
(:class:`LevelServer`). The decisions come from the sans-IO policies in
:mod:`kvpeer.fetch_policy`: the :class:`~kvpeer.fetch_policy.ResolutionController` picks each
chunk's level, the :class:`~kvpeer.fetch_policy.ChunkScheduler` picks its peer. This module
moves bytes and keeps the stages busy:

* **receive** — one task per chunk transfer (``window`` per peer), started by the coordinator;
  concurrent fetches of the same chunk share one transfer (:class:`_Transfers`);
* **decode + restore** — one worker drains a bounded priority queue (lowest chunk first) and
  runs ``codec.decode`` and the copy into the client's shared memory in an executor, so chunk
  i decodes while chunk i+1 is still on the wire;
* **report** — chunks are reported to the sink in prefix order as soon as they are restored.

A fetch ends when every reachable chunk is restored, when the controller decides that
recomputing the rest is faster, or at the request's deadline; the outcome says where the
client must start recomputing. It must not: decide levels itself, parse the wire, or return
while an executor job may still write into the client's memory (a job still queued when the
fetch ends is dropped instead of waited for: it has not touched that memory).

Logging: what happens to one fetch or one chunk logs at DEBUG, with the prefix and the peer
(under load one line per fetch floods the journal); :attr:`Fetcher.counters` counts it for the
metrics and the daemon's activity line. A peer that fails is warned about once, until it
serves a chunk again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import torch

from kvpeer import aio, codec
from kvpeer.errors import (
    CodecError,
    ErrorCode,
    KVPeerError,
    ProtocolError,
    StoreError,
    TransportError,
)
from kvpeer.fetch_policy import (
    Carrier,
    ChunkScheduler,
    ControllerConfig,
    FetchAt,
    LinkEvidence,
    RecomputeRest,
    ResolutionController,
    SchedulerConfig,
    head_to_recompute,
    prior_bytes_per_token,
)

log = logging.getLogger(__name__)

LOCAL = ""  # holder name of chunks in this node's own store
FETCHER_EVENTS = ("preempt", "retry", "chunk_failed", "peer_lost", "undecodable", "cache_dropped")
RATE_SAMPLES = 9  # puts whose prefill speed is remembered per model (median of these)
#: Bytes of fetched chunks waiting to be put into the store at most; past it they are not kept.
MAX_CACHING_BYTES = 256 << 20
#: Bytes of transcodes answered to peers before the store took them, at most; past it a peer's
#: answer waits for the put (a slow disk's back-pressure reaches the peers asking).
MAX_STORING_BYTES = 64 << 20
MAX_TROUBLED_PEERS = 1024  # peers remembered as warned about (peer ids come from the LAN)
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_T = TypeVar("_T")


# --------------------------------------------------------------------------- what we talk to
class BandwidthSource(Protocol):
    """A session's estimator (kvpeer.transport.estimator.BandwidthEstimator fits)."""

    total_bytes: int
    """Payload the session delivered so far, abandoned transfers included."""

    def bandwidth_bps(self, now: float) -> float | None: ...


class BlobSource(Protocol):
    """A peer session (kvpeer.transport.PeerSession fits)."""

    @property
    def estimator(self) -> BandwidthSource: ...

    @property
    def rtt_s(self) -> float | None: ...

    async def fetch_blob(self, key: bytes, level: str, timeout: float | None = None) -> bytes: ...  # noqa: ASYNC109


class ChunkCache(Protocol):
    """This node's store (kvpeer.store.ChunkStore fits)."""

    def has(self, key: bytes) -> bool: ...

    async def get(self, key: bytes, level: str | None = None) -> bytes | None: ...

    async def put(self, key: bytes, level: str, blob: bytes) -> Any: ...


class LevelStore(ChunkCache, Protocol):
    """The store a :class:`LevelServer` serves from (kvpeer.store.ChunkStore fits)."""

    async def put_if_held(self, key: bytes, level: str, blob: bytes) -> bool: ...

    def levels(self, key: bytes) -> list[str]: ...

    def used_as_prefix(self, keys: Sequence[bytes]) -> None: ...


class FetchSink(Protocol):
    """Where restored chunks go (kvpeer.api.server.FetchSink fits)."""

    async def allocate(
        self, *, layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: str, chunk_tokens: int
    ) -> Any: ...

    def chunk_view(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    async def chunk_done(self, index: int, level: str) -> Any: ...

    # Optional: ``chunk_decoded_blocking(index)``, called in the decoding thread once chunk
    # ``index``'s views are filled (a sink whose views are staging buffers copies them on).


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, slots=True, kw_only=True)
class FetchEvent:
    """One step of a fetch, for timelines and tests (``t`` in seconds since the fetch began)."""

    t: float
    kind: str  # request, received, decode_start, decode_end, done, switch, preempt,
    # peer_lost, failed, recompute, deadline, split (index: the chunks left to the client)
    index: int = -1
    level: str = ""
    peer: str = ""
    nbytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchOutcome:
    """What a fetch restored: chunks ``[0, chunks)``; the client recomputes from ``recompute_from``.

    A split fetch left its first ``head`` chunks to the client: then every count and index here
    (chunks, requested, the events') starts after them.
    """

    chunks: int
    requested: int
    levels: tuple[str, ...]
    bytes_moved: int  # encoded bytes received from peers
    elapsed_s: float
    reason: str  # complete, recompute, deadline, unavailable, error, cancelled (the caller gave up)
    switches: int = 0
    events: tuple[FetchEvent, ...] = ()
    head: int = 0

    @property
    def recompute_from(self) -> int:
        return self.chunks


@dataclass(frozen=True, slots=True, kw_only=True)
class FetcherConfig:
    """How the pipeline runs (defaults suit a LAN and a small CPU)."""

    request_timeout_s: float = 10.0
    """Longest wait for one chunk from a peer before the peer counts as stalled."""
    tick_s: float = 0.1
    """How often the coordinator looks at stalls, preemption and bandwidth without an event."""
    decode_queue: int = 2
    """Received chunks waiting for the decoder; transfers wait (backpressure) beyond this."""
    initial_bandwidth_bps: float = 100e6
    """Assumed per-peer bandwidth before the transport measured any."""
    probe_level: str = "q8"
    """Most faithful level asked of a peer whose bandwidth is not measured yet: a wrong guess
    then costs one mid-sized chunk, not one exact chunk (the estimate lasts across fetches)."""
    initial_decode_rate: float = 150e6
    """Assumed decode speed (compressed bytes/s) before one was measured."""
    default_recompute_rate: float = 400.0
    """Tokens/s the client recomputes at, when neither it nor a put told us."""
    kv_bytes_per_token: float = 23_040.0
    """Uncompressed KV bytes per token when the caller does not say (SmolLM2-135M, fp16)."""
    committed_bytes: int = 4 * 1024 * 1024
    """Bytes of a transfer a cancel cannot recall (the sender's buffered data): preempting a
    chunk saves only what lies beyond them."""
    evidence_s: float = 2.0
    """Before a whole chunk from some peer was measured, "recompute the rest" waits this long,
    unless the transport's live estimate is evidence (:class:`~kvpeer.fetch_policy.LinkEvidence`:
    ``evidence_bytes`` delivered and more than the session's first sample)."""
    evidence_bytes: int = 512 * 1024
    """Bytes a peer's session has delivered (in this fetch or earlier ones) before its live
    estimate may decide "recompute the rest" — and then only once a sample after the first one
    came in: the first spans set-up and slow start (a 1 Gbit/s link read 5 Mbit/s)."""
    link_memory_s: float = 120.0
    """How long the fetcher remembers a peer's live estimate that was evidence, after the
    transport forgot it (it drops an estimate 30 s after its last sample: a client recomputing
    after an abandoned fetch can easily take that long before it asks again)."""
    recompute_margin: float = 1.25
    """On the live estimate alone (no whole chunk measured, ``evidence_s`` not over), recompute
    only when it is evidence and even the floor would finish this many times later than
    recomputing."""
    max_retries: int = 3
    """Transient failures (BUSY) of one chunk before it is treated as unavailable."""
    retry_backoff_s: float = 0.1
    """Wait before asking for a chunk again after a transient failure, doubled per retry (a busy
    peer asked again at once is still busy: three retries would be spent in milliseconds)."""
    split_gain: float = 1.3
    """A split fetch leaves chunks to the client only when that is predicted to make the prefix
    usable this many times sooner than fetching all of it at the floor level. The prediction
    takes the client's prefill as linear in tokens, and a short head is dearer per token than
    the prompt's average (one 256-token chunk of SmolLM2 here: 1.6x, beside the fetch's own CPU
    work): at 1.1, a 100 Mbit/s fetch left the client one chunk and was 1.25 s instead of 0.97 s."""
    silent_after_s: float = 1.0
    """A peer with chunks in flight and nothing arriving for this long (and twice what its
    chunks should take) is taken at the rate "everything in flight arrives now", falling with
    the silence, so the recompute rule sees a link that went quiet before the request timeout."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# --------------------------------------------------------------------------- blocking work
def decode_into_blocking(blob: bytes, k_out: torch.Tensor, v_out: torch.Tensor) -> float:
    """Decode one chunk straight into the client's views (CodecError if it does not fit them);
    returns the seconds it took."""
    started = time.perf_counter()
    codec.decode(blob, out=(k_out, v_out))
    return time.perf_counter() - started


TranscodeOptions = Callable[[codec.Header], dict[str, Any]]


def transcode_blocking(blob: bytes, level: str, options: TranscodeOptions | None = None) -> bytes:
    """A lower level made from a held blob (runs in an executor). ``options``: encode keywords
    for the blob's model (its calibration profile, its RoPE layout), from the blob's header."""
    return codec.transcode(blob, level, **(options(codec.read_header(blob)) if options else {}))


# --------------------------------------------------------------------------- shared transfers
@dataclass(slots=True)
class ChunkRate:
    """What whole chunks from one peer measured: the goodput (bits/s, an EWMA), how many chunks
    it rests on, and when the last of them arrived (it is forgotten after ``link_memory_s``)."""

    bps: float
    samples: int
    at: float


class _SinkFailed(Exception):
    """The client's memory failed (allocation, a released or shrunk segment): not the chunk's
    or its peer's fault."""

    def __init__(self, error: KVPeerError) -> None:
        super().__init__(str(error))
        self.error = error


class _Transfer:
    """One chunk transfer that several fetches may wait on."""

    def __init__(self, task: asyncio.Task[bytes], level: str) -> None:
        self.task = task
        self.level = level
        self.waiters = 0


class _Delivery(NamedTuple):
    blob: bytes
    sender: str  # the peer it came from (LOCAL: this node's store)
    shared: bool  # another fetch's transfer, joined: its bytes crossed the wire for that one


class _Transfers:
    """Deduplication: concurrent fetches of the same chunk from the same peer share a transfer.

    The transfer task belongs to this table (not to any one fetch), so a fetch that gives up does
    not cancel it under another fetch; the last waiter to leave cancels it.
    """

    def __init__(self) -> None:
        # (chunk, peer, level): a fetch that will not join a bigger transfer of the chunk starts
        # its own beside it, and both stay joinable.
        self._live: dict[tuple[bytes, str, str], _Transfer] = {}
        self.shared = 0  # transfers joined by a second fetch (for stats and tests)

    def find(self, key: bytes, acceptable: Collection[str]) -> tuple[str, _Transfer] | None:
        """A live transfer of ``key`` (from any peer) at a level in ``acceptable``, and its peer."""
        for (k, peer, _level), transfer in self._live.items():
            task = transfer.task
            if k == key and transfer.level in acceptable and not task.done() and not task.cancelling():
                return peer, transfer
        return None

    async def get(
        self,
        key: bytes,
        peer: str,
        level: str,
        acceptable: Collection[str],
        start: Callable[[], Coroutine[Any, Any, bytes]],
    ) -> _Delivery:
        """The blob, the peer that sent it and whether this joined another fetch's transfer
        (which may come from another peer than ``peer``: its failure is that peer's, so it
        reaches the joiner as BUSY, ask again)."""
        found = self.find(key, acceptable)
        if found is None:
            task: asyncio.Task[bytes] = asyncio.get_running_loop().create_task(start())
            sender, transfer = peer, _Transfer(task, level)
            entry = (key, peer, level)
            self._live[entry] = transfer
            task.add_done_callback(lambda _t: self._forget(entry, transfer))
        else:
            sender, transfer = found
            self.shared += 1
        transfer.waiters += 1
        try:
            return _Delivery(await asyncio.shield(transfer.task), sender, found is not None)
        except KVPeerError as exc:
            if sender == peer:
                raise
            raise ProtocolError(ErrorCode.BUSY, f"shared transfer from {sender} failed: {exc}") from exc
        finally:
            transfer.waiters -= 1
            if transfer.waiters == 0 and not transfer.task.done():
                transfer.task.cancel()

    def _forget(self, key: tuple[bytes, str, str], transfer: _Transfer) -> None:
        if self._live.get(key) is transfer:
            del self._live[key]
        if not transfer.task.cancelled():
            transfer.task.exception()  # retrieved: a failure nobody awaited is not an error

    async def close(self) -> None:
        tasks = [t.task for t in self._live.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


# --------------------------------------------------------------------------- the fetcher
class Fetcher:
    """Fetches prefixes for one daemon; holds what outlives one fetch (rates, shared transfers).

    ``sessions(peer)`` returns the open session to a peer or None; ``cache`` is this node's
    store: chunks found there are restored without the network, and fetched chunks are put
    there once they decoded (so the next fetch of the same prefix is local). ``on_event`` sees
    every :class:`FetchEvent` as it happens (tracing; it must not block).
    """

    def __init__(
        self,
        *,
        sessions: Callable[[str], BlobSource | None],
        cache: ChunkCache | None,
        levels: Sequence[str] = codec.LEVELS,
        chunk_tokens: int = 256,
        config: FetcherConfig | None = None,
        executor: Any = None,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[FetchEvent], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.on_event = on_event
        self.cache = cache
        self.levels = tuple(levels)
        self.chunk_tokens = chunk_tokens
        self.config = config or FetcherConfig()
        self.executor = executor
        self.clock = clock
        self.transfers = _Transfers()
        self.decode_rate = self.config.initial_decode_rate
        # model -> the last prefill speeds (tokens/s) puts stated; their median is used
        self.recompute_samples: dict[str, collections.deque[float]] = {}
        # Learned sizes, kept across fetches, per (model, cache dtype): models compress
        # differently, and the lossless level's size depends on the dtype.
        self._bytes_per_token: dict[tuple[str, int], dict[str, float]] = {}
        self.bytes_from_peers = 0  # counted as chunks arrive: fetches cancelled later too
        #: Since start, for metrics and the activity line: preempt, retry, chunk_failed
        #: (a holder could not serve a chunk; another one or the client takes it), peer_lost
        #: (a peer died, stalled or had no session, counted once per fetch), undecodable.
        # Each at 0 from the start: a scrape shows the series before the first event.
        self.counters: collections.Counter[str] = collections.Counter(dict.fromkeys(FETCHER_EVENTS, 0))
        # Peers warned about, until they serve a chunk again (oldest first, capped).
        self._troubled: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Decoded peer chunks being put into the store: the fetcher's, not one fetch's, so a
        # fetch never waits for the store (its executor may be busy) past its deadline.
        self._caching: set[asyncio.Task[None]] = set()
        self._caching_bytes = 0
        self._closed = False
        self.chunk_rates: dict[str, ChunkRate] = {}
        # Which live estimates may condemn a link; the last of them per peer, for link_memory_s.
        self.links = LinkEvidence(
            evidence_bytes=self.config.evidence_bytes, memory_s=self.config.link_memory_s
        )

    def chunk_rate(self, peer: str, now: float) -> ChunkRate | None:
        """What whole chunks measured of ``peer``, if one did within ``link_memory_s``.

        An older rate is forgotten: after one congested fetch the controller recomputes rather
        than ask that peer, so nothing else would ever correct the rate.
        """
        rate = self.chunk_rates.get(peer)
        if rate is not None and now - rate.at > self.config.link_memory_s:
            del self.chunk_rates[peer]
            return None
        return rate

    def measure_chunk_rate(self, peer: str, sample_bps: float, now: float) -> None:
        """Fold one whole chunk's goodput into ``peer``'s rate."""
        old = self.chunk_rate(peer, now)
        if old is None:
            # A new peer's record: drop the ones nothing has asked of for too long, so peers
            # that came and went do not pile up.
            memory = self.config.link_memory_s
            for stale in [p for p, r in self.chunk_rates.items() if now - r.at > memory]:
                del self.chunk_rates[stale]
            self.chunk_rates[peer] = ChunkRate(bps=sample_bps, samples=1, at=now)
            return
        # Two chunks that shared the link and ended close together read as one chunk over that
        # small gap: bound one sample's pull.
        old.bps = 0.5 * old.bps + 0.5 * min(sample_bps, 4.0 * old.bps)
        old.samples += 1
        old.at = now

    def learn_recompute_rate(self, tokens: int, seconds: float, model: str = "") -> None:
        """A put showed how fast a client of ``model`` computes a prefix (its prefill time)."""
        # A prefill shorter than a chunk is mostly overhead, not speed.
        if tokens < self.chunk_tokens or seconds <= 0:
            return
        samples = self.recompute_samples.setdefault(model, collections.deque(maxlen=RATE_SAMPLES))
        samples.append(tokens / seconds)

    def recompute_rate_for(self, model: str = "") -> float | None:
        """The learned prefill speed of ``model``'s clients, None before any put stated one.
        The median of the last puts: one odd put (a prefill that hit the engine's own prefix
        cache reads 100x too fast, and would make every fetch give up at once) cannot move it."""
        samples = self.recompute_samples.get(model)
        return statistics.median(samples) if samples else None

    def _observe_decode(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.decode_rate = 0.7 * self.decode_rate + 0.3 * (nbytes / seconds)

    def peer_trouble(self, peer: str, message: str, *args: Any) -> None:
        """A failure of ``peer``: a WARNING the first time, DEBUG until it serves a chunk again
        (fifty fetches meeting one dead peer are one event, not fifty warnings)."""
        if peer in self._troubled:
            log.debug(message, *args)
            return
        self._troubled[peer] = None
        if len(self._troubled) > MAX_TROUBLED_PEERS:
            self._troubled.popitem(last=False)
        log.warning(message + " (until it serves a chunk again, more of this at DEBUG)", *args)

    def peer_served(self, peer: str) -> None:
        """``peer`` delivered a chunk: its trouble, if any, is over (the next is warned about)."""
        self._troubled.pop(peer, None)

    def cache_soon(self, key: bytes, level: str, blob: bytes) -> None:
        """Put a decoded peer chunk into this node's store, in the background; dropped when
        :data:`MAX_CACHING_BYTES` of such puts already wait (a slow disk's back-pressure must
        not turn into memory held here) or the fetcher is closed."""
        if self._closed or self._caching_bytes + len(blob) > MAX_CACHING_BYTES:
            self.counters["cache_dropped"] += 1
            return
        self._caching_bytes += len(blob)
        task = asyncio.get_running_loop().create_task(self._cache(key, level, blob))
        self._caching.add(task)
        task.add_done_callback(self._caching.discard)

    async def cached(self) -> None:
        """Wait until the peer chunks queued for the store by now are in it (or dropped)."""
        pending = list(self._caching)
        if pending:
            await asyncio.wait(pending)

    async def _cache(self, key: bytes, level: str, blob: bytes) -> None:
        try:
            with contextlib.suppress(StoreError):
                await self.cache.put(key, level, blob)  # type: ignore[union-attr]
        finally:
            self._caching_bytes -= len(blob)

    async def close(self) -> None:
        self._closed = True
        await self.transfers.close()
        caching = list(self._caching)
        for task in caching:
            task.cancel()
        for task in caching:
            with contextlib.suppress(BaseException):
                await task

    async def fetch(
        self,
        keys: Sequence[bytes],
        peers_per_chunk: Sequence[Collection[str]],
        sink: FetchSink,
        *,
        deadline: float | None = None,
        min_level: str | None = None,
        recompute_rate: float | None = None,
        kv_bytes_per_token: float | None = None,
        kv_dtype: str = "float16",
        policy: str = "adaptive",
        chunk_shape: tuple[int, int, int] | None = None,
        model: str = "",
        on_end: Callable[[FetchOutcome], None] | None = None,
        leave_head: Callable[[int], Any] | None = None,
    ) -> FetchOutcome:
        """Restore the longest reachable prefix of ``keys`` into ``sink``.

        ``peers_per_chunk[i]``: the peers holding chunk i (chunks in this node's store are found
        without being listed). ``deadline``: absolute time on :attr:`clock` by which the client
        wants the KV; levels aim at it and the fetch stops there. Without one, levels aim at
        ``recompute time / target_speedup`` and the fetch runs while it beats recomputing.
        ``kv_bytes_per_token`` / ``kv_dtype``: the uncompressed KV size of one token and its
        dtype (first guesses of chunk sizes; measured sizes take over).
        ``min_level``: the least faithful level acceptable. ``recompute_rate``: tokens/s the
        client prefills at; None: what puts of ``model`` showed (:meth:`learn_recompute_rate`);
        unknown, a guess steers the levels but the fetch never stops to recompute. ``policy``:
        ``adaptive`` or ``fixed:LEVEL`` (benchmarks). ``chunk_shape``: (layers, kv_heads, head_dim) the model
        fingerprint promises; a peer's chunk of another shape is refused before it is cached.
        ``on_end``: called with the outcome as the fetch ends, however it ends; a fetch whose
        caller cancels it raises CancelledError after ``on_end`` saw its outcome (reason
        "cancelled": what was restored and received until then).
        ``leave_head``: the client may prefill the prefix's first chunks itself while the rest is
        fetched (a split fetch). Where that makes the prefix usable sooner, it is called with
        how many, before any chunk is asked for or the sink allocated; the sink then gets the
        chunks from there on, numbered from 0.
        """
        if len(peers_per_chunk) != len(keys):
            raise ValueError("peers_per_chunk needs one entry per key")
        rate = recompute_rate or self.recompute_rate_for(model)
        run = _FetchRun(
            self,
            keys=list(keys),
            holders=[set(p) for p in peers_per_chunk],
            sink=sink,
            deadline=deadline,
            min_level=min_level,
            recompute_rate=rate or self.config.default_recompute_rate,
            recompute_known=rate is not None,
            kv_bytes_per_token=kv_bytes_per_token or self.config.kv_bytes_per_token,
            dtype_bytes=_DTYPE_BYTES.get(kv_dtype, 2),
            policy=policy,
            chunk_shape=chunk_shape,
            kv_dtype=kv_dtype,
            model=model,
            on_end=on_end,
            leave_head=leave_head,
        )
        return await run.run()


@dataclass(slots=True)
class _Received:
    index: int
    blob: bytes
    level: str
    peer: str


class _FetchRun:
    """The state of one fetch; lives for one :meth:`Fetcher.fetch` call."""

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        keys: list[bytes],
        holders: list[set[str]],
        sink: FetchSink,
        deadline: float | None,
        min_level: str | None,
        recompute_rate: float,
        recompute_known: bool,
        kv_bytes_per_token: float,
        dtype_bytes: int,
        policy: str,
        chunk_shape: tuple[int, int, int] | None = None,
        kv_dtype: str = "float16",
        model: str = "",
        on_end: Callable[[FetchOutcome], None] | None = None,
        leave_head: Callable[[int], Any] | None = None,
    ) -> None:
        self.f = fetcher
        self.cfg = fetcher.config
        self.on_end = on_end
        # The prefix in log lines: its last chunk's key names the whole prefix (the first
        # chunk's is shared by every prefix that starts alike: a system prompt).
        self.tag = keys[-1][:4].hex() if keys else "-"
        self.chunk_shape = chunk_shape
        self.keys = keys
        self.sink = sink
        self.start = fetcher.clock()
        self.hard_deadline = deadline
        self.events: list[FetchEvent] = []
        cache = fetcher.cache
        for index, key in enumerate(keys):
            if cache is not None and cache.has(key):
                holders[index].add(LOCAL)
        self.fixed: str | None = None
        if policy.startswith("fixed:"):
            self.fixed = policy.split(":", 1)[1]
            if self.fixed not in fetcher.levels:
                raise ValueError(f"unknown level {self.fixed!r} in policy {policy!r}")
        elif policy != "adaptive":
            raise ValueError(f"policy must be adaptive or fixed:LEVEL, not {policy!r}")
        if min_level is not None and min_level not in fetcher.levels:
            raise ProtocolError(ErrorCode.INVALID, f"unknown min_level {min_level!r}")
        self.sizes_key = (model, dtype_bytes)
        self.recompute_known = recompute_known
        self.leave_head = leave_head
        self.head = 0  # leading chunks left to the client (a split fetch)
        self._controller_args: dict[str, Any] = dict(
            levels=fetcher.levels,
            chunk_tokens=fetcher.chunk_tokens,
            recompute_rate=recompute_rate,
            start=self.start,
            bytes_per_token=fetcher._bytes_per_token.get(self.sizes_key) or prior_bytes_per_token(
                fetcher.levels, kv_bytes_per_token * 2 / dtype_bytes, dtype_bytes
            ),
            min_level=min_level,
            deadline=deadline,
            decode_rate=fetcher.decode_rate,
            config=self.cfg.controller,
            allow_recompute=recompute_known,
        )
        self.holders = holders
        self._plan_chunks(holders)
        self.queue: asyncio.PriorityQueue[tuple[int, int, _Received | None]] = asyncio.PriorityQueue(
            maxsize=self.cfg.decode_queue
        )
        self._seq = itertools.count()
        self.tg: asyncio.TaskGroup
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.transfers: dict[int, tuple[asyncio.Task[None], str, str, float]] = {}
        self.last_done: dict[str, float] = {}  # peer -> when its last chunk arrived
        self.retries: dict[int, int] = {}
        self.received: set[int] = set()
        self.restored: dict[int, str] = {}
        self.reported = 0
        self.cut = len(keys)  # first chunk we will not restore
        self.reason = "complete"
        self.bytes_moved = 0
        self.kv_dtype = kv_dtype
        # The client's memory, allocated as soon as the first chunk is requested when the model's
        # shape is known (reserving a large segment takes tens of ms: better while the chunk is
        # on the wire than when it waits to be decoded), else when the first chunk arrives.
        self.allocation: asyncio.Task[KVPeerError | None] | None = None
        self.shape: tuple[int, int, int] | None = None
        self.lost: set[str] = set()  # peers this fetch stopped asking
        self.below_floor: dict[int, str] = {}  # chunk -> the level its first holder sent, below the floor
        # True while the decoder waits on a thread (a decode, a hand-over): where the end of
        # the fetch may cancel it (:meth:`_stop_decoder`).
        self.in_thread = False

    def _plan_chunks(self, holders: list[set[str]], busy_until: float | None = None) -> None:
        """The controller and scheduler for chunks ``self.keys``, held by ``holders``."""
        self.ctl = ResolutionController(
            chunk_count=len(self.keys), busy_until=busy_until, **self._controller_args
        )
        self.acceptable = set(self.ctl.allowed)
        for index, peers in enumerate(holders):
            if LOCAL in peers:
                # A local chunk costs no wire bytes; its level is whatever the store holds.
                self.ctl.state_sizes(index, dict.fromkeys(self.f.levels, 0))
        self.sched = ChunkScheduler(holders=holders, now=self.start, config=self.cfg.scheduler)
        self.sched.set_bandwidth(LOCAL, 1e12)

    def note(self, kind: str, index: int = -1, level: str = "", peer: str = "", nbytes: int = 0) -> None:
        event = FetchEvent(
            t=self.f.clock() - self.start, kind=kind, index=index, level=level, peer=peer,
            nbytes=nbytes,
        )
        self.events.append(event)
        if self.f.on_event is not None:
            try:
                self.f.on_event(event)
            except Exception:  # a tracing hook must not end the fetch
                log.exception("fetch: on_event hook failed")

    # ----------------------------------------------------------------- coordinator
    async def run(self) -> FetchOutcome:
        try:
            await self._run()
        except asyncio.CancelledError:
            self.reason = "cancelled"
            self._end_with()
            raise
        return self._end_with()

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                decoder = tg.create_task(self._decode_loop())
                try:
                    await self._coordinate()
                finally:
                    self._stop_transfers()
                    self._stop_decoder(decoder)
                await asyncio.wait([decoder])
        except* KVPeerError as group:
            log.debug("fetch %s failed: %s", self.tag, group.exceptions[0])
            self.reason = "error"

    def _stop_decoder(self, decoder: asyncio.Task[None]) -> None:
        """Nothing below the cut is left to decode: drop the rest and stop the decoder. One
        waiting on a thread is cancelled: work still queued there (behind other fetches' decodes)
        is dropped at once, work running is still waited for. One reporting a chunk to the sink
        is let finish (a cancel could cut a message to the client in half)."""
        while not self.queue.empty():
            self.queue.get_nowait()
        if self.in_thread:
            decoder.cancel()
        else:
            self.queue.put_nowait((len(self.keys) + 1, next(self._seq), None))

    def _end_with(self) -> FetchOutcome:
        """The outcome, told to ``on_end``."""
        restored = self.reported
        self.f._bytes_per_token[self.sizes_key] = {
            name: self.ctl.bytes_per_token(name) for name in self.f.levels
        }
        if restored < len(self.keys) and self.reason == "complete":
            self.reason = "unavailable"
        if restored in self.below_floor and self.reason == "unavailable":
            # Said once, here: each holder's answer is logged at DEBUG only.
            log.info(
                "fetch %s: chunk %d is held at %s at best, below the floor (min_level or the "
                "fetch policy's): %d of %d chunks restored", self.tag, restored,
                self.below_floor[restored], restored, len(self.keys),
            )
        if log.isEnabledFor(logging.DEBUG):
            # The timeline explains where a slow fetch spent its time (benchmarks.ttft --logs).
            log.debug(
                "fetch timeline: %s",
                " ".join(
                    f"{e.t:.3f}:{e.kind}:{e.index}:{e.level}:{e.nbytes}" for e in self.events
                ),
            )
        outcome = FetchOutcome(
            chunks=restored,
            requested=len(self.keys),
            levels=tuple(self.restored[i] for i in range(restored)),
            bytes_moved=self.bytes_moved,
            elapsed_s=self.f.clock() - self.start,
            reason=self.reason,
            switches=self.ctl.switches,
            events=tuple(self.events),
            head=self.head,
        )
        if self.on_end is not None:
            self.on_end(outcome)
        return outcome

    def _stop_transfers(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.transfers.clear()

    def _end(self) -> int:
        """First chunk this fetch will not restore (as known now)."""
        return min(self.cut, self.sched.limit)

    def _split(self, now: float) -> None:
        """A split fetch: leave the client the leading chunks it can prefill while the rest
        arrives (``leave_head`` is told before anything is asked for or allocated), and fetch
        the rest, aiming at the end of that prefill."""
        leave, self.leave_head = self.leave_head, None
        head = self._head_to_leave(now) if leave is not None else 0
        if head == 0:
            return
        assert leave is not None
        leave(head)
        per_chunk = self.f.chunk_tokens / self.ctl.recompute_rate
        self.note("split", index=head)
        log.debug(
            "fetch %s: the client prefills chunks 0..%d (%.2fs) while %d chunks are fetched",
            self.tag, head - 1, head * per_chunk, len(self.keys) - head,
        )
        self.head = head
        self.keys = self.keys[head:]
        self.holders = self.holders[head:]
        self.cut = len(self.keys)
        self._plan_chunks(self.holders, busy_until=now + head * per_chunk)

    def _head_to_leave(self, now: float) -> int:
        """How many leading chunks to leave to the client (:func:`head_to_recompute`, every
        chunk at the floor level). Only on a measured link and a known recompute rate: a wrong
        guess makes the client recompute chunks for nothing."""
        if self.fixed is not None or not self.recompute_known or len(self.keys) < 2:
            return 0
        bandwidth, rtt = self._link(now)
        peers = [p for p in self.sched.working_peers(served_by=LOCAL) if p != LOCAL]
        if not peers or not all(self._measured(p, now) for p in peers):
            return 0
        floor = self.ctl.allowed[-1]
        config = self.cfg.controller
        fetch_s = []
        for index in range(len(self.keys)):
            nbytes = self.ctl.chunk_bytes(index, floor)
            transfer = nbytes * 8 / (bandwidth * config.safety) if bandwidth > 0 else math.inf
            fetch_s.append(max(transfer, nbytes / self.f.decode_rate) + config.per_chunk_overhead_s)
        per_chunk = self.f.chunk_tokens / self.ctl.recompute_rate
        # A head whose prefill outlasts the client's deadline would make the fetch stop there
        # with chunks the client cannot use yet.
        max_head = None if self.hard_deadline is None else int((self.hard_deadline - now) / per_chunk)
        return head_to_recompute(
            fetch_s, per_chunk, startup_s=rtt, min_gain=self.cfg.split_gain, max_head=max_head
        )

    async def _coordinate(self) -> None:
        self._split(self.f.clock())
        while True:
            now = self.f.clock()
            if self.hard_deadline is not None and now >= self.hard_deadline:
                self.note("deadline")
                self._cut_at(self.reported, "deadline")
                return
            self._handle_stalls(now)
            self._drop_from(self._end())  # chunks past a gap: no longer fetched nor counted
            self._maybe_preempt(now)
            self._check_recompute(now)
            self._start_transfers(now)
            if self.reported >= self._end():
                return
            decoding = {i for i in self.received if i < self._end()} - self.restored.keys()
            # The decoder may be inside the sink's chunk_done for restored chunks not yet
            # reported: that is progress in hand, not a prefix that ran out.
            reporting = self.reported in self.restored
            retry_wait = self.sched.retry_wait(now)
            if not self.transfers and not decoding and not reporting and retry_wait is None:
                # Nothing in flight, nothing to decode and nothing startable: the rest is gone.
                self._cut_at(self.reported, "unavailable")
                return
            timeout = self.cfg.tick_s if retry_wait is None else min(self.cfg.tick_s, retry_wait)
            if self.hard_deadline is not None:
                timeout = max(0.0, min(timeout, self.hard_deadline - now))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self.wake.wait(), timeout)

    def _cut_at(self, index: int, reason: str) -> None:
        if index >= self.cut:
            return
        self.cut = index
        self.reason = reason
        self._drop_from(index)

    def _drop_from(self, index: int) -> None:
        """Chunks from ``index`` on will not be restored: their transfers stop, and they no
        longer count against the deadline."""
        self.ctl.limit_to(index)
        for i, _peer in self.sched.abandon_from(index):
            self._cancel_transfer(i)
        for i in [i for i in self.transfers if i >= index]:
            self._cancel_transfer(i)

    def _cancel_transfer(self, index: int) -> None:
        entry = self.transfers.pop(index, None)
        if entry is not None:
            entry[0].cancel()

    def _bandwidth(self, peer: str, now: float) -> float:
        """What a chunk from ``peer`` gets: whole-chunk goodput (request to last byte, serving
        delays included), unless the transport's live estimate shows a sharp drop first."""
        if peer == LOCAL:
            return 1e12
        live, evidence = self._live(peer, now)
        rate = self.f.chunk_rate(peer, now)
        chunks = rate.bps if rate is not None else None
        if live or chunks:
            self.sched.set_window(peer, self.cfg.scheduler.window)
        else:
            self.sched.set_window(peer, 1)  # probe with one chunk until the link is measured
            return self.cfg.initial_bandwidth_bps
        if chunks is None:
            return float(live or 0.0)
        # The live estimate's first samples catch slow start: trust it for drops only once the
        # peer has a chunk-level baseline of a few samples, and only as evidence (not the
        # session's first sample).
        if live and evidence and live < 0.5 * chunks and rate is not None and rate.samples >= 2:
            return float(live)
        return chunks

    def _measured(self, peer: str, now: float) -> bool:
        return self.f.chunk_rate(peer, now) is not None or self._live(peer, now)[0] is not None

    def _live(self, peer: str, now: float) -> tuple[float | None, bool]:
        """The transport's live estimate of ``peer`` and whether it is evidence
        (:class:`~kvpeer.fetch_policy.LinkEvidence`); once the transport forgot it, the last one
        that was evidence, for ``link_memory_s``."""
        session = self.f.sessions(peer)
        if session is None:
            return self.f.links.observe(peer, now, None, None)
        live = session.estimator.bandwidth_bps(now)
        return self.f.links.observe(
            peer, now, float(live) if live else None, session.estimator.total_bytes
        )

    def _chunk_rate(self, peer: str, launched: float, now: float, nbytes: int) -> None:
        """One whole-chunk goodput sample (the transport's first samples catch SCTP's slow
        start and read low; a chunk's is what the next chunk will see)."""
        begin = max(launched, self.last_done.get(peer, launched))
        self.last_done[peer] = now
        if now - begin <= 0 or nbytes <= 0:
            return
        self.f.measure_chunk_rate(peer, nbytes * 8 / (now - begin), now)

    def _probe(self, level: str) -> str:
        probe = self.cfg.probe_level
        if probe not in self.ctl.allowed:
            return level
        allowed = self.ctl.allowed
        return allowed[max(allowed.index(level), allowed.index(probe))]

    def _rate(self, peer: str, now: float) -> float:
        """What ``peer`` delivers now: its bandwidth, unless it has gone silent
        (:meth:`ChunkScheduler.silent_bound`)."""
        bw = self._bandwidth(peer, now)
        bound = self.sched.silent_bound(peer, now, self.cfg.silent_after_s)
        return bw if bound is None else min(bw, bound)

    def _link(self, now: float) -> tuple[float, float]:
        """Aggregate rate and worst RTT of the live peers still holding work (a peer that only
        held chunks done already cannot speed up the rest)."""
        for peer in self.sched.peers():
            if peer != LOCAL:  # the scheduler weighs holders by bandwidth, silences aside
                self.sched.set_bandwidth(peer, self._bandwidth(peer, now))
        peers = [p for p in self.sched.working_peers(served_by=LOCAL) if p != LOCAL]
        if not peers:
            return 1e12, 0.0
        total = 0.0
        rtt = 0.0
        for peer in peers:
            total += self._rate(peer, now)
            session = self.f.sessions(peer)
            if session is not None and session.rtt_s:
                rtt = max(rtt, session.rtt_s)
        return total, rtt

    def _start_transfers(self, now: float) -> None:
        bandwidth, rtt = self._link(now)
        sizes = {}
        for index in range(min(self.cut, self.sched.limit)):
            level = self.ctl.levels_used[index] or self.ctl.allowed[-1]
            sizes[index] = self.ctl.chunk_bytes(index, level)
        for assignment in self.sched.assign(now, sizes):
            index, peer = assignment.index, assignment.peer
            if index >= self.cut:
                self.sched.abandon_from(self.cut)
                break
            if peer == LOCAL:
                level = ""
            elif self.fixed is not None:
                level = self.fixed
            else:
                carrier = Carrier(self._rate(peer, now), self._queued_on(peer, now))
                decision = self._decide(index, now, bandwidth, rtt, carrier)
                if isinstance(decision, RecomputeRest):
                    self._give_up(decision, now)
                    return
                assert isinstance(decision, FetchAt)
                level = decision.level
                if not self._measured(peer, now):
                    level = self._probe(level)
                previous = self.ctl.levels_used[index - 1] if index else None
                if previous is not None and previous != level:
                    self.note("switch", index=index, level=level)
            self.ctl.chunk_sent(index, level or self.ctl.levels[0])
            self._launch(index, peer, level, now)

    def _queued_on(self, peer: str, now: float) -> float:
        """Bytes still to come from ``peer`` for the chunks already requested from it, at the
        levels they were requested at (the scheduler's sizes are guesses made before the level)."""
        rate = self._bandwidth(peer, now)
        left = 0.0
        for index, (_task, sender, level, started) in self.transfers.items():
            if sender == peer and level:
                left += max(0.0, self.ctl.chunk_bytes(index, level) - (now - started) * rate / 8)
        return left

    def _decide(self, index: int, now: float, bandwidth: float, rtt: float, carrier: Carrier) -> Any:
        """The controller's decision; "recompute" only when :meth:`_may_recompute` agrees."""
        decision = self.ctl.decide(index, now, bandwidth, rtt, carrier)
        if not isinstance(decision, RecomputeRest) or self._may_recompute(decision, now):
            return decision
        self.ctl.allow_recompute = False
        try:
            return self.ctl.decide(index, now, bandwidth, rtt, carrier)
        finally:
            self.ctl.allow_recompute = True

    def _may_recompute(self, decision: RecomputeRest, now: float) -> bool:
        """Giving up needs evidence (the transport's first sample reads set-up and slow start,
        and a wrong "recompute" costs the whole prefix): a whole chunk measured from some peer,
        or ``evidence_s`` into the fetch; or, on live estimates that are evidence (possibly from
        an earlier, abandoned fetch: they last across fetches), a clear loss by
        ``recompute_margin``. However hopeless a first sample looks, it decides nothing: over a
        fresh session it read 5 Mbit/s on a 1 Gbit/s link."""
        fetch_left = decision.predicted_finish - now
        recompute_left = decision.recompute_finish - now
        if now - self.start >= self.cfg.evidence_s:
            return True
        # Every peer the rest depends on: one peer's measured chunk says nothing of another's
        # first sample.
        peers = [p for p in self.sched.working_peers(served_by=LOCAL) if p != LOCAL]
        if not peers:
            return False
        chunked = [p for p in peers if self.f.chunk_rate(p, now) is not None]
        if len(chunked) == len(peers):
            return True
        if all(p in chunked or self._live(p, now)[1] for p in peers):
            return fetch_left > self.cfg.recompute_margin * recompute_left
        return False

    def _check_recompute(self, now: float) -> None:
        """Between requests (the window full, or every chunk asked for), give up as soon as the
        bytes arriving show that even the floor loses clearly to recomputing, rather than at the
        next request or the end of the chunks in flight."""
        if self.fixed is not None or self.cut < len(self.keys) or not self.transfers:
            return
        bandwidth, rtt = self._link(now)
        decision = self.ctl.should_recompute(now, bandwidth, rtt, self.cfg.recompute_margin)
        if decision is None or not self._may_recompute(decision, now):
            return
        self._give_up(decision, now)

    def _give_up(self, decision: RecomputeRest, now: float) -> None:
        self.note("recompute", index=decision.from_index)
        log.debug(
            "fetch %s: recomputing from chunk %d is faster (%.2fs vs %.2fs)", self.tag,
            decision.from_index, decision.recompute_finish - now, decision.predicted_finish - now,
        )
        # Chunks received below the cut are still restored, and chunks in flight right after
        # them finish if that is quicker than recomputing them.
        self._cut_at(self._worth_finishing(now), "recompute")

    def _worth_finishing(self, now: float) -> int:
        """End of the received prefix extended by in-flight chunks that will arrive sooner than
        the client could recompute them (after the head of a split fetch, which it prefills first)."""
        end = self._received_prefix()
        per_chunk = self.f.chunk_tokens / self.ctl.recompute_rate + max(0.0, self.ctl.busy_until - now)
        while end < self.sched.limit:
            if end not in self.transfers:
                if LOCAL not in self.sched.holders(end):
                    break
                end = self._received_prefix(end + 1)  # this node's own: no wire to wait for
                continue
            _task, peer, level, started = self.transfers[end]
            bw = self._bandwidth(peer, now)
            size = self.ctl.chunk_bytes(end, level) if level else 0.0
            bound = self.sched.silent_bound(peer, now, self.cfg.silent_after_s)
            if bound is None:
                left = max(0.0, size - (now - started) * bw / 8)
            else:  # gone silent: none of it is known to have arrived
                bw, left = min(bw, bound), size
            if left > 0 and (not bw > 0 or left * 8 / bw > per_chunk):
                break
            end = self._received_prefix(end + 1)
        return end

    def _received_prefix(self, start: int | None = None) -> int:
        """First chunk from ``start`` (default: the next to report) neither received nor restored."""
        n = self.reported if start is None else start
        while n in self.received or n in self.restored:
            n += 1
        return n

    def _launch(self, index: int, peer: str, level: str, now: float) -> None:
        if self.allocation is None and self.chunk_shape is not None and self.kv_dtype in _DTYPE_BYTES:
            self._allocate(self.chunk_shape, self.kv_dtype)
        task = self.tg.create_task(self._transfer(index, peer, level))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.transfers[index] = (task, peer, level, now)
        self.note("request", index=index, level=level, peer=peer)

    def _handle_stalls(self, now: float) -> None:
        flights = self.sched.in_flight()
        for peer in self.sched.stalled(now):
            if peer == LOCAL:
                continue
            mine = [i for i, p in flights.items() if p == peer]
            if not any(len(self.sched.holders(i)) > 1 for i in mine):
                continue  # nobody else to ask: the request timeout or the recompute rule decides
            self.f.peer_trouble(
                peer, "fetch %s: peer %s stalled; its chunks go to other peers", self.tag, peer
            )
            self._lose_peer(peer)

    def _lose_peer(self, peer: str) -> None:
        if peer in self.lost:  # its other transfers failing too: one event
            return
        self.lost.add(peer)
        self.f.counters["peer_lost"] += 1
        self.note("peer_lost", peer=peer)
        for index in self.sched.peer_lost(peer):
            self._cancel_transfer(index)
            self.ctl.chunk_returned(index)

    def _maybe_preempt(self, now: float) -> None:
        if self.fixed is not None:
            return
        bandwidth, _ = self._link(now)
        for index, (_task, peer, level, started) in list(self.transfers.items()):
            if peer == LOCAL or not level:
                continue
            # No per-blob progress from the transport: estimate what arrived from the time spent,
            # plus what the sender has buffered already (a cancel does not recall it).
            received = int((now - started) * self._bandwidth(peer, now) / 8)
            received += self.cfg.committed_bytes
            again = self.ctl.reconsider(index, level, received, now, bandwidth)
            if again is None:
                continue
            log.debug(
                "fetch %s: chunk %d from %s restarts at %s (was %s)", self.tag, index, peer,
                again.level, level,
            )
            self.f.counters["preempt"] += 1
            self.note("preempt", index=index, level=again.level, peer=peer)
            self._cancel_transfer(index)
            self._launch(index, peer, again.level, now)

    # ----------------------------------------------------------------- receive
    async def _transfer(self, index: int, peer: str, level: str) -> None:
        key = self.keys[index]
        sender = peer
        try:
            blob, sender, shared = await self._get_blob(key, peer, level)
            # Header only (CRC-checked): the digest of the whole blob is checked by the decoder,
            # off the event loop, and a peer's chunk is cached only once it decoded.
            header = codec.read_header(blob)
            if header.level not in self.acceptable:
                # A holder sends the best it has when that is below the asked level: the chunk
                # is not held well enough there, which is no fault of the holder's.
                self.below_floor.setdefault(index, header.level)  # the first holder's answer
                raise ProtocolError(
                    ErrorCode.NOT_FOUND, f"held at {header.level} only, below the fetch's floor"
                )
            if header.tokens != self.f.chunk_tokens:
                raise ProtocolError(ErrorCode.INVALID, f"chunk of {header.tokens} tokens")
            shape = (header.layers, header.kv_heads, header.head_dim)
            if self.chunk_shape is not None and shape != self.chunk_shape:
                raise ProtocolError(
                    ErrorCode.INVALID, f"chunk of shape {shape}, the model has {self.chunk_shape}"
                )
        except asyncio.CancelledError:
            raise
        except ProtocolError as exc:
            # A bad blob of a joined transfer is its sender's: this fetch's peer is asked again.
            transient = exc.code == ErrorCode.BUSY or sender != peer
            self._transfer_failed(index, peer, exc, transient=transient)
            return
        except (CodecError, StoreError) as exc:
            self._transfer_failed(index, peer, exc, transient=sender != peer)
            return
        except KVPeerError as exc:  # transport: the session died, timed out or is not open
            self._forget_transfer(index)
            self.f.peer_trouble(
                peer, "fetch %s: peer %s failed on chunk %d: %s", self.tag, peer, index, exc
            )
            self._lose_peer(peer)
            self.wake.set()
            return
        now = self.f.clock()
        entry = self.transfers.get(index)
        if peer != LOCAL and not shared and entry is not None and entry[0] is asyncio.current_task():
            self._chunk_rate(peer, entry[3], now, len(blob))
        self._forget_transfer(index)
        size = len(blob) if peer != LOCAL else 0
        wire = 0 if shared else size  # a joined transfer's bytes are the fetch's that started it
        self.bytes_moved += wire
        self.f.bytes_from_peers += wire
        self.note("received", index=index, level=header.level, peer=sender, nbytes=wire)
        self.ctl.chunk_received(index, header.level, size)
        self.sched.completed(index, now)
        self.received.add(index)
        self.wake.set()
        # Backpressure: a full decode queue holds this task (and its blob) here.
        await self.queue.put((index, next(self._seq), _Received(index, blob, header.level, sender)))

    async def _get_blob(self, key: bytes, peer: str, level: str) -> _Delivery:
        """The chunk and who sent it (``peer``, or another one whose transfer this joined)."""
        if peer == LOCAL:
            assert self.f.cache is not None
            blob = await self.f.cache.get(key)
            if blob is None:
                raise StoreError("chunk no longer readable from the local store (evicted, or its file failed)")
            return _Delivery(blob, LOCAL, False)
        session = self.f.sessions(peer)
        if session is None:
            # The peer, not this chunk: it is dropped from the fetch at once, not chunk by chunk.
            raise TransportError(f"no session to {peer}")
        timeout = self.cfg.request_timeout_s

        async def start() -> bytes:
            return await session.fetch_blob(key, level, timeout=timeout)

        # Another fetch's transfer is joined only at this level or a smaller one: a bigger one
        # would not arrive when this fetch's plan needs it.
        smaller = self.ctl.allowed[self.ctl.allowed.index(level) :] if level in self.ctl.allowed else ()
        return await self.f.transfers.get(key, peer, level, smaller, start)

    def _forget_transfer(self, index: int) -> None:
        """The running task is done with chunk ``index`` (only if it is still the one on it)."""
        entry = self.transfers.get(index)
        if entry is not None and entry[0] is asyncio.current_task():
            del self.transfers[index]

    def _transfer_failed(self, index: int, peer: str, exc: Exception, *, transient: bool) -> None:
        self._forget_transfer(index)
        self.note("failed", index=index, peer=peer)
        self.ctl.chunk_returned(index)
        if peer == LOCAL:  # the free copy is gone: a peer's costs its real bytes
            self.ctl.state_sizes(index, None)
        retries = self.retries.get(index, 0) + 1
        self.retries[index] = retries
        where = peer or "local"
        if transient and retries <= self.cfg.max_retries:
            backoff = self.cfg.retry_backoff_s * 2 ** (retries - 1)
            log.debug(
                "fetch %s: chunk %d from %s: %s; retrying in %.2fs", self.tag, index, where, exc,
                backoff,
            )
            self.f.counters["retry"] += 1
            self.sched.chunk_retry(index, peer, not_before=self.f.clock() + backoff)
        else:
            self.f.counters["chunk_failed"] += 1
            message = "fetch %s: chunk %d from %s failed: %s"
            if isinstance(exc, ProtocolError) and exc.code in (ErrorCode.NOT_FOUND, ErrorCode.BUSY):
                # Evicted since the peer's inventory said it, or busy retry after retry: the
                # chunk's lot, not a fault of the peer.
                log.debug(message, self.tag, index, where, exc)
            else:
                self.f.peer_trouble(peer, message, self.tag, index, where, exc)
            self.sched.chunk_failed(index, peer)
        self.wake.set()

    # ----------------------------------------------------------------- decode + restore
    async def _decode_loop(self) -> None:
        while True:
            _, _, item = await self.queue.get()
            if item is None:
                return
            if item.index >= self._end() or item.index in self.restored:
                continue
            try:
                k_view, v_view = await self._views(item)
            except _SinkFailed as failed:
                self._not_handed_over(item.index, failed.error)
                continue
            except KVPeerError as exc:
                self._undecodable(item, exc)
                continue
            self.note("decode_start", index=item.index, level=item.level)
            try:
                seconds = await self._in_thread(decode_into_blocking, item.blob, k_view, v_view)
            except KVPeerError as exc:
                self._undecodable(item, exc)
                continue
            self.f._observe_decode(len(item.blob), seconds)
            self.note("decode_end", index=item.index, level=item.level)
            # Served means a chunk that decoded: one that arrives and fails its digest (or its
            # shape) every time is one trouble, not a warning per fetch.
            self.f.peer_served(item.peer)
            if item.peer != LOCAL and self.f.cache is not None:
                # Decoded means digest-checked: a corrupt or tampered chunk never enters the
                # store (it would be served on to others).
                self.f.cache_soon(self.keys[item.index], item.level, item.blob)
            if not await self._hand_over(item.index):
                continue
            self.restored[item.index] = item.level
            while self.reported < self._end() and self.reported in self.restored:
                await self.sink.chunk_done(self.reported, self.restored[self.reported])
                self.note("done", index=self.reported, level=self.restored[self.reported])
                self.reported += 1
            self.wake.set()

    async def _hand_over(self, index: int) -> bool:
        """Let a sink whose views are staging buffers copy chunk ``index`` on, in a thread;
        False if that failed (the client's memory did, not the peer's chunk: the fetch stops
        there, and no peer is blamed)."""
        decoded = getattr(self.sink, "chunk_decoded_blocking", None)
        if decoded is None:
            return True
        try:
            await self._in_thread(decoded, index)
        except KVPeerError as exc:
            self._not_handed_over(index, exc)
            return False
        return True

    async def _in_thread(self, work: Callable[..., _T], *args: Any) -> _T:
        """``work`` in the fetcher's executor. It writes into the client's memory, so once it
        started it ends before the fetch returns; still queued when the fetch ends, it is
        dropped (:meth:`_stop_decoder`)."""
        self.in_thread = True
        try:
            return await aio.in_thread_once_started(self.f.executor, work, *args)
        except KVPeerError:
            raise
        except RuntimeError as exc:
            if getattr(self.f.executor, "_shutdown", False):
                # ThreadPoolExecutor's own flag: the daemon is stopping.
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, f"cannot decode now: {exc}") from None
            raise self._failed_here(work, exc) from exc
        except Exception as exc:
            raise self._failed_here(work, exc) from exc
        finally:
            self.in_thread = False

    def _failed_here(self, work: Callable[..., Any], exc: Exception) -> ProtocolError:
        """Work that raised what no chunk should make it raise (torch's RuntimeError, a
        MemoryError): a fault of this node, logged with its traceback; the fetch ends at that
        chunk with what it restored, and no peer is blamed."""
        name = getattr(work, "__name__", repr(work))
        log.error("fetch %s: %s failed", self.tag, name, exc_info=exc)
        return ProtocolError(ErrorCode.INTERNAL, f"{name} failed here: {type(exc).__name__}: {exc}")

    def _not_handed_over(self, index: int, exc: KVPeerError) -> None:
        # The client's memory failed: the API server answers the client with it.
        log.debug("fetch %s: chunk %d cannot be handed over: %s", self.tag, index, exc)
        self._cut_at(index, "error")
        self.wake.set()

    def _undecodable(self, item: _Received, exc: KVPeerError) -> None:
        if isinstance(exc, ProtocolError) and exc.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL):
            # We are stopping, or this node failed (logged where it did): not the peer's chunk.
            log.debug("fetch %s: chunk %d not decoded: %s", self.tag, item.index, exc)
            self._cut_at(item.index, "error")
            self.wake.set()
            return
        self.f.counters["undecodable"] += 1
        self.f.peer_trouble(
            item.peer, "fetch %s: chunk %d from %s does not decode: %s", self.tag, item.index,
            item.peer or "local", exc,
        )
        self.note("failed", index=item.index, peer=item.peer)
        self._cut_at(item.index, "error")
        self.wake.set()

    def _allocate(self, shape: tuple[int, int, int], dtype: str) -> None:
        self.shape = shape
        self.allocation = self.tg.create_task(self._allocate_sink(shape, dtype))

    async def _allocate_sink(self, shape: tuple[int, int, int], dtype: str) -> KVPeerError | None:
        """Returns the error instead of raising it: the chunk that needs the memory fails, not
        the whole task group."""
        layers, kv_heads, head_dim = shape
        try:
            await self.sink.allocate(
                layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                tokens=len(self.keys) * self.f.chunk_tokens, dtype=dtype,
                chunk_tokens=self.f.chunk_tokens,
            )  # fmt: skip
        except KVPeerError as exc:
            return exc
        return None

    async def _views(self, item: _Received) -> tuple[torch.Tensor, torch.Tensor]:
        """Where chunk ``item`` goes in the client's memory. A chunk of another dtype than the
        memory's is converted by the copy; one of another shape is refused."""
        header = codec.read_header(item.blob)
        shape = (header.layers, header.kv_heads, header.head_dim)
        if self.allocation is None:
            self._allocate(shape, header.dtype)
        assert self.allocation is not None
        failed = await self.allocation
        if failed is not None:
            raise _SinkFailed(failed)
        if shape != self.shape:
            raise ProtocolError(ErrorCode.INVALID, f"chunk {item.index} has another shape")
        try:
            return self.sink.chunk_view(item.index)
        except KVPeerError as exc:
            raise _SinkFailed(exc) from None


# --------------------------------------------------------------------------- serving side
class LevelServer:
    """Serves a chunk at the level a peer asks for.

    The store keeps the top level a node was given; a lower level is made on demand with
    ``codec.transcode`` in an executor (never on the event loop, so serving other peers goes
    on), cached in the store, and shared by concurrent requests for the same (chunk, level).
    :meth:`warm` makes the lower levels of new chunks in the background, one transcode at a
    time, so that a later fetch does not wait for them (a transcode costs several times a
    chunk's transfer at LAN rates); requests from peers go first.
    """

    def __init__(
        self,
        store: LevelStore,
        *,
        executor: Any = None,
        concurrency: int = 1,
        warm_levels: Sequence[str] | None = None,
        transcode_options: TranscodeOptions | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        # What the chunk's model encodes with (profile, RoPE layout): the plain rules without it,
        # which would lose the per-head allocation the put level had.
        self.transcode_options = transcode_options
        self._making: dict[tuple[bytes, str], _Transcode] = {}
        self._storing = 0  # bytes of transcodes handed out and still waiting for the store
        # One transcode at a time by default: on a small CPU the decoder and the event loop
        # need the other core.
        self._slots = asyncio.Semaphore(concurrency)
        self.transcoded = 0
        self.warm_levels = tuple(codec.LEVELS if warm_levels is None else warm_levels)
        # Keys to warm, and prompts (tuples of keys) to mark used once those before are made.
        self._warm_queue: asyncio.Queue[bytes | tuple[bytes, ...]] | None = None
        self._warmer: asyncio.Task[None] | None = None

    def warm(self, keys: Sequence[bytes], prefix: Sequence[bytes] = ()) -> None:
        """Make the lower levels of ``keys`` in the background (no-op without warm levels).
        ``prefix``: the prompt's chunks, ``keys`` among them, marked used last to first once
        these are made (each level made is the newest in the store: made first to last, they
        left the prompt's first chunks the first to be evicted)."""
        if not self.warm_levels:
            return
        if self._warm_queue is None:
            self._warm_queue = asyncio.Queue()
        for key in keys:
            self._warm_queue.put_nowait(key)
        if prefix:
            self._warm_queue.put_nowait(tuple(prefix))
        if self._warmer is None or self._warmer.done():
            self._warmer = asyncio.get_running_loop().create_task(self._warm_loop())

    @property
    def warm_pending(self) -> int:
        return self._warm_queue.qsize() if self._warm_queue is not None else 0

    async def _warm_loop(self) -> None:
        assert self._warm_queue is not None
        while not self._warm_queue.empty():
            key = self._warm_queue.get_nowait()
            if isinstance(key, tuple):  # a prompt whose chunks queued before were made
                self.store.used_as_prefix(key)
                continue
            held = set(self.store.levels(key))
            for level in self.warm_levels:
                if level in held:  # made already: reading it would only churn the store
                    continue
                try:
                    await self.open_blob(key, level)
                    await self._stored(key, level)  # paced by the store, not ahead of it
                except (KVPeerError, OSError) as exc:
                    log.info("warming a chunk at %s failed: %s", level, exc)
                    break

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = []
        for making in self._making.values():
            # Peers waiting for it hear why: a cancelled blob reads as an internal failure.
            if not making.blob.done():
                making.blob.set_exception(ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping"))
            tasks.append(making.task)
        if self._warmer is not None:
            tasks.append(self._warmer)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def open_blob(self, key: bytes, level: str) -> bytes | None:
        """The chunk at ``level`` (or the best held when ``level`` is empty); None if not held.

        When the store only holds levels below the asked one, the best held is sent: the asking
        fetcher checks the level against its floor.
        """
        started = time.monotonic()
        if level:
            blob = await self.store.get(key, level)
            if blob is not None:
                self._log_open(key, level, "held", started)
                return blob
        top = await self.store.get(key)
        if top is None or not level:
            self._log_open(key, level, "top" if top is not None else "missing", started)
            return top
        held = codec.read_header(top).level
        if level not in codec.LEVELS or codec.level_rank(held) >= codec.level_rank(level):
            self._log_open(key, level, "top", started)
            return top
        read = time.monotonic()
        blob = await self._make(key, top, held, level)
        self._log_open(key, level, f"transcoded after a {read - started:.4f}s read", started)
        return blob

    def _log_open(self, key: bytes, level: str, how: str, started: float) -> None:
        # Where a slow first chunk's serving time went (store read vs on-demand transcode).
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "serve: chunk %s at %s: %s, %.4fs", key[:4].hex(), level or "best", how,
                time.monotonic() - started,
            )

    async def _make(self, key: bytes, top: bytes, held: str, level: str) -> bytes:
        # The transcode is this server's task, not the first requester's: a peer that cancels
        # its request only stops waiting, and the others (and the warm loop) still get the blob.
        # Requesters get the blob as soon as it is made, not once the store took it too (a slow
        # disk's write queue is no reason to keep a peer waiting).
        making = self._making.get((key, level))
        if making is None or making.task.cancelling():
            making = _Transcode()
            making.task = asyncio.get_running_loop().create_task(
                self._transcode(making, key, top, held, level)
            )
            self._making[(key, level)] = making
            making.task.add_done_callback(lambda task: self._made(key, level, making))
        making.waiters += 1
        try:
            return await asyncio.shield(making.blob)
        finally:
            making.waiters -= 1
            # Nobody waits for it and it has no slot yet: it leaves the queue, so that requests
            # given up on (deadlines, cancels) do not hold live ones behind them. One running
            # goes on: its blob is cached.
            if making.waiters == 0 and not making.started and not making.task.done():
                making.task.cancel()

    def _made(self, key: bytes, level: str, making: _Transcode) -> None:
        if self._making.get((key, level)) is making:
            del self._making[(key, level)]
        failed = None if making.task.cancelled() else making.task.exception()
        if not making.blob.done():  # it never made the blob: its requesters hear why
            if failed is None:
                making.blob.cancel()
            else:
                making.blob.set_exception(failed)
        if not making.blob.cancelled():
            making.blob.exception()  # retrieved: requesters that gave up are not told, nor is asyncio

    async def _stored(self, key: bytes, level: str) -> None:
        """Until the store took a transcode of (key, level) still being put, if there is one."""
        making = self._making.get((key, level))
        if making is not None:
            await asyncio.wait([making.task])

    async def _transcode(
        self, making: _Transcode, key: bytes, top: bytes, held: str, level: str
    ) -> None:
        async with self._slots:
            making.started = True
            blob = await asyncio.get_running_loop().run_in_executor(
                self.executor, transcode_blocking, top, level, self.transcode_options
            )
        self.transcoded += 1
        log.debug("transcoded a chunk from %s to %s (%d bytes)", held, level, len(blob))
        # Requesters get the blob before the store took it, while few such puts wait: past
        # MAX_STORING_BYTES they wait for the put, as the store's own back-pressure asks.
        early = self._storing + len(blob) <= MAX_STORING_BYTES
        if early:
            making.blob.set_result(blob)
        self._storing += len(blob)
        try:
            # Only while the chunk is still held: one evicted meanwhile (evict --all) stays
            # gone. Until the store has it, requests for it are answered from here.
            await self.store.put_if_held(key, level, blob)
        except StoreError:  # closed, or the store said why already
            pass
        except Exception:
            log.exception("a chunk transcoded to %s is not kept", level)
        finally:
            self._storing -= len(blob)
        if not early:
            making.blob.set_result(blob)


class _Transcode:
    """One on-demand transcode: the blob once made (the task goes on to store it), how many
    requests wait on it, and whether it has its slot."""

    task: asyncio.Task[None]

    def __init__(self) -> None:
        self.blob: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters = 0
        self.started = False


def total_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> float:
    """Uncompressed KV bytes per token (K and V) of a model: the scale of the size priors."""
    return float(2 * layers * kv_heads * head_dim * dtype_bytes)


__all__ = [
    "LOCAL",
    "FetchEvent",
    "FetchOutcome",
    "Fetcher",
    "FetcherConfig",
    "LevelServer",
    "decode_into_blocking",
    "total_bytes_per_token",
    "transcode_blocking",
]
