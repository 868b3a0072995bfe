"""Two real transports over loopback for the session tests: a handler, a config, a pair."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.transport import PeerSession, PeerTransport, TransportConfig

KEY = os.urandom(32)


class Handler:
    """Serves ``echo`` and the blobs in :attr:`blobs`."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}

    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "echo":
            return {"from": peer_id, **body}
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"no method {method}")

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return self.blobs.get(key)


def config(**overrides: Any) -> TransportConfig:
    values: dict[str, Any] = {"host": "127.0.0.1", "allow_loopback": True, "psk": KEY}
    values.update(overrides)
    return TransportConfig(**values)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


@contextlib.asynccontextmanager
async def pair(
    hb: Any = None,
    *,
    a: dict[str, Any] | None = None,
    b: dict[str, Any] | None = None,
    on_a_down: Callable[[str], None] | None = None,
    **both: Any,
) -> AsyncIterator[tuple[PeerSession, PeerSession]]:
    """node-a's session to node-b and node-b's side of it (b serves from *hb*); both closed after.

    *both* overrides the config of either node, *a* / *b* only that node's; *on_a_down* is
    node-a's on_peer_down."""
    ta = PeerTransport("node-a", config(**{**both, **(a or {})}), Handler(), on_peer_down=on_a_down)
    tb = PeerTransport("node-b", config(**{**both, **(b or {})}), hb or Handler())
    await ta.start()
    await tb.start()
    try:
        session = await ta.connect("node-b", "127.0.0.1", tb.port)
        served = tb.session("node-a")
        assert served is not None
        yield session, served
    finally:
        await ta.close()
        await tb.close()


def silence(session: PeerSession) -> None:
    """The peer of *session* vanishes: its UDP sockets close, nothing it was sent is acked."""
    connection = session._pc.sctp.transport.transport._connection
    for protocol in connection._protocols:
        protocol.transport.close()


def freeze(session: PeerSession) -> None:
    """*session* stops answering (no pongs, no ByeAck) though its socket still acks packets."""
    session._control.channel.remove_all_listeners("message")
    for task in list(session._tasks):
        task.cancel()


def unhandled_exceptions() -> list[dict[str, Any]]:
    """What reaches the loop's exception handler from now on ("never retrieved", ...)."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: seen.append(context))
    return seen


def deafen(session: PeerSession) -> None:
    """*session* takes in nothing its peer sends (no message, no SCTP ack) but still sends."""
    sctp = session._pc.sctp
    sctp.transport._kvpeer_reader = None  # every packet through aiortc's own receive path

    async def drop(_chunk: Any) -> None:
        return None

    sctp._receive_data_chunk = drop


def stall_sending(session: PeerSession) -> None:
    """Nothing *session* sends leaves its data-channel buffers from now on, as when its peer
    acks nothing and the congestion window is spent (without waiting for SCTP to get there)."""

    async def hold() -> None:
        return None

    session._pc.sctp._data_channel_flush = hold

