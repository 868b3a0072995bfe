"""Discovery through etcd (keys with leases), for clusters spanning routed subnets."""

from __future__ import annotations

from kvpeer.discovery.advert import Advertisement
from kvpeer.discovery.base import Discovery
from kvpeer.errors import ConfigError


class EtcdDiscovery(Discovery):
    """Peers registered under a key prefix in etcd."""

    async def _open(self, advert: Advertisement) -> None:
        raise ConfigError("discovery.backend: etcd is not implemented yet")

    async def _publish(self, advert: Advertisement) -> None:
        raise ConfigError("discovery.backend: etcd is not implemented yet")

    async def _close(self) -> None:
        return None
