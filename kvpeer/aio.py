"""asyncio helpers that the standard library gets wrong on the Python versions we support."""

from __future__ import annotations

import asyncio
import contextlib
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
        with contextlib.suppress(BaseException):
            await job
        raise
