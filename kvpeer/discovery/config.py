"""Discovery configuration and the choice of addresses a node may advertise.

Owns `DiscoveryConfig` (the `[discovery]` config section) and `advertisable_addresses`, the
guard that keeps loopback and container-bridge addresses off a real LAN unless the operator
named them explicitly. No sockets are opened here.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import ifaddr

from kvpeer.errors import ConfigError, NotReadyError

log = logging.getLogger(__name__)

BACKENDS = ("zeroconf", "static", "etcd")

# Interfaces that belong to containers or VMs on this host, not to the LAN.
_BRIDGE_PREFIXES = ("docker", "veth", "br-", "virbr", "cni", "flannel", "cali", "vnet", "podman")


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryConfig:
    """How this node finds its peers (the ``[discovery]`` config section)."""

    backend: str = "zeroconf"
    """Which registry: "zeroconf" (mDNS on the LAN), "static" (``static_peers``) or "etcd"."""

    interfaces: tuple[str, ...] = ()
    """Interface names or IP addresses to advertise and listen on. Empty: every IPv4 address of
    every up interface except loopback and container bridges. Loopback or a bridge is used only
    when named here (single-host setups)."""

    static_peers: tuple[str, ...] = ()
    """"host:port" of each peer's signalling port (backend "static"). Beacons go to the same
    port number over UDP."""

    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    """etcd client URLs (backend "etcd"); the first that answers is used."""

    etcd_prefix: str = "/kvpeer/nodes/"
    """Key prefix under which each node writes its advertisement (backend "etcd")."""

    etcd_lease_ttl_s: int = 10
    """Lease TTL of a node's etcd key: a node that stops refreshing vanishes after this long."""

    update_min_interval_s: float = 1.0
    """Advertisement updates are coalesced to at most one per this many seconds."""

    peer_timeout_s: float = 10.0
    """A peer not heard from (heartbeat, beacon or lease) for this long is dropped."""

    heartbeat_interval_s: float = 2.5
    """Period of the UDP heartbeat each node sends to its peers. 0 is refused for zeroconf,
    where heartbeats are the only evidence that a peer runs; static beacons at
    peer_timeout_s / 4 instead, and etcd does not use it."""

    request_timeout_s: float = 3.0
    """Timeout of one network wait: resolving a zeroconf service, one etcd request."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"discovery.backend: {self.backend!r} is not one of {BACKENDS}")
        for name in ("update_min_interval_s", "heartbeat_interval_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"discovery.{name} must be >= 0")
        for name in ("peer_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"discovery.{name} must be > 0")
        if self.heartbeat_interval_s and self.heartbeat_interval_s * 2 > self.peer_timeout_s:
            raise ConfigError("discovery.heartbeat_interval_s must be at most peer_timeout_s / 2")
        if self.backend == "zeroconf" and not self.heartbeat_interval_s:
            # mDNS keeps a killed peer's records for their TTL, and a peer the transport marked
            # dead came back only if its advertisement changed: a live peer was lost for good.
            raise ConfigError(
                "discovery.heartbeat_interval_s: 0 (no heartbeats) is not supported with backend "
                "zeroconf: peers found by mDNS need heartbeats to be dropped when they stop and "
                "taken back when they return"
            )
        if self.etcd_lease_ttl_s < 2:
            raise ConfigError("discovery.etcd_lease_ttl_s must be >= 2")
        for peer in self.static_peers:
            parse_host_port(peer, key="discovery.static_peers")

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | object | None) -> DiscoveryConfig:
        """Build from a parsed config section: a mapping, or an object with the same attributes.

        Unknown keys raise ConfigError naming the key; lists become tuples.
        """
        if section is None:
            return cls()
        names = {f.name for f in fields(cls)}
        if isinstance(section, Mapping):
            raw = dict(section)
        else:
            raw = {n: getattr(section, n) for n in names if hasattr(section, n)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"discovery.{unknown[0]}: unknown key")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, list | tuple):
                value = tuple(str(v) for v in value)
            elif key in ("interfaces", "static_peers", "etcd_endpoints") and isinstance(value, str):
                value = (value,)
            values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"discovery: {exc}") from exc


def parse_host_port(text: str, *, key: str = "address") -> tuple[str, int]:
    """Split "host:port" / "[v6]:port"; ConfigError naming ``key`` if malformed."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    return host, int(port_text)


