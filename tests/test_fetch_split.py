"""Split fetches: the client prefills a prefix's first chunks while the daemon fetches the rest.

The choice of the split (a pure function), the controller's view of a client busy with the head,
the fetcher deciding it on in-memory peers, and a real daemon and client carrying it through the
API (FetchStarted.first_token, chunk numbering, the KV rows).
"""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpeer import codec
from kvpeer.api import messages as m
from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ApiError, ErrorCode
from kvpeer.fetch_policy import ResolutionController, head_to_recompute
from kvpeer.fetcher import ChunkRate, _FetchRun
from tests.api.fakes import ScriptedDaemon, send
from tests.test_daemon_kv_from import FP, TOKENS, C, K, V, _with_daemon
from tests.test_fetcher import TOKENS as CHUNK
from tests.test_fetcher import Peer, Sink, blob, fetcher, key, measured

# --------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    ("fetch_s", "recompute_s", "startup_s", "head"),
    [
        ([1.0] * 8, 1.0, 0.0, 4),  # equal speeds: half each, twice as soon
        ([0.1] * 8, 1.0, 0.0, 0),  # a fast link: one chunk of prefill already loses
        ([10.0] * 4, 1.0, 0.0, 3),  # a very slow link: all but one (recomputing all is not ours)
        ([1.0] * 4, 1.0, 2.0, 3),  # the fetch's start-up counts against it
        ([0.0, 0.0, 1.0, 1.0], 1.0, 0.0, 0),  # chunks held here cost nothing: never prefilled
        ([1.0, 0.0, 1.0, 1.0], 1.0, 0.0, 1),
        ([1.0], 1.0, 0.0, 0),  # one chunk: nothing to split
        ([], 1.0, 0.0, 0),
        ([1.0, math.inf], 1.0, 0.0, 0),  # a dead link: not a split's to judge
    ],
)
def test_the_head_is_what_makes_the_prefix_usable_soonest(
    fetch_s: list[float], recompute_s: float, startup_s: float, head: int
) -> None:
    assert head_to_recompute(fetch_s, recompute_s, startup_s=startup_s) == head


def test_a_split_must_gain_enough() -> None:
    assert head_to_recompute([1.0, 1.0], 1.0, min_gain=2.0) == 1  # 1 s instead of 2 s
    assert head_to_recompute([1.0, 1.0], 1.0, min_gain=2.5) == 0
    with pytest.raises(ValueError, match="recompute_s"):
        head_to_recompute([1.0], 0.0)
    with pytest.raises(ValueError, match="min_gain"):
        head_to_recompute([1.0], 1.0, min_gain=0.5)


def test_a_client_busy_with_the_head_recomputes_the_rest_only_after_it() -> None:
    args: dict[str, Any] = dict(
        levels=("q8", "q4"), chunk_count=2, chunk_tokens=100, recompute_rate=100.0, start=10.0,
        bytes_per_token={"q8": 8.0, "q4": 4.0},
    )
    plain = ResolutionController(**args)
    busy = ResolutionController(**args, busy_until=13.0)
    assert plain.recompute_finish(10.0) == 12.0
    assert busy.recompute_finish(10.0) == 15.0  # 3 s of head first, then 2 s
    assert busy.recompute_finish(14.0) == 16.0
    # Without a deadline the fetch aims at the end of the head, not at a tenth of the recompute.
    assert plain.deadline == pytest.approx(10.2)
    assert busy.deadline == 13.0


# --------------------------------------------------------------------------- the fetcher


def _split_fetch(bps: float | None, **kwargs: Any) -> tuple[Any, Sink, Peer, list[str]]:
    """Fetch 4 chunks from one peer measured at ``bps`` (None: not measured), the client
    prefilling a chunk in 0.5 s; returns the outcome, the sink, the peer and the order of the
    split and allocation calls."""
    calls: list[str] = []

    class OrderedSink(Sink):
        async def allocate(self, **shape: Any) -> None:
            calls.append(f"allocate:{shape['tokens']}")
            await super().allocate(**shape)

    async def main() -> Any:
        peer = Peer("a")
        f = fetcher({"a": peer})
        if bps is not None:
            measured(f, "a", bps)
        options: dict[str, Any] = {"recompute_rate": CHUNK / 0.5, "chunk_shape": (2, 2, 16)}
        options.update(kwargs)
        return await f.fetch(
            [key(i) for i in range(4)], [{"a"}] * 4, sink,
            leave_head=lambda n: calls.append(f"head:{n}"), **options,
        ), peer

    sink = OrderedSink()
    outcome, peer = asyncio.run(main())
    return outcome, sink, peer, calls


