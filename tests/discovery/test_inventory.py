import os

import pytest

from kvpeer.discovery.inventory import (
    MAX_INVENTORY_KEYS,
    InventoryLog,
    InventoryTable,
    InventoryUpdate,
    StaleDeltaError,
)
from kvpeer.errors import ProtocolError


def keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def test_delta_then_full_agree() -> None:
    log = InventoryLog(epoch=100)
    a, b = keys(5), keys(5)
    log.add(a)
    table, reference = InventoryTable(), InventoryTable()
    table.apply("p", log.since(None))
    log.add(b)
    log.remove(a[:2])
    delta = log.since(table.epoch("p"))
    assert delta["kind"] == "delta"
    assert sorted(delta["add"]) == sorted(b) and sorted(delta["remove"]) == sorted(a[:2])
    table.apply("p", delta)
    reference.apply("p", log.since(None))
    assert table.snapshot() == reference.snapshot()
    assert table.epoch("p") == log.epoch == 103
    assert table.sizes() == {"p": 8} == {p: len(k) for p, k in table.snapshot().items()}


def test_unknown_or_future_epoch_answers_full() -> None:
    log = InventoryLog(epoch=10)
    log.add(keys(3))
    assert log.since(None)["kind"] == "full"
    assert log.since(5)["kind"] == "full"  # before this log existed (an older incarnation)
    assert log.since(99)["kind"] == "full"  # after it (a peer remembering a future?)


def test_history_bound_falls_back_to_full() -> None:
    log = InventoryLog(epoch=0, history_keys=4)
    for _ in range(5):
        log.add(keys(2))
    assert log.since(1)["kind"] == "full"
    assert log.since(log.epoch - 1)["kind"] == "delta"


def test_delta_on_wrong_base_is_stale() -> None:
    log = InventoryLog(epoch=0)
    log.add(keys(10))
    log.add(keys(1))
    table = InventoryTable()
    with pytest.raises(StaleDeltaError):
        table.apply("p", log.since(1))


def test_lookup_longest_prefix_and_fingerprint_filter() -> None:
    chain = keys(4)
    table = InventoryTable()
    table.apply("a", InventoryUpdate(kind="full", epoch=1, keys=tuple(chain[:3])), ["m1"])
    table.apply("b", InventoryUpdate(kind="full", epoch=1, keys=tuple(chain[:1])), ["m2"])
    n, holders = table.longest_prefix(chain)
    assert n == 3 and holders[0] == {"a", "b"} and holders[2] == {"a"}
    assert table.peers_for(chain[0], "m1") == {"a"}
    assert table.holders(chain) == [{"a", "b"}, {"a"}, {"a"}, set()]
    assert table.holders(chain, "m2") == [{"b"}, set(), set(), set()]
    table.drop("a")
    assert table.longest_prefix(chain, "m1") == (0, [])


@pytest.mark.parametrize(
    "message",
    [
        {"v": 2, "kind": "full", "epoch": 1, "keys": []},
        {"v": 1, "kind": "nope", "epoch": 1},
        {"v": 1, "kind": "full", "epoch": -1, "keys": []},
        {"v": 1, "kind": "full", "epoch": True, "keys": []},
        {"v": 1, "kind": "full", "epoch": 1, "keys": [b"short"]},
        {"v": 1, "kind": "full", "epoch": 1, "keys": "abc"},
        {"v": 1, "kind": "delta", "epoch": 1, "base": 5, "add": [], "remove": []},
        {"v": 1, "kind": "full", "epoch": 1, "keys": [b"k" * 32] * (MAX_INVENTORY_KEYS + 1)},
        [],
    ],
)
def test_malformed_inventory_is_rejected(message: object) -> None:
    with pytest.raises(ProtocolError):
        InventoryTable().apply("p", message)  # type: ignore[arg-type]


def test_first_chunk_keys_follow_removals() -> None:
    log = InventoryLog(epoch=0)
    a = keys(3)
    log.add(a, first=a[:1])
    assert log.first_chunk_keys() == {a[0]}
    log.remove(a[:1])
    assert log.first_chunk_keys() == set()


