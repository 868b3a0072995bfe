"""The clients against a daemon that fails: a lost connection, a stalled socket, answers that
come late or race the client (a scripted fake daemon does what a real one only does by fault)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kvpeer import shm
from kvpeer.api import client as client_mod
from kvpeer.api import messages as m
from kvpeer.api import unix
from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ApiError, ErrorCode
from tests.api.fakes import FP, ScriptedDaemon, kv, send, small_segment

BIG = list(range(1 << 20))  # a 4 MB request: more than a stalled socket's buffers take


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


class LookupDaemon(ScriptedDaemon):
    """Answers lookups (matched_tokens = the connection's number, so a test sees which one)."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.LookupRequest):
            send(conn, m.LookupResult(id=message.id, matched_tokens=index, chunk_tokens=4, sources=[]))
        else:
            super().handle(conn, index, message)


class DiesWithTheRequestUnread(LookupDaemon):
    """Connection 0 closes once a request is waiting in it, unread (the client sees a reset)."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        super().handle(conn, index, message)
        if index == 0 and isinstance(message, m.Hello):
            conn.recv(1, socket.MSG_PEEK)
            conn.close()


class NeverAnswersOnTheFirst(LookupDaemon):
    """Connection 0 reads requests and never answers them."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if index > 0 or isinstance(message, m.Hello):
            super().handle(conn, index, message)


class StopsReading(LookupDaemon):
    """Connection 0 stops reading after the hello until ``resume`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        super().handle(conn, index, message)
        if index == 0 and isinstance(message, m.Hello):
            self.resume.wait(30)

    def __exit__(self, *exc: object) -> None:
        self.resume.set()
        super().__exit__(*exc)


# --------------------------------------------------------------------------- lost connection


def test_a_connection_the_daemon_closed_while_idle_sends_the_next_call_on_a_new_one() -> None:
    """The daemon restarted, or closed a connection that said nothing for 10 s (its first-frame
    timeout): the request never reached it, so it is sent again, not failed (it was, once)."""
    with LookupDaemon() as daemon, KVPeerClient(daemon.socket_path, timeout_s=10) as client:
        daemon.drop(0)  # restarted while the client was idle
        assert client.lookup([1, 2, 3], FP).matched_tokens == 1  # answered on connection 1
        assert client.connected


def test_a_daemon_that_dies_with_the_request_unread_is_an_api_error() -> None:
    with DiesWithTheRequestUnread() as daemon, KVPeerClient(daemon.socket_path, timeout_s=10) as client:
        with pytest.raises(ApiError) as info:
            client.lookup([1, 2, 3], FP)
        # SHUTTING_DOWN as the engine integrations expect of a daemon gone; the text says what
        # is known (it was 'daemon connection lost: [Errno 104] ...').
        assert info.value.code == ErrorCode.SHUTTING_DOWN
        assert info.value.reason.startswith(client_mod.CLOSED_BY_DAEMON)
        assert not client.connected
        assert client.lookup([1, 2, 3], FP).matched_tokens == 1


class RefusesAndCloses(ScriptedDaemon):
    """Refuses every connection as the daemon past its connection caps does (an error tied to
    no request, then close), before the client sends a byte: ``closed`` is set once it did."""

    REFUSAL = "the daemon serves 1 connections at most: try again later"

    def __init__(self) -> None:
        self.closed = threading.Event()
        super().__init__()

    def _serve(self, conn: socket.socket, index: int) -> None:
        send(conn, m.ErrorResponse(code=ErrorCode.BUSY, reason=self.REFUSAL))
        conn.close()
        self.closed.set()


def test_a_refusal_the_hello_meets_as_a_closed_connection_is_reported_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hello's send met the daemon's closed end (EPIPE) with its refusal unread: the client
    said 'SHUTTING_DOWN: daemon connection lost: [Errno 32] Broken pipe' of a daemon that is up."""
    with RefusesAndCloses() as daemon:
        connect = unix.connect_blocking

        def connect_then_refused(sock: socket.socket, path: str, timeout_s: float) -> None:
            connect(sock, path, timeout_s)
            assert daemon.closed.wait(10)  # the refusal came and the daemon closed: then the hello

        monkeypatch.setattr(unix, "connect_blocking", connect_then_refused)
        with pytest.raises(ApiError) as info:
            KVPeerClient(daemon.socket_path, timeout_s=10)
        assert (info.value.code, info.value.reason) == (ErrorCode.BUSY, daemon.REFUSAL)


def test_async_a_refusal_the_hello_meets_as_a_closed_connection_is_reported_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        with RefusesAndCloses() as daemon:
            connect = unix._connect

            async def connect_then_refused(sock: socket.socket, path: str, timeout_s: float) -> None:
                await connect(sock, path, timeout_s)
                assert await asyncio.to_thread(daemon.closed.wait, 10)

            monkeypatch.setattr(unix, "_connect", connect_then_refused)
            client = AsyncKVPeerClient(daemon.socket_path, timeout_s=10)
            try:
                with pytest.raises(ApiError) as info:
                    await client.connect()
                assert (info.value.code, info.value.reason) == (ErrorCode.BUSY, daemon.REFUSAL)
            finally:
                await client.close()

    run(main())


def test_a_send_that_times_out_drops_the_half_sent_frame_with_its_connection() -> None:
    with StopsReading() as daemon, KVPeerClient(daemon.socket_path, timeout_s=0.5) as client:
        with pytest.raises(ApiError) as info:
            client.lookup(BIG, FP)
        assert info.value.code == ErrorCode.TIMEOUT
        assert "connection lost" in info.value.reason
        assert not client.connected
        daemon.resume.set()
        assert client.lookup([1, 2, 3], FP).matched_tokens == 1  # a fresh connection, whole frames
        assert daemon.received(m.LookupRequest) == [daemon.wait_for(m.LookupRequest)[0]]


def test_a_connect_that_fails_on_a_later_call_is_an_api_error() -> None:
    with LookupDaemon() as daemon:
        client = KVPeerClient(daemon.socket_path, timeout_s=10)
    with client:  # the daemon is gone: nothing listens on the socket any more
        with pytest.raises(ApiError) as info:
            client.lookup([1, 2, 3], FP)
        assert info.value.code == ErrorCode.SHUTTING_DOWN
        with pytest.raises(ApiError) as info:
            client.lookup([1, 2, 3], FP)
        assert "cannot reach the daemon" in info.value.reason


def test_a_closed_client_stays_closed() -> None:
    with LookupDaemon() as daemon:
        client = KVPeerClient(daemon.socket_path, timeout_s=10)
        client.close()
        with pytest.raises(ApiError) as info:
            client.lookup([1, 2, 3], FP)
        assert info.value.reason == "the client is closed"
        assert len(daemon.received(m.Hello)) == 1


def test_async_send_that_times_out_is_an_api_error_and_closes_the_connection() -> None:
    async def main() -> None:
        with StopsReading() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=0.5) as client:
                with pytest.raises(ApiError) as info:
                    await client.lookup(BIG, FP)
                assert info.value.code == ErrorCode.TIMEOUT and "connection lost" in info.value.reason
                assert not client.connected
                daemon.resume.set()
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 1  # a fresh connection
                assert len(daemon.received(m.LookupRequest)) == 1  # the half-sent frame went nowhere

    run(main())