def test_a_link_as_slow_as_the_client_splits_the_prefix_between_them() -> None:
    # ~10 KB per chunk at the floor (q3, as first guessed) over 0.2 Mbit/s: ~0.5 s a chunk, as
    # long as its prefill.
    outcome, sink, peer, calls = _split_fetch(2e5)
    assert calls == ["head:2", f"allocate:{2 * CHUNK}"]  # told before the segment exists
    assert (outcome.head, outcome.chunks, outcome.requested, outcome.reason) == (2, 2, 2, "complete")
    assert sorted(index for index, _ in peer.calls) == [2, 3]  # the head was never asked for
    assert [index for index, _ in sink.done] == [0, 1]  # numbered from the segment's start
    levels = dict(peer.calls)
    k2, v2 = codec.decode(blob(2, levels[2]))
    assert torch.equal(sink.k[:, :, :CHUNK], k2) and torch.equal(sink.v[:, :, :CHUNK], v2)
    assert any(event.kind == "split" and event.index == 2 for event in outcome.events)


@pytest.mark.parametrize(
    ("bps", "options"),
    [
        (1e9, {}),  # a fast link: fetching everything is soonest
        (None, {}),  # the link not measured yet: a guess must not cost the client a prefill
        (2e5, {"recompute_rate": None}),  # nobody said how fast the client prefills
        (2e5, {"policy": "fixed:q3"}),  # a benchmark's fixed level
    ],
)
def test_no_split_without_a_measured_reason(bps: float | None, options: dict[str, Any]) -> None:
    outcome, _sink, peer, calls = _split_fetch(bps, **options)
    assert not any(call.startswith("head:") for call in calls)
    assert outcome.head == 0
    assert (peer.calls[0][0] if peer.calls else 0) == 0  # chunk 0 was asked for first (if any)


# --------------------------------------------------------------------------- daemon and client


def _leave(head: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's fetcher leaves ``head`` chunks to a client that asks for a split (its local
    chunks are free, so it never would on its own)."""
    monkeypatch.setattr(_FetchRun, "_head_to_leave", lambda self, now: head)


def test_a_split_fetch_starts_the_segment_after_the_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _leave(2, monkeypatch)

    def blocking(socket_path: str) -> None:
        with KVPeerClient(socket_path) as client:
            with client.fetch(TOKENS, FP, split=True) as result:
                assert result.wait_first_token() == 2 * C  # prefill tokens [0, 2C) meanwhile
                assert result.wait().matched_tokens == 4 * C
                assert result.first_token == 2 * C
                assert torch.equal(result.k, K[:, :, 2 * C : 4 * C]) and torch.equal(result.v, V[:, :, 2 * C : 4 * C])
                assert torch.equal(result.chunk(3)[0], K[:, :, 3 * C : 4 * C])
                assert not result.wait_for_chunk(1)  # the head is the client's
            with client.fetch(TOKENS, FP) as result:  # not asked for: no split
                assert result.wait_first_token() == 0 and result.matched_tokens == 4 * C

    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS, K, V, FP)
        await asyncio.to_thread(blocking, socket_path)  # the blocking client, off the daemon's loop

    _with_daemon(tmp_path, test)


def test_a_split_after_kv_from_starts_past_kv_froms_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _leave(1, monkeypatch)

    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS, K, V, FP)
            async with client.fetch(TOKENS, FP, kv_from=C + 5, split=True, stream=True) as result:
                assert await result.wait_first_token() == 2 * C  # kv_from's chunk 1, then 1 more
                await result.wait()
                assert (result.first_token, result.matched_tokens) == (2 * C, 4 * C)
                assert torch.equal(result.k, K[:, :, 2 * C : 4 * C])

    _with_daemon(tmp_path, test)


def test_a_split_fetch_that_restores_nothing_leaves_the_whole_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _leave(1, monkeypatch)

    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            async with client.fetch(TOKENS, FP, split=True, stream=True) as result:
                assert await result.wait_first_token() == len(TOKENS)  # nothing held anywhere
                assert (await result.wait()).matched_tokens == 0

    _with_daemon(tmp_path, test)


class AnswersFrom(ScriptedDaemon):
    """A daemon that answers every fetch as restored from token ``first_token`` (one chunk)."""

    def __init__(self, first_token: int) -> None:
        super().__init__()
        self.first_token = first_token

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.FetchRequest):
            end = self.first_token + C
            send(conn, m.FetchResult(id=message.id, matched_tokens=end, chunk_tokens=C, levels=["q8"],
                                     recompute_from=end, first_token=self.first_token))
        else:
            super().handle(conn, index, message)


@pytest.mark.parametrize(
    ("first_token", "kv_from", "split"),
    [
        (C, 0, False),  # a later start that was not asked for
        (0, 2 * C, True),  # before kv_from's chunk
    ],
)
def test_a_fetch_answer_starting_where_the_request_does_not_allow_is_refused(
    first_token: int, kv_from: int, split: bool
) -> None:
    """Its rows would be read as the KV of other tokens. (One not at a chunk's start does not
    decode as a FetchResult at all.)"""
    with AnswersFrom(first_token) as daemon, KVPeerClient(daemon.socket_path) as client:
        with client.fetch(TOKENS, FP, kv_from=kv_from, split=split) as result, pytest.raises(ApiError) as info:
            result.wait_first_token()
        assert info.value.code == ErrorCode.MALFORMED


def test_a_split_answer_starting_at_a_later_chunk_is_taken() -> None:
    with AnswersFrom(2 * C) as daemon, KVPeerClient(daemon.socket_path) as client:
        with client.fetch(TOKENS, FP, kv_from=C, split=True) as result:
            assert result.wait_first_token() == 2 * C
            assert result.wait().first_token == 2 * C


def test_a_fetch_without_a_split_is_announced_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client from before splits refuses FetchStarted fields it does not know: its kv_from
    fetches (their segment starts at kv_from's chunk) get none."""
    bodies: list[dict[str, Any]] = []
    to_wire = m.FetchStarted.to_wire

    def recorded(self: m.FetchStarted) -> dict[str, Any]:
        bodies.append(to_wire(self))
        return bodies[-1]

    monkeypatch.setattr(m.FetchStarted, "to_wire", recorded)

    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS, K, V, FP)
            async with client.fetch(TOKENS, FP, kv_from=2 * C) as result:
                assert (result.first_token, result.matched_tokens) == (2 * C, 4 * C)
            async with client.fetch(TOKENS, FP, kv_from=2 * C, split=True, stream=True) as result:
                await result.wait()
                assert (result.first_token, result.matched_tokens) == (2 * C, 4 * C)
            with pytest.raises(ApiError, match="needs stream=True"):  # it could not prefill meanwhile
                client.fetch(TOKENS, FP, split=True)

    _with_daemon(tmp_path, test)
    assert [body.get("first_token") for body in bodies] == [None, 2 * C]


