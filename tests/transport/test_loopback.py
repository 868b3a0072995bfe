"""Two real transports in one process over loopback (allow_loopback): RPC, blobs, auth."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kvpeer.errors import AuthError, ConfigError, ErrorCode, ProtocolError, TransportError
from kvpeer.transport import PeerTransport, TransportConfig, load_psk
from tests.test_fetcher import wait_until

KEY = os.urandom(32)


class Handler:
    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.calls: list[tuple[str, str]] = []

    async def handle_request(
        self, peer_id: str, method: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append((peer_id, method))
        if method == "echo":
            return {"from": peer_id, **body}
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"no method {method}")

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return self.blobs.get(key)


def _config(**overrides: Any) -> TransportConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "allow_loopback": True, "psk": KEY, "connect_timeout_s": 10.0,
    }  # fmt: skip
    values.update(overrides)
    return TransportConfig(**values)


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


@contextlib.asynccontextmanager
async def _session_to_b(hb: Handler, **overrides: Any) -> AsyncIterator[tuple[Any, PeerTransport]]:
    """node-a's session to node-b (serving from ``hb``) and node-b's transport; both closed."""
    a = PeerTransport("node-a", _config(**overrides), Handler())
    b = PeerTransport("node-b", _config(**overrides), hb)
    await a.start()
    await b.start()
    try:
        yield await a.connect("node-b", "127.0.0.1", b.port), b
    finally:
        await a.close()
        await b.close()


def test_request_blob_errors_and_reverse_direction() -> None:
    async def body() -> None:
        ha, hb = Handler(), Handler()
        down: list[str] = []
        a = PeerTransport("node-a", _config(), ha)
        b = PeerTransport("node-b", _config(frame_bytes=8192), hb, on_peer_down=down.append)
        await a.start()
        await b.start()
        try:
            session = await a.connect("node-b", "127.0.0.1", b.port)
            assert await a.connect("node-b", "127.0.0.1", b.port) is session  # cached
            assert await session.request("echo", {"x": 1}) == {"from": "node-a", "x": 1}
            with pytest.raises(ProtocolError) as info:
                await session.request("nope", {})
            assert info.value.code == ErrorCode.UNKNOWN_TYPE

            hb.blobs[b"k1"] = os.urandom(300_001)  # not a multiple of the frame size
            hb.blobs[b"empty"] = b""
            blobs = await asyncio.gather(
                *(session.fetch_blob(k, "") for k in (b"k1", b"empty", b"k1"))
            )
            assert blobs == [hb.blobs[b"k1"], b"", hb.blobs[b"k1"]]
            assert session.delivered_bytes == 600_002
            assert session.rtt_s is not None and session.rtt_s > 0  # SCTP's smoothed RTT
            assert session.estimator.total_bytes > 600_000  # what the fetcher's estimate sees
            with pytest.raises(ProtocolError) as info:
                await session.fetch_blob(b"missing", "")
            assert info.value.code == ErrorCode.NOT_FOUND

            reverse = b.session("node-a")
            assert reverse is not None
            assert await reverse.request("echo", {}) == {"from": "node-b"}
            assert [s.peer_id for s in a.sessions()] == ["node-b"]
        finally:
            await a.close()
            await b.close()
        assert session.closed
        assert down == ["node-a"]  # b saw a leave; a closed itself and reports nothing

    _run(body)


def test_busy_limit_and_blob_size_limit() -> None:
    async def body() -> None:
        ha, hb = Handler(), Handler()
        a = PeerTransport("a", _config(max_blob_bytes=1000), ha)
        b = PeerTransport("b", _config(max_transfers_per_peer=1), hb)
        await a.start()
        await b.start()
        try:
            session = await a.connect("b", "127.0.0.1", b.port)
            hb.blobs[b"big"] = b"x" * 5000
            with pytest.raises(ProtocolError) as info:
                await session.fetch_blob(b"big", "")
            assert info.value.code == ErrorCode.TOO_LARGE
        finally:
            await a.close()
            await b.close()

    _run(body)


@pytest.mark.parametrize(
    ("client_key", "server_key"),
    [(os.urandom(32), KEY), (None, KEY), (KEY, None)],
    ids=["wrong-key", "client-without-key", "server-without-key"],
)
def test_peer_without_the_key_is_refused_and_counted(
    client_key: bytes | None, server_key: bytes | None
) -> None:
    async def body() -> None:
        server = PeerTransport("server", _config(psk=server_key), Handler())
        client = PeerTransport("client", _config(psk=client_key), Handler())
        await server.start()
        await client.start()
        try:
            with pytest.raises(AuthError):
                await client.connect("server", "127.0.0.1", server.port)
            assert client.sessions() == [] and server.sessions() == []
        finally:
            await client.close()
            await server.close()
        assert client.counters["auth_failures"] == 1
        if server_key is not None:
            assert server.counters["auth_failures"] == 1

    _run(body)


def test_key_rotation_connects_old_and_new() -> None:
    new = os.urandom(32)

    async def body() -> None:
        old_node = PeerTransport("old", _config(psk=KEY), Handler())
        rotating = PeerTransport("rot", _config(psk=KEY, next_psk=new), Handler())
        new_node = PeerTransport("new", _config(psk=new), Handler())
        for t in (old_node, rotating, new_node):
            await t.start()
        try:
            await old_node.connect("rot", "127.0.0.1", rotating.port)
            await new_node.connect("rot", "127.0.0.1", rotating.port)
            with pytest.raises(AuthError):
                await old_node.connect("new", "127.0.0.1", new_node.port)
        finally:
            for t in (old_node, rotating, new_node):
                await t.close()

    _run(body)


async def _tampering_proxy(target_port: int, flip: bytes) -> asyncio.Server:
    """A man in the middle that changes the offer's SDP (one hex digit after *flip*)."""

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tamper: bool
    ) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                data = await reader.readexactly(struct.unpack("!I", header)[0])
                at = data.find(flip)
                if tamper and at >= 0:
                    at += len(flip)
                    swapped = b"B" if data[at : at + 1] == b"A" else b"A"  # another hex digit
                    data = data[:at] + swapped + data[at + 1 :]
                writer.write(struct.pack("!I", len(data)) + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_tampered_sdp_is_refused() -> None:
    async def body() -> None:
        server = PeerTransport("server", _config(), Handler())
        client = PeerTransport("client", _config(connect_timeout_s=5.0), Handler())
        await server.start()
        await client.start()
        proxy = await _tampering_proxy(server.port, b"a=fingerprint:sha-256 ")
        port = proxy.sockets[0].getsockname()[1]
        try:
            with pytest.raises(TransportError):
                await client.connect("server", "127.0.0.1", port)
            assert server.counters["auth_failures"] == 1
            assert server.sessions() == []
        finally:
            proxy.close()
            await client.close()
            await server.close()

    _run(body)


def test_load_psk_refuses_readable_files(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(KEY.hex())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_psk(path)
    path.chmod(0o600)
    assert load_psk(path) == KEY
    path.write_bytes(b"short")
    with pytest.raises(ConfigError):
        load_psk(path)
    with pytest.raises(ConfigError):
        load_psk(tmp_path / "absent")


def test_config_refuses_unsafe_hosts() -> None:
    with pytest.raises(ConfigError):
        TransportConfig(host="0.0.0.0")
    with pytest.raises(ConfigError):
        TransportConfig(host="127.0.0.1")  # loopback needs allow_loopback
    assert TransportConfig.from_section({"port": 5}, default_host="10.0.0.1").host == "10.0.0.1"


def test_large_blob_with_a_wrong_digest_is_refused_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvpeer.transport import blobs
    from kvpeer.transport import session as session_module

    def lying_blob_start(*args: Any, **kwargs: Any) -> Any:
        start = blobs.blob_start(*args, **kwargs)
        return dataclasses.replace(start, digest=bytes(len(start.digest)))

    async def body() -> None:
        hb = Handler()
        async with _session_to_b(hb) as (session, _):
            # Large enough to be digest-checked off the event loop on both sides.
            hb.blobs[b"big"] = os.urandom(2 * session_module.OFF_LOOP_BYTES + 7)
            with monkeypatch.context() as patch:
                patch.setattr(session_module, "blob_start", lying_blob_start)
                with pytest.raises(ProtocolError) as info:
                    await session.fetch_blob(b"big", "")
            assert info.value.code == ErrorCode.INTEGRITY
            assert await session.fetch_blob(b"big", "") == hb.blobs[b"big"]

    _run(body)


def test_a_fetch_cancelled_while_its_digest_is_checked_frees_the_peers_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every byte arrived and the digest is being checked off the loop when the fetch is
    cancelled (the fetcher does this at every fetch's end): the peer must still hear BlobCancel
    and free its transfer slot, or it answers BUSY until its request timeout."""
    from kvpeer.transport import session as session_module

    checking = asyncio.Event()
    release = asyncio.Event()
    real_off_loop = session_module._off_loop

    async def slow_off_loop(work: Callable[[], Any], size: int) -> Any:
        if getattr(work, "__name__", "") == "result":  # the receiver's digest check only
            checking.set()
            await release.wait()
        return await real_off_loop(work, size)

    async def body() -> None:
        hb = Handler()
        try:
            async with _session_to_b(hb) as (session, b):
                hb.blobs[b"big"] = os.urandom(session_module.OFF_LOOP_BYTES + 7)
                monkeypatch.setattr(session_module, "_off_loop", slow_off_loop)
                fetch = asyncio.create_task(session.fetch_blob(b"big", ""))
                await asyncio.wait_for(checking.wait(), 20)
                fetch.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await fetch
                served = b.session("node-a")
                assert served is not None
                async with asyncio.timeout(10):  # the peer frees the slot once BlobCancel lands
                    while served._serving:  # noqa: ASYNC110 - no hook; polls a private table
                        await asyncio.sleep(0.01)
                monkeypatch.setattr(session_module, "_off_loop", real_off_loop)
                assert await session.fetch_blob(b"big", "") == hb.blobs[b"big"]
        finally:
            release.set()

    _run(body)


class _SlowHandler(Handler):
    """open_blob takes a while (a disk read, a transcode): counts how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.active = self.peak = 0

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.3)
            return b"x" * 100_000
        finally:
            self.active -= 1


def test_blob_done_before_the_blob_was_sent_does_not_free_a_transfer_slot() -> None:
    """BlobDone frees the slot early only once every frame went out; sent before that, it is a
    cancel (and a protocol error), so a peer cannot stack transfers past max_transfers_per_peer."""
    from kvpeer.transport import messages as m

    async def body() -> None:
        hb = _SlowHandler()
        a = PeerTransport("a", _config(), Handler())
        b = PeerTransport("b", _config(max_transfers_per_peer=1), hb)
        await a.start()
        await b.start()
        try:
            session = await a.connect("b", "127.0.0.1", b.port)
            for i in range(1, 11):
                session._send_control_now(m.BlobRequest(id=100 + i, key=b"k", level=""))
                session._send_control_now(m.BlobDone(id=100 + i))
            served = b.session("a")
            assert served is not None
            await asyncio.sleep(0.8)
            assert hb.peak == 1 and served.protocol_errors >= 1
            assert await session.fetch_blob(b"k", "") == b"x" * 100_000  # a proper fetch still works
        finally:
            await a.close()
            await b.close()

    _run(body)


def test_requests_in_one_read_count_against_the_cap_before_their_handlers_start() -> None:
    from kvpeer.transport import messages as m
    from kvpeer.transport.session import MAX_REQUESTS_IN_FLIGHT

    async def body() -> None:
        class Slow(Handler):
            running = 0
            peak = 0

            async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
                Slow.running += 1
                Slow.peak = max(Slow.peak, Slow.running)
                await asyncio.sleep(0.2)
                Slow.running -= 1
                return {}

        async with _session_to_b(Slow()) as (_session, b):
            served = b.session("node-a")
            assert served is not None
            for i in range(3 * MAX_REQUESTS_IN_FLIGHT):  # as one batched read hands them over
                served._dispatch(m.Request(id=i, method="echo", body={}))
            await asyncio.sleep(0.5)
            assert Slow.peak == MAX_REQUESTS_IN_FLIGHT and served._requests_in_flight == 0

    _run(body)


def test_a_handshake_that_fails_after_the_session_was_made_reports_no_peer_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Channels that do not open in time: the half-made session's close must not tell discovery
    that a peer which was never up went down."""
    from kvpeer.transport import session as session_mod

    async def never_opens(self: Any, limit_s: float) -> None:
        await asyncio.sleep(limit_s + 1)

    async def body() -> None:
        down_a: list[str] = []
        down_b: list[str] = []
        a = PeerTransport("a", _config(connect_timeout_s=1.0), Handler(), on_peer_down=down_a.append)
        b = PeerTransport("b", _config(connect_timeout_s=1.0), Handler(), on_peer_down=down_b.append)
        await a.start()
        await b.start()
        monkeypatch.setattr(session_mod.PeerSession, "wait_open", never_opens)
        try:
            with pytest.raises(TransportError):
                await a.connect("b", "127.0.0.1", b.port)
            await asyncio.sleep(1.5)
            assert (down_a, down_b) == ([], [])
            assert a.counters["peers_down"] == b.counters["peers_down"] == 0
            assert a.counters["handshakes_failed"] == 1
        finally:
            await a.close()
            await b.close()

    _run(body)


@pytest.mark.parametrize("side", ["connecting", "accepting"])
def test_a_session_that_ends_as_its_channels_open_is_not_registered(
    monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """The peer connection fails in the loop turn the channels open, and the session's end (a
    task) runs before the handshake resumes: registered anyway, the ended session stayed in the
    transport's tables for good (and counted against its session caps)."""
    from kvpeer.transport import session as session_mod

    opened = session_mod.PeerSession.wait_open
    ends = "b" if side == "connecting" else "a"  # the peer id of the side's session
    ended = asyncio.Event()

    async def fails_as_it_opens(self: Any, limit_s: float) -> None:
        await opened(self, limit_s)
        if self.peer_id == ends:
            await self._end(by_peer=True)  # what _on_state's task does on "failed"
            ended.set()

    async def body() -> None:
        a = PeerTransport("a", _config(), Handler())
        b = PeerTransport("b", _config(), Handler())
        await a.start()
        await b.start()
        monkeypatch.setattr(session_mod.PeerSession, "wait_open", fails_as_it_opens)
        try:
            if side == "connecting":
                with pytest.raises(TransportError, match="failed as it opened"):
                    await a.connect("b", "127.0.0.1", b.port)
                node = a
            else:
                with contextlib.suppress(TransportError):
                    await a.connect("b", "127.0.0.1", b.port)
                await asyncio.wait_for(ended.wait(), 10)
                await asyncio.gather(*b._handshakes)
                node = b
            assert node.counters["handshakes_failed"] == 1 and node.counters["sessions_opened"] == 0
            assert not node._all and not node._sessions and not node._session_keys
            assert not node._session_sources
        finally:
            await a.close()
            await b.close()

    _run(body)


def test_an_sdp_that_aiortc_cannot_take_is_a_counted_failed_handshake() -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection

    from kvpeer.transport import messages as m
    from kvpeer.transport.auth import ClientHandshake
    from kvpeer.transport.peer import _expect, _write_message

    async def body() -> None:
        unhandled: list[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: unhandled.append(ctx))
        b = PeerTransport("b", _config(), Handler())
        await b.start()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("x")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp.replace("a=setup:actpass", "a=setup:bogus")
        await pc.close()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            handshake = ClientHandshake((KEY,))
            await _write_message(writer, handshake.hello())
            await _write_message(writer, handshake.on_challenge(await _expect(reader, m.Challenge)))
            handshake.on_server_proof(await _expect(reader, m.ServerProof))
            await _write_message(writer, handshake.offer("evil", 1500, sdp))
            assert await asyncio.wait_for(reader.read(1), 10) == b""  # b hangs up
            writer.close()
            await asyncio.sleep(0.1)
            assert b.counters["handshakes_failed"] == 1 and not unhandled
        finally:
            await b.close()

    _run(body)


def test_a_peer_overrunning_the_receive_window_is_dropped_not_buffered() -> None:
    """A sender that ignores max-message-size and the window (one 16 MiB message): the receiver
    holds at most the window plus a bounded slack, not the whole message."""
    from kvpeer.transport import aiortc_patches

    async def body() -> None:
        # Taking in 16 MiB holds the loop for seconds on a loaded machine: heartbeats must not
        # declare the session down before the overrun shows.
        async with _session_to_b(Handler(), peer_dead_after_s=30.0) as (session, b):
            served = b.session("node-a")
            assert served is not None
            sctp = served._pc.sctp
            delivered: list[int] = []
            served._control.channel.remove_all_listeners("message")
            served._control.channel.on("message", lambda data: delivered.append(len(data)))
            session._pc.sctp._remote_max_message_size = 0  # the sender ignores the limit
            session._control.channel.send(b"\0" * (16 << 20))
            lowest = 0
            for _ in range(400):
                lowest = min(lowest, sctp._advertised_rwnd)
                if sctp._kvpeer_overrun:
                    break
                await asyncio.sleep(0.05)
            assert sctp._kvpeer_overrun
            await asyncio.sleep(0.5)
            lowest = min(lowest, sctp._advertised_rwnd)
            assert lowest >= -aiortc_patches._RWND_OVERSHOOT - 65536
            assert max(delivered, default=0) < 1 << 20  # heartbeats only

    _run(body)


def test_connections_that_never_prove_the_key_are_bounded_per_address() -> None:
    from kvpeer.transport.peer import MAX_HANDSHAKES_PER_ADDRESS

    async def body() -> None:
        async with _session_to_b(Handler()) as (_session, b):
            idle = [await asyncio.open_connection("127.0.0.1", b.port) for _ in range(MAX_HANDSHAKES_PER_ADDRESS)]
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed at once
            assert b.counters["handshakes_refused"] == 1
            writer.close()
            for _reader, idle_writer in idle:
                idle_writer.close()
            await asyncio.sleep(0.2)
            late = PeerTransport("node-c", _config(), Handler())
            await late.start()
            try:  # the slots came back: a real peer gets in
                session = await late.connect("node-b", "127.0.0.1", b.port)
                assert await session.request("echo", {}) == {"from": "node-c"}
            finally:
                await late.close()

    _run(body)


def test_sessions_are_capped_per_source_address_and_in_all(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key holder claiming a new node id per session opened any number of them (each a UDP
    socket, an SCTP association, tasks). Past the caps a peer is refused after proving the key,
    with a Reject its connect reports as BUSY, and a WARNING once per address."""
    from kvpeer.transport import peer

    monkeypatch.setattr(peer, "MAX_SESSIONS_PER_ADDRESS", 2, raising=False)
    monkeypatch.setattr(peer, "MAX_SESSIONS", 3, raising=False)

    async def body() -> None:
        down = asyncio.Event()
        b = PeerTransport("node-b", _config(), Handler(), on_peer_down=lambda _peer: down.set())
        await b.start()
        clients: list[PeerTransport] = []

        async def connect(name: str, host: str = "127.0.0.1") -> Any:
            client = PeerTransport(name, _config(host=host), Handler())
            clients.append(client)
            await client.start()
            return await client.connect("node-b", "127.0.0.1", b.port)

        try:
            await connect("sybil-1")
            await connect("sybil-2")
            for name in ("sybil-3", "sybil-4"):  # a third from 127.0.0.1, and again
                with pytest.raises(ProtocolError) as info:
                    await connect(name)
                assert info.value.code == ErrorCode.BUSY
            await connect("other-1", "127.0.0.2")  # another address still gets in ...
            with pytest.raises(ProtocolError):  # ... until the total is reached
                await connect("other-2", "127.0.0.2")
            assert len(b.sessions()) == 3 and b.counters["sessions_refused"] == 3
            await clients[0].close()  # a session ends: its slot comes back
            await asyncio.wait_for(down.wait(), 10)
            assert len(b.sessions()) == 2
            session = await connect("sybil-5")
            assert await session.request("echo", {}) == {"from": "sybil-5"}
            # Sessions node-b opens itself do not count: they filled the total before.
            down.clear()
            await clients[-1].close()
            await asyncio.wait_for(down.wait(), 10)
            other = PeerTransport("other-3", _config(host="127.0.0.3"), Handler())
            clients.append(other)
            await other.start()
            await b.connect("other-3", "127.0.0.3", other.port)
            await connect("other-4", "127.0.0.2")
        finally:
            for client in clients:
                await client.close()
            await b.close()

    with caplog.at_level("DEBUG", logger="kvpeer.transport.peer"):
        _run(body)
    refusals = [r for r in caplog.records if "refused a session" in r.getMessage()]
    assert [r.levelname for r in refusals] == ["WARNING", "DEBUG", "WARNING"]


def test_a_blob_counts_as_sent_only_once_the_peer_confirmed_it() -> None:
    class Counting(Handler):
        def __init__(self) -> None:
            super().__init__()
            self.sent: list[tuple[str, int]] = []

        def blob_sent(self, peer_id: str, blob: bytes) -> None:
            self.sent.append((peer_id, len(blob)))

    async def body() -> None:
        hb = Counting()
        a = PeerTransport("a", _config(max_blob_bytes=10_000), Handler())
        b = PeerTransport("b", _config(), hb)
        await a.start()
        await b.start()
        try:
            session = await a.connect("b", "127.0.0.1", b.port)
            hb.blobs[b"small"] = b"s" * 5000
            hb.blobs[b"big"] = b"b" * 50_000  # over a's max_blob_bytes: refused on arrival
            assert await session.fetch_blob(b"small", "") == hb.blobs[b"small"]
            with pytest.raises(ProtocolError):
                await session.fetch_blob(b"big", "")
            await asyncio.sleep(0.2)
            assert hb.sent == [("a", 5000)]
        finally:
            await a.close()
            await b.close()

    _run(body)


def test_a_peer_with_two_sessions_that_stops_is_down_once() -> None:
    """Both sides dialled each other (two sessions per pair, as daemons that discover each other
    do); when one stops, the other said "peer down", counted it and called on_peer_down once per
    session."""

    async def body() -> None:
        down_a: list[str] = []
        a = PeerTransport("a", _config(), Handler(), on_peer_down=down_a.append)
        b = PeerTransport("b", _config(), Handler())
        await a.start()
        await b.start()
        try:
            await asyncio.gather(a.connect("b", "127.0.0.1", b.port), b.connect("a", "127.0.0.1", a.port))
            assert len([s for s in a._all if s.peer_id == "b"]) == 2
            await b.close()
            await wait_until(lambda: not any(s.peer_id == "b" for s in a._all))
            await asyncio.sleep(0.2)
            assert down_a == ["b"] and a.counters["peers_down"] == 1
        finally:
            await a.close()
            await b.close()

    _run(body)
