"""The fetch pipeline on in-memory peers: real codec blobs, real decode, no sockets.

The peers here are small stand-ins for kvpeer.transport sessions (fetch_blob + estimator): the
cluster tests (tests/cluster/test_fetch*.py) run the same pipeline over real WebRTC.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpeer import codec
from kvpeer import fetcher as fetcher_mod
from kvpeer.errors import ErrorCode, ProtocolError, TransportError
from kvpeer.fetch_policy import RecomputeRest, SchedulerConfig
from kvpeer.fetcher import (
    LOCAL,
    ChunkRate,
    Fetcher,
    FetcherConfig,
    FetchEvent,
    LevelServer,
    _FetchRun,
)

TOKENS = 256
LAYERS, HEADS, DIM = 2, 2, 16


def chunk_kv(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(index)
    k = torch.randn(LAYERS, HEADS, TOKENS, DIM, generator=gen).to(torch.float16)
    v = torch.randn(LAYERS, HEADS, TOKENS, DIM, generator=gen).to(torch.float16)
    return k, v


_BLOBS: dict[tuple[int, str], bytes] = {}


def blob(index: int, level: str) -> bytes:
    if (index, level) not in _BLOBS:
        _BLOBS[(index, level)] = codec.encode(*chunk_kv(index), level=level)
    return _BLOBS[(index, level)]


def key(index: int) -> bytes:
    return bytes([index]) * 32


class Estimator:
    def __init__(self, bps: float | None) -> None:
        self.bps = bps
        self.total_bytes = 0  # payload the session delivered (kvpeer.transport's estimator)

    def bandwidth_bps(self, now: float) -> float | None:
        return self.bps


class Peer:
    """A peer session stand-in: serves codec blobs, counts calls, can gate or fail."""

    def __init__(self, name: str, bps: float | None = 1e9) -> None:
        self.name = name
        self.estimator = Estimator(bps)
        self.rtt_s: float | None = 0.001
        self.calls: list[tuple[int, str]] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.fail_on: set[int] = set()
        self.send_level: str | None = None

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        index = k[0]
        self.calls.append((index, level))
        gate = self.gates.get(index)
        if gate is not None:
            await gate.wait()
        if index in self.fail_on:
            raise TransportError(f"session to {self.name} closed")
        return blob(index, self.send_level or level or "exact")


class Sink:
    def __init__(self, on_view: Callable[[int], None] | None = None) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.done: list[tuple[int, str]] = []
        self.on_view = on_view

    async def allocate(self, *, layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: str, chunk_tokens: int) -> None:
        dt = getattr(torch, dtype)
        self.k = torch.zeros(layers, kv_heads, tokens, head_dim, dtype=dt)
        self.v = torch.zeros(layers, kv_heads, tokens, head_dim, dtype=dt)

    def chunk_view(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.k is not None and self.v is not None
        if self.on_view is not None:
            self.on_view(index)
        span = slice(index * TOKENS, (index + 1) * TOKENS)
        return self.k[:, :, span, :], self.v[:, :, span, :]

    async def chunk_done(self, index: int, level: str) -> None:
        self.done.append((index, level))


class Cache:
    def __init__(self) -> None:
        self.blobs: dict[bytes, dict[str, bytes]] = {}

    def has(self, k: bytes) -> bool:
        return k in self.blobs

    async def get(self, k: bytes, level: str | None = None) -> bytes | None:
        held = self.blobs.get(k, {})
        if level is not None:
            return held.get(level)
        for name in codec.LEVELS:
            if name in held:
                return held[name]
        return None

    async def put(self, k: bytes, level: str, data: bytes) -> None:
        self.blobs.setdefault(k, {})[level] = data

    async def put_if_held(self, k: bytes, level: str, data: bytes) -> bool:
        if k not in self.blobs:
            return False
        await self.put(k, level, data)
        return True

    def levels(self, k: bytes) -> list[str]:
        return [name for name in codec.LEVELS if name in self.blobs.get(k, {})]


class GatedCache(Cache):
    """A store whose puts wait until ``gate`` is set (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def put(self, k: bytes, level: str, data: bytes) -> None:
        await self.gate.wait()
        await super().put(k, level, data)


def fetcher(peers: dict[str, Peer], cache: Cache | None = None, **cfg: Any) -> Fetcher:
    return Fetcher(
        sessions=peers.get,
        cache=cache if cache is not None else Cache(),
        chunk_tokens=TOKENS,
        config=FetcherConfig(kv_bytes_per_token=2 * LAYERS * HEADS * DIM * 2, **cfg),
    )


async def wait_until(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait for a condition other tasks make true (not a settle-sleep: it returns at once)."""
    async with asyncio.timeout(limit_s):
        # Polled: the conditions are counters inside the fetcher, which has no hook to signal them.
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def expected(n: int, level: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    ks, vs = zip(*(codec.decode(blob(i, level)) for i in range(n)), strict=True)
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def kinds(outcome: Any, kind: str, index: int) -> int:
    """Position of the first event of ``kind`` for chunk ``index``."""
    for pos, event in enumerate(outcome.events):
        if event.kind == kind and event.index == index:
            return pos
    raise AssertionError(f"no {kind} event for chunk {index}")


def test_fetch_restores_every_chunk_in_order() -> None:
    async def main() -> None:
        peer = Peer("a")
        f = fetcher({"a": peer})
        sink = Sink()
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, sink, policy="fixed:exact")
        assert out.chunks == 4 and out.reason == "complete"
        assert [i for i, _ in sink.done] == [0, 1, 2, 3]
        k, v = expected(4)
        assert torch.equal(sink.k, k) and torch.equal(sink.v, v)
        assert out.bytes_moved == sum(len(blob(i, "exact")) for i in range(4))

    asyncio.run(main())


class GatedExecutor(ThreadPoolExecutor):
    """Holds the decode of a blob until a gate for it opens (to pin an interleaving down)."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.gates: dict[bytes, threading.Event] = {}

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        gate = self.gates.get(args[0]) if args else None

        def run() -> Any:
            if gate is not None:
                assert gate.wait(timeout=30)
            return fn(*args, **kwargs)

        return super().submit(run)


def test_decode_of_one_chunk_overlaps_the_receive_of_the_next() -> None:
    """Chunk i is still decoding when chunk i+1 arrives: the stages overlap."""

    async def main() -> None:
        n = 4
        peer = Peer("a")
        views: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(n)}
        # The peer sends chunk i+1 only once the decoder has taken up chunk i ...
        for i in range(1, n):
            peer.gates[i] = views[i - 1]
        executor = GatedExecutor()
        # ... and the decode of chunk i finishes only after chunk i+1 was received.
        for i in range(n - 1):
            executor.gates[blob(i, "exact")] = threading.Event()

        def on_event(event: FetchEvent) -> None:
            if event.kind == "received" and event.index >= 1:
                executor.gates[blob(event.index - 1, "exact")].set()

        f = fetcher({"a": peer})
        f.executor = executor
        f.on_event = on_event
        sink = Sink(on_view=lambda i: views[i].set())
        try:
            out = await f.fetch([key(i) for i in range(n)], [{"a"}] * n, sink, policy="fixed:exact")
        finally:
            executor.shutdown()
        assert out.chunks == n
        for i in range(n - 1):
            assert kinds(out, "decode_start", i) < kinds(out, "received", i + 1)
            assert kinds(out, "received", i + 1) < kinds(out, "decode_end", i)

    asyncio.run(main())


def test_concurrent_fetches_of_the_same_chunks_share_one_transfer() -> None:
    async def main() -> None:
        n = 4
        peer = Peer("a")
        release = asyncio.Event()
        for i in range(n):
            peer.gates[i] = release
        f = fetcher({"a": peer}, scheduler=SchedulerConfig(window=n))
        keys = [key(i) for i in range(n)]
        sinks = [Sink(), Sink()]
        first = asyncio.create_task(f.fetch(keys, [{"a"}] * n, sinks[0], policy="fixed:q8"))
        await wait_until(lambda: len(peer.calls) == n)
        second = asyncio.create_task(f.fetch(keys, [{"a"}] * n, sinks[1], policy="fixed:q8"))
        await wait_until(lambda: f.transfers.shared == n)
        release.set()
        outs = await asyncio.gather(first, second)
        assert [o.chunks for o in outs] == [n, n]
        assert sorted(peer.calls) == [(i, "q8") for i in range(n)]  # one transfer per chunk
        assert torch.equal(sinks[0].k, sinks[1].k)

    asyncio.run(main())


def test_a_dead_peers_chunks_come_from_another_peer() -> None:
    async def main() -> None:
        n = 6
        a, b = Peer("a"), Peer("b")
        a.fail_on = set(range(n))
        f = fetcher({"a": a, "b": b})
        sink = Sink()
        out = await f.fetch([key(i) for i in range(n)], [{"a", "b"}] * n, sink, policy="fixed:exact")
        assert out.chunks == n and out.reason == "complete"
        assert any(e.kind == "peer_lost" and e.peer == "a" for e in out.events)
        assert a.calls and len(b.calls) >= n - len(a.calls) + 1
        assert torch.equal(sink.k, expected(n)[0])

    asyncio.run(main())


def test_the_prefix_stops_at_a_chunk_only_a_dead_peer_held() -> None:
    async def main() -> None:
        a, b = Peer("a"), Peer("b")
        a.fail_on = {2}
        f = fetcher({"a": a, "b": b})
        out = await f.fetch(
            [key(i) for i in range(4)], [{"a", "b"}, {"a", "b"}, {"a"}, {"a", "b"}], Sink(),
            policy="fixed:q8",
        )
        assert out.chunks == 2 and out.recompute_from == 2

    asyncio.run(main())


def test_hopeless_link_means_recompute_without_waiting() -> None:
    async def main() -> None:
        peer = Peer("a", bps=1e3)  # 1 kbit/s
        peer.estimator.total_bytes = 1 << 20  # measured on this session before
        f = fetcher({"a": peer})
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), recompute_rate=1000.0)
        assert out.reason == "recompute" and out.chunks == 0
        assert peer.calls == []

    asyncio.run(main())