async def _until_disconnected(client: AsyncKVPeerClient) -> None:
    while client.connected:  # noqa: ASYNC110 - no hook: the reader sees the EOF
        await asyncio.sleep(0.01)


def test_async_client_reconnects_after_the_daemon_went_away_while_idle() -> None:
    async def main() -> None:
        with LookupDaemon() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=10) as client:
                daemon.drop(0)  # restarted while the client was idle
                await aio_wait(_until_disconnected(client))
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 1  # on connection 1
                assert client.connected

    run(main())


def test_async_requests_in_flight_on_a_lost_connection_fail_and_the_next_ones_share_one_reconnect() -> None:
    async def main() -> None:
        with NeverAnswersOnTheFirst() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=10) as client:
                waiting = asyncio.create_task(client.lookup([1, 2, 3], FP))
                await asyncio.to_thread(daemon.wait_for, m.LookupRequest)
                daemon.drop(0)
                with pytest.raises(ApiError) as info:
                    await waiting
                assert info.value.code == ErrorCode.SHUTTING_DOWN
                answers = await asyncio.gather(*(client.lookup([1, 2, 3], FP) for _ in range(3)))
                assert [a.matched_tokens for a in answers] == [1, 1, 1]
                assert len(daemon.received(m.Hello)) == 2  # one reconnect for the three

    run(main())


