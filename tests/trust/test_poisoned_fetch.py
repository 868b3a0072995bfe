"""A peer that serves bad chunks: nothing bad is cached, nothing bad reaches the client.

Runs the real fetch pipeline on the in-memory peers of tests/test_fetcher.py (real codec
blobs, no sockets); tests/cluster/test_faults.py does the same through real daemons.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvpeer import codec
from tests.test_fetcher import (
    DIM,
    HEADS,
    LAYERS,
    TOKENS,
    Cache,
    Peer,
    Sink,
    blob,
    chunk_kv,
    fetcher,
    key,
)


class PoisoningPeer(Peer):
    """Serves chunk ``bad`` bit-flipped (its codec digest no longer matches) or reshaped."""

    def __init__(self, name: str, bad: int, how: str) -> None:
        super().__init__(name)
        self.bad, self.how = bad, how

    async def fetch_blob(self, k: bytes, level: str, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        data = await super().fetch_blob(k, level, timeout)
        if k[0] != self.bad:
            return data
        if self.how == "flip":
            flipped = bytearray(data)
            flipped[len(flipped) - 3] ^= 0x40
            return bytes(flipped)
        wrong, _ = chunk_kv(99)
        return codec.encode(wrong[:, :, :, :8].contiguous(), wrong[:, :, :, :8].contiguous(), "exact")


@pytest.mark.parametrize("bad", [0, 2])
def test_a_bit_flipped_chunk_is_neither_cached_nor_restored(bad: int) -> None:
    n = 4
    cache = Cache()
    sink = Sink()
    f = fetcher({"a": PoisoningPeer("a", bad, "flip")}, cache=cache)
    out = asyncio.run(f.fetch([key(i) for i in range(n)], [{"a"}] * n, sink, policy="fixed:exact"))
    assert out.chunks == bad  # the verified prefix before the bad chunk; the rest: recompute
    assert key(bad) not in cache.blobs
    for levels in cache.blobs.values():
        for data in levels.values():
            codec.verify(data)  # every cached blob is intact
    for i in range(bad):
        k, v = chunk_kv(i)
        assert sink.k is not None and torch.equal(sink.k[:, :, i * TOKENS : (i + 1) * TOKENS], k)


def test_a_chunk_of_another_shape_is_not_cached() -> None:
    n = 3
    cache = Cache()
    sink = Sink()
    f = fetcher({"a": PoisoningPeer("a", 1, "shape")}, cache=cache)
    out = asyncio.run(
        f.fetch(
            [key(i) for i in range(n)], [{"a"}] * n, sink, policy="fixed:exact",
            chunk_shape=(LAYERS, HEADS, DIM),  # what the model fingerprint promises
        )
    )
    assert out.chunks == 1  # never handed over ...
    assert key(1) not in cache.blobs  # ... and refused before it could be cached


def test_blobs_of_the_fake_peer_are_real() -> None:
    assert codec.verify(blob(0, "exact")).tokens == TOKENS