def test_a_first_sample_over_a_fresh_session_does_not_condemn_the_link() -> None:
    """The transport's first sample spans set-up and slow start (over a 1 Gbit/s link it read
    5 Mbit/s): however hopeless it looks, the fetch asks for chunks — nor does the session's
    later bytes without a new sample (an abandoned transfer's rest) turn it into evidence."""

    async def main() -> None:
        peer = Peer("a", bps=1e3)  # "1 kbit/s", from one 256 KiB sample
        peer.estimator.total_bytes = 300 * 1024
        f = fetcher({"a": peer})
        keys = [key(i) for i in range(4)]
        out = await f.fetch(keys, [{"a"}] * 4, Sink(), recompute_rate=1000.0)
        assert out.reason == "complete" and peer.calls
        # The same sample, the session's bytes grown: still no evidence, in a new fetcher too
        # (the first fetch measured whole chunks; a new one starts without them).
        peer.estimator.total_bytes = 4 << 20
        fresh = fetcher({"a": peer})
        fresh.links.observe("a", 0.0, 1e3, 300 * 1024)  # it watched the first sample come in
        calls = len(peer.calls)
        again = await fresh.fetch(keys, [{"a"}] * 4, Sink(), recompute_rate=1000.0)
        assert again.reason == "complete" and len(peer.calls) > calls

    asyncio.run(main())


def test_a_recompute_rate_learned_from_puts_lets_the_fetch_give_up_for_that_model_only() -> None:
    async def main() -> None:
        peer = Peer("a", bps=1e3)  # 1 kbit/s: hopeless against any known recompute speed
        peer.estimator.total_bytes = 1 << 20  # measured on this session before
        f = fetcher({"a": peer})
        keys = [key(i) for i in range(4)]
        f.learn_recompute_rate(4 * TOKENS, 1.0, model="m1")
        assert f.recompute_rate_for("m1") == 4 * TOKENS and f.recompute_rate_for("m2") is None
        out = await f.fetch(keys, [{"a"}] * 4, Sink(), model="m1")
        assert out.reason == "recompute" and out.chunks == 0 and peer.calls == []
        # Another model's clients never stated their speed: a guess never stops a fetch, so it
        # asks the peer (whose stand-in answers at once, whatever its estimate says).
        other = await f.fetch(keys, [{"a"}] * 4, Sink(), model="m2")
        assert other.reason == "complete" and peer.calls

    asyncio.run(main())


def test_one_odd_put_does_not_move_the_learned_recompute_rate() -> None:
    """A put whose prefill hit the engine's own prefix cache states an absurd speed; a tiny put
    is mostly overhead. Neither may make every later fetch of the model give up."""
    f = fetcher({})
    for _ in range(3):
        f.learn_recompute_rate(4 * TOKENS, 2.0, model="m")  # 2 chunks/s
    f.learn_recompute_rate(4 * TOKENS, 0.001, model="m")  # a cache hit: 1000x faster
    f.learn_recompute_rate(TOKENS - 1, 1e-6, model="m")  # shorter than a chunk: ignored
    assert f.recompute_rate_for("m") == 2 * TOKENS


def test_adaptive_levels_respect_the_floor_and_pick_small_levels_on_a_slow_link() -> None:
    async def main() -> None:
        peer = Peer("a", bps=2e5)
        peer.estimator.total_bytes = 1 << 20  # measured (the stand-in itself answers at once)
        f = fetcher({"a": peer})
        out = await f.fetch(
            [key(i) for i in range(4)], [{"a"}] * 4, Sink(), min_level="q5", recompute_rate=50.0
        )
        assert out.chunks == 4
        assert set(out.levels) <= set(codec.LEVELS[: codec.LEVELS.index("q5") + 1])
        assert out.levels[-1] == "q5"

    asyncio.run(main())