def test_epoch_of_a_new_log_is_after_an_old_ones_last() -> None:
    old = InventoryLog()
    for _ in range(100):
        old.add(keys(1))
    assert InventoryLog().epoch > old.epoch - 100


def test_a_large_full_inventory_is_paged_and_joins_up() -> None:
    import asyncio

    from kvpeer.discovery.advert import PeerInfo
    from kvpeer.discovery.inventory import PAGE_KEYS
    from kvpeer.discovery.sync import sync_peer

    log = InventoryLog(epoch=1)
    keys = [i.to_bytes(32, "big") for i in range(2 * PAGE_KEYS + 5)]
    log.add(keys)
    first = log.since(None)
    assert first["pages"] == 3 and len(first["keys"]) == PAGE_KEYS

    asked: list[dict] = []

    async def request(peer_id: str, method: str, body: dict) -> dict:
        asked.append(body)
        return log.since(body["since"], body.get("page", 0))

    table = InventoryTable()
    peer = PeerInfo(node_id="p", addresses=("10.0.0.1",), port=7457, fingerprints=("ab" * 16,),
                    epoch=log.epoch, chunk_count=len(keys))
    asyncio.run(sync_peer(table, request, peer, timeout_s=5))
    assert table.keys_of("p") == frozenset(keys)
    assert [b.get("page", 0) for b in asked] == [0, 1, 2]


def test_a_log_over_the_key_limit_still_answers_in_pages() -> None:
    """Every answer used to build one full update of all keys first, which refuses more than
    MAX_INVENTORY_KEYS: such a node answered every inventory request with TOO_LARGE."""
    import asyncio

    from kvpeer.discovery.advert import PeerInfo
    from kvpeer.discovery.inventory import MAX_PAGES
    from kvpeer.discovery.sync import sync_peer

    log = InventoryLog(epoch=1)
    held = [i.to_bytes(32, "big") for i in range(MAX_INVENTORY_KEYS + 10)]
    log.add(held)

    async def request(peer_id: str, method: str, body: dict) -> dict:
        return log.since(body["since"], body.get("page", 0))

    assert log.since(None)["pages"] == MAX_PAGES
    assert log.since(1)["pages"] == MAX_PAGES  # a delta of more than a page: full, paged
    table = InventoryTable()
    peer = PeerInfo(node_id="p", addresses=("10.0.0.1",), port=7457, fingerprints=(),
                    epoch=log.epoch, chunk_count=len(held))
    asyncio.run(sync_peer(table, request, peer, timeout_s=5))
    assert table.keys_of("p") == frozenset(held[:MAX_INVENTORY_KEYS])  # the first, sorted


def test_later_pages_come_from_the_first_pages_epoch() -> None:
    from kvpeer.discovery.inventory import MAX_SNAPSHOTS, PAGE_KEYS

    log = InventoryLog(epoch=1)
    held = [i.to_bytes(32, "big") for i in range(2 * PAGE_KEYS)]
    log.add(held)
    first = log.since(None)
    log.remove(held[:10])  # the chunk set moves on between pages
    log.add(keys(5))
    second = log.since(None, 1, at=first["epoch"])
    assert second["epoch"] == first["epoch"] and second["pages"] == 2
    assert first["keys"] + second["keys"] == held
    assert log.since(None, 1)["epoch"] == log.epoch  # an asker from before: current epoch
    for _ in range(MAX_SNAPSHOTS):  # others page through newer epochs: the old one goes
        log.add(keys(1))
        log.since(None)
    with pytest.raises(ProtocolError):
        log.since(None, 1, at=first["epoch"])


def test_deltas_do_not_grow_a_peer_past_the_inventory_cap() -> None:
    """Each delta was checked against the cap, the running total never was."""
    table = InventoryTable()
    table.apply("p", InventoryUpdate(kind="full", epoch=1, keys=()))
    step = 40_000
    for i in range(7):
        added = tuple(os.urandom(32) for _ in range(step))
        table.apply("p", InventoryUpdate(kind="delta", epoch=i + 2, base_epoch=i + 1, added=added))
    assert len(table.keys_of("p")) == MAX_INVENTORY_KEYS
    assert table.counters == {"inventory_keys_refused": 7 * step - MAX_INVENTORY_KEYS}
    assert table.epoch("p") == 8
