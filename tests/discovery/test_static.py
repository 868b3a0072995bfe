"""StaticDiscovery on loopback (explicitly configured, as for a single-host setup): real UDP."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import pytest

from kvpeer.discovery import Advertisement, DiscoveryConfig, PeerEvent, StaticDiscovery
from kvpeer.discovery.advert import encode_record
from kvpeer.discovery.beacon import Beacon, BeaconSocket, encode_beacon

TIMEOUT_S = 20.0


def free_port() -> int:
    # A free TCP port number is used for both TCP (signalling) and UDP (beacons); check both.
    while True:
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)


class Recorder:
    def __init__(self) -> None:
        self.events: list[PeerEvent] = []
        self.changed = asyncio.Event()

    def __call__(self, event: PeerEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait(self, kind: str, node_id: str, **match: object) -> PeerEvent:
        async def find() -> PeerEvent:
            while True:
                for event in self.events:
                    if event.kind == kind and event.peer.node_id == node_id and all(
                        getattr(event, k, getattr(event.peer, k, None)) == v for k, v in match.items()
                    ):
                        return event
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(find(), TIMEOUT_S)


class CountingStatic(StaticDiscovery):
    publishes = 0

    async def _publish(self, advert: Advertisement) -> None:
        self.publishes += 1
        await super()._publish(advert)


def config(peer_port: int, **kw: object) -> DiscoveryConfig:
    return DiscoveryConfig(
        backend="static", interfaces=("127.0.0.1",), static_peers=(f"127.0.0.1:{peer_port}",),
        peer_timeout_s=2.0, heartbeat_interval_s=0.5, **kw,  # type: ignore[arg-type]
    )


def advert(node_id: str, port: int, epoch: int = 1, n: int = 0) -> Advertisement:
    return Advertisement(node_id=node_id, port=port, epoch=epoch, chunk_count=n)


def test_static_peers_see_update_goodbye_and_silence() -> None:
    async def main() -> None:
        pa, pb = free_port(), free_port()
        a = CountingStatic(config(pb, update_min_interval_s=0.5))
        b = StaticDiscovery(config(pa))
        seen = Recorder()
        b.subscribe(seen)
        await a.start(advert("a", pa))
        await b.start(advert("b", pb))
        try:
            await seen.wait("added", "a")
            assert b.peers()["a"].addresses == ("127.0.0.1",)
            # A burst of updates is coalesced: the last one arrives, in few publications.
            for epoch in range(2, 22):
                await a.update(advert("a", pa, epoch=epoch, n=epoch))
            await seen.wait("updated", "a", epoch=21)
            assert a.publishes <= 3
            assert "b" in a.peers()
            await a.close()
            assert (await seen.wait("removed", "a")).reason == "goodbye"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


async def _node_b_listening(pa: int, pb: int) -> tuple[StaticDiscovery, Recorder]:
    """Node "b" on port ``pb``, its static peer "a" on ``pa``, and a recorder of b's events."""
    b = StaticDiscovery(config(pa))
    seen = Recorder()
    b.subscribe(seen)
    await b.start(advert("b", pb))
    return b, seen


def _ad_beacon_of_a(pa: int) -> bytes:
    return encode_beacon(
        Beacon(kind="ad", node_id="a", record=encode_record(advert("a", pa), ["127.0.0.1"]))
    )


