"""EtcdDiscovery against an in-memory fake of the few aetcd calls it makes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from kvpeer.discovery import Advertisement, DiscoveryConfig
from kvpeer.discovery.advert import decode_record, encode_record
from kvpeer.discovery.etcd import EtcdDiscovery

KEY = b"/kvpeer/nodes/me"


class FakeLease:
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.alive = True

    async def refresh(self) -> SimpleNamespace:
        return SimpleNamespace(TTL=10 if self.alive else 0)

    async def revoke(self) -> None:
        self.alive = False


class Listing(list[Any]):
    header = SimpleNamespace(revision=1)


class FakeEtcd:
    """Keys with leases and revisions, watched by every client; ``fail_puts`` puts fail like
    a flaky connection. Changes ``kv`` directly are ones no watch sees (it was down)."""

    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, FakeLease]] = {}
        self.fail_puts = 0
        self.changed = asyncio.Event()
        self._history: list[SimpleNamespace] = []  # watch events, one revision each
        self._grown = asyncio.Event()

    async def status(self) -> None:
        return None

    async def lease(self, ttl: int) -> FakeLease:
        return FakeLease()

    async def put(self, key: bytes, value: bytes, lease: FakeLease) -> None:
        if self.fail_puts:
            self.fail_puts -= 1
            raise RuntimeError("connection reset")  # what a transient gRPC error looks like
        self.kv[key] = (value, lease)
        self._record("PUT", key, value, lease)

    async def get(self, key: bytes) -> SimpleNamespace | None:
        entry = self.kv.get(key)
        return None if entry is None else self._kv(key, *entry)

    async def get_prefix(self, prefix: bytes) -> Listing:
        listing = Listing(
            self._kv(k, v, lease) for k, (v, lease) in self.kv.items() if k.startswith(prefix)
        )
        listing.header = SimpleNamespace(revision=len(self._history))
        return listing

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[Any]:
        async def stream() -> AsyncIterator[Any]:
            seen = max(0, start_revision - 1)
            while True:
                grown = self._grown
                while seen < len(self._history):
                    event = self._history[seen]
                    seen += 1
                    if event.kv.key.startswith(prefix):
                        yield event
                await grown.wait()

        return stream()

    async def delete(self, key: bytes) -> None:
        if self.kv.pop(key, None) is not None:
            self._record("DELETE", key, b"", None)

    async def close(self) -> None:
        return None

    def expire_leases(self) -> None:
        """A partition longer than the TTL: etcd drops our lease and the key under it."""
        for key, (_, lease) in list(self.kv.items()):
            lease.alive = False
            del self.kv[key]
            self._record("DELETE", key, b"", None)

    def _kv(self, key: bytes, value: bytes, lease: FakeLease | None) -> SimpleNamespace:
        return SimpleNamespace(
            key=key, value=value, lease=lease.id if lease else 0, mod_revision=len(self._history)
        )

    def _record(self, kind: str, key: bytes, value: bytes, lease: FakeLease | None) -> None:
        kv = self._kv(key, value, lease)
        kv.mod_revision += 1
        self._history.append(SimpleNamespace(kind=kind, kv=kv))
        self._grown.set()
        self._grown = asyncio.Event()
        self.changed.set()

    def stored_epoch(self) -> int | None:
        entry = self.kv.get(KEY)
        if entry is None or not entry[1].alive:
            return None
        return decode_record(entry[0]).epoch

    async def wait(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        await wait_on(self.changed, condition, timeout_s)


async def wait_on(event: asyncio.Event, condition: Callable[[], bool], timeout_s: float) -> None:
    """Wait until ``condition`` holds, checking it each time ``event`` is set."""

    async def until() -> None:
        while not condition():
            event.clear()
            await event.wait()

    await asyncio.wait_for(until(), timeout_s)


class FakeEtcdDiscovery(EtcdDiscovery):
    def __init__(self, client: FakeEtcd) -> None:
        super().__init__(DiscoveryConfig(backend="etcd", interfaces=("127.0.0.1",),
                                         etcd_lease_ttl_s=2, update_min_interval_s=0))
        self.fake = client
        self.ticked = asyncio.Event()
        self.ticks = 0

    async def _connect(self) -> Any:
        return self.fake

    async def _tick(self) -> None:
        await super()._tick()
        self.ticks += 1
        self.ticked.set()

    async def ticks_until(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait, checking after each liveness round, until ``condition`` holds."""
        await wait_on(self.ticked, condition, timeout_s)


def advert(epoch: int) -> Advertisement:
    return Advertisement(node_id="me", port=9, epoch=epoch)