def test_a_level_below_the_floor_is_refused_without_blaming_the_holder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A holder sends the best it has when that is below the asked level. That was logged as
    the peer failing ("peer sent level q3, below the floor", a WARNING per holder), and nothing
    said that the fetch stopped there because of its floor."""
    async def main() -> Any:
        peer = Peer("a")
        peer.send_level = "q3"
        f = fetcher({"a": peer})
        return await f.fetch([key(0)], [{"a"}], Sink(), min_level="q8")

    with caplog.at_level(logging.INFO, logger="kvpeer.fetcher"):
        out = asyncio.run(main())
    assert (out.chunks, out.reason) == (0, "unavailable")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "chunk 0 is held at q3 at best, below the floor" in caplog.text


def test_local_chunks_need_no_peer_and_fetched_ones_are_cached() -> None:
    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        peer = Peer("a")
        f = fetcher({"a": peer}, cache=cache)
        sink = Sink()
        out = await f.fetch([key(0), key(1)], [set(), {"a"}], sink, policy="fixed:exact")
        assert out.chunks == 2
        assert [c[0] for c in peer.calls] == [1]
        assert cache.has(key(1))
        assert any(e.kind == "received" and e.peer == LOCAL for e in out.events)

    asyncio.run(main())


class CorruptingPeer(Peer):
    """Sends chunk ``bad`` with one payload byte flipped (its header still parses)."""

    def __init__(self, name: str, bad: int) -> None:
        super().__init__(name)
        self.bad = bad

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        data = await super().fetch_blob(k, level, timeout)
        if k[0] != self.bad:
            return data
        flipped = bytearray(data)
        flipped[-1] ^= 0x40
        return bytes(flipped)


def test_a_peer_chunk_that_fails_its_digest_is_cut_and_never_cached() -> None:
    async def main() -> None:
        cache = Cache()
        f = fetcher({"a": CorruptingPeer("a", bad=1)}, cache=cache)
        sink = Sink()
        out = await f.fetch([key(i) for i in range(3)], [{"a"}] * 3, sink, policy="fixed:exact")
        assert out.chunks == 1 and out.reason == "error"
        assert cache.has(key(0)) and not cache.has(key(1))

    asyncio.run(main())


def test_the_memory_is_allocated_with_the_models_dtype_before_the_first_chunk_arrives() -> None:
    async def main() -> None:
        peer = Peer("a")
        arrived = asyncio.Event()
        peer.gates[0] = arrived
        sink = Sink()
        f = fetcher({"a": peer})
        fetch = asyncio.create_task(
            f.fetch([key(0)], [{"a"}], sink, policy="fixed:exact", kv_dtype="float32",
                    chunk_shape=(LAYERS, HEADS, DIM))
        )  # fmt: skip
        await wait_until(lambda: sink.k is not None)
        assert sink.k is not None and sink.k.dtype == torch.float32  # chunk 0 still on the wire
        arrived.set()
        out = await fetch
        assert out.chunks == 1
        k, _ = expected(1)  # float16 chunks, converted by the copy
        assert torch.equal(sink.k, k.float())

    asyncio.run(main())


def test_deadline_stops_the_fetch_with_what_was_restored() -> None:
    async def main() -> None:
        peer = Peer("a")
        never = asyncio.Event()
        peer.gates[1] = never
        f = fetcher({"a": peer})
        sink = Sink()
        started = time.monotonic()
        out = await f.fetch(
            [key(i) for i in range(3)], [{"a"}] * 3, sink, deadline=started + 0.5,
            policy="fixed:q8",
        )
        assert out.reason == "deadline" and out.chunks == 1
        assert sink.done == [(0, "q8")]

    asyncio.run(main())


def test_unknown_policy_and_floor_are_rejected() -> None:
    async def main() -> None:
        f = fetcher({})
        with pytest.raises(ValueError):
            await f.fetch([key(0)], [{"a"}], Sink(), policy="fastest")
        with pytest.raises(ProtocolError):
            await f.fetch([key(0)], [{"a"}], Sink(), min_level="q1")

    asyncio.run(main())


def test_level_server_transcodes_once_and_caches() -> None:
    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        server = LevelServer(cache)
        got = await asyncio.gather(*(server.open_blob(key(0), "q4") for _ in range(3)))
        assert all(g == got[0] for g in got)
        assert codec.read_header(got[0]).level == "q4"
        assert server.transcoded == 1
        assert await cache.get(key(0), "q4") == got[0]
        assert await server.open_blob(key(0), "") == blob(0, "exact")
        assert await server.open_blob(key(9), "q4") is None

    asyncio.run(main())


def test_level_server_transcodes_with_the_chunks_models_options() -> None:
    """A lower level made on demand uses the encode options of the chunk's model (its profile),
    as a put at that level would, not the plain rules."""
    from kvpeer.codec.profile import CodecProfile

    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        k, _ = chunk_kv(0)
        layers, heads = k.shape[0], k.shape[1]
        profile = CodecProfile.from_sensitivities(
            "m", [float(1 + 30 * (i % 2)) for i in range(layers * heads)], [1.0] * (layers * heads), heads=heads
        )
        seen: list[codec.Header] = []

        def options(header: codec.Header) -> dict[str, Any]:
            seen.append(header)
            return {"profile": profile}

        server = LevelServer(cache, transcode_options=options)
        got = await server.open_blob(key(0), "q5")
        assert seen and seen[0].level == "exact" and seen[0].layers == layers
        assert got == codec.encode(*chunk_kv(0), level="q5", profile=profile)
        assert got != codec.transcode(blob(0, "exact"), "q5")  # the plain rules differ

    asyncio.run(main())


def test_a_transcode_that_ends_after_an_evict_does_not_bring_the_chunk_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        real = fetcher_mod.transcode_blocking

        def evicted_meanwhile(*args: Any) -> bytes:
            cache.blobs.clear()  # evict --all while the transcode runs
            return real(*args)

        monkeypatch.setattr(fetcher_mod, "transcode_blocking", evicted_meanwhile)
        server = LevelServer(cache)
        got = await server.open_blob(key(0), "q5")
        assert got is not None and codec.read_header(got).level == "q5"  # the asker gets it
        assert cache.blobs == {}

    asyncio.run(main())


def test_level_server_sends_what_it_has_when_it_only_holds_less() -> None:
    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "q5", blob(0, "q5"))
        server = LevelServer(cache)
        got = await server.open_blob(key(0), "q8")
        assert got is not None and codec.read_header(got).level == "q5"

    asyncio.run(main())


def test_busy_peer_is_retried() -> None:
    """Even by a peer with one transfer slot (not measured yet): the retry must not wait on the
    failed transfer's slot."""

    async def main() -> None:
        peer = Peer("a", bps=None)
        busy = {"left": 1}
        original = peer.fetch_blob

        async def flaky(k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
            if busy["left"]:
                busy["left"] -= 1
                raise ProtocolError(ErrorCode.BUSY, "too many transfers")
            return await original(k, level, timeout)

        peer.fetch_blob = flaky  # type: ignore[method-assign]
        f = fetcher({"a": peer})
        out = await f.fetch([key(i) for i in range(3)], [{"a"}] * 3, Sink(), policy="fixed:q8")
        assert (out.chunks, out.reason) == (3, "complete")
        # Chunk 0 backs off before it is asked again; the freed slot serves chunk 1 meanwhile.
        assert sorted(peer.calls) == [(0, "q8"), (1, "q8"), (2, "q8")]

    asyncio.run(main())


def test_a_requester_that_cancels_does_not_fail_the_others_waiting_on_its_transcode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer's BlobCancel cancels its serving task; another peer asked for the same chunk and
    level meanwhile and waits on the same transcode."""
    import kvpeer.fetcher as fetcher_mod

    transcode = fetcher_mod.transcode_blocking
    started = threading.Event()

    def slow_transcode(*args: Any) -> bytes:
        started.set()
        time.sleep(0.2)
        return transcode(*args)

    monkeypatch.setattr(fetcher_mod, "transcode_blocking", slow_transcode)

    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        server = LevelServer(cache, executor=ThreadPoolExecutor(1))
        first = asyncio.create_task(server.open_blob(key(0), "q4"))
        await asyncio.to_thread(started.wait, 5)
        second = asyncio.create_task(server.open_blob(key(0), "q4"))
        await asyncio.sleep(0.01)
        first.cancel()
        got = await second
        assert got is not None and codec.read_header(got).level == "q4"
        assert server.transcoded == 1 and await cache.get(key(0), "q4") == got
        await server.close()

    asyncio.run(main())


def test_a_shared_transfer_that_fails_is_not_blamed_on_the_joining_fetchs_peer() -> None:
    """Fetch B joins fetch A's transfer of a chunk from peer a; a dies. B's own peer b is
    healthy: B asks it again rather than dropping it."""

    async def main() -> None:
        a, b = Peer("a"), Peer("b")
        a.gates[0] = asyncio.Event()
        a.fail_on.add(0)
        f = fetcher({"a": a, "b": b})
        keys = [key(0), key(1)]
        fetch_a = asyncio.create_task(f.fetch(keys, [{"a"}] * 2, Sink(), policy="fixed:q8"))
        await wait_until(lambda: (0, "q8") in a.calls)
        fetch_b = asyncio.create_task(f.fetch(keys, [{"b"}] * 2, Sink(), policy="fixed:q8"))
        await wait_until(lambda: f.transfers.shared == 1)
        a.gates[0].set()
        out_a, out_b = await fetch_a, await fetch_b
        assert out_a.chunks == 0
        assert (out_b.chunks, out_b.reason) == (2, "complete")
        assert not [e for e in out_b.events if e.kind == "peer_lost"]
        assert (0, "q8") in b.calls

    asyncio.run(main())


def test_transcodes_nobody_waits_for_leave_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests given up on (deadline, BlobCancel) must not hold a live request behind their
    queued transcodes; the one already running finishes (its blob is cached)."""
    import kvpeer.fetcher as fetcher_mod

    transcode = fetcher_mod.transcode_blocking

    def slow_transcode(*args: Any) -> bytes:
        time.sleep(0.1)
        return transcode(*args)

    monkeypatch.setattr(fetcher_mod, "transcode_blocking", slow_transcode)

    async def main() -> None:
        cache = Cache()
        for i in range(7):
            await cache.put(key(i), "exact", blob(i, "exact"))
        server = LevelServer(cache, executor=ThreadPoolExecutor(1))
        given_up = [asyncio.create_task(server.open_blob(key(i), "q4")) for i in range(6)]
        await asyncio.sleep(0.02)
        for task in given_up:
            task.cancel()
        await asyncio.gather(*given_up, return_exceptions=True)
        live = await server.open_blob(key(6), "q4")
        assert live is not None and codec.read_header(live).level == "q4"
        assert server.transcoded <= 2  # the one that had the slot, and the live one
        assert not server._making
        await server.close()

    asyncio.run(main())


def test_a_joined_transfer_counts_its_bytes_once_and_its_bad_blob_is_its_senders() -> None:
    """Fetch B joins A's transfer from peer a. Its bytes crossed the wire once (for A); and a
    blob B cannot take (a sent a level below B's floor) does not drop B's own peer b."""

    async def main() -> None:
        a, b = Peer("a"), Peer("b")
        a.gates[0] = asyncio.Event()
        a.send_level = "q3"  # a answers every request with its q3
        f = fetcher({"a": a, "b": b})
        fetch_a = asyncio.create_task(f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:q8"))
        await wait_until(lambda: (0, "q8") in a.calls)
        fetch_b = asyncio.create_task(
            f.fetch([key(0)], [{"b"}], Sink(), policy="fixed:q8", min_level="q8")
        )
        await wait_until(lambda: f.transfers.shared == 1)
        a.gates[0].set()
        out_a, out_b = await fetch_a, await fetch_b
        assert out_a.chunks == 1 and out_a.bytes_moved > 0
        assert (out_b.chunks, out_b.reason) == (1, "complete") and b.calls == [(0, "q8")]
        assert out_b.bytes_moved == len(blob(0, "q8"))  # its own transfer from b only
        received = [e for e in out_b.events if e.kind == "received"]
        assert [(e.peer, e.nbytes) for e in received] == [("b", len(blob(0, "q8")))]

    asyncio.run(main())


def test_joined_transfers_move_their_bytes_once() -> None:
    async def main() -> None:
        a = Peer("a")
        a.gates[0] = asyncio.Event()
        f = fetcher({"a": a})
        first = asyncio.create_task(f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:q8"))
        await wait_until(lambda: (0, "q8") in a.calls)
        second = asyncio.create_task(f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:q8"))
        await wait_until(lambda: f.transfers.shared == 1)
        a.gates[0].set()
        outcomes = [await first, await second]
        assert [o.chunks for o in outcomes] == [1, 1] and a.calls == [(0, "q8")]
        assert sum(o.bytes_moved for o in outcomes) == len(blob(0, "q8"))
        assert f.bytes_from_peers == len(blob(0, "q8"))

    asyncio.run(main())


def test_level_server_warms_lower_levels_in_the_background() -> None:
    async def main() -> None:
        cache = Cache()
        for i in range(2):
            await cache.put(key(i), "exact", blob(i, "exact"))
        server = LevelServer(cache, warm_levels=("q8", "q4"))
        server.warm([key(0), key(1)])
        assert server._warmer is not None
        await server._warmer
        assert server.transcoded == 4 and server.warm_pending == 0
        for i in range(2):
            for lv in ("q8", "q4"):
                assert await cache.get(key(i), lv) is not None
        await server.close()

    asyncio.run(main())


def test_warming_chunks_again_reads_nothing_for_the_levels_they_hold() -> None:
    """Every turn of a conversation re-puts its history: warming it again read each level of
    each chunk from the store (disk, once RAM was full) although all were made already."""

    class CountingCache(Cache):
        gets = 0

        async def get(self, k: bytes, level: str | None = None) -> bytes | None:
            CountingCache.gets += 1
            return await super().get(k, level)

    async def main() -> None:
        cache = CountingCache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        server = LevelServer(cache, warm_levels=("q8", "q4"))
        server.warm([key(0)])
        assert server._warmer is not None
        await server._warmer
        made, reads = server.transcoded, CountingCache.gets
        server.warm([key(0)])
        await server._warmer
        assert server.transcoded == made and CountingCache.gets == reads
        await server.close()

    asyncio.run(main())


# A link that loses clearly to a 3 s recompute of four chunks: ~4 s for them even at q3, by the
# fetch policy's size priors (fetch_policy.PRIOR_RATIO_VS_FP16) and its safety margin.
SLOW_BPS = 7.5e4


def test_an_unproven_slow_estimate_does_not_stop_the_fetch_before_one_chunk_is_measured() -> None:
    """The transport's first samples read slow start: a link that looks a bit too slow gets
    one chunk's chance before the fetcher gives up on it."""

    async def main() -> None:
        peer = Peer("a", bps=SLOW_BPS)
        f = fetcher({"a": peer})
        recompute_rate = 4 * TOKENS / 3.0  # recompute: 3 s; the estimate says ~5 s to fetch
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), recompute_rate=recompute_rate)
        assert peer.calls, "gave up without measuring a single chunk"
        assert out.chunks >= 1

    asyncio.run(main())


def test_a_slow_link_measured_by_an_earlier_fetch_means_recompute_at_once() -> None:
    """The transport's live estimate lasts across fetches: once it stands on enough bytes (an
    earlier fetch's, even one abandoned before any chunk finished), a link that loses clearly
    to recomputing is not asked for a chunk again."""

    async def main() -> None:
        peer = Peer("a", bps=SLOW_BPS)
        peer.estimator.total_bytes = 1 << 20  # delivered earlier on this session
        f = fetcher({"a": peer})
        recompute_rate = 4 * TOKENS / 3.0  # recompute: 3 s; the estimate says ~5 s to fetch
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), recompute_rate=recompute_rate)
        assert out.reason == "recompute" and out.chunks == 0
        assert peer.calls == []

    asyncio.run(main())


