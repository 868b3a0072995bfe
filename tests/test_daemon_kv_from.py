"""Puts and fetches that start at ``kv_from``: the chunks before it are keyed, never copied.

A real daemon on loopback (no peers) and the real clients: an engine that holds the start of a
prompt (its own prefix cache, or the daemon's copy from an earlier put) moves only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from kvpeer.api import messages as m
from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ApiError, ErrorCode
from kvpeer.hashing import ModelFingerprint
from tests.api.fakes import ScriptedDaemon, send
from tests.test_daemon_codec import _local_daemon

C = 64  # codec.chunk_tokens: the smallest allowed keeps the tensors small
FP = ModelFingerprint(name="kv-from", layers=2, kv_heads=2, head_dim=16, dtype="float16", rope_theta=1e4)
TOKENS = list(range(1000, 1000 + 4 * C + 10))  # four whole chunks and a partial rest


def _kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    shape = (FP.layers, FP.kv_heads, tokens, FP.head_dim)
    return torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()


K, V = _kv(len(TOKENS))


def _with_daemon(tmp_path: Path, test: Callable[[str], Awaitable[None]], *, no_planning: bool = False) -> None:
    """``no_planning``: the daemon may not plan (ask peers) for any request."""
    async def main() -> None:
        node = _local_daemon(tmp_path, f"[codec]\nchunk_tokens = {C}\nlevel = \"exact\"\n")
        await node.start()
        if no_planning:
            async def planned(*args: object, **kwargs: object) -> None:
                raise AssertionError("a local-only lookup planned (asked peers)")
            node._plan = planned  # type: ignore[method-assign,assignment]
        try:
            await test(str(node.config.api.socket_path))
        finally:
            await node.stop()

    asyncio.run(main())


def test_a_put_from_kv_from_stores_the_chunks_from_there_on_from_the_kv_it_was_given(tmp_path: Path) -> None:
    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            # The first two chunks, as an earlier turn of the conversation put them.
            first = await client.put(TOKENS[: 2 * C], K[:, :, : 2 * C], V[:, :, : 2 * C], FP)
            assert (first.chunks, first.stored) == (2, 2)
            # This turn gives only the KV it computed: tokens 2C.. of the prompt.
            rest = await client.put(TOKENS, K[:, :, 2 * C :], V[:, :, 2 * C :], FP, kv_from=2 * C)
            assert (rest.chunks, rest.stored) == (4, 2)
            async with client.fetch(TOKENS, FP) as result:
                assert result.matched_tokens == 4 * C and result.first_token == 0
                assert torch.equal(result.k, K[:, :, : 4 * C]) and torch.equal(result.v, V[:, :, : 4 * C])

    _with_daemon(tmp_path, test)


def test_a_put_from_an_unaligned_kv_from_skips_the_chunk_it_cuts(tmp_path: Path) -> None:
    """Chunk 1 starts before kv_from: its KV is not all there, so it is not stored (and the
    prefix stays unshareable past chunk 0 until a put gives it)."""

    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS[:C], K[:, :, :C], V[:, :, :C], FP)
            cut = C + 5
            put = await client.put(TOKENS, K[:, :, cut:], V[:, :, cut:], FP, kv_from=cut)
            assert (put.chunks, put.stored) == (4, 2)  # chunks 2 and 3
            async with client.fetch(TOKENS, FP) as result:
                assert result.matched_tokens == C  # chunk 1 is missing
            async with client.fetch(TOKENS, FP, kv_from=2 * C) as result:
                assert (result.first_token, result.matched_tokens) == (2 * C, 4 * C)
                assert torch.equal(result.k, K[:, :, 2 * C : 4 * C]) and torch.equal(result.v, V[:, :, 2 * C : 4 * C])

    _with_daemon(tmp_path, test)


def test_a_fetch_from_kv_from_restores_the_chunks_from_the_one_holding_it(tmp_path: Path) -> None:
    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS, K, V, FP)
            async with client.fetch(TOKENS, FP, kv_from=C + 5, stream=True) as result:
                # Chunks are numbered from the prompt's start, whatever kv_from is.
                assert await result.wait_for_chunk(2)
                k2, v2 = await result.chunk(2)
                assert torch.equal(k2, K[:, :, 2 * C : 3 * C]) and torch.equal(v2, V[:, :, 2 * C : 3 * C])
                final = await result.wait()
                assert (final.first_token, final.matched_tokens, final.recompute_from) == (C, 4 * C, 4 * C)
                assert final.levels == ["exact"] * 3
                assert torch.equal(result.k, K[:, :, C : 4 * C]) and torch.equal(result.v, V[:, :, C : 4 * C])
                with pytest.raises(ApiError) as info:
                    await result.chunk(0)  # before kv_from's chunk: never restored
                assert info.value.code == ErrorCode.NOT_FOUND
            async with client.fetch(TOKENS, FP, kv_from=4 * C + 3) as result:
                assert result.matched_tokens == 0 and result.segment is None  # only the partial rest

    _with_daemon(tmp_path, test)


def test_the_blocking_client_takes_kv_from_too(tmp_path: Path) -> None:
    async def test(socket_path: str) -> None:
        def blocking() -> None:
            with KVPeerClient(socket_path) as client:
                client.put(TOKENS[: 3 * C], K[:, :, C : 3 * C], V[:, :, C : 3 * C], FP, kv_from=C)
                with client.fetch(TOKENS, FP, kv_from=C) as result:
                    assert result.wait_for_chunk(2)
                    assert torch.equal(result.chunk(2)[0], K[:, :, 2 * C : 3 * C])
                    assert (result.first_token, result.matched_tokens) == (C, 3 * C)
                    assert torch.equal(result.v, V[:, :, C : 3 * C])
                with pytest.raises(ApiError) as info:  # KV shorter than the tokens from kv_from
                    client.put(TOKENS, K[:, :, 2 * C :], V[:, :, 2 * C :], FP, kv_from=C)
                assert info.value.code == ErrorCode.INVALID and "kv_from" in info.value.reason
                # The whole prompt's KV with kv_from: its first rows would be stored as the KV
                # of the tokens from kv_from on.
                with pytest.raises(ApiError) as info:
                    client.put(TOKENS, K, V, FP, kv_from=3 * C)
                assert info.value.code == ErrorCode.INVALID and "k[:, :, 192:" in info.value.reason
                with client.fetch(TOKENS, FP, kv_from=C) as result:
                    assert result.matched_tokens == 3 * C  # chunk 3 was not stored from wrong rows

        await asyncio.to_thread(blocking)

    _with_daemon(tmp_path, test)


class IgnoresKvFrom(ScriptedDaemon):
    """A daemon that takes kv_from and answers as if it restored from token 0."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.FetchRequest):
            send(conn, m.FetchResult(id=message.id, matched_tokens=C, chunk_tokens=C, levels=["q8"],
                                     recompute_from=C))
        else:
            super().handle(conn, index, message)