async def register_peer(etcd: FakeEtcd, node_id: str = "peer") -> bytes:
    """A peer's key under a lease of its own, as its daemon puts it; returns the key."""
    key = b"/kvpeer/nodes/" + node_id.encode()
    record = encode_record(Advertisement(node_id=node_id, port=7000, epoch=5), ["10.0.0.2"])
    await etcd.put(key, record, FakeLease())
    return key


def test_a_failed_put_after_the_lease_expired_is_put_again() -> None:
    """The new lease holds no key until a put succeeds: refreshing it alone kept the node
    invisible for good."""

    async def main() -> None:
        etcd = FakeEtcd()
        d = FakeEtcdDiscovery(etcd)
        await d.start(advert(1))
        try:
            assert etcd.stored_epoch() == 1
            etcd.fail_puts = 1
            etcd.expire_leases()
            await etcd.wait(lambda: etcd.stored_epoch() == 1)
        finally:
            await d.close()

    asyncio.run(main())


def test_a_failed_update_is_published_again() -> None:
    """A failed publication was only logged: peers kept the old epoch until the next update."""

    async def main() -> None:
        etcd = FakeEtcd()
        d = FakeEtcdDiscovery(etcd)
        await d.start(advert(1))
        try:
            etcd.fail_puts = 1
            await d.update(advert(2))
            await etcd.wait(lambda: etcd.stored_epoch() == 2)
        finally:
            await d.close()

    asyncio.run(main())


def test_a_peer_marked_dead_whose_key_stays_comes_back() -> None:
    """The transport marks a peer dead on a lost session (a blip, a stalled loop); with etcd
    only a put brought it back, and a running peer's key may never change again."""

    async def main() -> None:
        etcd = FakeEtcd()
        await register_peer(etcd)
        d = FakeEtcdDiscovery(etcd)
        await d.start(advert(1))
        try:
            assert "peer" in d.peers()
            d.mark_dead("peer")
            assert "peer" not in d.peers()
            await d.ticks_until(lambda: "peer" in d.peers())  # its key outlived a lease TTL
        finally:
            await d.close()

    asyncio.run(main())


def test_a_dead_peer_whose_key_went_unseen_is_forgotten() -> None:
    """Dead entries were never forgotten with etcd (no timeout), and a re-list withdrew only
    live peers: a key deleted while the watch was down left its entry for good."""

    async def main() -> None:
        etcd = FakeEtcd()
        key = await register_peer(etcd)
        d = FakeEtcdDiscovery(etcd)
        await d.start(advert(1))
        try:
            d.mark_dead("peer")
            del etcd.kv[key]  # no watch event: the watch was down
            await d.ticks_until(lambda: d._table.known("peer") is None)
        finally:
            await d.close()

    asyncio.run(main())


def test_a_relisting_forgets_dead_peers_whose_key_went() -> None:
    async def main() -> None:
        etcd = FakeEtcd()
        key = await register_peer(etcd)
        d = FakeEtcdDiscovery(etcd)
        await d.start(advert(1))
        try:
            d.mark_dead("peer")
            del etcd.kv[key]
            await d._list()  # what a failed watch does before watching again
            assert d._table.known("peer") is None
        finally:
            await d.close()

    asyncio.run(main())


def test_a_node_whose_id_a_second_node_takes_warns_and_returns_when_it_leaves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two nodes with one node id (a cloned image): the second's put replaced the first's
    key, and when it stopped and deleted the key the first, still running, stayed
    unregistered for good, with nothing said about the clash."""

    async def main() -> None:
        etcd = FakeEtcd()
        first, clone = FakeEtcdDiscovery(etcd), FakeEtcdDiscovery(etcd)
        await first.start(advert(1))
        try:
            await clone.start(advert(2))
            await first.ticks_until(lambda: first.counters.get("node_id_clashes") == 1)
            ticks = first.ticks
            await first.ticks_until(lambda: first.ticks >= ticks + 2)
            assert etcd.stored_epoch() == 2  # the key is left to the clone while it runs
            await clone.close()
            await etcd.wait(lambda: etcd.stored_epoch() == 1)
        finally:
            await clone.close()
            await first.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "node id me: also registered in etcd by 127.0.0.1" in caplog.text


def test_a_node_whose_key_another_client_deletes_puts_it_again() -> None:
    async def main() -> None:
        etcd = FakeEtcd()
        d = FakeEtcdDiscovery(etcd)
        await d.start(advert(1))
        try:
            await etcd.delete(KEY)
            await etcd.wait(lambda: etcd.stored_epoch() == 1)
        finally:
            await d.close()

    asyncio.run(main())
