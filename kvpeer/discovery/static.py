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
from kvpeer.discovery.config import DiscoveryConfig, parse_host_port
from kvpeer.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_LOOKUPS = 8  # static peers' names resolved at once


class StaticDiscovery(Discovery):
    """Peers named in the config file."""

    _resolver: asyncio.Task[None] | None = None

    def __init__(self, config: DiscoveryConfig) -> None:
        super().__init__(config)
        self._targets: list[tuple[str, int]] = []  # listed peers, resolved
        self._unresolved: list[tuple[str, int]] = []

    async def _open(self, advert: Advertisement) -> None:
        self._targets, self._unresolved = [], [
            parse_host_port(p, key="discovery.static_peers") for p in self.config.static_peers
        ]
        self._start_resolving()

    def _start_resolving(self) -> None:
        # Names resolve in their own task: a DNS server that does not answer must hold up
        # neither start() nor the heartbeats that keep this node alive at its peers.
        if self._unresolved and (self._resolver is None or self._resolver.done()):
            self._resolver = asyncio.create_task(self._resolve_targets(), name="static-resolve")

    async def _resolve_targets(self) -> None:
        pending, self._unresolved = self._unresolved, []
        limit = asyncio.Semaphore(MAX_LOOKUPS)  # each lookup holds an executor thread
        await asyncio.gather(*(self._resolve_target(host, port, limit) for host, port in pending))

    async def _resolve_target(self, host: str, port: int, limit: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with limit:
            try:
                infos = await aio.wait_for(
                    loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM),
                    self.config.request_timeout_s,
                )
            except (OSError, TimeoutError, UnicodeError) as exc:
                self._warn(f"{host}:{port}", "static peer does not resolve (%r); will retry", exc)
                self._unresolved.append((host, port))
                return
        target = (str(infos[0][4][0]), port)
        if target[0] in self.addresses and port == (self._advert.port if self._advert else 0):
            return  # this node itself, listed in a config shared by the cluster
        if target not in self._targets:
            self._targets.append(target)
            # Announce ourselves now rather than at the next heartbeat.
            if (beacon := self._heartbeat()) is not None:
                self._send(beacon, target)

    async def _publish(self, advert: Advertisement) -> None:
        beacon = self._heartbeat()
        if beacon is not None:
            for target in self._heartbeat_targets():
                self._send(beacon, target)

    async def _close(self) -> None:
        # The base class sends the "bye" beacons.
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.wait([self._resolver])  # its end; a cancel of our own still comes through

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
        self._start_resolving()

    def _on_beacon(self, beacon: Beacon, source_ip: str) -> None:
        if beacon.kind != "ad":
            super()._on_beacon(beacon, source_ip)
            return
        try:
            info = decode_record(beacon.record)
        except ProtocolError as exc:
            self._ignore_beacon(source_ip, "malformed advertisement: %s", exc)
            return
        # Beacons leave from a node's first address, and our heartbeats go back there: one
        # from elsewhere could make us send beacons to a third party of the sender's choice.
        if info.node_id != beacon.node_id or info.addresses[:1] != (source_ip,):
            self._ignore_beacon(source_ip, "advertisement of %s from another address", info.node_id)
            return
        incumbent = self.peers().get(info.node_id)
        if incumbent is not None and incumbent.addresses[0] != source_ip:
            # Two hosts announce one node id (a cloned image): keep the one we have while it
            # lives, rather than flip between them, re-syncing inventories, at every beacon.
            self._events["node_id_clashes"] += 1
            self._warn(
                f"node id {info.node_id}", "announced from %s and %s; keeping %s while it runs",
                incumbent.addresses[0], source_ip, incumbent.addresses[0],
            )
            return
        # A peer the operator listed is never refused for a full table.
        self._observe(info, listed=(source_ip, info.port) in self._targets)