def test_a_link_found_slow_mid_chunk_is_given_up_without_waiting_for_the_chunk() -> None:
    """Within one fetch: when the bytes arriving show that even the floor loses clearly to
    recomputing, the fetch stops at once, not when the chunk in flight ends or after
    ``evidence_s`` (here an hour, and the chunk never ends)."""

    async def main() -> None:
        peer = Peer("a", bps=None)  # unmeasured: the fetch starts on the 100 Mbit/s guess
        gate = asyncio.Event()  # never set: chunk 0 stays in flight
        peer.gates[0] = gate
        f = fetcher({"a": peer}, evidence_s=3600.0)
        recompute_rate = 4 * TOKENS / 3.0
        task = asyncio.create_task(
            f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), recompute_rate=recompute_rate)
        )
        await wait_until(lambda: bool(peer.calls))
        assert not task.done()
        peer.estimator.bps = SLOW_BPS  # the transport measured the chunk's first bytes: too slow
        peer.estimator.total_bytes = 1 << 20
        async with asyncio.timeout(10):
            out = await task
        assert out.reason == "recompute" and out.chunks == 0
        assert [e.kind for e in out.events].count("recompute") == 1
        assert peer.calls == [(0, "q8")]

    asyncio.run(main())


@pytest.mark.parametrize("memory_s", [120.0, 0.0])
def test_the_fetcher_remembers_a_slow_link_after_the_transport_forgot_it(memory_s: float) -> None:
    """The transport drops an estimate 30 s after its last sample; a client that recomputed
    after a given-up fetch asks again later than that. Within ``link_memory_s`` the fetcher
    still knows the link loses to recomputing; past it, it measures again."""

    async def main() -> None:
        peer = Peer("a", bps=SLOW_BPS)
        peer.estimator.total_bytes = 1 << 20
        f = fetcher({"a": peer}, link_memory_s=memory_s)
        keys = [key(i) for i in range(4)]
        recompute_rate = 4 * TOKENS / 3.0
        first = await f.fetch(keys, [{"a"}] * 4, Sink(), recompute_rate=recompute_rate)
        assert first.reason == "recompute" and peer.calls == []
        peer.estimator.bps = None  # stale at the transport
        again = await f.fetch(keys, [{"a"}] * 4, Sink(), recompute_rate=recompute_rate)
        if memory_s:
            assert again.reason == "recompute" and peer.calls == []
        else:
            assert peer.calls  # nothing known: probe (the stand-in answers at once)

    asyncio.run(main())


def test_a_sink_slow_to_take_the_last_chunks_does_not_cut_the_prefix() -> None:
    """The sink's chunk_done may take several coordinator ticks (the engine's client is busy):
    restored but unreported chunks are not "nothing left", so the whole prefix is reported."""

    class SlowSink(Sink):
        async def chunk_done(self, index: int, level: str) -> None:
            await asyncio.sleep(0.05)  # a few ticks of tick_s below: the client's side is slow
            await super().chunk_done(index, level)

    async def main() -> None:
        f = fetcher({"a": Peer("a")}, tick_s=0.005)
        sink = SlowSink()
        out = await f.fetch([key(i) for i in range(3)], [{"a"}] * 3, sink, policy="fixed:exact")
        assert out.chunks == 3 and out.reason == "complete", out.reason
        assert [i for i, _ in sink.done] == [0, 1, 2]

    asyncio.run(main())


# --------------------------------------------------------------------------- link knowledge


def measured(f: Fetcher, peer: str, bps: float) -> None:
    """As if a whole chunk from ``peer`` had just measured it at ``bps``."""
    f.chunk_rates[peer] = ChunkRate(bps=bps, samples=3, at=f.clock())


class ShiftedClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_a_peer_measured_slow_is_asked_again_once_the_measurement_is_old() -> None:
    """One congested fetch must not write a peer off for good: with no chunk asked of it, its
    rate would never be corrected."""

    async def main() -> None:
        peer = Peer("a", bps=None)
        clock = ShiftedClock()
        f = Fetcher(
            sessions={"a": peer}.get, cache=Cache(), chunk_tokens=TOKENS, clock=clock,
            config=FetcherConfig(kv_bytes_per_token=2 * LAYERS * HEADS * DIM * 2),
        )
        measured(f, "a", 1e4)
        keys = [key(i) for i in range(4)]
        for i in range(4):  # encoded ahead: the peer answers at once
            for level in codec.LEVELS:
                blob(i, level)
        out = await f.fetch(keys, [{"a"}] * 4, Sink(), recompute_rate=4000.0)
        assert (out.reason, peer.calls) == ("recompute", [])  # the slow rate still stands
        clock.offset += f.config.link_memory_s + 1
        out = await f.fetch(keys, [{"a"}] * 4, Sink(), recompute_rate=4000.0)
        assert (out.chunks, out.reason) == (4, "complete")
        assert len(peer.calls) == 4

    asyncio.run(main())


