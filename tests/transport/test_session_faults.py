"""A session must answer every request and fail every wait promptly, whatever goes wrong on the
way: a reply too large for the peer, a reason too long for the wire, a reply the requester
cannot decode, a close racing the peer's, a peer dying under a full send buffer."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from aiortc import RTCSctpCapabilities
from aiortc.rtcsctptransport import RTCSctpTransport

from kvpeer.errors import ConfigError, ErrorCode, ProtocolError, TransportError
from kvpeer.transport import PeerTransport
from kvpeer.transport import messages as m
from tests.transport.pairs import (
    Handler,
    config,
    freeze,
    pair,
    run,
    silence,
    stall_sending,
    unhandled_exceptions,
)

#: Requests in these tests time out after this long; a prompt answer takes far less.
TIMEOUT_S = 5.0
PROMPT_S = 2.0


class _Big(Handler):
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "big":
            return {"pad": b"x" * 100_000}  # an inventory page is about 200 KB
        return await super().handle_request(peer_id, method, body)


async def _outcome(call: Any) -> tuple[ProtocolError, float]:
    started = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        await call
    return info.value, time.monotonic() - started


def _no_task_failures(caplog: pytest.LogCaptureFixture, unhandled: list[dict[str, Any]]) -> None:
    gc.collect()  # a task that died unseen is reported when collected
    assert not unhandled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.fixture
def peers_take_64k(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every peer connection announces a=max-message-size:65536 (what an SDP without the
    attribute means too), not aiortc's 256 KiB."""
    monkeypatch.setattr(
        RTCSctpTransport, "getCapabilities", classmethod(lambda cls: RTCSctpCapabilities(maxMessageSize=65536))
    )


# -- 1: messages over the peer's max-message-size -------------------------------------------


@pytest.mark.usefixtures("peers_take_64k")
def test_a_reply_over_the_peers_message_size_is_answered_too_large(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        unhandled = unhandled_exceptions()
        async with pair(_Big(), request_timeout_s=TIMEOUT_S) as (session, served):
            assert session.message_limit == served.message_limit == 65536
            error, took = await _outcome(session.request("big", {}))
            assert error.code == ErrorCode.TOO_LARGE and took < PROMPT_S
            assert await session.request("echo", {}) == {"from": "node-a"}  # the session goes on
            _no_task_failures(caplog, unhandled)

    run(body)


@pytest.mark.usefixtures("peers_take_64k")
@pytest.mark.parametrize("side", ["a", "b"], ids=["connecting-side", "accepting-side"])
def test_frames_larger_than_the_peer_takes_refuse_the_handshake(side: str) -> None:
    async def body() -> None:
        with pytest.raises(ProtocolError) as info:
            async with pair(**{side: {"frame_bytes": 128 * 1024}}):
                pass
        assert info.value.code == ErrorCode.TOO_LARGE
        assert "at most 65536 bytes" in info.value.reason and "frame_bytes (131072)" in info.value.reason

    run(body)


def test_a_send_over_the_peers_limit_found_only_by_aiortc_is_still_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defence in depth: the peer's limit drops below what the handshake said (aiortc raises
    ValueError on send). The request and the blob fetch still get TOO_LARGE at once."""

    async def body() -> None:
        unhandled = unhandled_exceptions()
        hb = _Big()
        hb.blobs[b"k"] = b"z" * 200_000
        async with pair(hb, request_timeout_s=TIMEOUT_S, b={"frame_bytes": 128 * 1024}) as (session, served):
            served._pc.sctp._remote_max_message_size = 65536
            error, took = await _outcome(session.request("big", {}))
            assert error.code == ErrorCode.TOO_LARGE and took < PROMPT_S
            error, took = await _outcome(session.fetch_blob(b"k", ""))
            assert error.code == ErrorCode.TOO_LARGE and took < PROMPT_S
            assert served._requests_in_flight == 0
            _no_task_failures(caplog, unhandled)

    run(body)


# -- 2: reasons longer than the wire takes ---------------------------------------------------


class _LongReason(Handler):
    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "chunk " + key.hex() * 40 + " is not here")


def test_a_long_error_reason_from_open_blob_reaches_the_fetcher_cut_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        unhandled = unhandled_exceptions()
        async with pair(_LongReason(), request_timeout_s=TIMEOUT_S) as (session, _served):
            error, took = await _outcome(session.fetch_blob(b"k" * 32, ""))
            assert error.code == ErrorCode.NOT_FOUND and took < PROMPT_S
            assert error.reason == f"peer node-b: chunk {(b'k' * 32).hex() * 40}"[: 13 + m.MAX_REASON]
            _no_task_failures(caplog, unhandled)

    run(body)


# -- 5: replies the requester cannot decode --------------------------------------------------


class _IntKeys(Handler):
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"per_level": {0: 1, 1: 2}}  # e.g. a dict keyed by level rank


def _answer_raw(served: Any, reply: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Make *served* answer each request with the raw map *reply* builds (an old or newer peer)."""

    def on_control(data: bytes) -> None:
        message = msgpack.unpackb(data)
        if message.get("t") == "req":
            served._control.channel.send(msgpack.packb(reply(message)))
        else:
            served._on_control(data)

    served._control.channel.remove_all_listeners("message")
    served._control.channel.on("message", on_control)


