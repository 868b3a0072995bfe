"""Segment descriptors over the API socket (kvpeer.api.unix): pairing, ordering, no leaks."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from kvpeer.api import messages as m
from kvpeer.api import unix
from kvpeer.api.client import AsyncKVPeerClient, KVPeerClient
from kvpeer.errors import ErrorCode, ProtocolError
from tests.api.fakes import FP, kv, serving


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
            before = open_fds()
            for _ in range(20):
                client.put(tokens, k, v, FP)
                with client.fetch(tokens, FP) as result:
                    assert result.matched_tokens == 8
            assert open_fds() == before and len(client._descriptors) == 0

        async def many() -> None:
            async with AsyncKVPeerClient(api.socket_path) as client:
                await client.put(tokens, k, v, FP)
                before = open_fds()

                async def one() -> None:
                    async with client.fetch(tokens, FP) as result:
                        assert result.matched_tokens == 8

                await asyncio.gather(*(one() for _ in range(12)))
                assert open_fds() == before and len(client._descriptors) == 0

        asyncio.run(asyncio.wait_for(many(), 60))