def test_chunk_rates_of_peers_gone_quiet_are_dropped_when_a_new_peer_is_measured() -> None:
    """Peers come and go; the rates of those nothing asked of within ``link_memory_s`` must not
    pile up for the daemon's lifetime."""
    clock = ShiftedClock()
    f = Fetcher(sessions={}.get, cache=Cache(), chunk_tokens=TOKENS, clock=clock)
    for i in range(100):
        f.measure_chunk_rate(f"old{i}", 1e6, clock())
    f.measure_chunk_rate("old0", 3e6, clock())
    assert f.chunk_rates["old0"].samples == 2
    assert f.chunk_rates["old0"].bps == pytest.approx(2e6)
    clock.offset += f.config.link_memory_s + 1
    f.measure_chunk_rate("new", 1e6, clock())
    assert list(f.chunk_rates) == ["new"]


BIG = (16, 8, 64)  # layers, kv_heads, head_dim: 64x the KV of the tests' model


class BigPeer(Peer):
    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.calls.append((k[0], level))
        gen = torch.Generator().manual_seed(k[0])
        kv = [torch.randn(BIG[0], BIG[1], TOKENS, BIG[2], generator=gen).half() for _ in range(2)]
        return codec.encode(*kv, level=level or "exact")


def test_sizes_learned_from_one_models_fetch_do_not_steer_another_models() -> None:
    async def main() -> None:
        small, big = Peer("a", bps=None), BigPeer("b", bps=None)
        f = fetcher({"a": small, "b": big})
        out = await f.fetch(
            [bytes([200]) * 32], [{"b"}], Sink(), policy="fixed:q3", model="big",
            kv_bytes_per_token=2 * BIG[0] * BIG[1] * BIG[2] * 2, chunk_shape=BIG,
        )
        assert out.chunks == 1
        # 20 Mbit/s: the small model's q3 chunk takes ~5 ms against 64 ms to recompute it, the
        # big one's ~0.3 s.
        measured(f, "a", 20e6)
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), recompute_rate=4000.0, model="small")
        assert (out.chunks, out.reason) == (4, "complete")

    asyncio.run(main())


class SilentAfterFirst(Peer):
    """Serves chunk 0, then goes silent: each later request waits out its timeout."""

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if k[0] >= 1:
            self.calls.append((k[0], level))
            await asyncio.sleep(timeout or 60)
            raise TransportError("blob fetch timed out")
        return await super().fetch_blob(k, level, timeout)


def test_a_link_that_goes_silent_is_given_up_for_recompute_before_the_request_timeout() -> None:
    async def main() -> None:
        peer = SilentAfterFirst("a")
        f = fetcher({"a": peer}, request_timeout_s=8.0)
        measured(f, "a", 1e9)
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), recompute_rate=8000.0)
        # Not "unavailable" at the request timeout: the silence showed recomputing is faster.
        assert (out.chunks, out.reason) == (1, "recompute")
        assert "peer_lost" not in {e.kind for e in out.events}

    asyncio.run(main())


class BusyFor(Peer):
    """Answers BUSY until ``until`` (a peer whose transfer slots are full for a while)."""

    def __init__(self, name: str, busy_s: float) -> None:
        super().__init__(name)
        self.until = time.monotonic() + busy_s
        self.busy = 0

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if time.monotonic() < self.until:
            self.busy += 1
            raise ProtocolError(ErrorCode.BUSY, "too many transfers")
        return await super().fetch_blob(k, level, timeout)


def test_a_peer_busy_for_a_moment_is_asked_again_after_a_backoff_not_given_up() -> None:
    async def main() -> None:
        peer = BusyFor("a", busy_s=0.05)
        f = fetcher({"a": peer})
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), policy="fixed:q8")
        assert (out.chunks, out.reason) == (4, "complete")
        assert peer.busy > 0

    asyncio.run(main())


def fetch_run(f: Fetcher, holders: list[set[str]]) -> _FetchRun:
    """One fetch's state, to drive its decisions by hand (no transfers run)."""
    return _FetchRun(
        f, keys=[key(i) for i in range(len(holders))], holders=holders, sink=Sink(),
        deadline=None, min_level=None, recompute_rate=4000.0, recompute_known=True,
        kv_bytes_per_token=256.0, dtype_bytes=2, policy="adaptive",
    )


def test_one_chunk_cannot_pull_a_peers_rate_up_more_than_fourfold() -> None:
    """Two chunks that shared the link and ended 1 ms apart: the second reads as its bytes over
    that millisecond."""

    async def main() -> None:
        f = fetcher({"a": Peer("a")})
        run = fetch_run(f, [{"a"}] * 2)
        now = f.clock()
        run._chunk_rate("a", now - 1.0, now, 125_000)  # 1 Mbit/s over a second
        assert f.chunk_rates["a"].bps == pytest.approx(1e6)
        run._chunk_rate("a", now - 1.0, now + 0.001, 125_000)
        assert f.chunk_rates["a"].bps == pytest.approx(0.5e6 + 0.5 * 4e6)

    asyncio.run(main())


class BusyOnceOnChunk0(Peer):
    """BUSY once for chunk 0; every other chunk takes ``slow_s`` (they fill the peer's window)."""

    def __init__(self, name: str, slow_s: float) -> None:
        super().__init__(name)
        self.slow_s = slow_s
        self.busy = False

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if k[0] == 0 and not self.busy:
            self.busy = True
            raise ProtocolError(ErrorCode.BUSY, "too many transfers")
        if k[0] != 0:
            await asyncio.sleep(self.slow_s)
        return await super().fetch_blob(k, level, timeout)


def test_a_backed_off_chunk_waiting_for_a_slot_does_not_spin_the_coordinator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its backoff over and the peer's window full of other chunks, it waits for a slot like
    any pending chunk: the coordinator ticks, it does not loop with a zero timeout."""
    from kvpeer.fetch_policy import ChunkScheduler

    looks = {"n": 0}
    retry_wait = ChunkScheduler.retry_wait

    def counted(self: ChunkScheduler, now: float) -> float | None:
        looks["n"] += 1
        return retry_wait(self, now)

    monkeypatch.setattr(ChunkScheduler, "retry_wait", counted)

    async def main() -> None:
        peer = BusyOnceOnChunk0("a", slow_s=1.0)
        f = fetcher({"a": peer}, scheduler=SchedulerConfig(window=2))
        out = await f.fetch([key(i) for i in range(4)], [{"a"}] * 4, Sink(), policy="fixed:q8")
        assert (out.chunks, out.reason) == (4, "complete")
        # ~2 s at one tick per 0.1 s plus the events: tens of looks, not tens of thousands.
        assert looks["n"] < 500

    asyncio.run(main())


def test_the_link_rate_counts_only_peers_holding_chunks_still_to_come() -> None:
    """A fast peer that held only chunk 0 does not speed up chunks only a slow one holds."""

    async def main() -> None:
        f = fetcher({"a": Peer("a", bps=None), "b": Peer("b", bps=None)})
        measured(f, "a", 1e9)
        measured(f, "b", 1e6)
        run = fetch_run(f, [{"a", "b"}] + [{"b"}] * 7)
        now = run.start
        assert run._link(now)[0] == pytest.approx(1e9 + 1e6)
        (first,) = [a for a in run.sched.assign(now) if a.index == 0]
        run.sched.completed(0, now)
        bandwidth, rtt = run._link(now)
        assert bandwidth == pytest.approx(1e6)
        # At b's rate, chunks 1-7 lose to recomputing them at 4,000 tokens/s.
        assert isinstance(run.ctl.decide(1, now, bandwidth, rtt), RecomputeRest)

    asyncio.run(main())


def test_a_client_segment_that_fails_is_not_blamed_on_the_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client truncated its segment: the chunks' hand-over fails, which used to be logged
    and noted as the peer's chunk not decoding (and its valid blob was not cached)."""
    import os
    from types import SimpleNamespace

    from kvpeer import shm
    from kvpeer.api.server import FetchSink

    class ShrinkingServer:
        async def _create_segment_off_loop(self, layout: Any, conn: Any, *, leased: bool) -> Any:
            segment = shm.DaemonSegment.create(layout, directory=tmp_path)
            os.truncate(segment.path, 4096)  # the client shrinks its segment (its right)
            return segment

    class Conn:
        async def send(self, message: Any, *attached: Any) -> None:
            pass

    async def main() -> Any:
        request = SimpleNamespace(
            id=1, kv_from=0, split=False, fingerprint=SimpleNamespace(layers=LAYERS, kv_heads=HEADS, head_dim=DIM)
        )
        sink = FetchSink(ShrinkingServer(), Conn(), request)  # type: ignore[arg-type]
        cache = Cache()
        out = await fetcher({"a": Peer("a")}, cache).fetch(
            [key(i) for i in range(4)], [{"a"}] * 4, sink, policy="fixed:exact"
        )
        sink.segment.unlink()
        sink.segment.close()
        return out, sink, cache

    with caplog.at_level(logging.DEBUG, logger="kvpeer.fetcher"):
        out, sink, cache = asyncio.run(main())
    assert sink.failed is not None and out.chunks == 0  # the API layer fails the fetch with it
    assert not any("does not decode" in r.getMessage() for r in caplog.records)
    assert any("cannot be handed over" in r.getMessage() for r in caplog.records)
    assert not [e for e in out.events if e.kind == "failed" and e.peer == "a"]


