"""Local API under fetch failures: a fetch that restores nothing ends cleanly, leaking nothing.

Against the fake backend of tests/api (real Unix socket, real shared memory).
"""

from __future__ import annotations

from kvpeer.api import messages as m
from kvpeer.api.client import KVPeerClient
from kvpeer.api.server import ClientContext, FetchSink
from tests.api.fakes import CHUNK, FP, FakeBackend, ServerThread, kv, our_segments


class FirstChunkFails(FakeBackend):
    """Allocates the segment (so the client is told its name), then restores nothing:
    what the fetcher does when chunk 1 arrived first and chunk 0 turned out bad."""

    async def fetch(self, ctx: ClientContext, req: m.FetchRequest, sink: FetchSink) -> None:
        keys = self._available(ctx, req.tokens, req.fingerprint)
        await sink.allocate(
            layers=FP.layers, kv_heads=FP.kv_heads, head_dim=FP.head_dim,
            tokens=len(keys) * CHUNK, dtype="float32", chunk_tokens=CHUNK,
        )


def test_a_fetch_that_restores_nothing_returns_zero_tokens_not_an_error() -> None:
    before = our_segments()
    tokens = list(range(8))
    k, v = kv(8)
    with ServerThread(FirstChunkFails()) as server:
        with KVPeerClient(server.socket_path) as client:
            client.put(tokens, k, v, FP)
            for _ in range(3):
                with client.fetch(tokens, FP) as result:
                    assert result.matched_tokens == 0
                    assert result.recompute_from == 0
                    assert tuple(result.k.shape) == (FP.layers, FP.kv_heads, 0, FP.head_dim)
            assert client.lookup(tokens, FP).matched_tokens == 8  # the connection still works
    assert our_segments() <= before