def test_async_client_that_cannot_reach_the_daemon_says_so_and_is_not_closed_for_good() -> None:
    async def main() -> None:
        with LookupDaemon() as daemon:
            client = await AsyncKVPeerClient(daemon.socket_path, timeout_s=10).connect()
        try:  # the daemon is gone: nothing listens on the socket any more
            await aio_wait(_until_disconnected(client))
            for _ in range(2):  # every call tries again
                with pytest.raises(ApiError) as info:
                    await client.lookup([1, 2, 3], FP)
                assert info.value.code == ErrorCode.SHUTTING_DOWN
                assert "cannot reach the daemon" in info.value.reason
        finally:
            await client.close()

    run(main())


def test_async_client_whose_connect_failed_connects_when_the_daemon_is_up() -> None:
    """An engine that started before its daemon: connect() failed once and closed the client
    for good, with a bare FileNotFoundError."""

    async def main() -> None:
        with LookupDaemon() as daemon:
            path = daemon.socket_path
        client = AsyncKVPeerClient(path, timeout_s=10)
        try:
            with pytest.raises(ApiError) as info:
                await client.connect()
            assert info.value.code == ErrorCode.SHUTTING_DOWN and "cannot reach the daemon" in info.value.reason
            with LookupDaemon() as daemon:
                client.socket_path = str(daemon.socket_path)
                assert (await client.connect()) is client
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 0
        finally:
            await client.close()

    run(main())


def test_async_closed_client_stays_closed() -> None:
    async def main() -> None:
        with LookupDaemon() as daemon:
            client = await AsyncKVPeerClient(daemon.socket_path, timeout_s=10).connect()
            await client.close()
            with pytest.raises(ApiError) as info:
                await client.lookup([1, 2, 3], FP)
            assert info.value.code == ErrorCode.SHUTTING_DOWN
            assert len(daemon.received(m.Hello)) == 1

    run(main())


def aio_wait(coro: Any) -> Any:
    return asyncio.wait_for(coro, 10)


# --------------------------------------------------------------------------- a full listen backlog


@contextlib.contextmanager
def full_backlog(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A socket that accepts nothing yet, its listen backlog filled (the daemon amid a burst
    of connects); the test accepts from the listener when it wants room."""
    path = str(tmp_path / "api.sock")
    queued: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(0)
        try:
            for _ in range(64):
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                queued.append(filler)
                filler.setblocking(False)
                try:
                    filler.connect(path)
                except BlockingIOError:
                    break
            else:
                raise AssertionError("the listen backlog never filled")
            yield path, listener
        finally:
            for filler in queued:
                filler.close()


def _accept_one_later(listener: socket.socket, accepted: list[socket.socket]) -> threading.Timer:
    """The daemon takes a queued connection 0.2 s from now: room in the backlog again."""
    timer = threading.Timer(0.2, lambda: accepted.append(listener.accept()[0]))
    timer.start()
    return timer


def test_a_connect_to_a_full_listen_backlog_is_busy_not_a_raw_blocking_io_error(tmp_path: Path) -> None:
    """More than ~100 clients connecting at once: each past the backlog raised
    BlockingIOError [Errno 11] (a Unix socket's connect with a timeout does not queue)."""
    with full_backlog(tmp_path) as (path, _):
        with pytest.raises(ApiError) as info:
            KVPeerClient(path, timeout_s=0.3)
        assert info.value.code == ErrorCode.BUSY and "listen backlog" in info.value.reason


def test_a_connect_to_a_full_listen_backlog_tries_again_within_the_timeout(tmp_path: Path) -> None:
    accepted: list[socket.socket] = []
    with full_backlog(tmp_path) as (path, listener):
        timer = _accept_one_later(listener, accepted)
        try:
            with KVPeerClient(path, namespace=None, timeout_s=10) as client:
                assert client.connected
                timer.join()
                listener.settimeout(10)
                accepted.append(listener.accept()[0])  # the client's, queued once there was room
        finally:
            timer.join()
            for conn in accepted:
                conn.close()


def test_async_connect_to_a_full_listen_backlog_is_busy_not_a_connection_never_made(tmp_path: Path) -> None:
    """asyncio's sock_connect took the EAGAIN for a connect in progress and the unconnected
    socket's writability for success: the hello then failed with ENOTCONN."""

    async def main() -> None:
        with full_backlog(tmp_path) as (path, _):
            client = AsyncKVPeerClient(path, timeout_s=0.3)
            try:
                with pytest.raises(ApiError) as info:
                    await client.connect()
                assert info.value.code == ErrorCode.BUSY and "listen backlog" in info.value.reason
            finally:
                await client.close()

    run(main())


def test_async_connect_to_a_full_listen_backlog_tries_again_within_the_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        accepted: list[socket.socket] = []
        with full_backlog(tmp_path) as (path, listener):
            timer = _accept_one_later(listener, accepted)
            client = AsyncKVPeerClient(path, namespace=None, timeout_s=10)
            try:
                await client.connect()
                assert client.connected
                await asyncio.to_thread(timer.join)
                listener.settimeout(10)
                accepted.append((await asyncio.to_thread(listener.accept))[0])  # a connection made
            finally:
                await client.close()
                await asyncio.to_thread(timer.join)
                for conn in accepted:
                    conn.close()

    run(main())


# --------------------------------------------------------------------------- closing


class NeverAnswers(ScriptedDaemon):
    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.Hello | m.Release):
            super().handle(conn, index, message)


def test_async_close_tells_waiters_the_client_was_closed() -> None:
    async def main() -> None:
        with NeverAnswers() as daemon:
            client = await AsyncKVPeerClient(daemon.socket_path, timeout_s=30).connect()
            waiting = asyncio.create_task(client.lookup([1, 2, 3], FP))
            await asyncio.to_thread(daemon.wait_for, m.LookupRequest)
            await client.close()
            with pytest.raises(ApiError) as info:
                await waiting
            assert (info.value.code, info.value.reason) == (ErrorCode.SHUTTING_DOWN, "the client was closed")
            with pytest.raises(ApiError) as info:
                await client.stats()
            assert info.value.reason == "the client was closed"

    run(main())


# --------------------------------------------------------------------------- async fetch


class FetchDaemon(ScriptedDaemon):
    """Answers a fetch with the messages ``answer`` makes of its id; a FetchStarted comes with
    the descriptor of ``segment``, as the daemon sends it."""

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer
        self.segment = small_segment(8)

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.FetchRequest):
            for reply in self.answer(message.id):
                send(conn, reply, self.segment if isinstance(reply, m.FetchStarted) else None)
        else:
            super().handle(conn, index, message)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.segment.unlink()
        self.segment.close()


