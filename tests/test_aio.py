"""kvpeer.aio: wait_for keeps a cancel that coincides with the awaited event; work run in a
thread ends before a cancel of its caller returns."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from kvpeer import aio


@pytest.mark.parametrize("spins", [0, 1, 2])
def test_a_cancel_landing_as_the_event_fires_is_kept(spins: int) -> None:
    """Python 3.11's asyncio.wait_for returned normally here (gh-86296): a loop waiting on a busy
    event went on after its task was cancelled."""

    async def main() -> bool:
        event = asyncio.Event()

        async def waiter() -> None:
            while True:
                event.clear()
                await aio.wait_for(event.wait(), 30.0)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        event.set()
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0.05)
        cancelled = task.cancelled()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return cancelled

    assert asyncio.run(main())


def test_timeout_and_result() -> None:
    async def main() -> None:
        assert await aio.wait_for(asyncio.sleep(0, "done"), 1.0) == "done"
        assert await aio.wait_for(asyncio.sleep(0, "done"), None) == "done"
        with pytest.raises(TimeoutError):
            await aio.wait_for(asyncio.sleep(10), 0.01)

    asyncio.run(main())


@pytest.mark.parametrize("helper", [aio.in_thread_to_the_end, aio.in_thread_once_started])
def test_a_cancelled_caller_waits_for_its_thread_work_to_end(helper: Any) -> None:
    """The work writes buffers the caller reuses as soon as it returns: a cancel must not
    return before the thread is done with them (in_thread_once_started keeps that promise for
    work that started)."""
    import threading
    import time

    started, finished = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        time.sleep(0.3)
        finished.set()

    async def main() -> None:
        task = asyncio.create_task(helper(None, work))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()

    asyncio.run(main())


def test_work_still_queued_when_its_caller_is_cancelled_is_dropped_at_once() -> None:
    """in_thread_once_started: the only thread is busy, so the work waits in the queue; a cancel
    returns while the thread is still busy, and the work never runs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    busy, release = threading.Event(), threading.Event()
    ran: list[str] = []
    executor = ThreadPoolExecutor(max_workers=1)

    def blocker() -> None:
        busy.set()
        assert release.wait(timeout=30)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        blocking = loop.run_in_executor(executor, blocker)
        await loop.run_in_executor(None, busy.wait)
        task = asyncio.create_task(aio.in_thread_once_started(executor, ran.append, "work"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)  # in_thread_to_the_end would wait for the blocker
        assert not release.is_set()
        release.set()
        await blocking
        await loop.run_in_executor(executor, ran.append, "after")

    try:
        asyncio.run(main())
    finally:
        release.set()
        executor.shutdown()
    assert ran == ["after"]


def test_in_thread_once_started_returns_the_result_and_raises_the_error() -> None:
    def fail() -> None:
        raise ValueError("no")

    async def main() -> None:
        assert await aio.in_thread_once_started(None, sum, [1, 2]) == 3
        with pytest.raises(ValueError, match="no"):
            await aio.in_thread_once_started(None, fail)

    asyncio.run(main())


@pytest.mark.parametrize("helper", [aio.in_thread_to_the_end, aio.in_thread_once_started])
def test_a_second_cancel_still_waits_for_the_running_work(helper: Any) -> None:
    """The fetch cancels its decoder at a deadline, and the client's cancel reaches it again:
    the second cancel cancelled the awaited future, and the helper returned while its thread
    still wrote into the caller's buffer."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)
        time.sleep(0.05)
        finished.set()

    async def main() -> bool:
        task = asyncio.create_task(helper(None, work))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return finished.is_set()

    assert asyncio.run(main())
