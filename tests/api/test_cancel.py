"""Cancelling a fetch: a client that gives up on one (releases its handle early, or times out)
has the daemon stop it, free its segment and its in-flight slot; a daemon that predates cancel
finishes the fetch and the client releases what it names."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import pytest

from kvpeer.api import messages as m
from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ApiError, ErrorCode
from tests.api.fakes import (
    CHUNK,
    FP,
    ScriptedDaemon,
    ServerThread,
    kv,
    send,
    small_segment,
    wait_until,
)
from tests.api.test_client_faults import AnswersLate

TOKENS = list(range(3 * CHUNK))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def stalled(api: ServerThread) -> None:
    """Store TOKENS; fetches of them then restore chunk 0 and wait (a slow peer)."""
    with KVPeerClient(api.socket_path) as client:
        client.put(TOKENS, *kv(len(TOKENS)), FP)
    api.backend.stall_after = 1


def idle(api: ServerThread) -> bool:
    """The daemon holds no segment and runs no request for any client."""
    conns = list(api.server._connections.values())
    return len(api.server.registry) == 0 and not any(c.tasks or c.fetches for c in conns)


class RawClient:
    """Frames in and out on a plain socket; descriptors that come along are closed."""

    def __init__(self, path: object) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.decoder = m.FrameDecoder()
        self.inbox: list[m.Message] = []

    def send(self, *messages: m.Message) -> None:
        self.sock.sendall(b"".join(m.encode(message) for message in messages))

    def until(self, kind: type[m.Message], rid: int) -> list[m.Message]:
        """Read until an answer of ``kind`` to ``rid`` came; returns everything read so far."""
        while not any(isinstance(a, kind) and a.id == rid for a in self.inbox):
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 8)
            for fd in fds:
                os.close(fd)
            assert data, "the daemon closed the connection"
            self.decoder.feed(data)
            for frame in self.decoder.frames():
                assert isinstance(frame, bytes)
                self.inbox.append(m.decode_body(frame))
        return self.inbox

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("when", ["after its first chunk", "in the same write"])
def test_a_cancelled_fetch_ends_with_an_answer_and_frees_its_segment_and_slot(api: ServerThread, when: str) -> None:
    stalled(api)
    raw = RawClient(api.socket_path)
    try:
        fetch = m.FetchRequest(id=2, tokens=TOKENS, fingerprint=FP)
        cancel = m.Cancel(id=3, fetch=2)
        if when == "in the same write":  # the daemon may cancel it before it ever ran
            raw.send(m.Hello(id=1), fetch, cancel)
        else:
            raw.send(m.Hello(id=1), fetch)
            raw.until(m.FetchProgress, 2)
            raw.send(cancel)
        raw.until(m.Cancelled, 3)
        answers = list(raw.until(m.ErrorResponse, 2))
        assert [a for a in answers if a.id == 2][-1] == m.ErrorResponse(
            id=2, code=int(ErrorCode.TIMEOUT), reason="cancelled by the client"
        )
        wait_until(lambda: idle(api))
        assert api.server.stats()["fetches_cancelled"] == 1
        # Nothing to stop any more: answered all the same, and nothing else comes.
        raw.send(m.Cancel(id=4, fetch=2), m.StatsRequest(id=5))
        late = raw.until(m.StatsResult, 5)[len(answers):]
        assert [type(a) for a in late] == [m.Cancelled, m.StatsResult]
    finally:
        raw.close()
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)


def test_async_fetches_given_up_on_leave_the_connection_usable(api: ServerThread) -> None:
    """Each fetch given up on held an in-flight slot and its segment until it ended: after
    max_inflight of them every request on the connection got BUSY."""
    stalled(api)

    async def main() -> None:
        async with AsyncKVPeerClient(api.socket_path, timeout_s=5) as client:
            for _ in range(api.server.max_inflight + 1):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        async with client.fetch(TOKENS, FP):
                            pass
            await asyncio.to_thread(wait_until, lambda: idle(api))
            assert (await client.stats())["api"]["fetches_cancelled"] == api.server.max_inflight + 1
            assert (await client.lookup(TOKENS, FP)).matched_tokens == len(TOKENS)
            assert client._abandoned == set()  # every fetch and cancel was answered
            assert len(client._descriptors) == 0

    try:
        run(main())
    finally:
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)


def test_releasing_a_running_fetch_cancels_it_instead_of_waiting_for_it(api: ServerThread) -> None:
    stalled(api)
    try:
        with KVPeerClient(api.socket_path, timeout_s=30) as client:
            started = time.monotonic()
            with client.fetch(TOKENS, FP) as result:
                assert result.wait_for_chunk(0)
            assert time.monotonic() - started < 10  # not the fetch's end (never) nor timeout_s
            wait_until(lambda: idle(api))
            assert client.lookup(TOKENS, FP).matched_tokens == len(TOKENS)
            assert client.stats()["api"]["fetches_cancelled"] == 1
            assert client._abandoned == set()

        async def main() -> None:
            async with AsyncKVPeerClient(api.socket_path, timeout_s=30) as client:
                async with client.fetch(TOKENS, FP, stream=True) as result:
                    assert await result.wait_for_chunk(0)
                await asyncio.to_thread(wait_until, lambda: idle(api))
                assert (await client.stats())["api"]["fetches_cancelled"] == 2
                assert client._abandoned == set()

        run(main())
    finally:
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)


class PredatesCancel(AnswersLate):
    """A daemon older than cancel: it answers it UNKNOWN_TYPE, and finishes the fetch."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.Cancel):
            send(conn, m.ErrorResponse(id=message.id, code=int(ErrorCode.UNKNOWN_TYPE),
                                       reason="unknown message type 'cancel'"))
        else:
            super().handle(conn, index, message)


