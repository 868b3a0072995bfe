"""ZeroconfDiscovery's handling of browser events, without a network: resolves are stubbed."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from zeroconf import NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceInfo

from kvpeer.discovery import DiscoveryConfig, ZeroconfDiscovery, zeroconf_backend
from kvpeer.discovery.advert import SERVICE_TYPE, Advertisement, PeerInfo
from kvpeer.discovery.beacon import Beacon, encode_beacon
from kvpeer.discovery.peers import PeerTable
from kvpeer.discovery.zeroconf_backend import (
    MAX_RESOLVES,
    MAX_WAITING_RESOLVES,
    UNKNOWN_RESOLVE_BURST,
    instance_name,
)
from kvpeer.errors import ConfigError


class StubResolve(ZeroconfDiscovery):
    """Resolves hang until released; counts how many run at once."""

    def __init__(self) -> None:
        super().__init__(DiscoveryConfig(interfaces=("127.0.0.1",)))
        self.in_flight = 0
        self.most = 0
        self.calls = 0
        self.release = asyncio.Event()

    async def _resolve_once(self, name: str) -> None:
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1

    def event(self, name: str, change: ServiceStateChange) -> None:
        self._on_state_change(None, SERVICE_TYPE, name, change)


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


@pytest.mark.parametrize(
    "name",
    ["evil.example.com.", "x._other._tcp.local.", "a" * 300 + "._kvpeer._tcp.local.",
     "bad id!._kvpeer._tcp.local.", "_kvpeer._tcp.local."],
)
def test_a_name_that_is_not_a_node_of_ours_is_not_resolved(name: str) -> None:
    """Any LAN host can point a PTR of our type anywhere: zeroconf refuses to resolve such a
    name, which killed the resolve task with an exception nobody retrieved."""

    async def main() -> None:
        d = StubResolve()
        for change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            d.event(name, change)
        await turns()
        assert d.calls == 0

    asyncio.run(main())


def test_a_failing_resolve_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        d = ZeroconfDiscovery(DiscoveryConfig(interfaces=("127.0.0.1",), request_timeout_s=0.1))
        d._azc = SimpleNamespace(zeroconf=None)  # type: ignore[assignment]  # requests fail
        d._on_state_change(None, SERVICE_TYPE, instance_name("peer"), ServiceStateChange.Added)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "did not resolve" in caplog.text:
                break
        assert "did not resolve" in caplog.text
        assert errors == []

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())


def test_events_after_close_or_removal_leave_nothing_behind() -> None:
    async def main() -> None:
        d = StubResolve()
        name = instance_name("peer")
        d.event(name, ServiceStateChange.Added)
        await turns()
        d.event(name, ServiceStateChange.Updated)  # resolve again after the running one...
        d.event(name, ServiceStateChange.Removed)  # ...unless the service is gone
        await turns()
        assert not d._dirty
        await d.close()
        d.event(instance_name("other"), ServiceStateChange.Added)
        await turns()
        assert d.calls == 1

    asyncio.run(main())


def test_heartbeats_of_made_up_nodes_start_few_resolves() -> None:
    """Each heartbeat from an unknown node id started a resolve (an mDNS query to the LAN);
    a host making up ids had us query without bound."""

    async def main() -> None:
        d = StubResolve()
        for i in range(200):
            d._on_datagram(encode_beacon(Beacon(kind="hb", node_id=f"n{i}")), "10.0.0.9")
        await turns()
        assert 0 < d.calls <= UNKNOWN_RESOLVE_BURST
        await d._close()

    asyncio.run(main())


def test_a_flood_of_made_up_service_names_starts_few_resolves_at_once() -> None:
    """Each browser event started a resolve at once: PTRs of made-up names, free to send,
    had us multicast queries for all of them together."""

    async def main() -> None:
        d = StubResolve()
        for i in range(5000):
            d.event(instance_name(f"n{i}"), ServiceStateChange.Added)
        await turns()
        assert d.most == MAX_RESOLVES
        dropped = 5000 - MAX_RESOLVES - MAX_WAITING_RESOLVES
        assert d.counters["resolves_dropped"] == dropped
        d.release.set()  # the resolves end: the waiting names come next
        await turns()
        assert d.calls > MAX_RESOLVES and d.most == MAX_RESOLVES
        await d._close()

    asyncio.run(main())


def test_a_peer_that_sends_heartbeats_is_resolved_before_a_flood_of_made_up_names() -> None:
    """Names queued behind a flood waited minutes, and a real peer's heartbeat-asked resolve
    was dropped once the queue was full."""

    async def main() -> None:
        d = StubResolve()
        for i in range(5000):
            d.event(instance_name(f"n{i}"), ServiceStateChange.Added)
        await turns()
        resolved: list[str] = []
        real_resolve_once = d._resolve_once

        async def noting(name: str) -> None:
            resolved.append(name)
            await real_resolve_once(name)

        d._resolve_once = noting  # type: ignore[method-assign]
        d._unknown_peer("real-peer")  # its heartbeat arrived
        d.release.set()
        await turns()
        assert resolved and resolved[0] == instance_name("real-peer")
        await d._close()

    asyncio.run(main())


def test_a_known_peers_update_is_not_lost_in_a_flood_of_made_up_names() -> None:
    """A known peer's "Updated" event (its epoch moved) waited in the browser's queue and was
    dropped once made-up names filled it; its heartbeats only keep it alive, so its old epoch
    (and inventory) stayed until it changed again."""

    class RealPeerResolves(StubResolve):
        epoch = 1

        async def _resolve_once(self, name: str) -> None:
            if name != instance_name("real"):
                return await super()._resolve_once(name)  # made up: no answer until released
            self._observe(
                PeerInfo(
                    node_id="real",
                    addresses=("10.0.0.9",),
                    port=7457,
                    fingerprints=(),
                    epoch=self.epoch,
                    chunk_count=1,
                )
            )

    async def main() -> None:
        d = RealPeerResolves()
        d.event(instance_name("real"), ServiceStateChange.Added)
        await turns()
        assert d.peers()["real"].epoch == 1
        for i in range(MAX_RESOLVES + MAX_WAITING_RESOLVES):
            d.event(instance_name(f"fake{i}"), ServiceStateChange.Added)
        d.epoch = 2
        d.event(instance_name("real"), ServiceStateChange.Updated)
        assert "resolves_dropped" not in d.counters
        d.release.set()  # the made-up names' resolves time out
        while d._resolving:
            await asyncio.wait(list(d._resolving.values()))
        assert d.peers()["real"].epoch == 2

    asyncio.run(main())


def test_a_multi_homed_peer_is_dialled_at_the_address_it_gave_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zeroconf returns A records in the order of its cache (newest first), and peers took its
    first: a node on 127.0.0.3, .1 and .2 was dialled at .2, where its transport (on .3, its
    first address) did not listen."""
    node = ZeroconfDiscovery(DiscoveryConfig(interfaces=("127.0.0.3", "127.0.0.1", "127.0.0.2")))
    node._addresses = node.config.interfaces  # as start() sets them
    registered = node._service_info(Advertisement(node_id="multi", port=17490))
    from_cache = AsyncServiceInfo(
        SERVICE_TYPE,
        registered.name,
        port=registered.port,
        properties=registered.properties,
        server=registered.server,
        addresses=list(reversed(registered.addresses)),
    )

    async def resolved(zc: Any, timeout_ms: int) -> bool:
        return True

    from_cache.async_request = resolved  # type: ignore[method-assign]
    monkeypatch.setattr(zeroconf_backend, "AsyncServiceInfo", lambda *args: from_cache)

    async def main() -> None:
        d = ZeroconfDiscovery(DiscoveryConfig(interfaces=("127.0.0.1",)))
        d._azc, d._addresses = SimpleNamespace(zeroconf=None), ("127.0.0.1",)  # type: ignore[assignment]
        await d._resolve_once(instance_name("multi"))
        assert d.peers()["multi"].addresses == ("127.0.0.3", "127.0.0.1", "127.0.0.2")

    asyncio.run(main())