def _is_bridge(nice_name: str) -> bool:
    return nice_name.startswith(_BRIDGE_PREFIXES)


@dataclass(frozen=True, slots=True)
class HostInterface:
    name: str
    addresses: tuple[str, ...] = field(default=())


def _host_interfaces() -> list[HostInterface]:
    out: list[HostInterface] = []
    for adapter in ifaddr.get_adapters():
        v4 = tuple(str(ip.ip) for ip in adapter.ips if isinstance(ip.ip, str))
        out.append(HostInterface(adapter.nice_name, v4))
    return out


def _interface_names() -> list[str]:
    """Every interface of the host, down or without an address too (ifaddr lists only those
    with one)."""
    return [name for _index, name in socket.if_nameindex()]


def advertisable_addresses(
    interfaces: Sequence[str],
    host: Iterable[HostInterface] | None = None,
    names: Iterable[str] | None = None,
) -> tuple[str, ...]:
    """IPv4 addresses this node may advertise and listen on, from ``interfaces``.

    An entry is an IP address or an interface name; both are taken as given (explicit
    configuration is trusted). With no entries, every address of every interface except
    loopback and container/VM bridges. Raises ConfigError when nothing usable remains, and
    NotReadyError when a named interface does not exist or has no IPv4 address yet (at boot:
    its driver not loaded, the link still down or DHCP pending; systemd starts the daemon
    again).
    """
    ifaces = list(host) if host is not None else _host_interfaces()
    if names is None:
        names = _interface_names() if host is None else ()
    all_names = {*names, *(i.name for i in ifaces)}
    chosen: list[str] = []
    if interfaces:
        for entry in interfaces:
            try:
                ip = ipaddress.ip_address(entry)
            except ValueError:
                if entry not in all_names:
                    # At boot a NIC's driver may not be loaded yet (exit 1: systemd starts us
                    # again); a typo ends in the unit's start limit, and --check-config fails.
                    raise NotReadyError(
                        f"discovery.interfaces: no interface {entry!r} (yet: its driver may not "
                        "be loaded)"
                    ) from None
                match = [i for i in ifaces if i.name == entry]
                if not match or not match[0].addresses:  # at boot, DHCP may come later
                    raise NotReadyError(
                        f"discovery.interfaces: no IPv4 address on interface {entry!r} (yet)"
                    ) from None
                chosen.extend(match[0].addresses)
            else:
                if ip.version != 4:
                    raise ConfigError(f"discovery.interfaces: {entry!r}: only IPv4 is supported")
                chosen.append(str(ip))
    else:
        for iface in ifaces:
            if _is_bridge(iface.name):
                continue
            for addr in iface.addresses:
                ip = ipaddress.ip_address(addr)
                if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
                    continue
                chosen.append(addr)
    unique = tuple(dict.fromkeys(chosen))
    if not unique:
        waiting = sorted(n for n in all_names if n != "lo" and not _is_bridge(n))
        if not interfaces and waiting:
            raise NotReadyError(
                "discovery.interfaces: no IPv4 address on any interface yet "
                f"({', '.join(waiting)}; loopback and bridges count only when named)"
            )
        raise ConfigError(
            "discovery.interfaces: no usable address (loopback and bridges must be named)"
        )
    return unique


def check_advertised(addresses: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """Addresses of an advertisement, restricted to ``allowed`` (from `advertisable_addresses`).

    An address outside the allowed set is refused with ConfigError: a daemon must not announce
    loopback or a bridge because another part of the config happened to name it.
    """
    if not addresses:
        return tuple(allowed)
    stray = [a for a in addresses if a not in allowed]
    if stray:
        raise ConfigError(
            f"discovery: advertised address {stray[0]} is not on a configured interface "
            f"({', '.join(allowed)})"
        )
    return tuple(addresses)