def test_a_daemon_that_predates_cancel_finishes_the_fetch_and_its_segment_is_released() -> None:
    with PredatesCancel() as daemon, KVPeerClient(daemon.socket_path, timeout_s=0.3) as client:
        with pytest.raises(ApiError) as info:
            with client.fetch(list(range(4)), FP) as result:
                result.wait()
        assert info.value.code == ErrorCode.TIMEOUT
        daemon.go.set()
        client.timeout_s = 10
        assert client.lookup([1, 2, 3], FP).matched_tokens == 0
        assert [r.segment for r in daemon.wait_for(m.Release)] == [daemon.segment]
        assert client.lookup([1, 2, 3], FP).matched_tokens == 0
        assert client._abandoned == set() and len(client._descriptors) == 0


def test_async_a_daemon_that_predates_cancel_finishes_the_fetch_and_its_segment_is_released() -> None:
    async def main() -> None:
        with PredatesCancel() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=0.3) as client:
                with pytest.raises(ApiError) as info:
                    async with client.fetch(list(range(4)), FP):
                        pass
                assert info.value.code == ErrorCode.TIMEOUT
                daemon.go.set()
                releases = await asyncio.to_thread(daemon.wait_for, m.Release)
                assert [r.segment for r in releases] == [daemon.segment]
                client.timeout_s = 10
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 0
                assert client._abandoned == set() and len(client._descriptors) == 0

    run(main())


def test_a_fetch_released_as_its_final_answer_crosses_the_cancel_frees_its_segment_at_once(
    api: ServerThread,
) -> None:
    """vLLM's loads take every chunk (wait_for_chunk) and release before the final answer was
    read: the cancel found nothing to stop, and the segment that answer named stayed with the
    daemon until the connection's next call (or its lease's end), one per idle connection."""
    with KVPeerClient(api.socket_path) as client:
        client.put(TOKENS, *kv(len(TOKENS)), FP)
        for _ in range(3):
            with client.fetch(TOKENS, FP, deadline_s=5.0) as result:
                for chunk in range(3):
                    assert result.wait_for_chunk(chunk)
                    result.chunk(chunk)
            wait_until(lambda: idle(api), timeout_s=5.0)  # no further call on this connection
        assert client.lookup(TOKENS, FP).matched_tokens == len(TOKENS)  # and it goes on


class CancelsWithoutAnEnd(ScriptedDaemon):
    """Starts a fetch (a segment, chunk 0) and answers its cancel, but never the fetch itself."""

    def __init__(self) -> None:
        super().__init__()
        self.handed = small_segment(8)

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.FetchRequest):
            send(conn, m.FetchStarted(id=message.id, segment=self.handed.name, size=1 << 12), self.handed)
            send(conn, m.FetchProgress(id=message.id, index=0, level="exact"))
        elif isinstance(message, m.Cancel):
            send(conn, m.Cancelled(id=message.id))
        else:
            super().handle(conn, index, message)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.handed.unlink()
        self.handed.close()


def test_a_release_reads_for_the_cancelled_fetchs_answer_a_bounded_time_then_drops_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release's read for the final answer was bounded per read, by timeout_s: a daemon
    that never ended the fetch held the engine one timeout_s per release (a vLLM forward pass)."""
    from kvpeer.api import client as client_mod

    monkeypatch.setattr(client_mod, "RELEASE_WAIT_S", 0.2)
    with CancelsWithoutAnEnd() as daemon, KVPeerClient(daemon.socket_path, timeout_s=30) as client:
        with client.fetch(TOKENS, FP) as result:
            assert result.wait_for_chunk(0)
        assert not client.connected  # given up on after RELEASE_WAIT_S, not 30 s: the daemon
        daemon.wait_for(m.Cancel)  # frees a dropped connection's fetch


def test_a_second_fetch_under_an_id_in_flight_is_refused_and_the_first_goes_on(api: ServerThread) -> None:
    """Both were taken: a cancel could not tell them apart, and the client got an error and a
    result under the one id."""
    stalled(api)
    raw = RawClient(api.socket_path)
    try:
        raw.send(m.Hello(id=1), m.FetchRequest(id=2, tokens=TOKENS, fingerprint=FP))
        raw.until(m.FetchProgress, 2)
        raw.send(m.FetchRequest(id=2, tokens=TOKENS, fingerprint=FP))
        refused = [a for a in raw.until(m.ErrorResponse, 2) if isinstance(a, m.ErrorResponse)]
        assert refused[0].code == int(ErrorCode.INVALID) and "in flight" in refused[0].reason
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)
        answers = raw.until(m.FetchResult, 2)
        assert sum(isinstance(a, m.FetchResult) for a in answers) == 1
        assert len([a for a in answers if isinstance(a, m.ErrorResponse)]) == 1
    finally:
        raw.close()
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)


def test_a_stopping_daemon_says_so_to_the_calls_waiting(api: ServerThread) -> None:
    """It closed its connections bare: a client could not tell a stop from a dropped connection."""
    stalled(api)

    async def main() -> ApiError:
        async with AsyncKVPeerClient(api.socket_path, timeout_s=10) as client:
            async def fetch() -> None:
                async with client.fetch(TOKENS, FP):
                    pass

            waiting = asyncio.create_task(fetch())
            await asyncio.to_thread(wait_until, lambda: any(c.fetches for c in api.server._connections.values()))
            await asyncio.to_thread(api.call, api.server.close())
            with pytest.raises(ApiError) as info:
                await waiting
            return info.value

    try:
        error = run(main())
    finally:
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)
    assert error.code == ErrorCode.SHUTTING_DOWN and "the daemon is stopping" in error.reason