def test_a_decode_still_queued_at_the_deadline_is_dropped_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other work holds the executor's only thread, so chunk 0's decode waits in its queue when
    the deadline comes: the fetch returns then, not once the thread is free (it used to wait for
    the decode to start and end), and the dropped decode never writes into the client's memory."""
    decoded: list[bytes] = []
    real = fetcher_mod.decode_into_blocking

    def counting(data: bytes, k: torch.Tensor, v: torch.Tensor) -> float:
        decoded.append(data)
        return real(data, k, v)

    monkeypatch.setattr(fetcher_mod, "decode_into_blocking", counting)
    executor = ThreadPoolExecutor(max_workers=1)
    busy, release = threading.Event(), threading.Event()

    def other_work() -> None:
        busy.set()
        release.wait(timeout=20)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        blocker = loop.run_in_executor(executor, other_work)
        await loop.run_in_executor(None, busy.wait, 10)
        peer = Peer("a")
        peer.gates[1] = asyncio.Event()  # chunk 1 never arrives
        f = fetcher({"a": peer})
        f.executor = executor
        sink = Sink()
        fetch = f.fetch(
            [key(i) for i in range(2)], [{"a"}] * 2, sink, deadline=time.monotonic() + 0.3,
            policy="fixed:q8",
        )
        try:
            out = await asyncio.wait_for(fetch, 10)
            returned_while_busy = not release.is_set()
        finally:
            release.set()
            await blocker
        return out, returned_while_busy, sink

    try:
        out, returned_while_busy, sink = asyncio.run(main())
    finally:
        release.set()
        executor.shutdown()
    assert returned_while_busy
    assert out.reason == "deadline" and out.chunks == 0 and sink.done == []
    assert [e.index for e in out.events if e.kind == "decode_start"] == [0]
    assert decoded == [] and not [e for e in out.events if e.kind == "decode_end"]


def test_a_decode_running_at_the_deadline_ends_before_the_fetch_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It writes into the client's memory: the fetch may not return while it runs."""
    started, release = threading.Event(), threading.Event()
    finished: list[int] = []
    real = fetcher_mod.decode_into_blocking

    def slow(data: bytes, k: torch.Tensor, v: torch.Tensor) -> float:
        started.set()
        assert release.wait(timeout=20)
        seconds = real(data, k, v)
        finished.append(1)
        return seconds

    monkeypatch.setattr(fetcher_mod, "decode_into_blocking", slow)

    async def main() -> Any:
        peer = Peer("a")
        peer.gates[1] = asyncio.Event()
        f = fetcher({"a": peer})
        deadline = time.monotonic() + 0.2
        task = asyncio.create_task(
            f.fetch([key(i) for i in range(2)], [{"a"}] * 2, Sink(), deadline=deadline, policy="fixed:q8")
        )
        try:
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            await wait_until(lambda: time.monotonic() > deadline + 0.2)
            still_running = not task.done()
        finally:
            release.set()
        return await task, still_running

    out, still_running = asyncio.run(main())
    assert still_running and finished == [1]
    assert out.reason == "deadline" and out.chunks == 0


def test_a_slow_store_put_of_a_fetched_chunk_does_not_hold_the_fetch() -> None:
    """The put of a decoded chunk into this node's store goes on after the fetch returned (the
    store's executor may be busy); it used to belong to the fetch, which waited for it."""

    async def main() -> None:
        cache = GatedCache()
        f = fetcher({"a": Peer("a")}, cache)
        out = await asyncio.wait_for(
            f.fetch([key(i) for i in range(2)], [{"a"}] * 2, Sink(), policy="fixed:q8"), 10
        )
        assert out.reason == "complete" and not cache.has(key(0))
        cache.gate.set()
        await wait_until(lambda: cache.has(key(0)) and cache.has(key(1)))
        await f.close()

    asyncio.run(main())


def test_a_cancelled_fetch_tells_its_outcome_and_counts_its_bytes() -> None:
    """The caller gave up (client gone, API backstop): what was restored and received until then
    is still told (on_end, reason "cancelled") and counted in bytes_from_peers."""

    async def main() -> None:
        peer = Peer("a")
        peer.gates[1] = asyncio.Event()  # chunk 0 arrives, chunk 1 never does
        f = fetcher({"a": peer})
        sink = Sink()
        ended: list[Any] = []
        task = asyncio.create_task(
            f.fetch([key(i) for i in range(2)], [{"a"}] * 2, sink, policy="fixed:q8", on_end=ended.append)
        )
        await wait_until(lambda: bool(sink.done))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(ended) == 1
        out = ended[0]
        assert out.reason == "cancelled" and out.chunks == 1 and out.levels == ("q8",)
        assert out.bytes_moved == len(blob(0, "q8")) == f.bytes_from_peers

    asyncio.run(main())


def test_a_holder_without_a_session_is_dropped_from_the_fetch_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It used to be asked chunk after chunk (NOT_FOUND, one WARNING each) and never dropped."""

    async def main() -> Any:
        f = fetcher({"a": Peer("a")})  # "b" is listed as a holder but has no session
        out = await f.fetch([key(i) for i in range(16)], [{"a", "b"}] * 16, Sink(), policy="fixed:q8")
        return out, f

    with caplog.at_level(logging.DEBUG, logger="kvpeer.fetcher"):
        out, f = asyncio.run(main())
    assert out.reason == "complete" and out.chunks == 16
    assert [e.kind for e in out.events if e.peer == "b"] in ([], ["request", "peer_lost"])
    assert not [e for e in out.events if e.kind == "failed"]
    assert f.counters["peer_lost"] <= 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1


def test_per_fetch_and_per_chunk_events_log_at_debug_with_the_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hundred fetches giving up on a slow link used to be a hundred INFO lines: they are
    counted by their outcome, and logged at DEBUG with the prefix they were about."""

    async def main() -> None:
        peer = Peer("a", bps=1e3)
        peer.estimator.total_bytes = 1 << 20
        f = fetcher({"a": peer})
        for _ in range(20):
            out = await f.fetch([key(j) for j in range(4)], [{"a"}] * 4, Sink(), recompute_rate=1000.0)
            assert out.reason == "recompute"

    with caplog.at_level(logging.DEBUG, logger="kvpeer"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("kvpeer")]
    gave_up = [r.getMessage() for r in caplog.records if "is faster" in r.getMessage()]
    assert len(gave_up) == 20 and all(key(3)[:4].hex() in line for line in gave_up)