def test_made_up_service_names_are_warned_of_by_kind(caplog: pytest.LogCaptureFixture) -> None:
    """A WARNING per name that did not resolve or was not ours: the sender picks the names."""

    async def main() -> None:
        d = ZeroconfDiscovery(DiscoveryConfig(interfaces=("127.0.0.1",), request_timeout_s=0.1))
        d._azc = SimpleNamespace(zeroconf=None)  # type: ignore[assignment]  # resolves fail
        for i in range(300):
            d._on_state_change(None, SERVICE_TYPE, instance_name(f"n{i}"), ServiceStateChange.Added)
            d._on_state_change(None, SERVICE_TYPE, f"x{i}.example.", ServiceStateChange.Added)
        while d._resolving:
            await asyncio.wait(list(d._resolving.values()))
        assert d.counters["resolves_failed"] == 300
        assert d.counters["services_ignored"] == 300

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) <= 6


class _NameTaken:
    """AsyncZeroconf whose probe finds our name announced already (a cloned node)."""

    def __init__(self, **kwargs: Any) -> None:
        self.zeroconf = None
        self.unregistered: list[Any] = []
        self.closed = False

    async def async_register_service(self, info: Any) -> Any:
        raise NonUniqueNameException

    async def async_unregister_service(self, info: Any) -> Any:
        self.unregistered.append(info)
        return asyncio.sleep(0)

    async def async_close(self) -> None:
        self.closed = True