@pytest.mark.parametrize("final", ["nothing restored", "error"])
def test_async_fetch_gives_the_final_answer_when_the_announced_segment_is_dropped(final: str) -> None:
    def answer(rid: int) -> list[m.Message]:  # announced, then dropped by the daemon
        last: m.Message = m.FetchResult(id=rid, chunk_tokens=4)
        if final == "error":
            last = m.ErrorResponse(id=rid, code=int(ErrorCode.INTEGRITY), reason="chunk 0 was corrupt")
        return [m.FetchStarted(id=rid, segment=daemon.segment.name, size=daemon.segment.layout.size), last]

    async def main() -> None:
        with FetchDaemon(answer) as fake:
            nonlocal daemon
            daemon = fake
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=10) as client:
                if final == "error":
                    with pytest.raises(ApiError) as info:
                        async with client.fetch(list(range(8)), FP):
                            pass
                    assert info.value.code == ErrorCode.INTEGRITY
                else:
                    async with client.fetch(list(range(8)), FP) as result:
                        assert result.matched_tokens == 0 and result.k.shape[2] == 0
                assert daemon.received(m.Release) == []  # the daemon dropped it: nothing to release
                assert len(client._descriptors) == 0  # and its descriptor is closed

    daemon: Any = None
    run(main())


def test_async_fetch_cancelled_while_its_segment_maps_still_releases_it(monkeypatch: pytest.MonkeyPatch) -> None:
    mapping, may_finish = threading.Event(), threading.Event()
    map_descriptor = client_mod._map_descriptor

    def slow_map(name: str, fd: int) -> shm.Segment:  # a large segment's page tables take a while
        mapping.set()
        may_finish.wait(10)
        return map_descriptor(name, fd)

    monkeypatch.setattr(client_mod, "_map_descriptor", slow_map)

    def answer(rid: int) -> list[m.Message]:
        size = daemon.segment.layout.size
        return [m.FetchStarted(id=rid, segment=daemon.segment.name, size=size),
                m.FetchResult(id=rid, segment=daemon.segment.name, matched_tokens=8, chunk_tokens=4,
                              levels=["exact", "exact"], recompute_from=8)]

    async def fetch(client: AsyncKVPeerClient) -> None:
        async with client.fetch(list(range(8)), FP):
            pass

    async def main() -> None:
        with FetchDaemon(answer) as fake:
            nonlocal daemon
            daemon = fake
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=2) as client:
                task = asyncio.create_task(fetch(client))
                await asyncio.to_thread(mapping.wait, 10)
                task.cancel()  # e.g. the engine's own timeout, while the answer's segment maps
                may_finish.set()
                with pytest.raises(asyncio.CancelledError):
                    await task
                releases = await asyncio.to_thread(daemon.wait_for, m.Release)
                assert [r.segment for r in releases] == [daemon.segment.name]

    daemon: Any = None
    run(main())


