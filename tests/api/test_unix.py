"""Segment descriptors over the API socket (kvpeer.api.unix): pairing, ordering, no leaks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from pathlib import Path

import pytest

from kvpeer import cli
from kvpeer.api import messages as m
from kvpeer.api import server as server_mod
from kvpeer.api import unix
from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ErrorCode, ProtocolError
from tests.api.fakes import FP, ServerThread, kv, serving, small_segment


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_fds_once_freed(api: ServerThread) -> int:
    """Open descriptors once the daemon's registry has closed what it released (on a thread of
    its own, in order: closing a segment's last descriptor frees its pages)."""
    api.server.registry._freeing.submit(lambda: None).result(timeout=10)
    return open_fds()


def test_each_announcement_takes_the_next_descriptor_and_the_rest_are_closed() -> None:
    table = unix.SegmentDescriptors()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    table.arrived([r1, r2])
    table.on_message(m.LookupResult(id=1, matched_tokens=0, chunk_tokens=4, sources=[]))  # takes none
    table.on_message(m.SegmentReady(id=2, segment="a", size=4096))
    table.on_message(m.FetchStarted(id=3, segment="b", size=4096))
    assert table.take("a") == r1
    table.discard("b")
    assert not is_open(r2)
    with pytest.raises(ProtocolError) as info:
        table.on_message(m.FetchStarted(id=4, segment="c", size=4096))
    assert info.value.code == ErrorCode.MALFORMED and "without its descriptor" in info.value.reason
    with pytest.raises(ProtocolError):
        table.take("c")
    r3, w3 = os.pipe()
    table.arrived([r3])
    table.close()
    assert not is_open(r3) and len(table) == 0
    for fd in (r1, w1, w2, w3):
        os.close(fd)


def test_a_read_with_more_descriptors_than_any_answer_sends_is_refused_and_closes_them() -> None:
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(unix.MAX_DESCRIPTORS_PER_READ + 1)]
    with a, b:
        socket.send_fds(a, [b"x"], [r for r, _ in pipes])
        before = open_fds()
        with pytest.raises(ProtocolError) as info:
            unix.receive(b, 100)
        assert info.value.code == ErrorCode.MALFORMED
        assert open_fds() == before  # what did arrive was closed
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_a_descriptor_waits_for_the_bytes_queued_before_it(tmp_path: Path) -> None:
    """The frame with a descriptor must not overtake a frame still queued in the transport:
    the receiver would pair the descriptor with the wrong answer."""
    big = m.encode(m.StatsResult(id=1, stats={"blob": "x" * (4 << 20)}))  # more than the socket holds
    small = m.encode(m.FetchStarted(id=2, segment="s", size=4096))
    path = str(tmp_path / "s.sock")
    r, w = os.pipe()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(big)  # most of it stays queued: the client is not reading yet
        assert writer.transport.get_write_buffer_size() > 0
        await unix.send_with_descriptor(writer, small, r, timeout_s=10)
        await writer.drain()
        writer.close()

    async def main() -> tuple[bytes, list[tuple[int, int, list[int]]]]:
        server = await asyncio.start_unix_server(serve, path=path)
        conn = await unix.AsyncUnixConnection.open(path)
        await asyncio.sleep(0.2)  # the server queues both frames before anything is read
        data, fds = b"", []  # (where the read that brought descriptors began, where it ended, them)
        while True:
            chunk, got = await conn.read(1 << 16)
            if got:
                fds.append((len(data), len(data) + len(chunk), got))
            if not chunk:
                break
            data += chunk
        conn.close()
        server.close()
        return data, fds

    data, fds = asyncio.run(asyncio.wait_for(main(), 30))
    assert data == big + small
    [(start, end, got)] = fds
    assert start <= len(big) < end  # the descriptor came with the second frame's first byte
    unix.close_all(got)
    os.close(r)
    os.close(w)


