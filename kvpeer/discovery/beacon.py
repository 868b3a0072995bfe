"""UDP beacons between peers: heartbeats (liveness), and full advertisements for static peers.

A node listens on UDP at its signalling port number, on each advertised address (TCP and UDP
ports are separate, so the number is free). A heartbeat is tiny and unicast, so liveness costs
O(peers) small datagrams per interval instead of multicast traffic. `encode_beacon` and
`decode_beacon` are the sans-IO message pair; `BeaconSocket` is the thin asyncio endpoint.
Beacons are not authenticated, like mDNS: they only say "I am alive" / "I advertise this";
peers prove who they are on the authenticated transport.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgpack

from kvpeer.discovery.advert import MAX_RECORD_BYTES, validate_node_id
from kvpeer.errors import ConfigError, ErrorCode, NotReadyError, ProtocolError

log = logging.getLogger(__name__)

BEACON_VERSION = 1
MAX_BEACON_BYTES = MAX_RECORD_BYTES + 128


@dataclass(frozen=True, slots=True, kw_only=True)
class Beacon:
    """One datagram: "hb" (alive), "ad" (alive, with my advertisement record), "bye" (leaving)."""

    kind: Literal["hb", "ad", "bye"]
    node_id: str
    record: bytes = b""  # encode_record() output, for kind "ad"

    def __post_init__(self) -> None:
        if self.kind not in ("hb", "ad", "bye"):
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"beacon kind {self.kind!r}")
        validate_node_id(self.node_id)
        if (self.kind == "ad") != bool(self.record):
            raise ProtocolError(ErrorCode.INVALID, "only an 'ad' beacon carries a record")
        if len(self.record) > MAX_RECORD_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, "beacon record too large")


def encode_beacon(beacon: Beacon) -> bytes:
    body: dict[str, object] = {"v": BEACON_VERSION, "k": beacon.kind, "id": beacon.node_id}
    if beacon.record:
        body["r"] = beacon.record
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_beacon(data: bytes) -> Beacon:
    if len(data) > MAX_BEACON_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"beacon of {len(data)} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, max_bin_len=MAX_BEACON_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(ErrorCode.MALFORMED, f"beacon: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != BEACON_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, "beacon version")
    kind, node_id, record = body.get("k"), body.get("id"), body.get("r", b"")
    if not isinstance(kind, str) or not isinstance(node_id, str) or not isinstance(record, bytes):
        raise ProtocolError(ErrorCode.INVALID, "beacon fields")
    return Beacon(kind=kind, node_id=node_id, record=record)  # type: ignore[arg-type]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, str], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._on_datagram(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that just died: liveness will notice.
        log.debug("beacon socket: %s", exc)


class BeaconSocket:
    """UDP endpoints on ``addresses`` at ``port``; `send` goes out of the first one."""

    def __init__(self, on_datagram: Callable[[bytes, str], None]) -> None:
        self._on_datagram = on_datagram
        self._transports: list[asyncio.DatagramTransport] = []

    async def open(self, addresses: tuple[str, ...], port: int) -> None:
        """Bind every address; a failure closes those bound and raises ConfigError naming
        transport.port (NotReadyError for an address not assigned yet, as at boot)."""
        loop = asyncio.get_running_loop()
        for address in addresses:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Protocol(self._on_datagram),
                    local_addr=(address, port),
                    family=socket.AF_INET,
                )
            except OSError as exc:
                self.close()
                error = NotReadyError if exc.errno == errno.EADDRNOTAVAIL else ConfigError
                # The signalling port is taken on TCP by the transport and on UDP here: a
                # firewall or another program may know only of the TCP one.
                raise error(
                    f"transport.port: cannot listen on UDP {address}:{port} for discovery "
                    f"beacons (the signalling port is TCP and UDP): "
                    f"{exc.strerror or exc}"
                ) from None
            self._transports.append(transport)

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        if self._transports:
            self._transports[0].sendto(data, address)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()