# --------------------------------------------------------------------------- late answers


class AnswersLate(ScriptedDaemon):
    """Holds back its answer to a put or fetch until ``go`` is set; lookups are answered at once.

    The put's answer is a segment to fill, the fetch's a restored segment: both the client's to
    release, even when it gave up waiting for them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.handed = small_segment()
        self.segment = self.handed.name

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.PutRequest | m.FetchRequest):
            self.go.wait(30)
        if isinstance(message, m.PutRequest):
            send(conn, m.SegmentReady(id=message.id, segment=self.segment, size=1 << 12), self.handed)
        elif isinstance(message, m.FetchRequest):
            send(conn, m.FetchStarted(id=message.id, segment=self.segment, size=1 << 12), self.handed)
            send(conn, m.FetchResult(id=message.id, segment=self.segment, matched_tokens=4,
                                     chunk_tokens=4, levels=["exact"], recompute_from=4))
        elif isinstance(message, m.LookupRequest):
            send(conn, m.LookupResult(id=message.id, matched_tokens=0, chunk_tokens=4, sources=[]))
        else:
            super().handle(conn, index, message)

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        super().__exit__(*exc)
        self.handed.unlink()
        self.handed.close()


@pytest.mark.parametrize("request_kind", ["put", "fetch"])
def test_a_segment_that_comes_after_the_client_gave_up_is_released(request_kind: str) -> None:
    with AnswersLate() as daemon, KVPeerClient(daemon.socket_path, timeout_s=0.3) as client:
        with pytest.raises(ApiError) as info:
            if request_kind == "put":
                client.put(list(range(4)), *kv(4), FP)
            else:
                with client.fetch(list(range(4)), FP) as result:
                    result.wait()
        assert info.value.code == ErrorCode.TIMEOUT
        daemon.go.set()
        client.timeout_s = 10
        client.lookup([1, 2, 3], FP)  # the blocking client reads the late answer on its next call
        assert [r.segment for r in daemon.wait_for(m.Release)] == [daemon.segment]
        assert client.lookup([1, 2, 3], FP).matched_tokens == 0  # the Released answer was dropped
        assert len(client._descriptors) == 0  # the late answer's descriptor was closed


@pytest.mark.parametrize("request_kind", ["put", "fetch"])
@pytest.mark.parametrize("give_up", ["timeout", "cancel"])
def test_async_a_segment_that_comes_after_the_client_gave_up_is_released(request_kind: str, give_up: str) -> None:
    async def ask(client: AsyncKVPeerClient) -> None:
        if request_kind == "put":
            await client.put(list(range(4)), *kv(4), FP)
        else:
            async with client.fetch(list(range(4)), FP):
                pass

    async def main() -> None:
        with AnswersLate() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=0.3 if give_up == "timeout" else 30) as client:
                task = asyncio.create_task(ask(client))
                if give_up == "timeout":
                    with pytest.raises(ApiError) as info:
                        await task
                    assert info.value.code == ErrorCode.TIMEOUT
                else:
                    await asyncio.to_thread(daemon.wait_for, m.PutRequest if request_kind == "put" else m.FetchRequest)
                    task.cancel()
                    async with asyncio.timeout(5):  # not timeout_s: a cancelled caller does not wait
                        with pytest.raises(asyncio.CancelledError):
                            await task
                daemon.go.set()
                releases = await asyncio.to_thread(daemon.wait_for, m.Release)
                assert [r.segment for r in releases] == [daemon.segment]
                client.timeout_s = 10
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 0
                assert len(client._descriptors) == 0  # the late answer's descriptor was closed

    run(main())


class AnswersAtOnce(ScriptedDaemon):
    """Answers a fetch at once, naming a segment for the client to release."""

    def __init__(self) -> None:
        super().__init__()
        self.handed = small_segment()
        self.segment = self.handed.name

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.handed.unlink()
        self.handed.close()

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.FetchRequest):
            send(conn, m.FetchStarted(id=message.id, segment=self.segment, size=1 << 12), self.handed)
            send(conn, m.FetchResult(id=message.id, segment=self.segment, matched_tokens=4,
                                     chunk_tokens=4, levels=["exact"], recompute_from=4))
        else:
            super().handle(conn, index, message)


def test_async_fetch_cancelled_while_its_request_drains_releases_the_answers_segment() -> None:
    """The request was written, the caller cancelled in drain(): the daemon still answers, and
    the segment it names must be released, not left for its lease."""

    async def main() -> None:
        with AnswersAtOnce() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=5) as client:
                real_send = client._send

                async def written_then_cancelled(message: m.Message) -> None:
                    await real_send(message)
                    if isinstance(message, m.FetchRequest):
                        raise asyncio.CancelledError

                client._send = written_then_cancelled  # type: ignore[method-assign]
                with pytest.raises(asyncio.CancelledError):
                    async with client.fetch(list(range(4)), FP):
                        pass
                client._send = real_send  # type: ignore[method-assign]
                releases = await asyncio.to_thread(daemon.wait_for, m.Release)
                assert [r.segment for r in releases] == [daemon.segment]

    run(main())


# --------------------------------------------------------------------------- segments without descriptors


class SendsNoDescriptor(ScriptedDaemon):
    """Names a put segment but sends no descriptor with it (a daemon older than the client)."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.PutRequest):
            send(conn, m.SegmentReady(id=message.id, segment=shm.new_name(), size=4096))
        elif isinstance(message, m.LookupRequest):
            send(conn, m.LookupResult(id=message.id, matched_tokens=0, chunk_tokens=4, sources=[]))
        else:
            super().handle(conn, index, message)


