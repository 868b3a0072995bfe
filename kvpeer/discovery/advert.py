"""What a node announces (`Advertisement`), what it learns of a peer (`PeerInfo`), and the one
wire form both take: a small set of TXT-style key/value fields.

The same fields are the zeroconf TXT record, the payload of a static-peer beacon and the value
of an etcd key, so every backend validates peer input through `decode_fields`. Everything a
peer sends is untrusted: decoding checks version, sizes and ranges and raises ProtocolError.
Pure code: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgpack

from kvpeer.discovery.digest import HEADER_BYTES as DIGEST_HEADER_BYTES
from kvpeer.discovery.digest import (
    KEY_ID_BYTES,
    MAX_DIGEST_BYTES,
    MIN_DIGEST_BYTES,
    BloomDigest,
    key_id,
    keyed_entries,
)
from kvpeer.errors import ErrorCode, ProtocolError

SERVICE_TYPE = "_kvpeer._tcp.local."
TXT_VERSION = 1
MAX_TXT_BYTES = 1000  # DESIGN.md: keep TXT under ~1 KB
MAX_FINGERPRINTS = 8
MAX_ADDRESSES = 8
MAX_EPOCH = 2**63 - 1
_DIGEST_PIECE = 240  # one TXT string holds at most 255 bytes, "dN=" included
_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{8,64}$")
MAX_RECORD_BYTES = 2048  # beacon / etcd value: TXT fields plus addresses


def validate_node_id(node_id: str) -> str:
    """A node id is 1-63 of [A-Za-z0-9_-]: it is a DNS label of the service instance name."""
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise ProtocolError(ErrorCode.INVALID, f"bad node id {node_id!r}")
    return node_id


def _check_common(
    node_id: str, addresses: tuple[str, ...], port: int, fingerprints: tuple[str, ...],
    epoch: int, chunk_count: int,
) -> None:
    validate_node_id(node_id)
    if len(addresses) > MAX_ADDRESSES:
        raise ProtocolError(ErrorCode.INVALID, f"{len(addresses)} addresses")
    for addr in addresses:
        # IPv4 only, like our own sockets: a peer's IPv6 address would become a heartbeat
        # target that an IPv4 socket cannot send to.
        try:
            if not isinstance(addr, str):
                raise ValueError(addr)
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise ProtocolError(ErrorCode.INVALID, f"bad IPv4 address {addr!r}") from None
    if not 0 < port < 65536:
        raise ProtocolError(ErrorCode.INVALID, f"bad port {port}")
    if len(fingerprints) > MAX_FINGERPRINTS:
        raise ProtocolError(ErrorCode.INVALID, f"{len(fingerprints)} fingerprints")
    for fp in fingerprints:
        if not isinstance(fp, str) or not _FINGERPRINT.match(fp):
            raise ProtocolError(ErrorCode.INVALID, f"bad fingerprint {fp!r}")
    if not 0 <= epoch <= MAX_EPOCH or not 0 <= chunk_count <= MAX_EPOCH:
        raise ProtocolError(ErrorCode.INVALID, "epoch or chunk count out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class Advertisement:
    """What this daemon announces. Invalid values raise ProtocolError(INVALID)."""

    node_id: str
    addresses: tuple[str, ...] = ()  # empty: the configured interfaces' addresses
    port: int  # signalling port (TCP for the handshake, UDP for the beacon)
    fingerprints: tuple[str, ...] = ()  # hex model fingerprints this node serves
    epoch: int = 0  # inventory epoch: changes whenever the chunk set changes
    chunk_count: int = 0
    first_chunk_keys: Collection[bytes] = ()  # summarised as a Bloom digest, never sent raw
    # The cluster key: the digest is published keyed with it, and not at all without one.
    digest_key: bytes | None = field(default=None, repr=False, compare=False)
    # Encoded keyed digests by size budget: a static node sends its advertisement every
    # heartbeat, and MACing every first-chunk key each time ran on the event loop. Per
    # instance, so never stale: a new epoch, key or key set is a new advertisement.
    _digests: dict[int, bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "fingerprints", tuple(self.fingerprints))
        _check_common(
            self.node_id, self.addresses, self.port, self.fingerprints, self.epoch,
            self.chunk_count,
        )

    def digest(self) -> BloomDigest:
        """The Bloom digest of the first-chunk keys: of their MACs when keyed (what is
        published), of the keys themselves otherwise (never published)."""
        if self.digest_key is None:
            return BloomDigest.build(self.first_chunk_keys)
        return BloomDigest.build(keyed_entries(self.digest_key, self.first_chunk_keys))

    def keyed_digest(self, max_bytes: int) -> bytes | None:
        """The published digest: key id then the encoded filter of the keys' MACs, at most
        ``max_bytes`` of filter; None without a cluster key."""
        if self.digest_key is None:
            return None
        encoded = self._digests.get(max_bytes)
        if encoded is None:
            entries = keyed_entries(self.digest_key, self.first_chunk_keys)
            built = BloomDigest.build(entries, max_bytes=max_bytes)
            encoded = self._digests[max_bytes] = key_id(self.digest_key) + built.encode()
        return encoded


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """What this node knows of one peer, from its advertisement."""

    node_id: str
    addresses: tuple[str, ...]
    port: int
    fingerprints: tuple[str, ...]
    epoch: int
    chunk_count: int
    digest: BloomDigest | None = field(default=None, compare=True)
    # Which key the digest is keyed with (`digest.key_id`); None: a digest of the chunk keys
    # themselves, as nodes before keyed digests sent.
    digest_key_id: bytes | None = None

    def __post_init__(self) -> None:
        _check_common(
            self.node_id, self.addresses, self.port, self.fingerprints, self.epoch,
            self.chunk_count,
        )
        # Peers are dialled and sent heartbeats at their first address: one without (a host
        # answering AAAA only, an etcd record with "addr": []) would be listed but unreachable.
        if not self.addresses:
            raise ProtocolError(ErrorCode.INVALID, "no IPv4 address")

    def serves(self, fingerprint_hex: str) -> bool:
        return fingerprint_hex in self.fingerprints

    def might_hold_prefix(self, first_chunk_key: bytes, keys: Collection[bytes] = ()) -> bool:
        """False only if the peer certainly lacks a prefix starting with this chunk. ``keys``:
        the cluster keys this node holds (current and next); a digest keyed with none of them
        answers "maybe"."""
        if self.chunk_count == 0:
            return False
        if self.digest is None:
            return True
        if self.digest_key_id is None:
            return first_chunk_key in self.digest
        for key in keys:
            if key_id(key) == self.digest_key_id:
                return keyed_entries(key, (first_chunk_key,))[0] in self.digest
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEvent:
    """A change in the set of live peers, delivered to `Discovery.subscribe` callbacks."""

    kind: Literal["added", "updated", "removed"]
    peer: PeerInfo
    epoch_changed: bool = False  # "updated": the inventory epoch moved (time to sync)
    reason: Literal["", "goodbye", "timeout", "transport"] = ""  # why "removed"


def encode_fields(advert: Advertisement, addresses: Sequence[str] = ()) -> dict[bytes, bytes]:
    """The TXT key/value fields of an advertisement.

    ``addresses``, where given, go in field "a" in the node's order: beside the TXT they travel
    as A records, which zeroconf returns in the order of its cache, and peers dial the first.
    Raises ProtocolError(TOO_LARGE) if the record would exceed MAX_TXT_BYTES.
    """
    fields: dict[bytes, bytes] = {
        b"v": str(TXT_VERSION).encode(),
        b"id": advert.node_id.encode(),
        b"p": str(advert.port).encode(),
        b"fp": ",".join(advert.fingerprints).encode(),
        b"e": str(advert.epoch).encode(),
        b"n": str(advert.chunk_count).encode(),
    }
    if addresses:
        # Peers take no more (and one TXT string holds 255 bytes); the first are the ones used.
        fields[b"a"] = ",".join(addresses[:MAX_ADDRESSES]).encode()
    # The digest is keyed (see digest.py): without a cluster key there is none, and peers
    # treat every prefix as "maybe". It goes in fields "kN": nodes before it read "dN" only,
    # there a digest of the chunk keys themselves, and see no digest here.
    # It gets what is left of the TXT budget (fingerprints and ids vary in length); with too
    # little left it is omitted.
    pieces_overhead = 4 * (1 + MAX_DIGEST_BYTES // _DIGEST_PIECE)  # "kN=" + length byte each
    budget = (
        MAX_TXT_BYTES - txt_size(fields) - pieces_overhead - DIGEST_HEADER_BYTES - KEY_ID_BYTES
    )
    if budget >= MIN_DIGEST_BYTES and (digest := advert.keyed_digest(budget)) is not None:
        for i in range(0, len(digest), _DIGEST_PIECE):
            fields[b"k%d" % (i // _DIGEST_PIECE)] = digest[i : i + _DIGEST_PIECE]
    size = txt_size(fields)
    if size > MAX_TXT_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"TXT record of {size} bytes")
    return fields


def txt_size(fields: Mapping[bytes, bytes | None]) -> int:
    """Bytes of the TXT RDATA: one length byte plus "key=value" per field."""
    return sum(1 + len(k) + (1 + len(v) if v is not None else 0) for k, v in fields.items())


def _int_field(fields: Mapping[bytes, bytes | None], key: bytes) -> int:
    raw = fields.get(key)
    if raw is None or not raw.isdigit() or len(raw) > 19:
        raise ProtocolError(ErrorCode.INVALID, f"TXT field {key.decode()} missing or not a number")
    return int(raw)


def decode_fields(fields: Mapping[bytes, bytes | None], addresses: Collection[str]) -> PeerInfo:
    """A peer's advertisement from its TXT fields; ProtocolError if anything is off.

    ``addresses`` are those that came beside the fields (A records, a record's "addr"). The
    fields' own list "a" wins where present: it is in the order the node gave, first the one
    its transport listens on. Nodes before that field sent none.
    """
    if txt_size(fields) > MAX_TXT_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, "TXT record too large")
    if fields.get(b"v") != str(TXT_VERSION).encode():
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"TXT version {fields.get(b'v')!r}")
    raw_id = fields.get(b"id") or b""
    raw_fp = fields.get(b"fp") or b""
    raw_addresses = fields.get(b"a") or b""
    try:
        node_id = raw_id.decode("ascii")
        fingerprints = tuple(f for f in raw_fp.decode("ascii").split(",") if f)
        advertised = tuple(dict.fromkeys(a for a in raw_addresses.decode("ascii").split(",") if a))
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.INVALID, "TXT text fields are not ASCII") from None
    digest, digest_key_id = None, None
    if keyed := _pieces(fields, b"k"):
        if len(keyed) < KEY_ID_BYTES:
            raise ProtocolError(ErrorCode.INVALID, "keyed digest without its key id")
        digest_key_id, digest = keyed[:KEY_ID_BYTES], BloomDigest.decode(keyed[KEY_ID_BYTES:])
    elif unkeyed := _pieces(fields, b"d"):  # a node before keyed digests
        digest = BloomDigest.decode(unkeyed)
    return PeerInfo(
        node_id=node_id,
        addresses=advertised or tuple(addresses),
        port=_int_field(fields, b"p"),
        fingerprints=fingerprints,
        epoch=_int_field(fields, b"e"),
        chunk_count=_int_field(fields, b"n"),
        digest=digest,
        digest_key_id=digest_key_id,
    )


def _pieces(fields: Mapping[bytes, bytes | None], prefix: bytes) -> bytes:
    """The joined values of fields ``prefix``0, ``prefix``1, ... up to the first missing."""
    pieces: list[bytes] = []
    while (piece := fields.get(prefix + b"%d" % len(pieces))) is not None:
        pieces.append(piece)
    return b"".join(pieces)


def encode_record(advert: Advertisement, addresses: Collection[str]) -> bytes:
    """Advertisement as one self-contained blob (static beacons, etcd values)."""
    record = {"addr": list(addresses), "txt": encode_fields(advert)}
    return msgpack.packb(record, use_bin_type=True)  # type: ignore[no-any-return]


def decode_record(data: bytes) -> PeerInfo:
    """Inverse of `encode_record`; ProtocolError for anything malformed or too large."""
    if len(data) > MAX_RECORD_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"record of {len(data)} bytes")
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=MAX_RECORD_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(ErrorCode.MALFORMED, f"record: {exc}") from None
    if not isinstance(record, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "record is not a map")
    addrs, txt = record.get("addr"), record.get("txt")
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ProtocolError(ErrorCode.INVALID, "record addresses")
    if not isinstance(txt, dict) or not all(
        isinstance(k, bytes) and isinstance(v, bytes) for k, v in txt.items()
    ):
        raise ProtocolError(ErrorCode.INVALID, "record fields")
    return decode_fields(txt, addrs)