def test_a_handler_body_the_peer_cannot_decode_fails_the_request_at_once() -> None:
    async def body() -> None:
        async with pair(_IntKeys(), request_timeout_s=TIMEOUT_S) as (session, _served):
            error, took = await _outcome(session.request("stats", {}))
            assert took < PROMPT_S and "map key 0 (int)" in error.reason
            with pytest.raises(ProtocolError, match="map key"):  # and never leaves the requester
                await session.request("echo", {"by_rank": {1: "a"}})

    run(body)


def test_a_reply_refused_on_arrival_fails_its_request_at_once() -> None:
    async def body() -> None:
        async with pair(request_timeout_s=TIMEOUT_S) as (session, served):
            _answer_raw(served, lambda req: {"v": 1, "t": "resp", "id": req["id"], "body": {0: 1}})
            error, took = await _outcome(session.request("echo", {}))
            assert error.code == ErrorCode.MALFORMED and took < PROMPT_S
            assert "undecodable" in error.reason and "map key" in error.reason

    run(body)


def test_an_error_code_from_a_newer_peer_fails_the_request_at_once() -> None:
    async def body() -> None:
        async with pair(request_timeout_s=TIMEOUT_S) as (session, served):
            _answer_raw(
                served, lambda req: {"v": 1, "t": "err", "id": req["id"], "code": 14, "reason": "rate limited"}
            )
            error, took = await _outcome(session.request("echo", {}))
            assert error.code == ErrorCode.INTERNAL and took < PROMPT_S
            assert error.reason == "peer node-b: error code 14: rate limited"

    run(body)


def test_a_request_the_peer_refuses_on_arrival_is_answered_at_once() -> None:
    async def body() -> None:
        async with pair(request_timeout_s=TIMEOUT_S) as (session, _served):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            session._pending[999] = future  # as request() would, for a message it cannot build
            session._control.channel.send(
                msgpack.packb({"v": 1, "t": "req", "id": 999, "method": "echo", "body": {0: 1}})
            )
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(future, PROMPT_S)
            assert info.value.code == ErrorCode.MALFORMED

    run(body)


# -- 3: close() racing the end of the session ------------------------------------------------


def test_both_sides_closing_at_once_do_not_wait_for_a_bye_ack() -> None:
    async def body() -> None:
        async with pair(close_timeout_s=TIMEOUT_S) as (session, served):
            started = time.monotonic()
            await asyncio.gather(session.close(), served.close())
            assert time.monotonic() - started < PROMPT_S

    run(body)


def test_two_transports_stopping_together_do_not_wait_for_a_bye_ack() -> None:
    async def body() -> None:
        ta, tb = PeerTransport("node-a", config(), Handler()), PeerTransport("node-b", config(), Handler())
        await ta.start()
        await tb.start()
        try:
            await (await ta.connect("node-b", "127.0.0.1", tb.port)).request("echo", {})
        finally:
            started = time.monotonic()
            await asyncio.gather(ta.close(), tb.close())
        assert time.monotonic() - started < PROMPT_S  # close_timeout_s is 5 s

    run(body)


