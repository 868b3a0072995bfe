"""Daemon.fetch's accounting: every fetch is counted however it ends, with the request's time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from kvpeer.activity import Activity
from kvpeer.metrics import Metrics
from tests.test_fetcher import DIM, HEADS, LAYERS, TOKENS, Peer, Sink, fetcher, key, wait_until

daemon = pytest.importorskip("kvpeer.daemon")

FP = SimpleNamespace(hex="m", layers=LAYERS, kv_heads=HEADS, head_dim=DIM, dtype="float16")
CTX = SimpleNamespace(namespace="default")


def request(chunks: int) -> Any:
    return SimpleNamespace(
        fingerprint=FP, tokens=list(range(chunks * TOKENS)), deadline_s=None, min_level=None,
        recompute_tokens_per_s=None, kv_from=0, split=False,
    )


class Node:
    """A daemon's fetch path over in-memory peers; planning says who holds what (and can take
    time on the daemon's clock)."""

    fetch = daemon.Daemon.fetch
    # (getattr: the same test runs against an older daemon without these, and fails on what
    # it counts, not on a missing name)
    _fetch = getattr(daemon.Daemon, "_fetch", None)
    _fetch_ended = getattr(daemon.Daemon, "_fetch_ended", None)
    _in_background = daemon.Daemon._in_background
    _mark_prompt_soon = getattr(daemon.Daemon, "_mark_prompt_soon", None)
    _used_as_prefix_once_cached = getattr(daemon.Daemon, "_used_as_prefix_once_cached", None)

    def __init__(self, peers: dict[str, Peer], *, held: int, clock: list[float] | None = None,
                 plan_s: float = 0.0) -> None:
        self.config = SimpleNamespace(fetch=SimpleNamespace(
            deadline_s=0.0, min_level="", recompute_tokens_per_s=0.0, policy="fixed:q8"
        ))  # fmt: skip
        self.fetcher = fetcher(peers)
        self.metrics = Metrics(process=False)
        self.activity = Activity(events=lambda: self.fetcher.counters)
        self.chunk_tokens = TOKENS
        self.held = held
        self.models_used: list[Any] = []
        self.clock = clock
        self.plan_s = plan_s
        self.prompts_used: list[list[bytes]] = []
        self.store = SimpleNamespace(used_as_prefix=self.prompts_used.append)
        self._background: set[asyncio.Task[None]] = set()
        self._markings: set[asyncio.Task[None]] = set()

    async def settled(self) -> None:
        """The work a fetch left in the background is done."""
        while self._background or self._markings:
            await asyncio.gather(*self._background, *self._markings)

    def _model_used(self, fp: Any) -> bool:
        self.models_used.append(fp)
        return False  # nothing to save

    def _keys(self, ctx: Any, tokens: Any, fp: Any) -> list[bytes]:
        return [key(i) for i in range(len(tokens) // TOKENS)]

    async def _plan(self, keys: list[bytes], fp: Any, limit_s: float | None = None) -> Any:
        if self.clock is not None:
            self.clock[0] += self.plan_s
        plan = daemon._Plan(keys=list(keys))
        plan.sources = ["a"] * self.held
        plan.holders = [{"a"} for _ in range(self.held)]
        return plan

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def cancel_once(node: Node, sink: Sink, reached: Callable[[], Awaitable[Any]]) -> None:
    """Start a fetch of 4 chunks, cancel it once ``reached()`` returns (the client went away)."""
    task = asyncio.create_task(node.fetch(CTX, request(4), sink))
    await reached()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_cancelled_fetch_is_counted_with_its_bytes() -> None:
    """The client went away (or the API's backstop fired) after chunk 0 arrived: that fetch used
    to vanish from every metric, the activity line and bytes_from_peers."""

    async def main() -> Node:
        peer = Peer("a")
        peer.gates[1] = asyncio.Event()  # never arrives
        node = Node({"a": peer}, held=4)
        sink = Sink()
        await cancel_once(node, sink, lambda: wait_until(lambda: bool(sink.done)))
        return node

    node = asyncio.run(main())
    assert node.value("kvpeer_fetches_total", outcome="cancelled") == 1
    assert node.value("kvpeer_fetch_seconds_count") == 1
    assert node.value("kvpeer_peer_received_bytes_total", peer="a", level="q8") > 0
    assert node.fetcher.bytes_from_peers > 0
    line = node.activity.take_summary(60)
    assert line is not None and "(cancelled 1)" in line


def test_a_fetch_cancelled_while_planning_is_counted_too() -> None:
    async def main() -> Node:
        node = Node({"a": Peer("a")}, held=4)
        planning = asyncio.Event()

        async def slow_plan(keys: list[bytes], fp: Any, limit_s: float | None = None) -> Any:
            planning.set()
            await asyncio.Event().wait()

        node._plan = slow_plan  # type: ignore[method-assign]
        await cancel_once(node, Sink(), planning.wait)
        return node

    node = asyncio.run(main())
    assert node.value("kvpeer_fetches_total", outcome="cancelled") == 1
    assert node.value("kvpeer_fetch_seconds_count") == 1


def test_fetch_seconds_include_planning_for_fetches_and_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding the holders may take seconds: kvpeer_fetch_seconds used to leave it out (the
    fetcher's own time), and never observed a miss at all."""
    clock = [1000.0]
    monkeypatch.setattr(daemon, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))

    async def main() -> tuple[Node, Node]:
        fetched = Node({"a": Peer("a")}, held=4, clock=clock, plan_s=1.5)
        await fetched.fetch(CTX, request(4), Sink())
        missed = Node({"a": Peer("a")}, held=0, clock=clock, plan_s=2.0)
        await missed.fetch(CTX, request(4), Sink())
        return fetched, missed

    fetched, missed = asyncio.run(main())
    assert fetched.value("kvpeer_fetches_total", outcome="complete") == 1
    assert fetched.value("kvpeer_fetch_seconds_sum") == 1.5  # the daemon's clock: planning only
    assert missed.value("kvpeer_fetches_total", outcome="miss") == 1
    assert missed.value("kvpeer_fetch_seconds_count") == 1
    assert missed.value("kvpeer_fetch_seconds_sum") == 2.0
    assert missed.value("kvpeer_chunk_misses_total") == 4


def test_chunks_a_peer_held_but_the_fetch_recomputed_are_not_misses() -> None:
    async def main() -> Node:
        peer = Peer("a", bps=1e3)  # hopeless: recomputing is faster
        peer.estimator.total_bytes = 1 << 20
        node = Node({"a": peer}, held=3)
        node.config.fetch.policy = "adaptive"
        node.config.fetch.recompute_tokens_per_s = 1000.0
        await node.fetch(CTX, request(4), Sink())
        return node

    node = asyncio.run(main())
    assert node.value("kvpeer_fetches_total", outcome="recompute") == 1
    assert node.value("kvpeer_chunk_misses_total") == 1  # chunk 3: nobody held it
    assert node.value("kvpeer_chunk_skips_total", reason="recompute") == 3


def test_a_local_chunk_that_turns_out_corrupt_comes_from_a_peer_that_holds_it(tmp_path: Any) -> None:
    """The plan listed no peers for chunks held here, so a local file failing its checksum
    ended the fetch at that chunk and the client recomputed everything, peers' chunks too."""
    from kvpeer import codec
    from kvpeer.discovery.inventory import InventoryTable, InventoryUpdate
    from kvpeer.store import ChunkStore
    from tests.test_fetcher import blob

    async def main() -> Any:
        store = ChunkStore(ram_bytes=0, disk_bytes=1 << 30, directory=tmp_path, level_order=codec.LEVELS)
        keys = [key(i) for i in range(4)]
        for index in range(2):  # this node holds chunks 0 and 1; peer "a" holds all four
            await store.put(keys[index], "exact", blob(index, "exact"))
        store.flush()
        path = next(tmp_path.rglob(keys[0].hex() + "*"))
        data = bytearray(path.read_bytes())
        data[-10] ^= 1
        path.write_bytes(bytes(data))
        table = InventoryTable()
        table.apply("a", InventoryUpdate(kind="full", epoch=1, keys=tuple(keys)), fingerprints=[FP.hex])
        node = SimpleNamespace(store=store, peer_table=table, discovery=SimpleNamespace(peers=dict))
        plan = await daemon.Daemon._plan(node, keys, FP)
        assert plan.sources == [None, None, "a", "a"]
        fetching = fetcher({"a": Peer("a")}, cache=store)  # type: ignore[arg-type]
        try:
            outcome = await fetching.fetch(keys, plan.holders, Sink(), policy="fixed:exact")
        finally:
            await fetching.close()
            store.close()
        return outcome, store.stats()["corrupt"]

    outcome, corrupt = asyncio.run(main())
    assert corrupt == 1
    assert (outcome.chunks, outcome.reason) == (4, "complete")


def test_a_fetch_from_peers_makes_its_model_one_this_node_serves() -> None:
    """Chunks a fetch caches are served from here too: peers look for them only among nodes
    advertising the model, which a node that only fetched it did not."""

    async def main() -> tuple[Node, Node]:
        fetched = Node({"a": Peer("a")}, held=4)
        await fetched.fetch(CTX, request(4), Sink())
        missed = Node({"a": Peer("a")}, held=0)
        await missed.fetch(CTX, request(4), Sink())
        return fetched, missed

    fetched, missed = asyncio.run(main())
    assert fetched.models_used == [FP] and missed.models_used == []


def test_an_unknown_level_is_the_clients_error_not_a_failed_fetch_or_a_silent_put() -> None:
    """A fetch asking for min_level q9 was counted as a failed fetch (outcome error, every chunk
    a skip), which alerting reads as the daemon failing; a put at q9 was refused only if it had
    a chunk to encode (INTEGRITY), and accepted when the chunks were held already."""
    from kvpeer.errors import ErrorCode, ProtocolError

    node = Node({"a": Peer("a")}, held=4)
    bad_fetch = request(4)
    bad_fetch.min_level = "q9"
    with pytest.raises(ProtocolError) as info:
        asyncio.run(node.fetch(CTX, bad_fetch, Sink()))
    assert info.value.code == ErrorCode.INVALID and "min_level" in info.value.reason
    assert node.value("kvpeer_fetch_seconds_count") == 0

    put = SimpleNamespace(fingerprint=FP, tokens=list(range(4 * TOKENS)), level="q9", prefill_s=None)
    with pytest.raises(ProtocolError) as info:
        asyncio.run(daemon.Daemon._put(SimpleNamespace(config=None), CTX, put, None))  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.INVALID and "level" in info.value.reason


def test_a_fetch_marks_its_prompt_used_however_it_ends() -> None:
    """Its chunks were read first to last, leaving the first the least recently used: eviction
    then took it first, and the rest, still held, could never be matched again."""
    async def main() -> Node:
        node = Node({"a": Peer("a")}, held=4)
        await node.fetch(CTX, request(4), Sink())
        cancelled = Sink()
        await cancel_once(node, cancelled, lambda: wait_until(lambda: bool(cancelled.done)))
        await node.settled()
        return node

    node = asyncio.run(main())
    assert node.prompts_used == [[key(i) for i in range(4)]] * 2


def test_a_prompt_fetched_from_a_peer_is_evicted_from_its_end_here_too() -> None:
    """Chunks from peers reach the store in the background, newest last: marked as the fetch
    ended, the ones not in yet came after it, and eviction took the prompt's head first."""
    from kvpeer import codec
    from kvpeer.store import ChunkStore
    from tests.test_fetcher import blob

    size = len(blob(0, "q8"))
    store = ChunkStore(ram_bytes=4 * size + size // 2, level_order=codec.LEVELS)

    async def main() -> None:
        node = Node({"a": Peer("a")}, held=4)
        node.fetcher = fetcher({"a": Peer("a")}, cache=store)  # type: ignore[arg-type]
        node.store = store  # type: ignore[assignment]
        await node.fetch(CTX, request(4), Sink())
        await node.settled()
        await wait_until(lambda: all(store.has(key(i)) for i in range(4)))
        await store.put(key(9), "q8", blob(0, "q8"))  # another prompt's chunk: room is made

    asyncio.run(main())
    assert [store.has(key(i)) for i in range(4)] == [True, True, True, False]