def test_a_node_id_announced_by_another_node_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zeroconf's NonUniqueNameException escaped as a traceback and exit 1, and systemd
    restarted a daemon whose name stays taken; nor may our close send a goodbye for the
    other node's records."""
    monkeypatch.setattr(zeroconf_backend, "AsyncZeroconf", _NameTaken)

    async def main() -> _NameTaken:
        d = ZeroconfDiscovery(DiscoveryConfig(interfaces=("127.0.0.1",)))
        advert = Advertisement(node_id="gpu-7", addresses=("127.0.0.1",), port=17482)
        with pytest.raises(ConfigError, match="node.node_id.*'gpu-7'.*already announced"):
            await d._open(advert)
        await d._close()
        assert isinstance(d._azc, _NameTaken)
        return d._azc

    azc = asyncio.run(main())
    assert azc.unregistered == [] and azc.closed


def test_a_second_node_with_a_running_nodes_id_is_refused() -> None:
    """A second kvpeerd with the node id of a running one started and ran. zeroconf's probe is
    a QU question, answered by unicast to port 5353; with two responders bound to that port on
    one host the kernel gave the answer to the first one, and the probe saw no conflict."""
    node_id = f"dup-{uuid.uuid4().hex[:8]}"  # not another test run's on this host
    config = DiscoveryConfig(interfaces=("127.0.0.1",))

    async def main() -> None:
        first, second = ZeroconfDiscovery(config), ZeroconfDiscovery(config)
        await first.start(Advertisement(node_id=node_id, port=17483))
        try:
            with pytest.raises(ConfigError, match=f"node.node_id: '{node_id}' is already announced"):
                await second.start(Advertisement(node_id=node_id, port=17484))
            # the first node's records stay announced: no goodbye went out for them
            assert await zeroconf_backend.name_in_use(instance_name(node_id), ("127.0.0.1",), 2.0)
        finally:
            await second.close()
            await first.close()
        assert not await zeroconf_backend.name_in_use(instance_name(node_id), ("127.0.0.1",), 0.25)

    asyncio.run(main())


def _resolving_to(
    monkeypatch: pytest.MonkeyPatch, node_id: str, listed: str, a_records: list[str]
) -> None:
    """Resolves answer an advert of ``node_id`` whose TXT lists ``listed`` ("a"), beside A
    records ``a_records``: what one mDNS response from any host on the LAN can say."""
    properties = {b"v": b"1", b"id": node_id.encode(), b"p": b"6379", b"fp": b"", b"e": b"1",
                  b"n": b"1", b"a": listed.encode()}
    info = AsyncServiceInfo(
        SERVICE_TYPE, instance_name(node_id), port=6379, properties=properties,
        server=f"{node_id}.local.", addresses=[socket.inet_aton(a) for a in a_records],
    )

    async def resolved(zc: Any, timeout_ms: int) -> bool:
        return True

    info.async_request = resolved  # type: ignore[method-assign]
    monkeypatch.setattr(zeroconf_backend, "AsyncServiceInfo", lambda *args: info)


def _node(*addresses: str) -> ZeroconfDiscovery:
    """A node as start() leaves it, on ``addresses``, without a network."""
    d = ZeroconfDiscovery(DiscoveryConfig(interfaces=addresses))
    d._addresses = addresses
    d._table = PeerTable("me", timeout_s=10.0)
    d._azc = SimpleNamespace(zeroconf=None)  # type: ignore[assignment]
    return d