def test_a_split_under_a_deadline_leaves_no_more_head_than_the_client_prefills_by_then() -> None:
    """Past the deadline the fetch stops: chunks arriving while the client still prefilled a
    longer head would have been thrown away and recomputed after it."""
    heads: list[int] = []

    async def main() -> Any:
        peer = Peer("a")
        for i in range(8):
            peer.gates[i] = asyncio.Event()
        f = fetcher({"a": peer})
        measured(f, "a", 2e5)  # ~0.5 s a chunk at the floor, as long as its prefill

        async def release() -> None:  # every chunk arrives 0.4 s in
            await asyncio.sleep(0.4)
            for gate in peer.gates.values():
                gate.set()

        task = asyncio.create_task(release())
        out = await f.fetch(
            [key(i) for i in range(8)], [{"a"}] * 8, Sink(), recompute_rate=CHUNK / 0.5,
            chunk_shape=(2, 2, 16), deadline=f.clock() + 1.2, leave_head=heads.append,
        )
        await task
        return out

    out = asyncio.run(main())
    assert heads == [2]  # 1 s of prefill fits the 1.2 s deadline; unbounded it would be 4
    assert out.chunks > 0 and out.head == 2


def test_a_chunk_on_the_wire_when_a_split_fetch_gives_up_is_kept_if_it_comes_before_the_head_is_done() -> None:
    async def main() -> int:
        f = fetcher({"a": Peer("a")})
        measured(f, "a", 1e6)
        heads: list[int] = []
        run = _FetchRun(
            f, keys=[key(i) for i in range(8)], holders=[{"a"} for _ in range(8)], sink=Sink(),
            deadline=None, min_level=None, recompute_rate=CHUNK / 1.0,  # 1 s a chunk
            recompute_known=True, kv_bytes_per_token=2 * 2 * 2 * 16 * 2, dtype_bytes=2,
            policy="adaptive", leave_head=heads.append,
        )
        run._head_to_leave = lambda now: 4  # type: ignore[method-assign]
        now = f.clock()
        run._split(now)
        assert heads == [4] and run.ctl.busy_until == now + 4.0
        level = run.ctl.allowed[-1]
        size = run.ctl.chunk_bytes(0, level)
        # Chunk 0 (the prompt's chunk 4) needs 2 s more: it comes while the client is still busy
        # with its head (until now + 4), long before it could recompute it (now + 5).
        f.chunk_rates["a"] = ChunkRate(bps=size * 8 / 2.0, samples=3, at=now)
        run.transfers[0] = (asyncio.get_running_loop().create_future(), "a", level, now)  # type: ignore[assignment]
        return run._worth_finishing(now)

    assert asyncio.run(main()) >= 1