def test_a_fetch_answer_that_does_not_start_at_kv_froms_chunk_is_refused() -> None:
    """Its rows would be read as the KV of other tokens (the vLLM loader writes them into blocks)."""
    with IgnoresKvFrom() as daemon, KVPeerClient(daemon.socket_path) as client:
        with client.fetch(TOKENS, FP, kv_from=C) as result, pytest.raises(ApiError) as info:
            result.wait()
        assert info.value.code == ErrorCode.MALFORMED and "kv_from" in info.value.reason


def test_a_local_only_lookup_counts_the_leading_chunks_held_here_and_asks_no_peer(tmp_path: Path) -> None:
    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS[: 2 * C], K[:, :, : 2 * C], V[:, :, : 2 * C], FP)
            await client.put(TOKENS, K[:, :, 3 * C :], V[:, :, 3 * C :], FP, kv_from=3 * C)
            found = await client.lookup(TOKENS, FP, local_only=True)
            assert (found.matched_tokens, found.sources) == (2 * C, ["local", "local"])  # chunk 2 missing

    _with_daemon(tmp_path, test, no_planning=True)


def test_a_prompt_under_store_pressure_loses_its_last_chunks_first(tmp_path: Path) -> None:
    """A put stored its chunks, then made their lower levels, first to last: the first chunk's
    levels were the oldest and went first, and the chunks after it, still held, could never be
    matched again (each key hashes the chunks before it)."""
    from kvpeer import codec
    from kvpeer.hashing import chunk_keys

    async def settled(node: object) -> None:  # every level made and on disk
        level_server = node.level_server  # type: ignore[attr-defined]
        for _ in range(600):
            if not level_server.warm_pending and (level_server._warmer is None or level_server._warmer.done()):
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(node.store.flush, 30)  # type: ignore[attr-defined]

    async def main() -> None:
        # No RAM tier: it would hold copies of what the disk evicts.
        config = f"[codec]\nchunk_tokens = {C}\nlevel = \"q8\"\n[store]\nram_bytes = 0\n"
        node = _local_daemon(tmp_path, config)
        await node.start()
        try:
            async with AsyncKVPeerClient(str(node.config.api.socket_path)) as client:
                await client.put(TOKENS[: 4 * C], K[:, :, : 4 * C], V[:, :, : 4 * C], FP)
                await settled(node)
                keys = chunk_keys(TOKENS[: 4 * C], FP.digest(), "default", C)
                assert all(node.store.levels(k) == list(codec.LEVELS[1:]) for k in keys)
                node.store.disk_limit = node.store.stats()["disk_bytes"]  # full from here on
                other = [t + 7 for t in TOKENS[:C]]  # another prompt: room for it is made
                await client.put(other, K[:, :, :C], V[:, :, :C], FP)
                await settled(node)
            held = [node.store.levels(k) for k in keys]
            assert held[:3] == [list(codec.LEVELS[1:])] * 3, held  # the head is whole
            assert len(held[3]) < len(codec.LEVELS[1:]), held  # the room came from the end
        finally:
            await node.stop()

    asyncio.run(main())