def test_a_segment_named_without_its_descriptor_is_an_api_error_that_says_why() -> None:
    """Callers (the engine integrations) catch ApiError; the connection, whose descriptors and
    answers no longer pair up, is dropped and the next call gets a new one."""
    k, v = kv(8)
    with SendsNoDescriptor() as daemon:
        with KVPeerClient(daemon.socket_path) as client:
            with pytest.raises(ApiError) as info:
                client.put(list(range(8)), k, v, FP)
            assert info.value.code == ErrorCode.MALFORMED and "descriptor" in info.value.reason
            assert client.lookup([1, 2, 3], FP).matched_tokens == 0

        async def put_async() -> None:
            async with AsyncKVPeerClient(daemon.socket_path) as client:
                with pytest.raises(ApiError) as info:
                    await client.put(list(range(8)), k, v, FP)
                assert info.value.code == ErrorCode.MALFORMED and "descriptor" in info.value.reason
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 0

        run(put_async())


def test_releasing_a_fetch_whose_wait_timed_out_does_not_wait_again() -> None:
    """The vLLM worker's load held the forward pass for two full timeouts: the wait, then the
    release waiting for the same final answer once more."""
    with NeverAnswersOnTheFirst() as daemon, KVPeerClient(daemon.socket_path, timeout_s=0.5) as client:
        handle = client.fetch([1, 2, 3, 4], FP)
        with pytest.raises(ApiError) as info:
            handle.wait()
        assert info.value.code == ErrorCode.TIMEOUT
        reads: list[int] = []
        real_receive = client._receive

        def counting_receive() -> m.Message:
            reads.append(1)
            return real_receive()

        client._receive = counting_receive  # type: ignore[method-assign]
        handle.release()  # the daemon did not answer the last wait: no second one
        assert reads == []
        # Left by the timeout itself: no second wait either.
        with pytest.raises(ApiError) as info, client.fetch([1, 2, 3, 4], FP) as again:
            again.wait()
        assert info.value.code == ErrorCode.TIMEOUT and len(reads) == 1  # the wait's own read


def test_async_releasing_a_fetch_whose_wait_timed_out_does_not_wait_again() -> None:
    async def main() -> None:
        with NeverAnswersOnTheFirst() as daemon:
            async with AsyncKVPeerClient(daemon.socket_path, timeout_s=0.5) as client:
                handle = await client.fetch([1, 2, 3, 4], FP, stream=True)
                with pytest.raises(ApiError) as info:
                    await handle.wait()
                assert info.value.code == ErrorCode.TIMEOUT
                waits: list[int] = []
                real_get = client._get

                async def counting_get(queue: asyncio.Queue[m.Message]) -> m.Message:
                    waits.append(1)
                    return await real_get(queue)

                client._get = counting_get  # type: ignore[method-assign]
                await handle.release()
                assert waits == []
                [cancel] = await asyncio.to_thread(daemon.wait_for, m.Cancel)
                assert cancel.fetch == handle._state.request.id

    run(main())