def test_a_session_the_peer_said_bye_to_is_handed_out_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the peer's Bye and the session's end (up to close_timeout_s while the ByeAck
    drains), connect() and session() handed out the ending session and requests were sent on
    it. Now it takes no new work: connect() opens another session, close() waits for the end."""
    from kvpeer.transport.session import PeerSession

    said_bye, release = asyncio.Event(), asyncio.Event()
    end_after_bye = PeerSession._end_after_bye

    async def held(self: PeerSession) -> None:  # the ByeAck takes its time to drain
        said_bye.set()
        await release.wait()
        await end_after_bye(self)

    monkeypatch.setattr(PeerSession, "_end_after_bye", held)

    async def body() -> None:
        ta, tb = PeerTransport("node-a", config(), Handler()), PeerTransport("node-b", config(), Handler())
        await ta.start()
        await tb.start()
        try:
            session = await ta.connect("node-b", "127.0.0.1", tb.port)
            served = tb.session("node-a")
            assert served is not None
            served._send_control_now(m.Bye())  # the peer leaves this session (not its transport)
            await asyncio.wait_for(said_bye.wait(), TIMEOUT_S)
            assert session.closing and ta.session("node-b") is None
            with pytest.raises(TransportError, match="closed"):
                await asyncio.wait_for(session.request("echo", {}), PROMPT_S)
            fresh = await ta.connect("node-b", "127.0.0.1", tb.port)
            assert fresh is not session and ta.session("node-b") is fresh
            assert await fresh.request("echo", {}) == {"from": "node-a"}
            closing = asyncio.get_running_loop().create_task(session.close())  # waits for the end
            await asyncio.sleep(0)
            assert not closing.done()
            release.set()
            await asyncio.wait_for(closing, TIMEOUT_S)
            assert session.closed and ta.session("node-b") is fresh
        finally:
            release.set()
            await asyncio.gather(ta.close(), tb.close())

    run(body)


def test_close_returns_once_the_silent_peer_is_declared_dead() -> None:
    async def body() -> None:
        async with pair(close_timeout_s=8.0, heartbeat_interval_s=0.2, peer_dead_after_s=1.0) as (
            session,
            served,
        ):
            freeze(served)
            started = time.monotonic()
            await session.close()
            assert session.closed and time.monotonic() - started < 1.0 + PROMPT_S

    run(body)


# -- 4: callers waiting on flow control when the session ends --------------------------------


def test_requests_waiting_on_a_full_send_buffer_fail_when_the_session_ends() -> None:
    async def body() -> None:
        down = asyncio.Event()
        async with pair(
            request_timeout_s=8.0, heartbeat_interval_s=0.2, peer_dead_after_s=1.0,
            buffer_high_bytes=256 * 1024, buffer_low_bytes=64 * 1024,
            on_a_down=lambda _peer: down.set(),
        ) as (session, served):  # fmt: skip
            silence(served)
            calls = [asyncio.create_task(session.request("echo", {"pad": b"x" * 60_000})) for _ in range(12)]
            await asyncio.wait_for(down.wait(), 5)
            ended = time.monotonic()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert time.monotonic() - ended < 0.5  # not the rest of request_timeout_s
            assert all(isinstance(o, TransportError) and "closed" in str(o) for o in outcomes), outcomes

    run(body)


# -- 6: fetch_blob's timeout ------------------------------------------------------------------


class _SlowBlobs(Handler):
    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        await asyncio.sleep(0.6)  # a disk read, a transcode
        return b"x" * 1000


def test_a_fetch_timeout_covers_the_wait_for_a_transfer_slot() -> None:
    async def body() -> None:
        async with pair(_SlowBlobs(), a={"max_transfers_per_peer": 1}) as (session, _served):

            async def fetch(key: bytes) -> tuple[str, float]:
                started = time.monotonic()
                try:
                    await session.fetch_blob(key, "", timeout=1.0)
                    outcome = "ok"
                except TransportError as exc:
                    outcome = str(exc)
                return outcome, time.monotonic() - started

            results = await asyncio.gather(*(fetch(b"k%d" % i) for i in range(4)))
            assert results[0][0] == "ok"
            assert all(took < 1.4 for _, took in results), results  # was 0.6, 1.2, 1.8, 2.4 s
            assert all("timed out after 1 s" in outcome for outcome, _ in results[1:]), results

    run(body)


# -- 7: sessions per peer id -----------------------------------------------------------------


def test_a_peer_id_reconnecting_keeps_at_most_two_sessions_the_newest_winning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that forgets its sessions (a retry loop, two hosts with one node id) connects
    again and again: each connect is a new peer connection on our side, and was kept."""

    async def body() -> None:
        tb = PeerTransport("node-b", config(), Handler())
        await tb.start()
        clients: list[PeerTransport] = []
        replaced = asyncio.Semaphore(0)
        try:
            for _ in range(5):
                client = PeerTransport("node-a", config(), Handler(), on_peer_down=lambda _p: replaced.release())
                await client.start()
                clients.append(client)
                await client.connect("node-b", "127.0.0.1", tb.port)
            for _ in range(3):  # the three oldest were told Bye
                await asyncio.wait_for(replaced.acquire(), 5)
            assert [c.session("node-b") is not None for c in clients] == [False] * 3 + [True] * 2
            assert len([s for s in tb._all if s.peer_id == "node-a"]) == 2
            assert tb.counters["sessions_replaced"] == 3
            newest = tb.session("node-a")
            assert newest is not None and await newest.request("echo", {}) == {"from": "node-b"}
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "closing the oldest" in r.message]
            assert len(warnings) == 1
        finally:
            for client in clients:
                await client.close()
            await tb.close()

    run(body)


