"""asyncio helpers that the standard library gets wrong on the Python versions we support."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

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