def test_a_peer_dying_under_many_fetches_is_one_warning_per_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twenty fetches meeting one dead peer used to be twenty WARNINGs for one event. Once the
    peer serves a chunk again, its next failure is a new episode, warned about again."""

    async def dying(f: Fetcher, peer: Peer, n: int, first: int) -> None:
        chunks = range(first, first + 4)
        gate = asyncio.Event()
        peer.gates = dict.fromkeys(chunks, gate)
        peer.fail_on = set(chunks)
        peer.calls.clear()
        tasks = [
            asyncio.create_task(f.fetch([key(j) for j in chunks], [{"a"}] * 4, Sink(), policy="fixed:q8"))
            for _ in range(n)
        ]
        await wait_until(lambda: len(peer.calls) >= 1)
        gate.set()
        for out in await asyncio.gather(*tasks):
            assert out.chunks == 0

    async def main() -> Fetcher:
        peer = Peer("a")
        f = fetcher({"a": peer})
        await dying(f, peer, 20, first=0)
        peer.gates.clear()
        peer.fail_on = set()
        assert (await f.fetch([key(8)], [{"a"}], Sink(), policy="fixed:q8")).chunks == 1
        await dying(f, peer, 5, first=4)
        return f

    with caplog.at_level(logging.DEBUG, logger="kvpeer.fetcher"):
        f = asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("peer a failed" in w for w in warnings)
    assert f.counters["peer_lost"] == 25


def test_a_peer_whose_chunks_never_decode_is_one_warning_across_fetches(caplog: pytest.LogCaptureFixture) -> None:
    """A chunk that arrived counted as served before its digest failed: every fetch began a new
    episode of trouble, and warned again."""

    async def main() -> None:
        f = fetcher({"a": CorruptingPeer("a", bad=0)})
        for _ in range(10):
            out = await f.fetch([key(0), key(1)], [{"a"}] * 2, Sink(), policy="fixed:q8")
            assert out.chunks == 0

    with caplog.at_level(logging.DEBUG, logger="kvpeer"):
        asyncio.run(main())
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_fetched_chunks_waiting_for_a_slow_store_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decoded peer chunk became a task holding its blob until the store took it: with a
    store held up by a slow disk, memory grew with every fetch."""

    class StuckCache(Cache):
        async def put(self, k: bytes, level: str, data: bytes) -> None:
            await asyncio.Event().wait()

    async def main() -> None:
        f = fetcher({"a": Peer("a")}, StuckCache())
        size = len(blob(0, "exact"))
        monkeypatch.setattr(fetcher_mod, "MAX_CACHING_BYTES", 3 * size)
        for n in range(4):
            out = await f.fetch([key(n)], [{"a"}], Sink(), policy="fixed:exact")
            assert out.chunks == 1
        assert len(f._caching) == 3 and f.counters["cache_dropped"] == 1
        await f.close()
        assert all(task.done() for task in f._caching) and f._caching_bytes == 0

    asyncio.run(main())


def test_a_fetch_meeting_a_shut_decode_pool_ends_as_a_clean_failure(caplog: pytest.LogCaptureFixture) -> None:
    """At stop, the decode pool is shut once the API's fetches were given time to end: one still
    running raised RuntimeError out of its task group and never told its outcome."""

    async def main() -> None:
        pool = ThreadPoolExecutor(2)
        pool.shutdown(wait=False)
        f = fetcher({"a": Peer("a")})
        f.executor = pool
        ended: list[Any] = []
        out = await f.fetch([key(0), key(1)], [{"a"}] * 2, Sink(), policy="fixed:q8", on_end=ended.append)
        assert out.chunks == 0 and ended
        assert f.counters["undecodable"] == 0  # stopping is not the peer's fault

    with caplog.at_level(logging.WARNING, logger="kvpeer"):
        asyncio.run(main())
    assert not caplog.records