def test_an_advert_cannot_make_a_node_on_the_lan_dial_its_own_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One mDNS advert from a host without the key, TXT "a" = 127.0.0.1 first, made the node
    dial its own loopback at the advert's port, again and again (only an all-loopback list
    was refused; /tmp/review-trust/mdns_evil_advert.py). A peer is dialled and heard at its
    first address: one this node cannot use there is ignored; a later one is dropped."""

    async def main() -> None:
        d = _node("10.0.0.5")
        _resolving_to(monkeypatch, "evil1", "127.0.0.1,10.0.0.66", ["10.0.0.66"])
        await d._resolve_once(instance_name("evil1"))
        assert d.peers() == {} and d.counters["peers_ignored_no_address"] == 1
        _resolving_to(monkeypatch, "evil3", "10.0.0.66,127.0.0.1", ["10.0.0.66"])
        await d._resolve_once(instance_name("evil3"))
        assert d.peers()["evil3"].addresses == ("10.0.0.66",)
        assert d.counters["peer_addresses_dropped"] == 1

    asyncio.run(main())


@pytest.mark.parametrize(
    "listed", ["127.0.0.1", "224.0.0.251", "239.1.2.3,127.0.0.2", "0.0.0.0", "0.1.2.3",
               "255.255.255.255", "240.0.0.1"],
)
def test_a_peer_with_no_address_a_lan_peer_can_have_is_ignored_and_named_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, listed: str
) -> None:
    _resolving_to(monkeypatch, "evil2", listed, ["10.0.0.66"])

    async def main() -> None:
        d = _node("10.0.0.5")
        for _ in range(3):
            await d._resolve_once(instance_name("evil2"))
        assert d.peers() == {} and d.counters["peers_ignored_no_address"] == 3

    with caplog.at_level(logging.INFO, logger="kvpeer.discovery"):
        asyncio.run(main())
    said = [r for r in caplog.records if r.levelno >= logging.INFO and "evil2" in r.getMessage()]
    assert len(said) == 1 and "first address is not one" in said[0].getMessage()


def test_a_node_on_loopback_alone_keeps_loopback_peers_but_not_multicast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Single-host use (tests, a demo): peers are on loopback too."""
    _resolving_to(monkeypatch, "local", "127.0.0.2,224.0.0.251", ["127.0.0.2"])

    async def main() -> None:
        d = _node("127.0.0.1")
        await d._resolve_once(instance_name("local"))
        assert d.peers()["local"].addresses == ("127.0.0.2",)

    asyncio.run(main())


def test_heartbeats_count_only_from_a_peers_first_address() -> None:
    """Heartbeats from any address the advert listed kept the entry alive: an advert could
    list a third party first (dialled, sent our heartbeats) and keep itself alive from its own
    address. Beacons leave from a node's first address, so a real peer sends from there."""

    async def main() -> None:
        d = _node("10.0.0.5")
        peer = PeerInfo(node_id="multi", addresses=("10.0.0.6", "10.0.0.7"), port=7457,
                        fingerprints=(), epoch=1, chunk_count=0)
        d._observe(peer)
        d.mark_dead("multi")
        d._on_datagram(encode_beacon(Beacon(kind="hb", node_id="multi")), "10.0.0.7")
        assert "multi" not in d.peers()
        d._on_datagram(encode_beacon(Beacon(kind="bye", node_id="multi")), "10.0.0.7")
        assert d._table.known("multi") is not None  # nor says goodbye for it
        d._on_datagram(encode_beacon(Beacon(kind="hb", node_id="multi")), "10.0.0.6")
        assert "multi" in d.peers()
        assert d.counters["heartbeats_ignored"] == 2  # a peer that expires says why

    asyncio.run(main())


def test_peers_on_this_host_that_list_loopback_first_are_heard() -> None:
    """Two daemons on one host, both on ["127.0.0.1", LAN]: beacons leave from 127.0.0.1, but
    loopback was dropped from the peer's list (this node is on the LAN), so its first address
    became the LAN one and every heartbeat was dropped, uncounted: the peer expired
    (/tmp/review-disc/zc_loopback_first.py)."""

    async def main() -> None:
        d = _node("127.0.0.1", "192.0.2.2")
        peer = PeerInfo(node_id="gpu1", addresses=("127.0.0.1", "192.0.2.2"), port=7457,
                        fingerprints=(), epoch=1, chunk_count=0)
        d._observe(peer)
        assert d.peers()["gpu1"].addresses == ("127.0.0.1", "192.0.2.2")
        d.mark_dead("gpu1")
        d._on_datagram(encode_beacon(Beacon(kind="hb", node_id="gpu1")), "127.0.0.1")
        assert "gpu1" in d.peers() and d.counters.get("heartbeats_ignored", 0) == 0

    asyncio.run(main())


def test_a_node_that_lists_loopback_keeps_a_peer_on_loopback_alone() -> None:
    """Single-host use: a node on ["127.0.0.1", LAN] ignored a peer on 127.0.0.1 alone, which
    saw it, so the two saw each other one way only (/tmp/review-disc/loopback_first.py mixed).
    A node that lists no loopback address still ignores it (the advert names this host)."""

    async def main() -> None:
        peer = PeerInfo(node_id="local", addresses=("127.0.0.1",), port=7457,
                        fingerprints=(), epoch=1, chunk_count=0)
        both, lan = _node("127.0.0.1", "192.0.2.2"), _node("192.0.2.2")
        both._observe(peer)
        lan._observe(peer)
        assert "local" in both.peers()
        assert lan.peers() == {} and lan.counters["peers_ignored_no_address"] == 1

    asyncio.run(main())
