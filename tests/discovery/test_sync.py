"""InventorySync: discovery events drive inventory pulls through an in-memory request."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from kvpeer.discovery import InventoryLog, InventorySync, InventoryTable, PeerEvent, PeerInfo
from kvpeer.errors import TransportError

FP = "ab" * 16


def peer(log: InventoryLog) -> PeerInfo:
    return PeerInfo(
        node_id="p", addresses=("10.0.0.2",), port=7457, fingerprints=(FP,), epoch=log.epoch,
        chunk_count=len(log),
    )


def test_events_drive_full_then_delta_then_drop() -> None:
    async def main() -> None:
        log = InventoryLog(epoch=0)
        asked: list[Any] = []
        failures = [TransportError("session not up yet")]

        async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            asked.append(body["since"])
            if failures:
                raise failures.pop()
            return log.since(body["since"])

        sync = InventorySync(InventoryTable(), request, retry_s=0.01)
        first = [os.urandom(32) for _ in range(3)]
        log.add(first)
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        await sync.wait_synced("p", 10)
        assert sync.table.keys_of("p") == set(first)
        assert asked == [None, None]  # failed once, retried: full inventory both times

        later = os.urandom(32)
        log.add([later])
        log.remove(first[:1])
        sync.on_event(PeerEvent(kind="updated", peer=peer(log), epoch_changed=True))
        await sync.wait_synced("p", 10, epoch=log.epoch)
        assert asked[-1] == log.epoch - 2  # a delta since the epoch held
        assert sync.table.longest_prefix([later], FP) == (1, [{"p"}])

        sync.on_event(PeerEvent(kind="removed", peer=peer(log), reason="timeout"))
        assert sync.table.peer_ids() == []
        await sync.close()

    asyncio.run(main())


def test_an_advert_that_arrives_during_the_pull_sets_the_models() -> None:
    """A peer first seen with no models puts its first chunks while we pull its inventory: the
    answer already holds the new epoch, so no second pull runs — the table must still learn the
    models of the newer advertisement (else lookups filtered by model find nothing)."""

    async def main() -> None:
        log = InventoryLog(epoch=0)
        answer_now = asyncio.Event()

        async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            await answer_now.wait()
            return log.since(body["since"])

        sync = InventorySync(InventoryTable(), request, retry_s=0.01)
        bare = PeerInfo(node_id="p", addresses=("10.0.0.2",), port=7457, fingerprints=(), epoch=0,
                        chunk_count=0)
        sync.on_event(PeerEvent(kind="added", peer=bare))
        await asyncio.sleep(0)  # the pull is on its way
        key = os.urandom(32)
        log.add([key])
        sync.on_event(PeerEvent(kind="updated", peer=peer(log), epoch_changed=True))
        answer_now.set()
        await sync.wait_synced("p", 10, epoch=log.epoch)
        await asyncio.sleep(0)  # let the sync task finish its turn
        assert sync.table.longest_prefix([key], FP) == (1, [{"p"}])
        await sync.close()

    asyncio.run(main())


def test_a_peer_removed_and_added_at_once_has_one_sync_task() -> None:
    """The cancelled task of the removed peer must not unregister its successor: that let a
    second sync of the same peer run alongside, and the successor outlive close()."""

    async def main() -> None:
        in_flight = 0
        most = 0

        async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                await asyncio.Event().wait()  # a slow peer
                raise AssertionError("unreachable")
            finally:
                in_flight -= 1

        log = InventoryLog(epoch=1)
        sync = InventorySync(InventoryTable(), request)
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        await asyncio.sleep(0)
        # The transport says the peer died and, in the same loop iteration, a heartbeat
        # brings it back.
        sync.on_event(PeerEvent(kind="removed", peer=peer(log), reason="transport"))
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        for _ in range(3):
            await asyncio.sleep(0)
        log.add([os.urandom(32)])
        sync.on_event(PeerEvent(kind="updated", peer=peer(log), epoch_changed=True))
        for _ in range(3):
            await asyncio.sleep(0)
        assert most == 1
        await sync.close()
        assert in_flight == 0  # no task outlived close()

    asyncio.run(main())


def test_a_malformed_paged_answer_or_an_unexpected_error_is_retried() -> None:
    """A page whose keys are not a list is a ProtocolError, and even an error nobody foresaw
    leaves the sync task retrying instead of dying with the peer never synced."""

    async def main() -> None:
        log = InventoryLog(epoch=5)
        log.add([os.urandom(32)])
        answers: list[Any] = [
            {"v": 1, "kind": "full", "epoch": 5, "keys": 7, "pages": 2},
            RuntimeError("a bug in the transport"),
        ]

        async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            if answers:
                answer = answers.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer  # type: ignore[no-any-return]
            return log.since(body["since"])

        sync = InventorySync(InventoryTable(), request, retry_s=0.01)
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        await sync.wait_synced("p", 10, epoch=log.epoch)
        assert sync.table.keys_of("p") == log.keys()
        await sync.close()

    asyncio.run(main())


def test_a_large_inventory_that_changes_while_paged_is_synced() -> None:
    """Paging restarted from page 0 whenever the peer's epoch moved between two pages: a busy
    peer with more than one page of keys was never synced."""
    from kvpeer.discovery.inventory import PAGE_KEYS

    async def main() -> None:
        log = InventoryLog(epoch=1)
        log.add([os.urandom(32) for _ in range(3 * PAGE_KEYS)])

        async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            if body.get("page"):
                log.add([os.urandom(32)])  # a put lands between every two pages
            return log.since(body["since"], body.get("page", 0), body.get("at"))

        sync = InventorySync(InventoryTable(), request, retry_s=0.01)
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        await sync.wait_synced("p", 5)
        sync.on_event(PeerEvent(kind="updated", peer=peer(log), epoch_changed=True))
        await sync.wait_synced("p", 5, epoch=log.epoch)
        assert sync.table.keys_of("p") == log.keys()
        await sync.close()

    asyncio.run(main())


def test_a_large_inventory_of_a_node_from_before_paging_at_an_epoch_is_synced() -> None:
    """Such a node reads "since" as a delta request and knows no "at": the page requests must
    still get pages (of its current epoch) from it, not an empty delta."""
    from kvpeer.discovery.inventory import PAGE_KEYS

    async def main() -> None:
        log = InventoryLog(epoch=1)
        log.add([os.urandom(32) for _ in range(3 * PAGE_KEYS)])

        async def old_node(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            if body["since"] is not None:  # it answers any request naming an epoch with a delta
                return log.since(body["since"])
            return log.since(None, body.get("page", 0))  # and knows no "at"

        sync = InventorySync(InventoryTable(), old_node, retry_s=0.01)
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        await sync.wait_synced("p", 5)
        assert sync.table.keys_of("p") == log.keys()
        await sync.close()

    asyncio.run(main())


class NotDialled(TransportError):
    """What the transport raises while a peer's failed connect waits (PeerBackingOff)."""

    def __init__(self, retry_in_s: float) -> None:
        super().__init__("unreachable; next try soon")
        self.retry_in_s = retry_in_s


def test_a_connect_the_transport_holds_back_is_waited_for_not_backed_off_further() -> None:
    """Nothing was dialled: the sync tries when the transport's wait ends, and its own
    backoff (which grows to 30 s) does not grow meanwhile."""

    async def main() -> None:
        log = InventoryLog(epoch=0)
        log.add([os.urandom(32)])
        held_back = [NotDialled(0.05) for _ in range(4)]

        async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            if held_back:
                raise held_back.pop()
            return log.since(body["since"])

        sync = InventorySync(InventoryTable(), request, retry_s=5.0)  # a real failure: 5 s
        sync.on_event(PeerEvent(kind="added", peer=peer(log)))
        await sync.wait_synced("p", 3)  # four waits of 0.05 s, not 5 + 10 + 20 + 30 s
        await sync.close()

    asyncio.run(main())
