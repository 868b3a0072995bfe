"""Discovery: who the peers are, what they hold, and whether they are still alive.

Public surface: `make_discovery(config)` returns a `Discovery` (zeroconf on the LAN, a static
peer list, or etcd across routed subnets), all announcing an `Advertisement` and reporting
`PeerInfo`s and `PeerEvent`s. `InventoryLog` / `InventoryTable` (sans-IO) keep this node's and
the peers' chunk sets in step through full and delta inventories; `InventorySync` pulls them.

Liveness: a goodbye (zeroconf goodbye packet, static "bye" beacon, etcd key delete) removes a
peer at once. A peer that vanishes is dropped by whichever notices first: the transport's
session heartbeat (`mark_dead`, ~2 s with a session open), or our own unicast UDP heartbeats
(zeroconf, static: every heartbeat_interval_s to each known peer at its signalling port
number; silent for peer_timeout_s = dropped), or, for etcd, the lease expiring. mDNS TTLs
alone would keep a killed peer for minutes. A dropped peer that is in fact alive comes back
with its next heartbeat.
"""

from __future__ import annotations

from kvpeer.discovery.advert import SERVICE_TYPE, Advertisement, PeerEvent, PeerInfo
from kvpeer.discovery.base import Discovery
from kvpeer.discovery.config import DiscoveryConfig
from kvpeer.discovery.digest import BloomDigest
from kvpeer.discovery.inventory import (
    InventoryLog,
    InventoryTable,
    InventoryUpdate,
    StaleDeltaError,
)
from kvpeer.discovery.static import StaticDiscovery
from kvpeer.discovery.sync import InventorySync, sync_peer
from kvpeer.discovery.zeroconf_backend import ZeroconfDiscovery

__all__ = [
    "SERVICE_TYPE",
    "Advertisement",
    "BloomDigest",
    "Discovery",
    "DiscoveryConfig",
    "EtcdDiscovery",
    "InventoryLog",
    "InventorySync",
    "InventoryTable",
    "InventoryUpdate",
    "PeerEvent",
    "PeerInfo",
    "StaleDeltaError",
    "StaticDiscovery",
    "ZeroconfDiscovery",
    "make_discovery",
    "sync_peer",
]


def make_discovery(config: DiscoveryConfig) -> Discovery:
    """The backend ``config.backend`` names."""
    if config.backend == "static":
        return StaticDiscovery(config)
    if config.backend == "etcd":
        return EtcdDiscovery(config)
    return ZeroconfDiscovery(config)


from kvpeer.discovery.etcd import EtcdDiscovery  # noqa: E402  (needs base, imported above)
