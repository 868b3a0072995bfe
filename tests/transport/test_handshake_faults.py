"""A peer that holds the key and still breaks the handshake: the connecting side fails that one
connection with a TransportError (which callers skip), counted, and keeps no half-made session."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import msgpack
import pytest

from kvpeer.errors import ErrorCode, KVPeerError, TransportError
from kvpeer.transport import PeerTransport, TransportConfig, auth
from kvpeer.transport import peer as peer_mod

KEY = os.urandom(32)


class Handler:
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return None


def _config() -> TransportConfig:
    return TransportConfig(host="127.0.0.1", allow_loopback=True, psk=KEY, connect_timeout_s=5.0)


def test_an_answer_that_aiortc_cannot_take_is_a_counted_transport_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's MAC is right (the server made it), its SDP makes aiortc raise AssertionError:
    connect() raised that raw, and the daemon failed every lookup as INTERNAL."""
    answer = auth.ServerHandshake.answer

    def broken_answer(self: auth.ServerHandshake, node_id: str, mtu: int, sdp: str) -> Any:
        sdp = sdp.replace("a=fingerprint:sha-256", "a=fingerprint:sha-256 ").replace("m=application", "m=application x")
        return answer(self, node_id, mtu, sdp)

    monkeypatch.setattr(auth.ServerHandshake, "answer", broken_answer)

    async def body() -> None:
        a, b = PeerTransport("a", _config(), Handler()), PeerTransport("b", _config(), Handler())
        await a.start()
        await b.start()
        try:
            with pytest.raises(TransportError, match="connecting to b") as info:
                await a.connect("b", "127.0.0.1", b.port)
            assert info.value.__cause__ is not None  # what aiortc said stays in the chain
            assert a.counters["handshakes_failed"] == 1
            assert a.sessions() == []
        finally:
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("code", [ErrorCode.UNAUTHENTICATED, ErrorCode.BUSY])
def test_a_rejects_reason_cannot_write_lines_into_our_log(code: ErrorCode) -> None:
    """A host with no key answers with a Reject whose reason forges a log line."""

    async def body() -> str:
        reject = msgpack.packb({"v": 1, "t": "reject", "code": int(code), "reason": "x\nWARNING forged"})
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("!I", len(reject)) + reject)
        with pytest.raises(KVPeerError) as info:
            await peer_mod._read_message(reader)
        return str(info.value)

    said = asyncio.run(body())
    assert "\n" not in said and "peer refused us" in said
    assert ("forged" in said) == (code != ErrorCode.UNAUTHENTICATED)  # no remote text unauthenticated