def test_a_decode_failing_for_a_reason_of_this_node_ends_the_fetch_at_that_chunk(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A RuntimeError raised by the decode work itself (torch's, say) escaped the fetch's task
    group: the fetch lost the chunks it had restored and its outcome was never told."""
    real = fetcher_mod.decode_into_blocking
    calls = [0]

    def failing_second(blob_: bytes, k_out: torch.Tensor, v_out: torch.Tensor) -> float:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("CUDA error: out of memory")
        return real(blob_, k_out, v_out)

    monkeypatch.setattr(fetcher_mod, "decode_into_blocking", failing_second)

    async def main() -> None:
        f = fetcher({"a": Peer("a")})
        ended: list[Any] = []
        out = await f.fetch([key(n) for n in range(3)], [{"a"}] * 3, Sink(), policy="fixed:q8", on_end=ended.append)
        assert out.chunks == 1 and out.reason == "error" and ended
        assert f.counters["undecodable"] == 0  # not the peer's chunk
        assert "a" not in f._troubled

    with caplog.at_level(logging.WARNING, logger="kvpeer"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR and errors[0].exc_info


def test_a_transcode_is_sent_before_the_store_took_it() -> None:
    """A peer asking for a level made on demand waited for the store's put too: on a disk slow
    enough to fill the write queue, for that disk."""

    async def main() -> None:
        cache = GatedCache()
        cache.blobs[key(0)] = {"exact": blob(0, "exact")}
        server = LevelServer(cache)
        got = await asyncio.wait_for(server.open_blob(key(0), "q4"), 10)
        assert got is not None and codec.read_header(got).level == "q4"
        # Asked again while the put waits: the same blob, not a second transcode.
        assert await asyncio.wait_for(server.open_blob(key(0), "q4"), 10) == got
        assert server.transcoded == 1 and await cache.get(key(0), "q4") is None
        cache.gate.set()
        await wait_until(lambda: not server._making)
        assert await cache.get(key(0), "q4") == got
        await server.close()

    asyncio.run(main())


def test_giving_up_keeps_the_chunks_this_node_holds() -> None:
    """"Recompute the rest" cut the prefix after the chunks in flight: local chunks still
    waiting for one of the store's two slots were cut and recomputed although they cost no wire."""

    async def main() -> None:
        cache = Cache()
        for i in range(4):
            await cache.put(key(i), "q8", blob(i, "q8"))
        f = fetcher({"a": Peer("a")}, cache=cache)
        measured(f, "a", 1e3)  # the peer's link is hopeless, and measured so
        out = await f.fetch([key(i) for i in range(8)], [set()] * 4 + [{"a"}] * 4, Sink(), recompute_rate=1000.0)
        assert (out.chunks, out.reason) == (4, "recompute")

    asyncio.run(main())


class _Paced(Peer):
    """Sends each blob at ``rate`` bits/s."""

    def __init__(self, name: str, rate: float, delay_s: float = 0.0) -> None:
        super().__init__(name, bps=None)
        self.rate = rate
        self.delay_s = delay_s

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.calls.append((k[0], level))
        data = blob(k[0], level or "exact")
        await asyncio.sleep(self.delay_s + len(data) * 8 / self.rate)
        return data


def test_a_local_chunk_that_cannot_be_read_is_fetched_at_its_real_cost() -> None:
    """The store said it held chunk 0 and then could not read it: the chunk went to the peer
    still stated as 0 bytes (the free local copy), at the top level; once the peer was silent
    for a moment the link read 0 bits/s and the fetch died of a ZeroDivisionError."""

    class Vanishing(Cache):
        def has(self, k: bytes) -> bool:
            return k == key(0) or super().has(k)

        async def get(self, k: bytes, level: str | None = None) -> bytes | None:
            return None if k == key(0) else await super().get(k, level)

    async def main() -> None:
        slow = _Paced("a", 1e9, delay_s=1.5)
        f = fetcher({"a": slow}, cache=Vanishing())
        measured(f, "a", 1e9)
        out = await f.fetch([key(0)], [{"a"}], Sink(), recompute_rate=4000.0)
        assert out.reason in ("complete", "recompute")
        paced = _Paced("b", 1e6)
        f = fetcher({"b": paced}, cache=Vanishing())
        measured(f, "b", 1e6)
        out = await f.fetch([key(0)], [{"b"}], Sink(), recompute_rate=400.0, deadline=f.clock() + 0.25)
        assert paced.calls == [(0, "q3")]  # what the deadline allows at 1 Mbit/s, not exact

    asyncio.run(main())


def test_one_peers_measured_chunk_does_not_make_anothers_first_sample_evidence() -> None:
    async def run(holders: list[set[str]]) -> tuple[int, str]:
        a = Peer("a", bps=None)
        b = Peer("b", bps=1e3)  # the first sample of a fresh session: set-up and slow start
        b.estimator.total_bytes = 300 * 1024
        for i in range(4):
            b.gates[i] = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, lambda: [g.set() for g in b.gates.values()])
        f = fetcher({"a": a, "b": b})
        out = await f.fetch([key(i) for i in range(4)], holders, Sink(), recompute_rate=1000.0)
        return out.chunks, out.reason

    async def main() -> None:
        assert await run([{"b"}] * 4) == (4, "complete")
        assert await run([{"a"}] + [{"b"}] * 3) == (4, "complete")

    asyncio.run(main())


def test_a_chunk_only_a_slow_peer_holds_gets_a_level_its_link_delivers_in_time() -> None:
    """Levels were chosen on the sum of all peers' rates, whichever peer sent the chunk: the
    one chunk held only by a 1 Mbit/s peer went at exact (0.48 s) against a 0.3 s deadline."""

    async def main() -> None:
        fast, slow = _Paced("a", 1e9), _Paced("b", 1e6)
        f = fetcher({"a": fast, "b": slow})
        measured(f, "a", 1e9)
        measured(f, "b", 1e6)
        out = await f.fetch(
            [key(i) for i in range(8)], [{"a"}] * 7 + [{"b"}], Sink(), recompute_rate=400.0,
            deadline=f.clock() + 0.3,
        )  # fmt: skip
        assert len(slow.calls) == 1
        level = slow.calls[0][1]
        assert len(blob(7, level)) * 8 / 1e6 < 0.3, level
        assert out.chunks == 8

    asyncio.run(main())


def test_a_fetch_joins_another_fetchs_transfer_only_at_its_level_or_a_smaller_one() -> None:
    """A fetch that chose q3 for its deadline joined another fetch's exact transfer of the
    chunk, and ended at its deadline with nothing."""

    async def main() -> None:
        peer = _Paced("a", 1e6)
        f = fetcher({"a": peer})
        measured(f, "a", 1e6)
        big = asyncio.create_task(f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:exact"))
        await wait_until(lambda: bool(peer.calls))
        small = await f.fetch([key(0)], [{"a"}], Sink(), recompute_rate=400.0, deadline=f.clock() + 0.3)
        assert (small.chunks, small.reason) == (1, "complete")
        assert peer.calls == [(0, "exact"), (0, "q3")] and f.transfers.shared == 0
        await big
        # A smaller transfer in flight is still joined.
        peer.calls.clear()
        first = asyncio.create_task(f.fetch([key(1)], [{"a"}], Sink(), policy="fixed:q3"))
        await wait_until(lambda: bool(peer.calls))
        second = await f.fetch([key(1)], [{"a"}], Sink(), policy="fixed:q8")
        assert second.chunks == 1 and peer.calls == [(1, "q3")] and f.transfers.shared == 1
        await first

    asyncio.run(main())


class _Serial(Peer):
    """One link: blobs go one after the other at ``rate`` bits/s."""

    def __init__(self, name: str, rate: float) -> None:
        super().__init__(name, bps=None)
        self.rate = rate
        self.link = asyncio.Lock()

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.calls.append((k[0], level))
        data = blob(k[0], level or "exact")
        async with self.link:
            await asyncio.sleep(len(data) * 8 / self.rate)
        return data


def test_the_carrying_peers_queue_is_what_was_requested_from_it_at_its_level() -> None:
    """The per-peer check was told the scheduler's guesses (every chunk at the floor, the next
    chunk counted ahead of this one): both chunks of a 4 Mbit/s peer went at exact and the
    fetch missed its deadline."""

    async def main() -> None:
        fast, slow = _Serial("a", 1e9), _Serial("b", 4e6)
        f = fetcher({"a": fast, "b": slow})
        measured(f, "a", 1e9)
        measured(f, "b", 4e6)
        out = await f.fetch(
            [key(i) for i in range(8)], [{"a"}] * 6 + [{"b"}] * 2, Sink(), recompute_rate=400.0,
            deadline=f.clock() + 0.2,
        )  # fmt: skip
        on_b = sum(len(blob(index, level)) for index, level in slow.calls)
        assert on_b * 8 / 4e6 <= 0.2, slow.calls
        assert out.chunks == 8

    asyncio.run(main())


def test_transfers_past_a_gap_stop() -> None:
    """The only holder of chunk 2 died: the transfers of the chunks after it went on, using the
    link and uncounted, until the fetch ended."""

    class Dies(Peer):
        async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
            await asyncio.sleep(0.05)
            raise TransportError("session closed")

    class Watched(_Serial):
        stopped: list[float] = []

        async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
            try:
                return await super().fetch_blob(k, level, timeout)
            except asyncio.CancelledError:
                self.stopped.append(time.monotonic())
                raise

    async def main() -> None:
        a, c = _Serial("a", 4e6), Watched("c", 1e6)
        f = fetcher({"a": a, "b": Dies("b"), "c": c})
        for name, bps in (("a", 4e6), ("b", 1e9), ("c", 1e6)):
            measured(f, name, bps)
        started = time.monotonic()
        holders = [{"a"}] * 2 + [{"b"}] + [{"c"}] * 5
        out = await f.fetch([key(i) for i in range(8)], holders, Sink(), policy="fixed:exact")
        assert (out.chunks, out.reason) == (2, "unavailable")
        # a needs ~0.24 s for chunks 0 and 1; c's transfers stop when b dies (0.05 s).
        assert c.calls and c.stopped and max(c.stopped) - started < 0.2

    asyncio.run(main())


def test_a_fetch_not_joining_a_bigger_transfer_leaves_it_joinable() -> None:
    class Held(Peer):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.let_exact = asyncio.Event()

        async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
            self.calls.append((k[0], level))
            if level == "exact":
                await self.let_exact.wait()
            return blob(k[0], level)

    class Keeps(Cache):
        async def put(self, k: bytes, level: str, data: bytes) -> None:
            return None  # keeps nothing: every fetch asks the peer

    async def main() -> None:
        peer = Held("a")
        f = fetcher({"a": peer}, cache=Keeps())
        measured(f, "a", 1e9)
        big = asyncio.create_task(f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:exact"))
        await wait_until(lambda: bool(peer.calls))
        small = await f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:q3")
        assert small.chunks == 1
        third = asyncio.create_task(f.fetch([key(0)], [{"a"}], Sink(), policy="fixed:exact"))
        await wait_until(lambda: f.transfers.shared == 1)
        peer.let_exact.set()
        assert (await big).chunks == 1 and (await third).chunks == 1
        assert peer.calls == [(0, "exact"), (0, "q3")]

    asyncio.run(main())


def test_transcodes_waiting_for_the_store_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answered before the put, a peer asks for the next chunk at once: on a stuck disk every
    transcode held its blob while it waited for the store."""

    class StuckPut(Cache):
        async def put_if_held(self, k: bytes, level: str, data: bytes) -> bool:
            await asyncio.Event().wait()
            return False

    async def main() -> None:
        cache = StuckPut()
        for i in range(4):
            await cache.put(key(i), "exact", blob(i, "exact"))
        monkeypatch.setattr(fetcher_mod, "MAX_STORING_BYTES", 2 * len(blob(0, "q4")) + 100)
        server = LevelServer(cache)
        for i in range(2):
            assert await asyncio.wait_for(server.open_blob(key(i), "q4"), 10) is not None
        third = asyncio.create_task(server.open_blob(key(2), "q4"))
        await wait_until(lambda: server.transcoded == 3)
        await asyncio.sleep(0.05)
        assert not third.done()  # waits for the store, as before
        await server.close()

    asyncio.run(main())


def test_a_store_put_failing_oddly_after_a_transcode_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Odd(Cache):
        async def put_if_held(self, k: bytes, level: str, data: bytes) -> bool:
            raise ValueError("odd")

    async def main() -> None:
        cache = Odd()
        await cache.put(key(0), "exact", blob(0, "exact"))
        server = LevelServer(cache)
        assert await server.open_blob(key(0), "q4") is not None
        await wait_until(lambda: not server._making)

    with caplog.at_level(logging.WARNING, logger="kvpeer"):
        asyncio.run(main())
    assert [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]


def test_closing_the_level_server_tells_waiting_requests_it_is_stopping() -> None:
    """Its transcodes were cancelled under the peers waiting for them: the serving session saw
    a cancel it was not sent, and logged it as an internal failure."""

    async def main() -> None:
        cache = Cache()
        await cache.put(key(0), "exact", blob(0, "exact"))
        gate = threading.Event()
        real = fetcher_mod.transcode_blocking

        def held(*args: Any) -> bytes:
            gate.wait(10)
            return real(*args)

        fetcher_mod.transcode_blocking = held
        try:
            server = LevelServer(cache)
            waiting = asyncio.create_task(server.open_blob(key(0), "q4"))
            await wait_until(lambda: bool(server._making))
            closing = asyncio.create_task(server.close())
            with pytest.raises(ProtocolError) as info:
                await waiting
            assert info.value.code == ErrorCode.SHUTTING_DOWN
            gate.set()
            await closing
        finally:
            fetcher_mod.transcode_blocking = real

    asyncio.run(main())


def test_every_fetcher_event_is_exported_from_the_start() -> None:
    """kvpeer_fetcher_events_total had no series until the first event of each kind: an alert
    on its rate saw nothing, and the README's metric looked missing."""
    import inspect
    import re

    from kvpeer import fetcher as fetcher_mod

    counted = set(re.findall(r'counters\["([a-z_]+)"\]', inspect.getsource(fetcher_mod)))
    assert counted == set(fetcher_mod.FETCHER_EVENTS)
    assert dict(fetcher({}).counters) == dict.fromkeys(fetcher_mod.FETCHER_EVENTS, 0)
