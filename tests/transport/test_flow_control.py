"""The send queue of one data channel: fair among transfers, bounded, and never stuck.

A fake channel stands in for aiortc's: a "link" task drains its buffer one frame per loop turn
and fires bufferedamountlow on the low crossing, as aiortc does.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from kvpeer.errors import TransportError
from kvpeer.transport.session import _Channel
from tests.transport.pairs import config, run

FRAME = 64 * 1024
HIGH, LOW = 4 << 20, 1 << 20


class FakeChannel:
    label = "bulk-0"
    readyState = "open"

    def __init__(self) -> None:
        self.bufferedAmount = 0
        self.bufferedAmountLowThreshold = 0
        self.handlers: dict[str, Any] = {}
        self.peak = 0

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler

    def send(self, data: bytes) -> None:
        self.bufferedAmount += len(data)
        self.peak = max(self.peak, self.bufferedAmount)


def channel() -> tuple[_Channel, FakeChannel]:
    fake = FakeChannel()
    return _Channel(fake, config(buffer_high_bytes=HIGH, buffer_low_bytes=LOW)), fake  # type: ignore[arg-type]


async def drain(fake: FakeChannel, cycles: list[int]) -> None:
    while True:
        await asyncio.sleep(0)
        if fake.bufferedAmount:
            before = fake.bufferedAmount
            fake.bufferedAmount -= min(FRAME, fake.bufferedAmount)
            if before > fake.bufferedAmountLowThreshold >= fake.bufferedAmount:
                cycles[0] += 1
                fake.handlers["bufferedamountlow"]()


def test_transfers_sharing_a_channel_each_move_every_drain_cycle() -> None:
    """All waiters woke together and re-checked: the first kept sending until the buffer was
    full again and the rest went back to wait, so the k-th transfer waited k drain cycles for a
    frame (3 MiB each: 2.5 s at 10 Mbit/s) and, past request_timeout_s, was dropped."""

    async def body() -> None:
        ch, fake = channel()
        cycles = [0]
        worst = [0] * 16

        async def transfer(i: int) -> None:
            last = cycles[0]
            for _ in range(40):
                await ch.send(b"f" * FRAME, 60.0)
                worst[i] = max(worst[i], cycles[0] - last)
                last = cycles[0]

        link = asyncio.create_task(drain(fake, cycles))
        await asyncio.gather(*(transfer(i) for i in range(16)))
        link.cancel()
        assert max(worst) <= 2, worst  # was the transfer's place in the queue: up to 15
        assert fake.peak <= HIGH + FRAME

    run(body)


def test_a_waiter_that_gives_up_passes_its_turn_on() -> None:
    async def body() -> None:
        ch, fake = channel()
        fake.bufferedAmount = HIGH + 1  # full: everyone waits
        gives_up = asyncio.create_task(ch.send(b"a", 60.0))
        times_out = asyncio.create_task(ch.send(b"b", 0.05))
        waits = asyncio.create_task(ch.send(b"c", 60.0))
        await asyncio.sleep(0.01)
        gives_up.cancel()
        with pytest.raises(TransportError):
            await times_out
        fake.bufferedAmount = 0
        fake.handlers["bufferedamountlow"]()
        await asyncio.wait_for(waits, 5)
        assert gives_up.cancelled() and fake.bufferedAmount == 1

    run(body)


def test_a_send_after_the_buffer_drained_quietly_does_not_wait_for_a_low_event() -> None:
    """Waiters queued while the buffer was full; it drained to between the marks (no low event
    yet): a new send neither jumps the queue nor waits for an event that may not come."""

    async def body() -> None:
        ch, fake = channel()
        fake.bufferedAmount = HIGH + 1
        first = asyncio.create_task(ch.send(b"1", 60.0))
        await asyncio.sleep(0.01)
        fake.bufferedAmount = LOW + 1  # drained, but not past the low mark
        await asyncio.wait_for(ch.send(b"2", 60.0), 5)
        await asyncio.wait_for(first, 5)

    run(body)


def test_closing_fails_every_waiting_send() -> None:
    async def body() -> None:
        ch, fake = channel()
        fake.bufferedAmount = HIGH + 1
        sends = [asyncio.create_task(ch.send(b"x", 60.0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        ch.close("session closed")
        for send in sends:
            with pytest.raises(TransportError, match="session closed"):
                await asyncio.wait_for(send, 5)

    run(body)


def test_a_queued_sender_cancelled_as_the_channel_closes_leaves_no_unseen_error() -> None:
    """The session's end fails the queue, then cancels its tasks: a sender woken by the cancel
    never read its message's error, and asyncio logged it as never retrieved (one per frame)."""

    async def body() -> None:
        ch, fake = channel()
        fake.bufferedAmount = HIGH + 1
        seen: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: seen.append(context))
        sender = asyncio.create_task(ch.send(b"x", 60.0))
        await asyncio.sleep(0.01)
        ch.close("session closed")
        sender.cancel()
        await asyncio.wait({sender})
        assert sender.cancelled()
        del sender
        gc.collect()
        assert not seen, seen

    run(body)