def test_stats_carry_the_counters_metrics_has(tmp_path: Path) -> None:
    """`kvpeer stats` ("every counter") had the store's, the API's and the inventory's only:
    fetch outcomes and the fetcher's, transport's and discovery's events were in /metrics alone."""
    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            await client.put(TOKENS[: 2 * C], K[:, :, : 2 * C], V[:, :, : 2 * C], FP)
            await client.fetch(TOKENS[: 2 * C], FP)
            for _ in range(100):  # counted as the fetch's request ends, just after its answer
                stats = await client.stats()
                if stats["fetches"]["complete"]:
                    break
                await asyncio.sleep(0.05)
        assert stats["fetches"]["complete"] == 1 and stats["fetches"]["miss"] == 0, stats["fetches"]
        assert {"retry", "chunk_failed"} <= set(stats["fetcher"])
        for section in ("transport", "discovery", "inventory_sync"):
            assert all(isinstance(count, int) for count in stats[section].values()), section

    _with_daemon(tmp_path, test)


def test_a_put_at_an_unknown_level_is_refused_before_its_segment_is_made(tmp_path: Path) -> None:
    """It was given a segment to fill and refused only at its commit."""
    async def test(socket_path: str) -> None:
        async with AsyncKVPeerClient(socket_path) as client:
            before = (await client.stats())["api"]["segments"]
            with pytest.raises(ApiError) as info:
                await client.put(TOKENS[:C], K[:, :, :C], V[:, :, :C], FP, level="q99")
            made = (await client.stats())["api"]["segments"] - before
        assert info.value.code == ErrorCode.INVALID and "q99" in info.value.reason
        assert made == 0

    _with_daemon(tmp_path, test)


def test_only_models_with_chunks_held_are_remembered_and_no_more_than_a_bound(tmp_path: Path) -> None:
    """A put that stored nothing made its model the most recent: 1,500 puts, each naming a new
    model and cutting its segment short, grew fingerprints.json to 1,510 entries (rewritten on
    every put) and pushed the served models out of the advertisement."""
    import dataclasses
    import json

    from kvpeer import daemon

    async def main() -> None:
        node = _local_daemon(tmp_path, f"[codec]\nchunk_tokens = {C}\nlevel = \"q8\"\n")
        await node.start()
        try:
            async with AsyncKVPeerClient(str(node.config.api.socket_path)) as client:
                await client.put(TOKENS[: C - 1], K[:, :, : C - 1], V[:, :, : C - 1], FP)  # no chunk
                assert FP.hex not in node.fingerprints
                for i in range(daemon.MAX_REMEMBERED_MODELS + 6):
                    model = dataclasses.replace(FP, name=f"model-{i}")
                    await client.put(TOKENS[:C], K[:, :, :C], V[:, :, :C], model)
            saved = json.loads(node.fingerprints_path.read_text())
            assert len(node.fingerprints) == len(saved) == daemon.MAX_REMEMBERED_MODELS
            assert list(node.fingerprints.values())[-1].name == f"model-{daemon.MAX_REMEMBERED_MODELS + 5}"
        finally:
            await node.stop()

    asyncio.run(main())