def test_silent_static_peer_times_out_and_returns() -> None:
    async def main() -> None:
        pa, pb = free_port(), free_port()
        b, seen = await _node_b_listening(pa, pb)
        # Node "a" is a bare socket sending beacons by hand, so it can fall silent like a
        # crashed process (no goodbye).
        beacon = _ad_beacon_of_a(pa)
        with socket.socket(type=socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", pa))
            try:
                a.sendto(beacon, ("127.0.0.1", pb))
                await seen.wait("added", "a")
                b.mark_dead("a")  # the transport says so; a's next beacon brings it back
                assert (await seen.wait("removed", "a")).reason == "transport"
                seen.events.clear()
                a.sendto(beacon, ("127.0.0.1", pb))
                await seen.wait("added", "a")
                assert (await seen.wait("removed", "a")).reason == "timeout"
            finally:
                await b.close()

    asyncio.run(main())


def test_garbage_beacons_are_ignored() -> None:
    async def main() -> None:
        pa, pb = free_port(), free_port()
        b = StaticDiscovery(config(pa))
        await b.start(advert("b", pb))
        try:
            with socket.socket(type=socket.SOCK_DGRAM) as s:
                for blob in (b"", b"\xc1", os.urandom(300), b"\x83\xa1v\x01\xa1k\xa2ad\xa2id\xa1x"):
                    s.sendto(blob, ("127.0.0.1", pb))
            a = StaticDiscovery(config(pb))
            seen = Recorder()
            b.subscribe(seen)
            await a.start(advert("a", pa))
            await seen.wait("added", "a")  # still working after the garbage
            await a.close()
        finally:
            await b.close()

    asyncio.run(main())


def test_a_failing_send_neither_stops_expiry_nor_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop raises ValueError, not OSError, for a target the socket cannot reach: the
    liveness round must still expire silent peers, and close() must still finish."""

    def refuse(self: BeaconSocket, data: bytes, address: tuple[str, int]) -> None:
        raise ValueError("socket family mismatch or a DNS lookup is required")

    monkeypatch.setattr(BeaconSocket, "send", refuse)

    async def main() -> None:
        pa, pb = free_port(), free_port()
        b, seen = await _node_b_listening(pa, pb)
        beacon = _ad_beacon_of_a(pa)
        try:
            with socket.socket(type=socket.SOCK_DGRAM) as a:
                a.bind(("127.0.0.1", pa))
                a.sendto(beacon, ("127.0.0.1", pb))
                await seen.wait("added", "a")
                assert (await seen.wait("removed", "a")).reason == "timeout"
        finally:
            await b.close()

    asyncio.run(main())


def test_names_that_do_not_resolve_hold_up_neither_start_nor_heartbeats() -> None:
    """Static peers' names were resolved one after another in start() and then in front of
    every heartbeat round: a DNS server that does not answer made peers expire a live node."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
            if host.startswith("hang"):
                await asyncio.Event().wait()  # no answer, ever (request_timeout_s is longer)
            return await real(host, *args, **kwargs)

        loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
        pa, pb = free_port(), free_port()
        hanging = tuple(f"hang{i}.example:{pb}" for i in range(3))
        a = StaticDiscovery(DiscoveryConfig(
            backend="static", interfaces=("127.0.0.1",), peer_timeout_s=1.0,
            heartbeat_interval_s=0.25, request_timeout_s=60.0,
            static_peers=(*hanging, f"127.0.0.1:{pb}"),
        ))
        b = StaticDiscovery(config(pa))
        seen = Recorder()
        b.subscribe(seen)
        try:
            await asyncio.wait_for(a.start(advert("a", pa)), TIMEOUT_S / 4)
            await b.start(advert("b", pb))
            await seen.wait("added", "a")
            await asyncio.sleep(3.0)  # three of a's peer timeouts
            assert [e.kind for e in seen.events] == ["added"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_an_advertisement_is_taken_only_from_its_first_address() -> None:
    """Heartbeats go to a peer's first address: an advertisement sent from another address
    it lists would make us send beacons to a third party of the sender's choice."""

    async def main() -> None:
        pa, pb = free_port(), free_port()
        b = StaticDiscovery(config(pa))
        seen = Recorder()
        b.subscribe(seen)
        await b.start(advert("b", pb))

        def ad(node_id: str, addresses: list[str]) -> bytes:
            record = encode_record(advert(node_id, pa), addresses)
            return encode_beacon(Beacon(kind="ad", node_id=node_id, record=record))

        try:
            with socket.socket(type=socket.SOCK_DGRAM) as a:
                a.bind(("127.0.0.1", pa))
                a.sendto(ad("reflector", ["127.0.0.2", "127.0.0.1"]), ("127.0.0.1", pb))
                a.sendto(ad("a", ["127.0.0.1", "127.0.0.2"]), ("127.0.0.1", pb))
                await seen.wait("added", "a")
                assert "reflector" not in b.peers()
                assert [e.peer.node_id for e in seen.events] == ["a"]
        finally:
            await b.close()

    asyncio.run(main())


def test_peers_refused_by_a_full_table_are_counted_for_metrics() -> None:
    from kvpeer.discovery.advert import PeerInfo
    from kvpeer.discovery.peers import PeerTable

    d = StaticDiscovery(config(free_port()))
    d._table = PeerTable("me", timeout_s=10.0, max_peers=0)
    assert d.counters["peers_refused"] == 0
    d._table.observe(
        PeerInfo(node_id="x", addresses=("10.0.0.9",), port=1, fingerprints=(), epoch=1, chunk_count=0), 0.0
    )
    assert d.counters["peers_refused"] == 1


def test_garbage_from_many_addresses_is_counted_and_seldom_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Beacon sources are easy to spoof: warnings keyed by source address came at the
    sender's packet rate once it used more addresses than WarnOnce remembers."""
    d = StaticDiscovery(config(free_port()))
    with caplog.at_level(logging.WARNING):
        for i in range(900):
            d._on_datagram(b"\xc1garbage", f"10.0.{i // 256}.{i % 256}")
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) <= 3
    assert d.counters["beacons_ignored"] == 900


def test_a_listed_peer_is_taken_although_made_up_peers_fill_the_table() -> None:
    async def main() -> None:
        from kvpeer.discovery.peers import PeerTable

        d = StaticDiscovery(config(free_port()))
        d._table = PeerTable("me", timeout_s=10.0, max_peers=2)
        d._targets = [("10.0.0.1", 7000)]  # what static_peers = ["10.0.0.1:7000"] resolves to

        def ad(node_id: str, address: str) -> Beacon:
            record = encode_record(advert(node_id, 7000), [address])
            return Beacon(kind="ad", node_id=node_id, record=record)

        for node_id in ("x", "y", "z"):
            d._on_beacon(ad(node_id, "10.0.0.66"), "10.0.0.66")
        assert set(d.peers()) == {"x", "y"} and d.counters["peers_refused"] == 1
        d._on_beacon(ad("listed", "10.0.0.1"), "10.0.0.1")
        assert "listed" in d.peers()

    asyncio.run(main())


def test_a_peer_on_loopback_only_is_ignored_by_a_node_on_the_lan(caplog: pytest.LogCaptureFixture) -> None:
    """A daemon on this host listening on 127.0.0.1 alone (a test, a second instance) was taken
    as a peer by the LAN node beside it, which dialled it and warned on every failed connect."""
    from kvpeer.discovery.peers import PeerTable

    def ad(node_id: str, address: str) -> Beacon:
        return Beacon(kind="ad", node_id=node_id, record=encode_record(advert(node_id, 7000), [address]))

    async def main() -> None:
        on_lan = StaticDiscovery(config(free_port()))
        on_lan._table, on_lan._addresses = PeerTable("me", timeout_s=10.0), ("10.0.0.5",)
        with caplog.at_level(logging.WARNING):
            on_lan._on_beacon(ad("local-test", "127.0.0.1"), "127.0.0.1")
            on_lan._on_beacon(ad("lan-peer", "10.0.0.6"), "10.0.0.6")
        assert set(on_lan.peers()) == {"lan-peer"} and on_lan.counters["peers_ignored_no_address"] == 1
        assert "local-test: ignored peer: its first address is not one" in caplog.text
        on_loopback = StaticDiscovery(config(free_port()))  # single-host use: its own kind
        on_loopback._table, on_loopback._addresses = PeerTable("me", timeout_s=10.0), ("127.0.0.1",)
        on_loopback._on_beacon(ad("local-test", "127.0.0.1"), "127.0.0.1")
        assert set(on_loopback.peers()) == {"local-test"}

    asyncio.run(main())


def test_a_peer_on_this_host_that_lists_loopback_first_stays_without_a_clash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two static nodes on one host, both on ["127.0.0.1", LAN]: beacons leave from 127.0.0.1;
    loopback was dropped from the stored list, so every beacon after the first was taken for
    a node id clash (counted, WARNING "announced from 192.0.2.2 and 127.0.0.1") and the peer
    expired (/tmp/review-disc/loopback_first.py both)."""
    from kvpeer.discovery.peers import PeerTable

    async def main() -> None:
        d = StaticDiscovery(config(free_port()))
        d._table, d._addresses = PeerTable("me", timeout_s=10.0), ("127.0.0.1", "192.0.2.2")
        record = encode_record(advert("gpu1", 7000), ["127.0.0.1", "192.0.2.2"])
        for _ in range(3):
            d._on_beacon(Beacon(kind="ad", node_id="gpu1", record=record), "127.0.0.1")
        assert d.peers()["gpu1"].addresses == ("127.0.0.1", "192.0.2.2")
        assert d.counters.get("node_id_clashes", 0) == 0
        d._on_beacon(Beacon(kind="bye", node_id="gpu1"), "127.0.0.1")
        assert d.peers() == {}

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert caplog.text == ""


def test_a_node_id_announced_from_two_hosts_keeps_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two hosts with one node id (a cloned image) made the entry flip address and epoch at
    every beacon, each flip an inventory re-sync, with nothing saying why."""

    async def main() -> list[PeerEvent]:
        d = StaticDiscovery(config(free_port()))
        events: list[PeerEvent] = []
        d.subscribe(events.append)

        def ad(address: str, epoch: int) -> Beacon:
            record = encode_record(advert("gpu", 7000, epoch=epoch), [address])
            return Beacon(kind="ad", node_id="gpu", record=record)

        for _ in range(10):
            d._on_beacon(ad("10.0.0.1", 100), "10.0.0.1")
            d._on_beacon(ad("10.0.0.2", 900), "10.0.0.2")
        assert d.peers()["gpu"].addresses == ("10.0.0.1",)
        assert d.counters["node_id_clashes"] == 10
        return events

    with caplog.at_level(logging.WARNING):
        events = asyncio.run(main())
    assert [e.kind for e in events] == ["added"]
    assert [r.getMessage() for r in caplog.records] == [
        "node id gpu: announced from 10.0.0.1 and 10.0.0.2; keeping 10.0.0.1 while it runs"
    ]


def test_a_beacon_port_taken_on_udp_is_a_config_error_naming_transport_port() -> None:
    """The signalling port is also a UDP port: taken there, the start blamed [discovery] with
    a bare errno, and nothing said UDP."""
    from kvpeer.errors import ConfigError, NotReadyError

    async def main() -> None:
        with socket.socket(type=socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            beacons = BeaconSocket(lambda data, source: None)
            with pytest.raises(ConfigError, match=f"transport.port: .*UDP 127.0.0.1:{port}.*in use") as err:
                await beacons.open(("127.0.0.1",), port)
            assert not isinstance(err.value, NotReadyError)  # exit 2: a restart cannot free it
        with pytest.raises(NotReadyError, match="transport.port"):  # TEST-NET-1: not here (yet)
            await BeaconSocket(lambda data, source: None).open(("192.0.2.1",), port)

    asyncio.run(main())
