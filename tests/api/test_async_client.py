"""AsyncKVPeerClient: the same API on asyncio, with concurrent requests on one connection."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ApiError, ErrorCode
from tests.api.fakes import CHUNK, FP, ServerThread, kv, our_segments


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_async_round_trip_and_concurrent_fetches(api: ServerThread) -> None:
    k, v = kv(12)
    tokens = list(range(12))

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path, namespace="ns") as client:
            put = await client.put(tokens, k, v, FP, level="exact")
            assert (put.chunks, put.stored) == (3, 3)
            assert (await client.lookup(tokens, FP)).matched_tokens == 12

            async def one() -> torch.Tensor:
                async with client.fetch(tokens, FP) as result:
                    assert result.matched_tokens == 12 and result.zero_copy()
                    return result.k.clone()

            results = await asyncio.gather(*(one() for _ in range(4)))
            assert all(torch.equal(r, k) for r in results)
            stats, peers = await asyncio.gather(client.stats(), client.peers())
            assert stats["api"]["live_segments"] == 0 and peers[0]["node_id"] == "peer-1"

    run(main())
    assert not our_segments()


def test_async_put_and_fetch_state_prefill_time_and_recompute_speed(api: ServerThread) -> None:
    k, v = kv(4)

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path) as client:
            await client.put(list(range(4)), k, v, FP, prefill_s=0.25)
            async with client.fetch(list(range(4)), FP, recompute_tokens_per_s=900.0) as result:
                assert result.matched_tokens == 4

    run(main())
    put, fetch = api.backend.requests[-2:]
    assert getattr(put, "prefill_s", None) == 0.25
    assert getattr(fetch, "recompute_tokens_per_s", None) == 900.0


def test_async_streaming_uses_chunk_zero_before_the_rest(api: ServerThread) -> None:
    k, v = kv(12)
    tokens = list(range(12))
    api.backend.stall_after = 1

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path) as client:
            await client.put(tokens, k, v, FP)
            async with client.fetch(tokens, FP, stream=True) as result:
                k0, v0 = await result.chunk(0)
                assert torch.equal(k0, k[:, :, :CHUNK]) and torch.equal(v0, v[:, :, :CHUNK])
                api.loop.call_soon_threadsafe(api.backend.release_stall.set)
                final = await result.wait()
                assert final.matched_tokens == 12 and torch.equal(result.v, v)

    run(main())


def test_async_errors_are_typed(api: ServerThread) -> None:
    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path) as client:
            with pytest.raises(ApiError) as info:
                await client.put([1, 2], *kv(2), FP.__class__(name="x", layers=1, kv_heads=1, head_dim=1, dtype="float32"))
            assert info.value.code == ErrorCode.INVALID
            api.backend.fail_fetch = True
            with pytest.raises(ApiError) as info:
                async with client.fetch([1, 2, 3, 4], FP):
                    pass
            assert info.value.code == ErrorCode.NOT_FOUND

    run(main())


def test_async_put_whose_connection_was_lost_while_it_filled_says_so(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another request found the daemon gone and connected again while this put filled its
    segment: the put is lost with the old connection, and it says so (a commit on the new one
    only found "no put is waiting")."""
    from kvpeer.api import client as client_mod

    fill = client_mod._fill_segment_blocking

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path) as client:
            loop = asyncio.get_running_loop()

            def fill_then_lose(name: str, fd: int, k: torch.Tensor, v: torch.Tensor) -> None:
                fill(name, fd, k, v)
                asyncio.run_coroutine_threadsafe(client._retire_connection(), loop).result(10)

            monkeypatch.setattr(client_mod, "_fill_segment_blocking", fill_then_lose)
            k, v = kv(8)
            with pytest.raises(ApiError) as info:
                await client.put(list(range(8)), k, v, FP)
            assert info.value.code == ErrorCode.SHUTTING_DOWN and "during the put" in info.value.reason
            monkeypatch.setattr(client_mod, "_fill_segment_blocking", fill)
            assert (await client.put(list(range(8)), k, v, FP)).stored == 2  # on a new connection

    asyncio.run(asyncio.wait_for(main(), 60))


def test_connecting_twice_keeps_one_connection(api: ServerThread) -> None:
    """`await client.connect()` and then `async with client` opened a second connection, whose
    reader shared the first one's segment descriptors."""

    async def main() -> None:
        client = AsyncKVPeerClient(api.socket_path)
        await client.connect()
        async with client:
            assert (await client.stats())["api"]["connected"] == 1

    run(main())


def test_a_release_is_served_while_every_request_slot_is_taken(api: ServerThread) -> None:
    """A release frees memory: with max_inflight fetches waiting on slow peers it got BUSY and
    the finished fetch's segment stayed with the daemon until its lease ran out."""
    k, v = kv(12)
    tokens = list(range(12))
    api.backend.stall_after = 1  # 12-token fetches wait after chunk 0; a 4-token one completes

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path) as client:
            await client.put(tokens, k, v, FP)
            done = await client.fetch(tokens[:CHUNK], FP)
            segment = (await done.wait()).segment
            slow = [await client.fetch(tokens, FP, stream=True) for _ in range(api.server.max_inflight)]
            for handle in slow:
                await handle.wait_for_chunk(0)
            await done.release()
            assert segment not in api.server.registry.names()
            api.loop.call_soon_threadsafe(api.backend.release_stall.set)
            for handle in slow:
                await handle.release()

    run(main())


def test_k_and_v_of_a_released_fetch_are_an_error_not_empty(api: ServerThread) -> None:
    """They read as empty tensors (nothing restored) while matched_tokens said otherwise."""
    k, v = kv(8)
    tokens = list(range(8))
    with KVPeerClient(api.socket_path) as client:
        client.put(tokens, k, v, FP)
        with client.fetch(tokens, FP) as result:
            assert result.matched_tokens == 8
        for read in (lambda: result.k, lambda: result.v, lambda: result.chunk(0)):
            with pytest.raises(ApiError, match="released"):
                read()

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path) as client:
            async with client.fetch(tokens, FP) as result:
                assert result.matched_tokens == 8
            with pytest.raises(ApiError, match="released"):
                result.k  # noqa: B018
            with pytest.raises(ApiError, match="released"):
                await result.chunk(0)

    run(main())
