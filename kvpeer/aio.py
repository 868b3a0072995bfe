"""asyncio helpers that the standard library gets wrong on the Python versions we support."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
    """``asyncio.wait_for`` without Python 3.11's lost cancel (CPython gh-86296).

    3.11's ``wait_for`` returns normally when its task is cancelled in the same loop iteration in
    which the awaited thing finishes, so a loop waiting on a busy event could never be cancelled.
    ``asyncio.timeout`` keeps an outside cancel. Raises ``TimeoutError`` after ``timeout``
    seconds (None: no limit), cancelling what it awaited, as ``wait_for`` does.
    """
    async with asyncio.timeout(timeout):
        return await aw


async def in_thread_to_the_end(executor: Executor | None, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in ``executor`` (None: the loop's default); a cancelled caller still
    waits for it to end before the cancel goes on, because such work reads or writes buffers
    the caller reuses or releases as soon as it returns."""
    job = asyncio.get_running_loop().run_in_executor(executor, work, *args)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await _until_done(job)
        raise


async def in_thread_once_started(executor: Executor | None, work: Callable[..., T], *args: Any) -> T:
    """:func:`in_thread_to_the_end` for work that may still be queued when its caller gives up.

    A cancelled caller still waits for ``work(*args)`` to end once it started; work still
    queued behind other jobs then is dropped (it never runs, so it touches no buffer) and the
    cancel goes on at once: a deadline is not spent waiting for a free thread.
    """
    lock = threading.Lock()
    state = ["queued"]  # -> "running" in the thread, or -> "dropped" by the cancelled caller

    def run() -> T:
        with lock:
            if state[0] == "dropped":
                raise asyncio.CancelledError("dropped before it started")
            state[0] = "running"
        return work(*args)

    job = asyncio.get_running_loop().run_in_executor(executor, run)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        with lock:
            dropped = state[0] == "queued"
            if dropped:
                state[0] = "dropped"
        if dropped:
            job.cancel()  # out of the executor's queue where it still can be
            raise
        await _until_done(job)
        raise


async def _until_done(job: asyncio.Future[Any]) -> None:
    """Wait for ``job`` to end, whatever cancels arrive meanwhile (each is taken up again by
    the caller's ``raise``): ``await job`` would let a second cancel cancel the future, and
    return while its thread still ran."""
    while not job.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([job])


def ignore_outcome(future: asyncio.Future[Any]) -> None:
    """A done-callback for work nobody waits on any more: retrieves its exception, so asyncio
    does not log "exception was never retrieved" for it."""
    if not future.cancelled():
        future.exception()
