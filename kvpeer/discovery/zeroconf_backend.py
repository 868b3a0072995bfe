"""Discovery over mDNS/DNS-SD with python-zeroconf's asyncio API.

Registers `<node_id>._kvpeer._tcp.local.` with the advertisement as TXT on the configured
interfaces only (after asking whether a node answers for that name already), browses the same
type, and resolves each added or updated service into a
`PeerInfo`. A goodbye (or a record expiring) removes the peer at once. Liveness beyond that
comes from the shared UDP heartbeats (base.py) and the transport's `mark_dead`: mDNS alone
keeps a killed peer's records for their whole TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Sequence
from typing import Any

from zeroconf import (
    DNSIncoming,
    DNSOutgoing,
    DNSQuestion,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from kvpeer import aio
from kvpeer.discovery._warn import WarnRarely
from kvpeer.discovery.advert import (
    SERVICE_TYPE,
    Advertisement,
    decode_fields,
    encode_fields,
    validate_node_id,
)
from kvpeer.discovery.base import Discovery
from kvpeer.discovery.peers import RateLimit
from kvpeer.errors import ConfigError, ErrorCode, ProtocolError

log = logging.getLogger(__name__)


# Heartbeats are unauthenticated and carry any node id: resolves (mDNS queries to the whole
# LAN) for nodes we do not know start at most this often, however many ids a host makes up.
UNKNOWN_RESOLVES_PER_S = 2.0
UNKNOWN_RESOLVE_BURST = 16
# Any LAN host can multicast PTRs of made-up names for free, each a browser event: resolves
# run this many at a time, and this many names wait; beyond that a new name is dropped
# (counted; a real peer's heartbeats bring it back, see `_unknown_peer`). A known peer's name
# is never dropped: its heartbeats do not ask for a resolve.
MAX_RESOLVES = 16
MAX_WAITING_RESOLVES = 1024
# How long a node that holds our name has to answer the legacy unicast query of
# `name_in_use`: the interval between mDNS probes (RFC 6762 8.1), so the same time a
# defending responder is given there. Added to every start.
NAME_CHECK_S = 0.25
_MDNS_GROUP = ("224.0.0.251", 5353)
_TYPE_SRV, _CLASS_IN = 33, 1


def instance_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def _node_id(name: str) -> str | None:
    """The node id of an instance name, or None if the name is not one of ours."""
    suffix = "." + SERVICE_TYPE
    if not name.endswith(suffix):
        return None
    try:
        return validate_node_id(name.removesuffix(suffix))
    except ProtocolError:
        return None


def _name_taken(node_id: str) -> ConfigError:
    return ConfigError(
        f"node.node_id: {node_id!r} is already announced by another node on the LAN; give "
        "each node its own node.node_id (a cloned image may have copied node.state_dir/node_id)"
    )


async def name_in_use(name: str, addresses: Sequence[str], timeout_s: float) -> bool:
    """Whether a responder on the LAN answers for the service instance ``name`` within
    ``timeout_s``: a legacy unicast query (RFC 6762 6.7) from a port of our own, on each of
    ``addresses``.

    python-zeroconf's probes are QU questions, which a node holding the name answers by unicast
    to port 5353 of the prober's address. Where another mDNS responder has a socket on that
    port on the prober's host (a second kvpeerd; maybe avahi-daemon) the kernel hands the
    answer to one socket only, often not ours: the probe saw no conflict and a second node of
    the same id started. An answer to a query from an ephemeral port goes to that port alone.
    """
    # A conventional DNS query (QR and AA clear) with an id of its own (multicast=False writes
    # it): responders drop a packet equal to one seen in the last 0.8 s as a duplicate.
    query = DNSOutgoing(0, multicast=False, id_=secrets.randbelow(0xFFFF) + 1)
    query.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
    packets = query.packets()
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[None] = loop.create_future()
    wanted = name.lower()

    class _Answers(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            message = DNSIncoming(data)  # marks a bad packet invalid, never raises
            if not message.valid or answered.done():
                return
            if any(r.type == _TYPE_SRV and r.name.lower() == wanted for r in message.answers()):
                answered.set_result(None)

    transports: list[asyncio.DatagramTransport] = []
    try:
        for address in addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
                sock.bind((address, 0))
            except OSError:
                sock.close()
                raise
            transport, _ = await loop.create_datagram_endpoint(_Answers, sock=sock)
            transports.append(transport)
            for packet in packets:
                transport.sendto(packet, _MDNS_GROUP)
        try:
            await aio.wait_for(asyncio.shield(answered), timeout_s)
        except TimeoutError:
            return False
        return True
    finally:
        for transport in transports:
            transport.close()


class ZeroconfDiscovery(Discovery):
    """Peers on the LAN, found by multicast DNS."""

    _azc: AsyncZeroconf | None = None
    _browser: AsyncServiceBrowser | None = None
    _info: AsyncServiceInfo | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, None] = {}  # names to resolve once a resolve ends, in order
        # Names of known peers and of nodes that send heartbeats (rate-limited): resolved
        # before the other names, so a flood of made-up service names cannot starve a peer.
        self._first: dict[str, None] = {}
        self._dirty: set[str] = set()
        # Warnings by kind, not by service name: names are the sender's to make up.
        self._warn_name = WarnRarely(log)
        self._warn_dropped = WarnRarely(log)
        self._warn_unresolved = WarnRarely(log)
        self._warn_malformed = WarnRarely(log)
        self._asked: dict[str, float] = {}  # node id -> when a heartbeat last made us resolve it
        self._unknown_resolves = RateLimit(UNKNOWN_RESOLVES_PER_S, UNKNOWN_RESOLVE_BURST)

    def _service_info(self, advert: Advertisement) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(advert.node_id),
            port=advert.port,
            properties=encode_fields(advert, self.addresses),
            server=f"{advert.node_id}.local.",
            addresses=[socket.inet_aton(a) for a in self.addresses],
        )

    async def _open(self, advert: Advertisement) -> None:
        # Probing alone missed a node holding our name: see name_in_use. No restart will free
        # the name while that node runs (a cloned disk image brings its node id along).
        if await name_in_use(instance_name(advert.node_id), self.addresses, NAME_CHECK_S):
            raise _name_taken(advert.node_id)
        self._azc = AsyncZeroconf(interfaces=list(self.addresses), ip_version=IPVersion.V4Only)
        self._info = self._service_info(advert)
        try:
            # The awaitable returned completes once the announcements are sent.
            await aio.wait_for(
                await self._azc.async_register_service(self._info), self._register_timeout()
            )
        except NonUniqueNameException:
            # Probing found our name taken: not our record to withdraw at close.
            self._info = None
            raise _name_taken(advert.node_id) from None
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
        )

    async def _publish(self, advert: Advertisement) -> None:
        assert self._azc is not None
        self._info = self._service_info(advert)
        await aio.wait_for(
            await self._azc.async_update_service(self._info), self._register_timeout()
        )

    async def _close(self) -> None:
        self._waiting.clear()
        self._first.clear()
        for task in list(self._resolving.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            if self._info is not None:
                # Without awaiting this task no goodbye leaves, and peers keep our records
                # for up to 75 minutes.
                with contextlib.suppress(TimeoutError, OSError):
                    await aio.wait_for(
                        await self._azc.async_unregister_service(self._info),
                        self._register_timeout(),
                    )
            await self._azc.async_close()

    def _register_timeout(self) -> float:
        # Probing and announcing take ~1-2 s by the mDNS rules; allow for a busy host.
        return max(10.0, 3 * self.config.request_timeout_s)

    # ----------------------------------------------------------------- browsing
    def _on_state_change(
        self,
        zeroconf: Any,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._closed:
            return
        node_id = _node_id(name)
        if node_id is None:
            # Any LAN host can send a PTR of our type pointing anywhere; resolving such a
            # name would only fail (zeroconf refuses it).
            self._events["services_ignored"] += 1
            self._warn_name(
                "ignored service name %r: not <node id>.%s", name[:100], SERVICE_TYPE
            )
            return
        if self._advert is not None and node_id == self._advert.node_id:
            return
        if state_change is ServiceStateChange.Removed:
            self._dirty.discard(name)
            self._waiting.pop(name, None)
            self._first.pop(name, None)
            task = self._resolving.pop(name, None)
            if task is not None:
                task.cancel()
                self._start_resolves()
            self._withdraw(node_id)
            return
        # A known peer's update (its epoch moved) must not wait behind, or be dropped with, a
        # flood of made-up names: nothing else would bring its new advertisement.
        if self._table.known(node_id) is not None:
            self._queue_resolve(name, first=True, capped=False)  # bounded by the peer table
        else:
            self._queue_resolve(name)

    def _queue_resolve(self, name: str, *, first: bool = False, capped: bool = True) -> None:
        """Resolve ``name`` once a resolve slot frees. ``first``: before the names queued
        without; ``capped``: dropped when MAX_WAITING_RESOLVES names wait already."""
        queue = self._first if first else self._waiting
        if name in self._resolving:
            self._dirty.add(name)  # resolve again once the running resolve finishes
        elif name in queue or not capped or len(queue) < MAX_WAITING_RESOLVES:
            queue[name] = None
            self._start_resolves()
        else:
            self._events["resolves_dropped"] += 1
            self._warn_dropped("too many services to resolve: dropped %r", name)

    def _start_resolves(self) -> None:
        while len(self._resolving) < MAX_RESOLVES and not self._closed:
            queue = self._first or self._waiting
            if not queue:
                return
            name = next(iter(queue))
            del queue[name]
            self._waiting.pop(name, None)
            if name not in self._resolving:
                self._resolving[name] = asyncio.create_task(
                    self._resolve(name), name=f"resolve {name}"
                )

    def _unknown_peer(self, node_id: str) -> None:
        # A peer we forgot (dead too long) or never resolved is sending heartbeats: its
        # records may sit unchanged in the cache, so no browser event would bring it back.
        now = self._now()
        if now - self._asked.get(node_id, -1e9) < self.config.peer_timeout_s or self._closed:
            return
        if not self._unknown_resolves.allow(now):
            return  # a real peer's next heartbeat asks again
        if len(self._asked) > 4096:  # peers choose node ids: bound what we remember
            self._asked.clear()
        self._asked[node_id] = now
        name = instance_name(node_id)
        if name not in self._resolving:
            self._queue_resolve(name, first=True)

    async def _resolve(self, name: str) -> None:
        try:
            while True:
                self._dirty.discard(name)
                await self._resolve_once(name)
                if name not in self._dirty:
                    return
        finally:
            # A Removed then Added event may already have registered a newer resolve.
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]
                self._start_resolves()

    async def _resolve_once(self, name: str) -> None:
        assert self._azc is not None
        timeout_ms = int(self.config.request_timeout_s * 1000)
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            resolved = await info.async_request(self._azc.zeroconf, timeout_ms)
        except Exception as exc:  # zeroconf raises its own types; this task has no awaiter
            self._events["resolves_failed"] += 1
            self._warn_unresolved("service %s did not resolve: %r", name, exc)
            return
        if not resolved:
            self._events["resolves_failed"] += 1
            self._warn_unresolved(
                "service %s did not resolve within %.1fs", name, self.config.request_timeout_s
            )
            return
        try:
            peer = decode_fields(info.properties, info.parsed_addresses(IPVersion.V4Only))
            if instance_name(peer.node_id) != name:
                raise ProtocolError(ErrorCode.INVALID, f"TXT id {peer.node_id!r} does not match the name")
        except ProtocolError as exc:
            self._events["services_ignored"] += 1
            self._warn_malformed("ignored malformed advertisement of %s: %s", name, exc)
            return
        self._observe(peer)


