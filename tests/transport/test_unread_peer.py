"""A peer that keeps sending but reads nothing we send must not make us queue without end: its
pings, requests and refused blob requests are answered past flow control, so the session ends
once more is queued than a reading peer ever leaves, or once a send buffer stays full for
request_timeout_s, and refusals are not a task each. A caller's timeout covers its wait on that
flow control, and a fetch given up on tells the peer without waiting on it again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

import msgpack
import pytest

from kvpeer.errors import TransportError
from kvpeer.transport import PeerSession
from tests.transport.pairs import Handler, deafen, pair, run, stall_sending

PING = msgpack.packb({"v": 1, "t": "ping", "seq": 1, "sent": 0.0})


#: A send cap quick to reach: 4 x 8 KiB buffer_high_bytes + one 4 KiB message.
SMALL_CAP = {"buffer_high_bytes": 8192, "buffer_low_bytes": 4096, "max_message_bytes": 4096, "frame_bytes": 4096}


def _stopped_reading(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "stopped reading" in r.message]


def test_pongs_to_a_peer_that_reads_nothing_end_the_session_at_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        down = asyncio.Event()
        async with pair(
            request_timeout_s=30.0,  # the stalled-buffer check cannot be what ends it
            a=SMALL_CAP, on_a_down=lambda _peer: down.set(),
        ) as (session, _served):  # fmt: skip
            stall_sending(session)
            for _ in range(5000):  # pings as aiortc hands them over: each answered past flow control
                session._on_control(PING)
            await asyncio.wait_for(down.wait(), 5)  # was: open, 5000 pongs queued
            assert session.closed and session._control.channel.bufferedAmount <= 36 * 1024
            assert len(_stopped_reading(caplog)) == 1, caplog.text

    run(body)


def test_a_send_buffer_that_stays_full_ends_the_session() -> None:
    async def body() -> None:
        down = asyncio.Event()
        async with pair(
            request_timeout_s=1.0, buffer_high_bytes=8192, buffer_low_bytes=4096,
            b={"peer_dead_after_s": 600.0},  # b hears nothing from a, a hears b's pings
            on_a_down=lambda _peer: down.set(),
        ) as (session, served):  # fmt: skip
            deafen(served)
            # The first fills SCTP's queue, the next our send buffer, the rest wait there.
            calls = [asyncio.create_task(session.request("echo", {"pad": b"x" * 60_000})) for _ in range(8)]
            await asyncio.wait_for(down.wait(), 10)  # was: never, b's pings kept it alive
            assert session.closed
            await asyncio.gather(*calls, return_exceptions=True)

    run(body)


class _Stuck(Handler):
    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        await asyncio.Event().wait()  # a disk that never answers
        return None


def test_blob_requests_refused_busy_are_not_a_task_each(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with pair(
            _Stuck(), request_timeout_s=30.0, b={**SMALL_CAP, "max_transfers_per_peer": 2},
        ) as (_session, served):  # fmt: skip
            stall_sending(served)
            ended = _on_end(served)
            most_tasks = 0
            for i in range(5000):
                served._on_control(msgpack.packb({"v": 1, "t": "blob_req", "id": i + 1, "key": b"k", "level": ""}))
                most_tasks = max(most_tasks, len(served._tasks))
            assert most_tasks < 10, most_tasks  # heartbeat, two transfers; was one per refusal
            await asyncio.wait_for(ended.wait(), 5)  # its send buffer passed the cap
            assert len(_stopped_reading(caplog)) == 1, caplog.text

    run(body)



def _on_end(session: PeerSession) -> asyncio.Event:
    """Set once *session* ended (its transport was told)."""
    ended = asyncio.Event()
    tell = session._on_end

    def told(ended_session: PeerSession, by_peer: bool) -> None:
        tell(ended_session, by_peer)
        ended.set()

    session._on_end = told
    return ended


# -- a caller's timeout covers the wait on flow control -------------------------------------


async def _time(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        await call
    except (TransportError, asyncio.CancelledError) as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_request_and_fetch_timeouts_cover_a_full_send_buffer() -> None:
    async def body() -> None:
        async with pair(
            request_timeout_s=8.0, close_timeout_s=1.0, buffer_high_bytes=8192, buffer_low_bytes=4096,
            b={"peer_dead_after_s": 600.0},  # b hears nothing from a, a hears b's pings
        ) as (session, served):  # fmt: skip
            deafen(served)
            fillers = [asyncio.create_task(session.request("echo", {"pad": b"x" * 60_000})) for _ in range(4)]
            await asyncio.sleep(0)  # they queued: the send buffer is past buffer_high_bytes
            assert session._control.channel.bufferedAmount > 8192
            for call in (session.request("echo", {}, timeout=0.5), session.fetch_blob(b"k", "", timeout=0.5)):
                error, took = await _time(call)
                assert isinstance(error, TransportError) and "timed out after 0.5 s" in str(error), error
                assert took < 3.0  # was request_timeout_s (8 s), and 8 more for the BlobCancel
            fetch = asyncio.create_task(session.fetch_blob(b"k", "", timeout=30))
            await asyncio.sleep(0.1)
            fetch.cancel()
            error, took = await _time(fetch)
            assert isinstance(error, asyncio.CancelledError) and took < 3.0  # was 8 s for the BlobCancel
            for filler in fillers:
                filler.cancel()
            await asyncio.gather(*fillers, return_exceptions=True)

    run(body)