def test_a_put_whose_connection_the_daemon_dropped_before_the_commit_says_shutting_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit names a segment of the old connection: it is not sent again on a new one
    (that answered NOT_FOUND, which the vLLM connector does not read as the daemon gone)."""
    from kvpeer.api import client as client_mod
    from tests.api.fakes import CHUNK, FakeBackend, ServerThread, wait_until

    with ServerThread(FakeBackend(), spare_bytes=0) as api, \
            KVPeerClient(api.socket_path, timeout_s=5) as client:
        fill = client_mod._fill_segment_blocking

        def fill_then_daemon_drops_us(*args: Any) -> None:
            fill(*args)

            async def drop_all() -> None:
                for conn in list(api.server._connections.values()):
                    conn.writer.close()

            api.call(drop_all())
            wait_until(lambda: api.server.stats()["connected"] == 0)

        monkeypatch.setattr(client_mod, "_fill_segment_blocking", fill_then_daemon_drops_us)
        k, v = kv(2 * CHUNK)
        with pytest.raises(ApiError) as info:
            client.put(list(range(2 * CHUNK)), k, v, FP)
        assert info.value.code == ErrorCode.SHUTTING_DOWN, info.value


# --------------------------------------------------------------------------- descriptors


def _fails_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next mapping of a segment fails (ENOMEM), later ones work."""
    real = shm.map_populated
    calls: list[int] = []

    def flaky(fd: int, size: int) -> Any:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(12, "Cannot allocate memory")
        return real(fd, size)

    monkeypatch.setattr(shm, "map_populated", flaky)


def test_a_fetch_whose_segment_fails_to_map_fails_and_its_segment_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mapping at FetchStarted used the descriptor up: the fetch used to raise MALFORMED at
    its final answer, never finish, make release() wait a whole timeout and hold the segment."""
    from tests.api.fakes import serving, wait_until

    k, v = kv(8)
    with serving() as api, KVPeerClient(api.socket_path, timeout_s=5) as client:
        client.put(list(range(8)), k, v, FP)
        _fails_once(monkeypatch)
        handle = client.fetch(list(range(8)), FP)
        with pytest.raises(ApiError) as info:
            handle.wait()
        assert info.value.code == ErrorCode.INTERNAL and "cannot map" in info.value.reason
        handle.release()  # nothing to wait for
        # Each call reads what came meanwhile: the late final answer is dropped, its segment released.
        wait_until(lambda: bool(client.stats()) and not api.server.registry.names())
        assert len(client._descriptors) == 0

        async def async_fetch() -> None:
            _fails_once(monkeypatch)
            async with AsyncKVPeerClient(api.socket_path, timeout_s=5) as aclient:
                with pytest.raises(ApiError) as info:
                    async with aclient.fetch(list(range(8)), FP):
                        pass
                assert info.value.code == ErrorCode.INTERNAL
                await asyncio.to_thread(wait_until, lambda: not api.server.registry.names())
                assert len(aclient._descriptors) == 0

        run(async_fetch())


def test_an_async_put_cancelled_before_its_fill_ran_leaves_no_descriptor() -> None:
    """The fill owns the segment's descriptor: cancelled while still queued in the executor, it
    never ran and never closed it, and the segment's pages outlived the daemon's release."""
    from tests.api.fakes import serving

    def segment_fds() -> set[str]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if "/kvpeer-" in target:
                    out.add(f"{fd} {target}")
        return out

    async def main(api: Any) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        k, v = kv(8)
        async with AsyncKVPeerClient(api.socket_path, timeout_s=5) as client:
            before = segment_fds()
            gate = threading.Event()
            busy = loop.run_in_executor(None, gate.wait, 10)  # the only thread is busy
            put = asyncio.create_task(client.put(list(range(8)), k, v, FP))
            while not len(api.server.registry) and not put.done():  # noqa: ASYNC110 - no hook
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the answer came: the fill is queued behind `busy`
            assert not put.done()
            put.cancel()
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await put
            await busy
            assert segment_fds() == before

    with serving() as api:
        run(main(api))


def test_an_aborted_client_does_not_connect_again() -> None:
    """abort() (another thread ending a call blocked on a hung daemon) only shut the socket: the
    put met it, connected again, said hello and waited out its whole timeout there."""
    with StopsReading() as daemon:
        client = KVPeerClient(daemon.socket_path, timeout_s=10)
        client.abort()
        with pytest.raises(ApiError) as info:
            client.put(list(range(4)), *kv(4), FP)
        assert info.value.code == ErrorCode.SHUTTING_DOWN
        assert len(daemon.received(m.Hello)) == 1
        client.close()


class SpeaksAnotherVersion(ScriptedDaemon):
    """A daemon of another API version: its answers carry another version number."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        body = msgpack.unpackb(m.encode(m.HelloOk(id=message.id))[m.FRAME_HEADER_BYTES:])
        body["v"] = m.API_VERSION - 1
        payload = msgpack.packb(body)
        conn.sendall(len(payload).to_bytes(m.FRAME_HEADER_BYTES, "big") + payload)


