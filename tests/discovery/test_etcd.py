"""EtcdDiscovery against an in-memory fake of the few aetcd calls it makes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

from kvpeer.discovery import Advertisement, DiscoveryConfig
from kvpeer.discovery.advert import decode_record
from kvpeer.discovery.etcd import EtcdDiscovery

KEY = b"/kvpeer/nodes/me"


class FakeLease:
    def __init__(self) -> None:
        self.alive = True

    async def refresh(self) -> SimpleNamespace:
        return SimpleNamespace(TTL=10 if self.alive else 0)

    async def revoke(self) -> None:
        self.alive = False


class Listing(list[Any]):
    header = SimpleNamespace(revision=1)


class FakeEtcd:
    """Keys with leases; ``fail_puts`` puts fail like a flaky connection."""

    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, FakeLease]] = {}
        self.fail_puts = 0
        self.changed = asyncio.Event()

    async def status(self) -> None:
        return None

    async def lease(self, ttl: int) -> FakeLease:
        return FakeLease()

    async def put(self, key: bytes, value: bytes, lease: FakeLease) -> None:
        if self.fail_puts:
            self.fail_puts -= 1
            raise RuntimeError("connection reset")  # what a transient gRPC error looks like
        self.kv[key] = (value, lease)
        self.changed.set()

    async def get_prefix(self, prefix: bytes) -> Listing:
        return Listing()

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[Any]:
        async def never() -> AsyncIterator[Any]:
            await asyncio.Event().wait()
            yield None

        return never()

    async def delete(self, key: bytes) -> None:
        self.kv.pop(key, None)

    async def close(self) -> None:
        return None

    def expire_leases(self) -> None:
        """A partition longer than the TTL: etcd drops our lease and the key under it."""
        for key, (_, lease) in list(self.kv.items()):
            lease.alive = False
            del self.kv[key]

    def stored_epoch(self) -> int | None:
        entry = self.kv.get(KEY)
        if entry is None or not entry[1].alive:
            return None
        return decode_record(entry[0]).epoch

    async def wait(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async def until() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout_s)


class FakeEtcdDiscovery(EtcdDiscovery):
    def __init__(self, client: FakeEtcd) -> None:
        super().__init__(DiscoveryConfig(backend="etcd", interfaces=("127.0.0.1",),
                                         etcd_lease_ttl_s=2, update_min_interval_s=0))
        self.fake = client

    async def _connect(self) -> Any:
        return self.fake


def advert(epoch: int) -> Advertisement:
    return Advertisement(node_id="me", port=9, epoch=epoch)


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
