"""Discovery through etcd v3 (keys with leases), for clusters spanning routed subnets.

Each node puts its advertisement record (advert.py) at ``<prefix><node_id>`` under a lease of
``etcd_lease_ttl_s`` that it keeps alive from the liveness loop; it lists the prefix once and
then watches it. A clean stop deletes the key and revokes the lease (peers see the delete at
once); a node that dies stops refreshing and etcd deletes its key when the lease expires, so
liveness here is the lease TTL plus the transport's `mark_dead`, without UDP heartbeats. A
peer the transport marks dead is looked up again a lease TTL later: if its key is still there,
its node refreshed the lease since and runs, so it comes back; if not, it is forgotten.
The client is aetcd (gRPC), imported only when this backend is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

from kvpeer import aio
from kvpeer.discovery.advert import Advertisement, decode_record, encode_record, validate_node_id
from kvpeer.discovery.base import Discovery
from kvpeer.discovery.config import DiscoveryConfig
from kvpeer.errors import ConfigError, ErrorCode, ProtocolError, TransportError

log = logging.getLogger(__name__)

RETRY_S = 1.0


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"http://host:port" or "host:port" -> (host, port)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "") or not parts.hostname:
        raise ConfigError(f"discovery.etcd_endpoints: {endpoint!r} (only http:// is supported)")
    return parts.hostname, parts.port or 2379


class EtcdDiscovery(Discovery):
    """Peers registered under a key prefix in etcd."""

    _client: Any = None
    _lease: Any = None
    _watcher: asyncio.Task[None] | None = None
    # Whether the advertisement is stored under the current lease: a lease granted again
    # after expiring holds no key until a put succeeds, and refreshing it alone keeps the
    # node invisible.
    _stored = False
    # Where another node holds our key: one that has our node id too (a cloned image hashes
    # the same machine-id and host name). We leave the key to it rather than overwrite each
    # other every tick (each overwrite has every peer fetch a full inventory), and put ours
    # again once that key goes.
    _taken_by: str | None = None

    def __init__(self, config: DiscoveryConfig) -> None:
        super().__init__(config)
        self._dead_at: dict[str, float] = {}  # node id -> when the transport marked it dead

    def _heartbeat_interval(self) -> float:
        return 0.0  # the lease is the heartbeat

    def _liveness_timeout(self) -> float | None:
        return None  # etcd expires the key; a watch DELETE removes the peer

    def _tick_period(self) -> float:
        return self.config.etcd_lease_ttl_s / 3

    @property
    def _prefix(self) -> bytes:
        return self.config.etcd_prefix.encode()

    def _key(self, node_id: str) -> bytes:
        return self._prefix + node_id.encode()

    async def _call(self, coro: Any) -> Any:
        try:
            return await aio.wait_for(coro, self.config.request_timeout_s)
        except TimeoutError:
            raise TransportError("etcd request timed out") from None
        except Exception as exc:  # aetcd maps gRPC failures onto its own exception tree
            if isinstance(exc, ProtocolError | ConfigError):
                raise
            raise TransportError(f"etcd: {exc}") from exc

    async def _connect(self) -> Any:
        import aetcd  # gRPC is heavy to import; only etcd users pay for it

        errors = []
        for endpoint in self.config.etcd_endpoints:
            host, port = parse_endpoint(endpoint)
            client = aetcd.Client(
                host=host, port=port, timeout=int(max(1, self.config.request_timeout_s))
            )
            try:
                await self._call(client.status())
            except TransportError as exc:
                errors.append(f"{endpoint}: {exc}")
                with contextlib.suppress(Exception):
                    await client.close()
                continue
            return client
        raise TransportError("no etcd endpoint answered: " + "; ".join(errors))

    def mark_dead(self, node_id: str) -> None:
        if node_id in self.peers():
            self._dead_at[node_id] = self._now()
        super().mark_dead(node_id)

    async def _open(self, advert: Advertisement) -> None:
        self._client = await self._connect()
        await self._register(advert)
        revision = await self._list()
        self._watcher = asyncio.create_task(self._watch(revision + 1), name="etcd-watch")

    async def _register(self, advert: Advertisement) -> None:
        self._lease = await self._call(self._client.lease(self.config.etcd_lease_ttl_s))
        await self._put(advert)

    async def _put(self, advert: Advertisement) -> None:
        lease, record = self._lease, encode_record(advert, self.addresses)
        self._stored = False
        await self._call(self._client.put(self._key(advert.node_id), record, lease=lease))
        # Not stored if the lease or the advertisement changed while this put was on its way.
        self._stored = lease is self._lease and advert is self._advert

    async def _publish(self, advert: Advertisement) -> None:
        if self._taken_by is None:  # else put once the key is free
            await self._put(advert)

    async def _tick(self) -> None:
        if self._client is None or self._lease is None or self._advert is None:
            return
        try:
            reply = await self._call(self._lease.refresh())
            if reply is None or reply.TTL <= 0:
                # The lease expired (we were partitioned or stalled): our key is gone too.
                log.warning("etcd lease expired; registering again")
                await self._register(self._advert)
            elif not self._stored and self._taken_by is None:
                await self._put(self._advert)
        except TransportError as exc:
            log.warning("etcd keep-alive failed: %s", exc)
            return
        try:
            await self._recheck_dead()
        except TransportError as exc:
            log.debug("etcd look-up of dead peers failed (next tick tries again): %s", exc)

    async def _recheck_dead(self) -> None:
        """Bring back, or forget, peers the transport marked dead a lease TTL ago or more.

        Here only a put brings a peer back, and a running peer's key may never change again.
        """
        now = self._now()
        for node_id, dead_at in list(self._dead_at.items()):
            if node_id in self.peers() or self._table.known(node_id) is None:
                del self._dead_at[node_id]  # back (a put) or gone (a delete) meanwhile
            elif now - dead_at >= self.config.etcd_lease_ttl_s:
                kv = await self._call(self._client.get(self._key(node_id)))
                # The watch may have brought it back or removed it while we asked.
                if node_id not in self.peers() and self._table.known(node_id) is not None:
                    if kv is None or self._on_put(kv) is None:
                        self._withdraw(node_id)
                del self._dead_at[node_id]

    async def _list(self) -> int:
        listing = await self._call(self._client.get_prefix(self._prefix))
        present = set()
        for kv in listing:
            node_id = self._on_put(kv)
            if node_id is not None:
                present.add(node_id)
        if self._advert is not None and self._advert.node_id not in present:
            self._own_key_gone()
        for node_id in self._table.known_ids():  # dead ones too: they are never forgotten else
            if node_id not in present:
                self._withdraw(node_id)
        return int(listing.header.revision)

    def _node_id(self, key: bytes) -> str | None:
        try:
            return validate_node_id(key[len(self._prefix) :].decode("ascii"))
        except (UnicodeDecodeError, ProtocolError):
            self._warn(repr(key), "ignored etcd key with a bad node id")
            return None

    def _on_put(self, kv: Any) -> str | None:
        node_id = self._node_id(kv.key)
        if node_id is None:
            return None
        if self._advert is not None and node_id == self._advert.node_id:
            self._on_own_put(kv)
            return node_id
        try:
            info = decode_record(kv.value)
            if info.node_id != node_id:
                raise ProtocolError(ErrorCode.INVALID, f"record of {info.node_id} under {node_id}")
        except ProtocolError as exc:
            self._warn(node_id, "ignored malformed advertisement: %s", exc)
            return None
        self._observe(info)
        return node_id

    def _on_delete(self, node_id: str) -> None:
        if self._advert is not None and node_id == self._advert.node_id:
            self._own_key_gone()
        else:
            self._withdraw(node_id)

    def _on_own_put(self, kv: Any) -> None:
        """Our key was put: by us (our lease), or by another node with our node id."""
        if self._lease is not None and kv.lease == self._lease.id:
            self._taken_by = None
            return
        try:
            other = ",".join(decode_record(kv.value).addresses)
        except ProtocolError:
            other = "a malformed record"
        if self._taken_by is None:
            self._events["node_id_clashes"] += 1
            assert self._advert is not None
            self._warn(
                f"node id {self._advert.node_id}",
                "also registered in etcd by %s, which replaced our key; ours is put again "
                "once that key goes (give each node its own node.node_id)", other,
            )
        self._taken_by, self._stored = other, False

    def _own_key_gone(self) -> None:
        """Our key was deleted (its lease expired, or another client deleted it): put it again."""
        if self._taken_by is not None:
            log.info("etcd key of our node id, held by %s, is gone; putting ours again", self._taken_by)
        elif self._stored:
            log.warning("our etcd key was deleted (lease expired, or by another client); putting it again")
        self._taken_by, self._stored = None, False

    async def _watch(self, revision: int) -> None:
        while True:
            try:
                watch = await self._call(self._client.watch_prefix(self._prefix, start_revision=revision))
                async for event in watch:
                    revision = int(event.kv.mod_revision) + 1
                    if event.kind == "PUT":
                        self._on_put(event.kv)
                    elif (node_id := self._node_id(event.kv.key)) is not None:
                        self._on_delete(node_id)
                raise TransportError("etcd watch ended")
            except Exception as exc:  # gRPC/aetcd errors of any type: re-list and re-watch
                log.warning("etcd watch failed (%s); listing again in %.0fs", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
                with contextlib.suppress(TransportError):
                    revision = await self._list() + 1

    async def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._client is None:
            return
        if self._advert is not None:
            # Goodbye: delete at once rather than leaving peers to wait for the lease.
            with contextlib.suppress(TransportError):
                await self._call(self._client.delete(self._key(self._advert.node_id)))
        if self._lease is not None:
            with contextlib.suppress(TransportError):
                await self._call(self._lease.revoke())
        with contextlib.suppress(Exception):
            await self._client.close()