# -- receive memory: blobs in flight from one peer --------------------------------------------


def test_blobs_arriving_from_one_peer_are_capped_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One fetch holds its 1 MB (every frame in, the digest check not done); a second 1 MB
    blob would pass the 1.5 MB cap, so it fails BUSY at once; once the first is done, it fits."""
    from kvpeer.transport import session as session_module

    checking = asyncio.Event()
    release = asyncio.Event()
    real_off_loop = session_module._off_loop

    async def held_off_loop(work: Callable[[], Any], size: int) -> Any:
        if getattr(work, "__name__", "") == "result" and not release.is_set():  # the digest check
            checking.set()
            await release.wait()
        return await real_off_loop(work, size)

    monkeypatch.setattr(session_module, "_off_loop", held_off_loop)

    async def body() -> None:
        hb = Handler()
        hb.blobs = {b"one": b"1" * 1_000_000, b"two": b"2" * 1_000_000}
        caps = {"max_blob_bytes": 1_000_000, "max_incoming_blob_bytes": 1_500_000}
        async with pair(hb, a=caps, request_timeout_s=TIMEOUT_S) as (session, _served):
            first = asyncio.create_task(session.fetch_blob(b"one", ""))
            await asyncio.wait_for(checking.wait(), PROMPT_S)
            error, took = await _outcome(session.fetch_blob(b"two", ""))
            assert error.code == ErrorCode.BUSY and took < PROMPT_S
            assert session.protocol_errors == 0  # our limit, not the peer's fault
            release.set()
            assert await first == hb.blobs[b"one"]
            assert await session.fetch_blob(b"two", "") == hb.blobs[b"two"]
            assert session._incoming_bytes == 0

    run(body)


def test_the_incoming_blob_cap_defaults_to_1_gib_and_holds_one_blob_at_least() -> None:
    assert config().incoming_blob_budget == 1 << 30
    assert config(max_blob_bytes=3 << 30).incoming_blob_budget == 3 << 30
    assert config(max_incoming_blob_bytes=10**9).incoming_blob_budget == 10**9
    with pytest.raises(ConfigError, match="max_incoming_blob_bytes"):
        config(max_blob_bytes=1000, max_incoming_blob_bytes=999)


# -- serving failures are answered, not left to the requester's timeout ----------------------


class _Failing(Handler):
    """Fails the way a handler's inner calls do: a timeout, a transport error, a future that
    someone else cancelled; or returns a body msgpack cannot pack."""

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        await self._fail(key.decode())
        return b"never"

    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "set":
            return {"ranks": {1, 2}}
        if method == "huge":
            return {"n": 2**64}
        await self._fail(method)
        return {}

    async def _fail(self, how: str) -> None:
        if how == "timeout":
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        if how == "transport":
            raise TransportError("an inner transport call failed")
        if how == "cancelled":
            shared = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, shared.cancel)
            await asyncio.shield(shared)


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("timeout", ErrorCode.INTERNAL),
        ("transport", ErrorCode.INTERNAL),
        # Shared work cancelled under the request (a stopping daemon's transcodes): no ERROR.
        ("cancelled", ErrorCode.SHUTTING_DOWN),
    ],
)
def test_a_blob_the_handler_fails_to_open_is_answered_at_once(
    how: str, code: ErrorCode, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with pair(_Failing(), request_timeout_s=TIMEOUT_S) as (session, _served):
            error, took = await _outcome(session.fetch_blob(how.encode(), ""))
            assert error.code == code and took < PROMPT_S  # was TIMEOUT_S, no answer

    with caplog.at_level(logging.INFO, logger="kvpeer"):
        run(body)
    assert bool([r for r in caplog.records if r.levelno >= logging.ERROR]) == (code == ErrorCode.INTERNAL)


@pytest.mark.parametrize("method", ["cancelled", "set", "huge"])
def test_a_request_the_handler_fails_is_answered_at_once(method: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with pair(_Failing(), request_timeout_s=TIMEOUT_S) as (session, _served):
            error, took = await _outcome(session.request(method, {}))
            assert took < PROMPT_S  # was TIMEOUT_S: no answer
            assert error.code in (ErrorCode.INTERNAL, ErrorCode.INVALID), error
            assert "session task failed" not in caplog.text

    run(body)



def test_a_blob_whose_frames_stop_midway_is_failed_at_once_for_the_requester() -> None:
    """Serving stopped after the first frames (our send buffer stayed full past the request
    timeout): the requester was not told and waited out its own whole timeout."""

    async def body() -> None:
        served_handler = Handler()
        served_handler.blobs[b"k"] = b"x" * 600_000  # several frames
        async with pair(served_handler, request_timeout_s=TIMEOUT_S) as (session, served):
            frames = [0]

            def stalls_after_one(channel: Any) -> Callable[..., Any]:
                real = channel.send

                async def send(data: bytes, limit_s: float) -> None:
                    frames[0] += 1
                    if frames[0] > 1:
                        raise TransportError("peer stopped reading (send buffer stayed full)")
                    await real(data, limit_s)

                return send

            for channel in served._bulk:
                channel.send = stalls_after_one(channel)  # type: ignore[method-assign]
            error, took = await _outcome(session.fetch_blob(b"k", "", timeout=3 * TIMEOUT_S))
            # Not BUSY (asked again, the same): the link to this peer is the trouble.
            assert error.code == ErrorCode.TIMEOUT and took < PROMPT_S, (error, took)

    run(body)


def test_closing_a_session_another_path_ended_first_does_not_raise() -> None:
    """The peer said Bye and our ByeAck could not drain; the session then ended another way
    (the peer closed its connection): close() raised CancelledError into a caller nobody
    cancelled."""

    async def body() -> None:
        async with pair(a={"close_timeout_s": 0.3}, b={"close_timeout_s": 3.0}) as (a, b):
            stall_sending(b)  # its ByeAck stays in the buffer
            closing_a = asyncio.create_task(a.close())
            while b._ending is None:  # noqa: ASYNC110 (no event marks the Bye's arrival)
                await asyncio.sleep(0.01)
            await asyncio.wait_for(b.close(), 10)  # returns, does not raise
            assert b.closed
            await closing_a

    run(body)