def test_clients_hold_no_descriptor_after_their_puts_and_fetches() -> None:
    k, v = kv(8)
    tokens = list(range(8))
    with serving() as api:
        with KVPeerClient(api.socket_path) as client:
            client.put(tokens, k, v, FP)
            with client.fetch(tokens, FP) as result:
                assert result.zero_copy()
            before = open_fds_once_freed(api)
            for _ in range(20):
                client.put(tokens, k, v, FP)
                with client.fetch(tokens, FP) as result:
                    assert result.matched_tokens == 8
            assert open_fds_once_freed(api) == before and len(client._descriptors) == 0

        async def many() -> None:
            async with AsyncKVPeerClient(api.socket_path) as client:
                await client.put(tokens, k, v, FP)
                before = open_fds_once_freed(api)

                async def one() -> None:
                    async with client.fetch(tokens, FP) as result:
                        assert result.matched_tokens == 8

                await asyncio.gather(*(one() for _ in range(12)))
                assert open_fds_once_freed(api) == before and len(client._descriptors) == 0

        asyncio.run(asyncio.wait_for(many(), 60))


def test_a_descriptor_waits_until_the_client_read_the_last_one(tmp_path: Path) -> None:
    """Descriptors a client leaves unread count against the daemon's open-file limit; past it
    every client's puts and fetches failed (ETOOMANYREFS). One unread per connection at most."""
    path = str(tmp_path / "s.sock")
    r, w = os.pipe()
    frame = m.encode(m.FetchStarted(id=2, segment="s", size=4096))
    outcome: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await unix.send_with_descriptor(writer, frame, r, timeout_s=10)
        try:
            await unix.send_with_descriptor(writer, frame, r, timeout_s=0.3)  # first one unread
            outcome.append("sent")
        except TimeoutError:
            outcome.append("timed out")
        await unix.send_with_descriptor(writer, frame, r, timeout_s=10)  # read meanwhile
        outcome.append("sent after the read")
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=path)
        conn = await unix.AsyncUnixConnection.open(path)
        while not outcome:  # noqa: ASYNC110 - the server's side tells
            await asyncio.sleep(0.01)
        got: list[int] = []
        while True:
            data, fds = await conn.read(1 << 16)
            got += fds
            if not data:
                break
        assert len(got) == 2
        unix.close_all(got)
        conn.close()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert outcome == ["timed out", "sent after the read"]
    os.close(r)
    os.close(w)


def test_a_client_out_of_descriptors_is_told_so_not_blamed_on_the_daemon() -> None:
    """The kernel could not install the descriptor that came (EMFILE): the read says that."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a, b = socket.socketpair()
            r, _ = os.pipe()
            socket.send_fds(a, [b"x"], [r])
            filler = []
            soft = max(int(n) for n in os.listdir("/proc/self/fd")) + 1
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            with contextlib.suppress(OSError):
                while True:
                    filler.append(os.dup(0))
            try:
                unix.receive(b, 100)
            except ProtocolError as exc:
                code = 0 if exc.code == ErrorCode.INTERNAL and "out of file descriptors" in exc.reason else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_segment_announced_to_a_client_already_gone_is_absorbed(tmp_path: Path) -> None:
    """A plain answer to a lost client is dropped quietly; one with a descriptor raised EBADF
    into the request, which logged a traceback."""
    path = str(tmp_path / "s.sock")

    async def main() -> None:
        accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer)

        server = await asyncio.start_unix_server(serve, path=path)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        writer = await accepted
        conn = server_mod._Connection(1, writer, 0, 0, 0)
        segment = small_segment()
        try:
            writer.transport.abort()  # as after a reset: the socket is closed
            await asyncio.sleep(0)
            await conn.send(m.SegmentReady(id=2, segment=segment.name, size=segment.layout.size), segment)
            assert conn.closed
        finally:
            segment.unlink()
            segment.close()
            client.close()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_raising_the_open_file_limit_takes_the_hard_limit() -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            code = 0 if cli.raise_open_file_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
