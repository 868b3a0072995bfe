"""The `Discovery` interface and the machinery every backend shares.

Shared here: the live-peer table and its subscribers, coalesced advertisement updates, and
the liveness loop (heartbeats out, silent peers expired). A backend implements only how an
advertisement is published and withdrawn and how peers' advertisements arrive
(`_publish`, `_open`, `_close`, and optionally heartbeats). Every task is owned by the
discovery object and cancelled in `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping

from kvpeer.discovery._warn import WarnOnce, WarnRarely
from kvpeer.discovery.advert import Advertisement, PeerEvent, PeerInfo
from kvpeer.discovery.beacon import Beacon, BeaconSocket, decode_beacon, encode_beacon
from kvpeer.discovery.config import DiscoveryConfig, advertisable_addresses, check_advertised
from kvpeer.discovery.peers import PeerTable, UpdateThrottle
from kvpeer.errors import KVPeerError, ProtocolError

log = logging.getLogger(__name__)

PeerCallback = Callable[[PeerEvent], None]


class Discovery(ABC):
    """Announces this node and tracks live peers. One instance per daemon."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        self._subscribers: list[PeerCallback] = []
        self._throttle = UpdateThrottle(config.update_min_interval_s)
        self._table = PeerTable("", None)
        self._advert: Advertisement | None = None
        self._pending: Advertisement | None = None
        self._addresses: tuple[str, ...] = ()
        self._flush: asyncio.Task[None] | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._beacons: BeaconSocket | None = None
        self._warn = WarnOnce(log)
        self._warn_beacon = WarnRarely(log)  # beacons' source addresses are easy to spoof
        # Once per peer, and rarely when made-up names come in a flood.
        self._warn_unusable = WarnOnce(log, rarely=WarnRarely(log))
        self._events: Counter[str] = Counter()  # peer-caused trouble, for metrics
        self._closed = False

    # ----------------------------------------------------------------- public interface
    async def start(self, advert: Advertisement) -> None:
        """Announce ``advert`` and start tracking peers."""
        allowed = advertisable_addresses(self.config.interfaces)
        self._addresses = check_advertised(advert.addresses, allowed)
        self._table = PeerTable(advert.node_id, self._liveness_timeout())
        self._advert = advert
        try:
            # Beacon sockets first: a port already taken fails before anything is announced.
            if self._heartbeat_interval():
                self._beacons = BeaconSocket(self._on_datagram)
                await self._beacons.open(self._addresses, advert.port)
            await self._open(advert)
        except BaseException:
            await self.close()
            raise
        self._throttle.published(self._now())
        self._liveness = asyncio.create_task(self._liveness_loop(), name="discovery-liveness")
        log.info(
            "discovery (%s) started: %s at %s port %d",
            self.config.backend, advert.node_id, ",".join(self._addresses), advert.port,
        )

    async def update(self, advert: Advertisement) -> None:
        """Publish a changed advertisement; bursts coalesce to one per update_min_interval_s."""
        if self._advert is None:
            raise KVPeerError("discovery is not started")
        if self._closed:
            return  # shutting down: the goodbye is (being) sent instead
        if advert.node_id != self._advert.node_id or advert.port != self._advert.port:
            raise KVPeerError("an update may not change node id or port")
        self._pending = advert
        # Publishing never blocks the caller (a put): one owned task publishes the latest
        # pending advertisement, waiting out the minimum interval between publications.
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._flush_loop(), name="discovery-flush")

    async def close(self) -> None:
        """Withdraw the advertisement (goodbye) and stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in (self._flush, self._liveness):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._advert is not None:
            # A unicast goodbye too: a lost multicast goodbye would leave us listed until
            # the peers' liveness timeout.
            bye = Beacon(kind="bye", node_id=self._advert.node_id)
            for target in self._heartbeat_targets():
                self._send(bye, target)
            await self._close()
        if self._beacons is not None:
            self._beacons.close()

    def peers(self) -> Mapping[str, PeerInfo]:
        """Live peers by node id; never this node."""
        return self._table.alive()

    @property
    def counters(self) -> Mapping[str, int]:
        """Event counts for metrics: new peers refused because the table was full or their
        address held its share, dead peers evicted to make room, and whatever else peers made
        us ignore or repair (each counted once it happens)."""
        table = self._table
        return {
            "peers_refused": table.refused,
            "peers_refused_per_address": table.crowded,
            "peers_evicted": table.evicted,
            **self._events,
        }

    def subscribe(self, callback: PeerCallback) -> None:
        """Call ``callback`` (in the event loop, must not block) for each added/updated/removed."""
        self._subscribers.append(callback)

    def mark_dead(self, node_id: str) -> None:
        """The transport's heartbeat says the peer vanished: drop it now."""
        self._dispatch(self._table.mark_dead(node_id))

    @property
    def advertisement(self) -> Advertisement | None:
        """What this node announces now (the latest published or pending)."""
        return self._pending or self._advert

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    # ----------------------------------------------------------------- for backends
    @abstractmethod
    async def _open(self, advert: Advertisement) -> None:
        """Publish the first advertisement and start receiving peers'."""

    @abstractmethod
    async def _publish(self, advert: Advertisement) -> None:
        """Replace the published advertisement."""

    @abstractmethod
    async def _close(self) -> None:
        """Withdraw the advertisement (goodbye) and release resources."""

    async def _tick(self) -> None:
        """Periodic backend work, run from the liveness loop before heartbeats go out."""
        return None

    def _tick_period(self) -> float:
        """How often the liveness loop runs when heartbeats are off."""
        return max(self.config.peer_timeout_s / 4, 0.25)

    def _liveness_timeout(self) -> float | None:
        """Silence after which a peer is dropped, or None if the backend has its own."""
        return self.config.peer_timeout_s if self._heartbeat_interval() else None

    def _heartbeat_interval(self) -> float:
        return self.config.heartbeat_interval_s

    def _heartbeat(self) -> Beacon | None:
        """What to send each peer every interval."""
        assert self._advert is not None
        return Beacon(kind="hb", node_id=self._advert.node_id)

    def _heartbeat_targets(self) -> list[tuple[str, int]]:
        targets = []
        for node_id in self._table.known_ids():
            info = self._table.known(node_id)
            if info is not None and info.addresses:
                targets.append((info.addresses[0], info.port))
        return targets

    def _on_beacon(self, beacon: Beacon, source_ip: str) -> None:
        info = self._table.known(beacon.node_id)
        if info is None:
            if beacon.kind == "hb":
                self._unknown_peer(beacon.node_id)
            return
        if info.addresses[0] != source_ip:
            # Heartbeats leave from a node's first address, where we dial it and send ours:
            # one from any other address the advert listed would keep alive an entry that
            # points us at a target of the advertiser's choice. Counted: a peer dropped this
            # way just expires, with nothing else to say why.
            self._events["heartbeats_ignored"] += 1
            log.debug("peer %s: %s from %s, not its first address %s", beacon.node_id,
                      beacon.kind, source_ip, info.addresses[0])
            return
        if beacon.kind == "bye":
            self._dispatch(self._table.withdraw(beacon.node_id))
        else:
            self._dispatch(self._table.heard(beacon.node_id, self._now()))

    def _ignore_beacon(self, source_ip: str, message: str, *args: object) -> None:
        self._events["beacons_ignored"] += 1
        self._warn_beacon("ignored beacon from %s: " + message, source_ip, *args)

    def _unknown_peer(self, node_id: str) -> None:
        """A heartbeat from a node we hold no advertisement of (forgotten, or missed)."""
        return None

    def _observe(self, info: PeerInfo, listed: bool = False) -> None:
        # Peers are dialled, and sent heartbeats, at their first address, which the advert
        # chooses (unauthenticated over mDNS): keep only addresses a peer on the LAN can have.
        usable = usable_addresses(info.addresses, keep_loopback=_lists_loopback(self._addresses))
        if usable[:1] != info.addresses[:1]:
            # Its first address is the one its transport listens on and its beacons leave
            # from: dialled at a later one it is not reached, and its heartbeats (from the
            # first) are not taken, so it would only be added to expire. Seen from the LAN:
            # a daemon on this host on loopback, or an advert naming loopback or multicast
            # first to make us dial there.
            self._events["peers_ignored_no_address"] += 1
            self._warn_unusable(
                info.node_id, "ignored peer: its first address is not one this node can "
                "reach it at (%s)", ",".join(info.addresses),
            )
            return
        if usable != info.addresses:
            self._events["peer_addresses_dropped"] += 1
            log.debug(
                "peer %s: dropped addresses %s", info.node_id,
                ",".join(a for a in info.addresses if a not in usable),
            )
            info = dataclasses.replace(info, addresses=usable)
        refused, crowded = self._table.refused, self._table.crowded
        self._dispatch(self._table.observe(info, self._now(), listed))
        if self._table.refused != refused:
            self._warn(
                "peer table", "full: ignored new peer %s (%d refused so far)",
                info.node_id, self._table.refused,
            )
        elif self._table.crowded != crowded:
            self._warn(
                "peer table (per address)", "%s holds its share: ignored new peer %s "
                "(%d refused so far)", info.addresses[0], info.node_id, self._table.crowded,
            )

    def _withdraw(self, node_id: str) -> None:
        self._dispatch(self._table.withdraw(node_id))

    def _send(self, beacon: Beacon, target: tuple[str, int]) -> None:
        """Send one beacon; a failure is logged, never raised (targets come from peers)."""
        if self._beacons is None:
            return
        try:
            self._beacons.send(encode_beacon(beacon), target)
        except (OSError, ValueError) as exc:
            # uvloop raises ValueError (not OSError) for a target the socket's family cannot
            # reach; either way one bad target must not stop the beacons to the others.
            log.debug("beacon to %s failed: %r", target, exc)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    # ----------------------------------------------------------------- internals
    def _dispatch(self, events: list[PeerEvent]) -> None:
        for event in events:
            log.info(
                "peer %s %s%s (epoch %d, %d chunks)",
                event.peer.node_id, event.kind, f" ({event.reason})" if event.reason else "",
                event.peer.epoch, event.peer.chunk_count,
            )
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:  # a subscriber's bug must not stop discovery
                    log.exception("peer event subscriber failed on %s", event)

    def _on_datagram(self, data: bytes, source_ip: str) -> None:
        try:
            beacon = decode_beacon(data)
            self._on_beacon(beacon, source_ip)
        except ProtocolError as exc:
            self._ignore_beacon(source_ip, "%s", exc)

    async def _publish_pending(self) -> bool:
        """Publish the pending advertisement; False if that failed (it stays pending)."""
        advert, self._pending = self._pending, None
        if advert is None:
            return True
        self._advert = advert
        self._throttle.published(self._now())
        try:
            await self._publish(advert)
        except Exception as exc:  # a background task: log it, the liveness loop retries
            log.warning("advertisement update failed (retrying): %r", exc)
            # Peers must not keep an old epoch until some later update happens to succeed.
            if self._pending is None:
                self._pending = advert
            return False
        return True

    async def _flush_loop(self) -> None:
        while self._pending is not None:
            delay = self._throttle.delay(self._now())
            if delay:
                await asyncio.sleep(delay)
            if not await self._publish_pending():
                return  # the next liveness round tries again, not a tight loop here

    def _retry_publish(self) -> None:
        """Start publishing an advertisement left pending by a failure, unless under way."""
        if self._pending is not None and not self._closed and (
            self._flush is None or self._flush.done()
        ):
            self._flush = asyncio.create_task(self._flush_loop(), name="discovery-flush")

    def _send_heartbeats(self) -> None:
        beacon = self._heartbeat()
        if beacon is None:
            return
        for target in self._heartbeat_targets():
            self._send(beacon, target)

    async def _liveness_loop(self) -> None:
        interval = self._heartbeat_interval()
        period = interval if interval else self._tick_period()
        while True:
            # Each step on its own: a failure in backend work or in sending (a bug, or peer
            # input we did not foresee) must not keep silent peers from expiring.
            try:
                await self._tick()
                self._retry_publish()
                if interval:
                    self._send_heartbeats()
            except Exception:
                log.exception("discovery liveness round failed")
            try:
                self._dispatch(self._table.expire(self._now()))
            except Exception:
                log.exception("discovery expiry failed")
            wake = period
            next_expiry = self._table.next_expiry()
            if next_expiry is not None:
                wake = min(wake, max(0.05, next_expiry - self._now() + 0.01))
            await asyncio.sleep(wake)


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def usable_addresses(addresses: tuple[str, ...], *, keep_loopback: bool) -> tuple[str, ...]:
    """The addresses of a peer's list that can be a peer's: never multicast, broadcast,
    reserved or "this network" (0.0.0.0/8); loopback only when ``keep_loopback``."""
    usable = []
    for address in addresses:
        ip = ipaddress.IPv4Address(address)  # PeerInfo holds IPv4 addresses only
        if ip.is_multicast or ip.is_reserved or ip in _THIS_NETWORK:
            continue  # 255.255.255.255 is among the reserved
        if ip.is_loopback and not keep_loopback:
            continue
        usable.append(address)
    return tuple(usable)


def _lists_loopback(addresses: tuple[str, ...]) -> bool:
    """Whether this node announces a loopback address itself: single-host use (tests, a
    second daemon on this host), where peers on loopback are this host's. Otherwise a loopback address in
    an advert names this host, not the peer (an advert aimed at our own local services)."""
    return any(ipaddress.ip_address(a).is_loopback for a in addresses)
