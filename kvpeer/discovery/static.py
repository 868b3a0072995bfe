"""Discovery from a fixed list of peers ("host:port" of their signalling ports).

Each node sends its full advertisement as a unicast UDP beacon to every listed peer at the same
port number, every heartbeat interval and at once when it changes; a beacon is also the
liveness signal, and a "bye" beacon on shutdown removes the node from its peers at once.
Works across routed subnets; needs no multicast and no registry.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from kvpeer import aio
from kvpeer.discovery.advert import Advertisement, decode_record, encode_record
from kvpeer.discovery.base import Discovery
from kvpeer.discovery.beacon import Beacon
from kvpeer.discovery.config import parse_host_port
from kvpeer.errors import ProtocolError

log = logging.getLogger(__name__)


class StaticDiscovery(Discovery):
    """Peers named in the config file."""

    _targets: list[tuple[str, int]]
    _unresolved: list[tuple[str, int]]

    async def _open(self, advert: Advertisement) -> None:
        self._targets, self._unresolved = [], [
            parse_host_port(p, key="discovery.static_peers") for p in self.config.static_peers
        ]
        await self._resolve_targets()

    async def _resolve_targets(self) -> None:
        loop = asyncio.get_running_loop()
        pending, self._unresolved = self._unresolved, []
        for host, port in pending:
            try:
                infos = await aio.wait_for(
                    loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM),
                    self.config.request_timeout_s,
                )
            except (OSError, TimeoutError) as exc:
                log.warning("static peer %s:%d does not resolve (%s); will retry", host, port, exc)
                self._unresolved.append((host, port))
                continue
            ip = str(infos[0][4][0])
            if ip in self.addresses and port == (self._advert.port if self._advert else 0):
                continue  # this node itself, listed in a config shared by the cluster
            self._targets.append((ip, port))

    async def _publish(self, advert: Advertisement) -> None:
        beacon = self._heartbeat()
        if beacon is not None:
            for target in self._heartbeat_targets():
                self._send(beacon, target)

    async def _close(self) -> None:
        return None  # the base class sends the "bye" beacons

    def _heartbeat_interval(self) -> float:
        # Beacons are how static peers learn of each other at all: never off.
        return self.config.heartbeat_interval_s or self.config.peer_timeout_s / 4

    def _heartbeat(self) -> Beacon | None:
        assert self._advert is not None
        record = encode_record(self._advert, self.addresses)
        return Beacon(kind="ad", node_id=self._advert.node_id, record=record)

    def _heartbeat_targets(self) -> list[tuple[str, int]]:
        # Peers that list us but that we do not list still hear from us.
        return list(dict.fromkeys([*self._targets, *super()._heartbeat_targets()]))

    async def _tick(self) -> None:
        if self._unresolved:
            await self._resolve_targets()

    def _on_beacon(self, beacon: Beacon, source_ip: str) -> None:
        if beacon.kind != "ad":
            super()._on_beacon(beacon, source_ip)
            return
        try:
            info = decode_record(beacon.record)
        except ProtocolError as exc:
            self._warn(source_ip, "ignored malformed advertisement: %s", exc)
            return
        if info.node_id != beacon.node_id or source_ip not in info.addresses:
            self._warn(source_ip, "ignored advertisement of %s from another address", info.node_id)
            return
        self._observe(info)
