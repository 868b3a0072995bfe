"""Pull peers' inventories into an `InventoryTable` when their advertised epoch moves.

The daemon hands in one callable, ``request(peer_id, method, body) -> answer``, that sends a
request over the authenticated peer connection (the transport); this module decides when to
ask, what to ask for (a delta since the epoch held, or the full set), and applies the answer.
`InventorySync` owns one task per peer at a time and cancels them on `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kvpeer import aio
from kvpeer.discovery.advert import PeerEvent, PeerInfo
from kvpeer.discovery.inventory import MAX_PAGES, InventoryTable, StaleDeltaError
from kvpeer.errors import ErrorCode, KVPeerError, ProtocolError

log = logging.getLogger(__name__)

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0

Request = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]


async def sync_peer(table: InventoryTable, request: Request, peer: PeerInfo, timeout_s: float) -> int:
    """Bring ``table``'s view of ``peer`` to its latest epoch; returns the epoch now held.

    Raises KVPeerError (transport or protocol) or TimeoutError; the table is unchanged then.
    """
    known = table.epoch(peer.node_id)
    if known is not None and known == peer.epoch:
        table.set_fingerprints(peer.node_id, peer.fingerprints)
        return known
    answer = await _inventory(request, peer.node_id, known, timeout_s)
    try:
        return table.apply(peer.node_id, answer, peer.fingerprints)
    except StaleDeltaError:
        # The peer answered a delta from an epoch we no longer hold (a race with an earlier
        # answer): one full inventory settles it.
        answer = await _inventory(request, peer.node_id, None, timeout_s)
        return table.apply(peer.node_id, answer, peer.fingerprints)


async def _inventory(
    request: Request, peer_id: str, since: int | None, timeout_s: float
) -> dict[str, Any]:
    """One inventory answer; a paged full inventory is fetched page by page and joined."""
    answer = await aio.wait_for(request(peer_id, "inventory", {"since": since}), timeout_s)
    pages = answer.get("pages", 1) if isinstance(answer, dict) else 1
    if not isinstance(pages, int) or isinstance(pages, bool) or not 1 <= pages <= MAX_PAGES:
        raise ProtocolError(ErrorCode.INVALID, f"inventory pages {pages!r}")
    if pages == 1:
        return answer
    keys = _page_keys(answer)
    epoch = answer.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise ProtocolError(ErrorCode.INVALID, f"inventory epoch {epoch!r}")
    for page in range(1, pages):
        # Every page of page 0's epoch, even if the peer's chunk set moved on meanwhile (the
        # peer keeps that epoch's keys for a while): this yields a full inventory at that
        # epoch, and the next round asks for the delta since it. The epoch travels as "at":
        # a node from before reads "since" as a delta request, and ignores "at" (it pages its
        # current epoch, and the epoch check below catches a move).
        part = await aio.wait_for(
            request(peer_id, "inventory", {"since": None, "page": page, "at": epoch}), timeout_s
        )
        part_keys = _page_keys(part)
        if part.get("epoch") != epoch or part.get("pages") != pages:
            raise ProtocolError(ErrorCode.INVALID, "inventory pages of different epochs")
        keys.extend(part_keys)
    return {**answer, "keys": keys}


def _page_keys(page: Any) -> list[Any]:
    """The keys of one page, checked to be a list (each key is checked when applied)."""
    keys = page.get("keys") if isinstance(page, dict) else None
    if not isinstance(keys, list):
        raise ProtocolError(ErrorCode.INVALID, "inventory page without a list of keys")
    return keys


class InventorySync:
    """Subscribe `on_event` to a Discovery; keeps ``table`` current with every live peer."""

    def __init__(
        self,
        table: InventoryTable,
        request: Request,
        *,
        timeout_s: float = 5.0,
        retry_s: float = RETRY_FIRST_S,
    ) -> None:
        self.table = table
        self._retry_s = retry_s
        self._request = request
        self._timeout_s = timeout_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._latest: dict[str, PeerInfo] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    def on_event(self, event: PeerEvent) -> None:
        """Discovery callback: sync on added/updated, forget on removed."""
        peer_id = event.peer.node_id
        if event.kind == "removed":
            self._latest.pop(peer_id, None)
            task = self._tasks.pop(peer_id, None)
            if task is not None:
                task.cancel()
            self.table.drop(peer_id)
            return
        self.request_sync(event.peer)

    def request_sync(self, peer: PeerInfo) -> None:
        if self._closed:
            return
        self._latest[peer.node_id] = peer
        if peer.node_id not in self._tasks:
            self._tasks[peer.node_id] = asyncio.create_task(
                self._run(peer.node_id), name=f"inventory sync {peer.node_id}"
            )

    async def _run(self, peer_id: str) -> None:
        backoff = self._retry_s
        previous: int | None = None
        try:
            while (peer := self._latest.get(peer_id)) is not None:
                try:
                    epoch = await sync_peer(self.table, self._request, peer, self._timeout_s)
                except Exception as exc:
                    waiting = getattr(exc, "retry_in_s", None)
                    if isinstance(waiting, float):
                        # Not dialled: the transport waits out a failed connect (said once,
                        # there); try when its wait ends, without backing off further.
                        log.debug("inventory of %s not synced yet: %s", peer_id, exc)
                        await asyncio.sleep(min(waiting, RETRY_MAX_S))
                        continue
                    # The advertisement may not change again for a long time: retry, backing
                    # off, while the peer is still listed. An unexpected error (a peer's answer
                    # we did not foresee) is retried too, else the peer is never synced.
                    expected = isinstance(exc, KVPeerError | TimeoutError | OSError)
                    log.log(
                        logging.INFO if expected else logging.WARNING,
                        "inventory of %s not synced (%r); retry in %.0fs", peer_id, exc, backoff,
                        exc_info=not expected,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                backoff = self._retry_s
                async with self._changed:
                    self._changed.notify_all()
                latest = self._latest.get(peer_id)
                # Stop when caught up, or when the answer did not move (an advertised epoch
                # ahead of the peer's own log must not make us ask in a tight loop).
                if latest is None or latest.epoch <= epoch or epoch == previous:
                    if latest is not None:
                        # The answer may already cover an advertisement that came in while it
                        # was on its way (a first put: epoch and models move together); the
                        # table must not keep the models of the older advertisement.
                        self.table.set_fingerprints(peer_id, latest.fingerprints)
                    return
                previous = epoch
        finally:
            # A "removed" then "added" in one loop iteration registers a new task before this
            # cancelled one unwinds: leave that one in place.
            if self._tasks.get(peer_id) is asyncio.current_task():
                del self._tasks[peer_id]

    async def wait_synced(self, peer_id: str, timeout_s: float, epoch: int = 0) -> None:
        """Wait until the table holds ``peer_id`` at ``epoch`` or later (tests, benchmarks)."""

        def done() -> bool:
            held = self.table.epoch(peer_id)
            return held is not None and held >= epoch

        async with self._changed:
            await aio.wait_for(self._changed.wait_for(done), timeout_s)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
