"""ZeroconfDiscovery's handling of browser events, without a network: resolves are stubbed."""

from __future__ import annotations

import asyncio

from zeroconf import ServiceStateChange

from kvpeer.discovery import DiscoveryConfig, ZeroconfDiscovery
from kvpeer.discovery.zeroconf_backend import instance_name


class StubResolve(ZeroconfDiscovery):
    """Resolves hang until released; counts how many run at once."""

    def __init__(self) -> None:
        super().__init__(DiscoveryConfig(interfaces=("127.0.0.1",)))
        self.in_flight = 0
        self.most = 0
        self.release = asyncio.Event()

    async def _resolve_once(self, name: str) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1

    def event(self, name: str, change: ServiceStateChange) -> None:
        self._on_state_change(None, "_kvpeer._tcp.local.", name, change)


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_service_removed_and_added_at_once_has_one_resolve() -> None:
    """The cancelled resolve must not unregister the one started after it for the same name."""

    async def main() -> None:
        d = StubResolve()
        name = instance_name("peer")
        d.event(name, ServiceStateChange.Added)
        await turns()
        d.event(name, ServiceStateChange.Removed)
        d.event(name, ServiceStateChange.Added)
        await turns()
        d.event(name, ServiceStateChange.Updated)
        await turns()
        assert d.most == 1
        await d._close()
        assert d.in_flight == 0

    asyncio.run(main())