def test_a_daemon_of_another_api_version_is_an_api_error_that_says_so() -> None:
    """Callers (the engine integrations) catch ApiError: the blocking client raised the raw
    ProtocolError of an answer it could not read."""
    with SpeaksAnotherVersion() as daemon:
        with pytest.raises(ApiError) as info:
            KVPeerClient(daemon.socket_path, timeout_s=5)
        assert info.value.code == ErrorCode.UNSUPPORTED_VERSION and "version" in info.value.reason


def test_an_abort_landing_while_the_client_connects_again_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """abort() from another thread found no socket to shut while the calling thread was
    connecting again: the call went out on the new connection."""
    with LookupDaemon() as daemon:
        client = KVPeerClient(daemon.socket_path, timeout_s=10)
        daemon.drop(0)  # restarted while idle: the next call connects again
        connect = KVPeerClient._connect

        def aborted_meanwhile(self: KVPeerClient) -> Any:
            self.abort()  # the other thread's abort() lands here
            return connect(self)

        monkeypatch.setattr(KVPeerClient, "_connect", aborted_meanwhile)
        with pytest.raises(ApiError) as info:
            client.lookup([1, 2, 3], FP)
        assert info.value.code == ErrorCode.SHUTTING_DOWN and not client.connected
        assert len(daemon.received(m.Hello)) == 1


def test_a_call_cut_by_abort_says_the_client_is_closed_not_that_the_daemon_closed_it() -> None:
    with NeverAnswersOnTheFirst() as daemon:
        client = KVPeerClient(daemon.socket_path, timeout_s=10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.lookup, [1, 2, 3], FP)
            daemon.wait_for(m.LookupRequest)
            client.abort()
            with pytest.raises(ApiError) as info:
                call.result(timeout=10)
        assert (info.value.code, info.value.reason) == (ErrorCode.SHUTTING_DOWN, "the client is closed")
        client.close()


def test_a_call_after_abort_drops_the_connection() -> None:
    with LookupDaemon() as daemon:
        client = KVPeerClient(daemon.socket_path, timeout_s=10)
        client.abort()
        with pytest.raises(ApiError):
            client.lookup([1, 2, 3], FP)
        assert not client.connected and client._sock is None


def test_a_request_too_large_to_send_is_an_api_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a raw ProtocolError (a request of MAX_TOKENS tokens, before the frame limit made
    room for the rest of the request)."""
    with LookupDaemon() as daemon:
        with KVPeerClient(daemon.socket_path) as client:
            monkeypatch.setattr(m, "MAX_FRAME_BYTES", 1000)
            for call in (lambda: client.lookup(list(range(500)), FP), lambda: client.fetch(list(range(500)), FP)):
                with pytest.raises(ApiError) as info:
                    call()
                assert info.value.code == ErrorCode.TOO_LARGE
            monkeypatch.undo()
            assert client.lookup([1, 2, 3], FP).matched_tokens == 0  # its connection, kept

        async def main() -> None:
            async with AsyncKVPeerClient(daemon.socket_path) as client:
                monkeypatch.setattr(m, "MAX_FRAME_BYTES", 1000)
                with pytest.raises(ApiError) as info:
                    await client.lookup(list(range(500)), FP)
                assert info.value.code == ErrorCode.TOO_LARGE
                with pytest.raises(ApiError) as info:
                    async with client.fetch(list(range(500)), FP):
                        pass
                assert info.value.code == ErrorCode.TOO_LARGE
                monkeypatch.undo()
                assert (await client.lookup([1, 2, 3], FP)).matched_tokens == 1  # its connection, kept
                assert client._abandoned == set() and daemon.received(m.Cancel) == []

        run(main())
