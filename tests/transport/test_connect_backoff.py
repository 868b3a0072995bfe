"""A peer that cannot be connected to: one warning per episode, then connects refused at once
while its backoff runs, tried again when it ends or when the peer is seen to come back."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from kvpeer.errors import KVPeerError, TransportError
from kvpeer.transport import PeerTransport, TransportConfig
from kvpeer.transport import peer as peer_mod
from kvpeer.transport.peer import PeerBackingOff
from tests.transport.test_handshake_faults import Handler

KEY = os.urandom(32)


def _config(psk: bytes = KEY) -> TransportConfig:
    return TransportConfig(host="127.0.0.1", allow_loopback=True, psk=psk, connect_timeout_s=5.0)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_peer_is_said_once_and_not_dialled_again_until_its_wait_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        a = PeerTransport("node-a", _config(), Handler())
        await a.start()
        port = _closed_port()
        try:
            with caplog.at_level(logging.DEBUG, logger="kvpeer.transport.peer"):
                with pytest.raises(TransportError):
                    await a.connect("ghost", "127.0.0.1", port)
                failed = a.counters["handshakes_failed"]
                for _ in range(20):  # what 20 lookups in a row did: 20 dials, 20 log lines
                    with pytest.raises(PeerBackingOff):
                        await a.connect("ghost", "127.0.0.1", port)
                assert a.counters["handshakes_failed"] == failed and a.backing_off() == ["ghost"]
                a._backoff["ghost"].retry_at = time.monotonic()  # its wait is over
                with pytest.raises(TransportError) as info:
                    await a.connect("ghost", "127.0.0.1", port)
                assert not isinstance(info.value, PeerBackingOff)
                assert a._backoff["ghost"].wait_s == 2 * peer_mod.CONNECT_BACKOFF_S[0]
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "cannot connect to peer ghost" in warnings[0].getMessage()
            a.forget_failures("ghost")  # seen to come back: tried at once
            with pytest.raises(TransportError) as info:
                await a.connect("ghost", "127.0.0.1", port)
            assert not isinstance(info.value, PeerBackingOff)
        finally:
            await a.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_peer_with_another_key_is_one_warning_not_one_per_request_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        a = PeerTransport("node-a", _config(), Handler())
        b = PeerTransport("node-b", _config(psk=os.urandom(32)), Handler())
        await a.start()
        await b.start()
        try:
            with caplog.at_level(logging.INFO, logger="kvpeer.transport.peer"):
                for _ in range(5):  # the first: an AuthError, then refused at once
                    with pytest.raises(KVPeerError):
                        await a.connect("node-b", "127.0.0.1", b.port)
            assert a.counters["auth_failures"] == 1
            ours = [r for r in caplog.records if r.levelno >= logging.WARNING and "node-b" in r.getMessage()]
            assert len(ours) == 1
            await b.close()
            b = PeerTransport("node-b", _config(), Handler())  # now with the cluster's key
            await b.start()
            a._backoff["node-b"].retry_at = time.monotonic()
            with caplog.at_level(logging.INFO, logger="kvpeer.transport.peer"):
                session = await a.connect("node-b", "127.0.0.1", b.port)
            assert session is not None and a.backing_off() == []
            assert any("reachable again" in r.getMessage() for r in caplog.records)
        finally:
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_peer_at_a_new_address_or_one_that_dials_us_ends_its_backoff() -> None:
    async def body() -> None:
        a = PeerTransport("node-a", _config(), Handler())
        b = PeerTransport("node-b", _config(), Handler())
        await a.start()
        await b.start()
        try:
            with pytest.raises(TransportError):
                await a.connect("node-b", "127.0.0.1", _closed_port())  # an old address
            assert a.backing_off() == ["node-b"]
            session = await a.connect("node-b", "127.0.0.1", b.port)  # its new one: tried at once
            assert session is not None and a.backing_off() == []
            await session.close()
            with pytest.raises(TransportError):
                await a.connect("node-c", "127.0.0.1", _closed_port())
            c = PeerTransport("node-c", _config(), Handler())
            await c.start()
            try:
                await c.connect("node-a", "127.0.0.1", a.port)  # it dials us: it is up
                assert a.backing_off() == []
            finally:
                await c.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_connect_callers_get_transport_error_when_close_cancels_the_attempt() -> None:
    async def body() -> None:
        stuck = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)  # never answers
        port = stuck.sockets[0].getsockname()[1]
        transport = PeerTransport("node-a", _config(), Handler())
        await transport.start()
        try:
            callers = [asyncio.create_task(transport.connect("node-b", "127.0.0.1", port)) for _ in range(2)]
            await asyncio.sleep(0)  # both start, and wait on the one attempt
            await transport.close()
            outcomes = await asyncio.gather(*callers, return_exceptions=True)
            # Was CancelledError: as if each caller itself had been cancelled.
            assert all(isinstance(o, TransportError) and "closing" in str(o) for o in outcomes), outcomes
        finally:
            stuck.close()

    asyncio.run(asyncio.wait_for(body(), 30))