def _slow_encodes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> threading.Event:
    """Each chunk the daemon encodes takes ``seconds`` more; the event is set at the first (a
    put was committed and is being stored)."""
    import time

    from kvpeer import daemon

    encode = daemon.encode_chunk_blocking
    encoding = threading.Event()

    def slow_encode(*args: object) -> bytes:
        encoding.set()
        time.sleep(seconds)
        return encode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon, "encode_chunk_blocking", slow_encode)
    return encoding


def test_a_committed_put_is_stored_though_its_client_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the connection right after the commit cut the put (1 of 16 chunks stored in the
    review) and nothing said so: the client had handed its KV over."""
    encoding = _slow_encodes(monkeypatch, 0.2)
    tokens = TOKENS[: 4 * C]

    async def test(socket_path: str) -> None:
        client = AsyncKVPeerClient(socket_path)
        await client.__aenter__()
        put = asyncio.create_task(client.put(tokens, K[:, :, : 4 * C], V[:, :, : 4 * C], FP))
        await asyncio.to_thread(encoding.wait, 30)  # committed: the daemon encodes it
        put.cancel()
        await client.__aexit__(None, None, None)  # gone, its put's answer unread
        async with AsyncKVPeerClient(socket_path) as other:
            for _ in range(200):
                if (await other.lookup(tokens, FP, local_only=True)).matched_tokens == len(tokens):
                    break
                await asyncio.sleep(0.05)
            assert (await other.lookup(tokens, FP, local_only=True)).matched_tokens == len(tokens)
            # ... and the connection it left is gone too (it stayed, past the caps, with an
            # asyncio error logged: the wait for its other requests was given an empty set)
            for _ in range(200):
                if (await other.stats())["api"]["connected"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert (await other.stats())["api"]["connected"] == 1

    _with_daemon(tmp_path, test)


def test_a_stop_with_a_reset_connection_still_closes_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvloop (the default) writing the stop notice to a connection its client reset
    raised, which ended ApiServer.close() early: other connections stayed open, segments and
    the socket file were left."""
    uvloop = pytest.importorskip("uvloop")
    encoding = _slow_encodes(monkeypatch, 0.5)

    async def main() -> None:
        node = _local_daemon(tmp_path, f"[codec]\nchunk_tokens = {C}\nlevel = \"exact\"\n")
        await node.start()
        socket_path = str(node.config.api.socket_path)
        sockets.append(Path(socket_path))
        bystander = AsyncKVPeerClient(socket_path)
        await bystander.__aenter__()
        client = AsyncKVPeerClient(socket_path)
        await client.__aenter__()
        put = asyncio.create_task(client.put(TOKENS[: 4 * C], K[:, :, : 4 * C], V[:, :, : 4 * C], FP))
        await asyncio.to_thread(encoding.wait, 30)  # committed: the daemon encodes it
        client._reader_task.cancel()  # stops reading ...
        await asyncio.sleep(0.05)
        await client._conn.write(m.encode(m.StatsRequest(id=999)))
        await asyncio.sleep(0.2)
        client._conn.close()  # ... and closes with an answer unread: a reset at the daemon
        put.cancel()
        await asyncio.sleep(0.2)
        await node.stop()
        await bystander.close()
        assert list(node.api._connections) == []

    sockets: list[Path] = []
    uvloop.run(main())
    assert not sockets[0].exists()


def test_a_connection_whose_handler_is_cancelled_from_outside_is_still_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel while the handler waited for a committed put (not the server's own close) was
    raised again before the clean-up: the connection stayed counted, its segments held."""
    encoding = _slow_encodes(monkeypatch, 0.3)

    async def main() -> None:
        node = _local_daemon(tmp_path, f"[codec]\nchunk_tokens = {C}\nlevel = \"exact\"\n")
        await node.start()
        try:
            client = AsyncKVPeerClient(str(node.config.api.socket_path))
            await client.__aenter__()
            put = asyncio.create_task(client.put(TOKENS[: 4 * C], K[:, :, : 4 * C], V[:, :, : 4 * C], FP))
            await asyncio.to_thread(encoding.wait, 30)
            put.cancel()
            await client.__aexit__(None, None, None)  # the handler now waits for the put
            await asyncio.sleep(0.2)
            (handler,) = node.api._handlers
            handler.cancel()  # from outside: not the server's close
            with contextlib.suppress(asyncio.CancelledError):
                await handler
            assert not node.api._connections and len(node.api.registry) == 0
        finally:
            await node.stop()

    asyncio.run(main())
