"""Fuzz targets and input strategies for every decoder that reads untrusted bytes.

Each ``feed_*`` target takes one input, runs it through one decoder of kvpeer and either gets a
valid value back or a typed :class:`~kvpeer.errors.KVPeerError`; any other exception escapes and
fails the caller. Every call is counted in :data:`COUNTS`, so the tests and the benchmark
(``benchmarks.faults``) report how many inputs were actually tried.

Inputs come in two kinds: *mutations* (bit flips, byte overwrites, truncations, insertions and
deletions) of valid encodings, which reach past the first length check, and *structured*
garbage (a valid envelope with wrong-typed or out-of-range fields), which reaches the field
validation of each message type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch
from hypothesis import strategies as st

from kvpeer import codec
from kvpeer.api import messages as api
from kvpeer.discovery import advert, beacon, digest, inventory
from kvpeer.errors import ErrorCode, KVPeerError
from kvpeer.hashing import ModelFingerprint
from kvpeer.transport import blobs
from kvpeer.transport import messages as tm

COUNTS: Counter[str] = Counter()
LIMIT = 1 << 20  # transport message limit used by the targets (the daemon's is larger)

FP = ModelFingerprint(name="fuzz-model", layers=2, kv_heads=2, head_dim=8, dtype="float16")


# --------------------------------------------------------------------------- seeds
def _codec_seeds() -> list[bytes]:
    gen = torch.Generator().manual_seed(6)
    out = []
    for level, dtype in (("exact", torch.float16), ("q8", torch.float16), ("q4", torch.bfloat16)):
        k = torch.randn(2, 2, 16, 8, generator=gen).to(dtype)
        v = torch.randn(2, 2, 16, 8, generator=gen).to(dtype)
        out.append(codec.encode(k, v, level))
    return out


CODEC_SEEDS = _codec_seeds()

TRANSPORT_SEEDS = [
    tm.encode(msg, LIMIT)
    for msg in (
        tm.Hello(nonce=b"n" * tm.NONCE_BYTES),
        tm.Challenge(nonce=b"c" * tm.NONCE_BYTES),
        tm.ClientProof(proofs=[b"p" * tm.MAC_BYTES, b"q" * tm.MAC_BYTES]),
        tm.ServerProof(proof=b"s" * tm.MAC_BYTES),
        tm.Offer(node_id="node-a", mtu=1500, sdp="v=0\r\n", mac=b"m" * tm.MAC_BYTES),
        tm.Answer(node_id="node-b", mtu=9000, sdp="v=0\r\n", mac=b"m" * tm.MAC_BYTES),
        tm.Reject(code=int(ErrorCode.UNAUTHENTICATED), reason="no"),
        tm.Request(id=7, method="has", body={"keys": [b"\x01" * 32]}),
        tm.Response(id=7, body={"have": [True]}),
        tm.Error(id=3, code=ErrorCode.NOT_FOUND, reason="gone"),
        tm.Ping(seq=1, sent=12.5),
        tm.Pong(seq=1, sent=12.5),
        tm.BlobRequest(id=9, key=b"k" * 32, level="q8"),
        tm.BlobStart(
            id=9, key=b"k" * 32, level="q8", size=100, frames=1, frame_payload=1000,
            digest=b"d" * 32,
        ),
        tm.BlobDone(id=9),
        tm.BlobCancel(id=9),
        tm.Bye(),
        tm.ByeAck(),
    )
]
ALL_TRANSPORT_TYPES = {**tm.SIGNALLING_TYPES, **tm.CONTROL_TYPES}

FRAME_BLOB = bytes(range(256)) * 10
FRAME_BYTES = 1024  # transport.frame_bytes is 1 KiB at the least
FRAME_SEEDS = list(blobs.iter_frames(5, FRAME_BLOB, FRAME_BYTES))
FRAME_START = blobs.blob_start(5, FRAME_BLOB, FRAME_BYTES, key=b"k" * 32, level="q8")

_KEYS = [bytes([i]) * 32 for i in range(1, 6)]
_ADVERT = advert.Advertisement(
    node_id="node-a", addresses=("10.0.0.1",), port=7457, fingerprints=(FP.hex,), epoch=12,
    chunk_count=3, first_chunk_keys=_KEYS,
)
DISCOVERY_SEEDS = [
    advert.encode_record(_ADVERT, ["10.0.0.1"]),
    beacon.encode_beacon(beacon.Beacon(kind="ad", node_id="node-a", record=advert.encode_record(_ADVERT, []))),
    beacon.encode_beacon(beacon.Beacon(kind="bye", node_id="node-a")),
    msgpack.packb(inventory.InventoryUpdate(kind="full", epoch=5, keys=tuple(_KEYS)).to_dict()),
    msgpack.packb(
        inventory.InventoryUpdate(kind="delta", epoch=9, base_epoch=5, added=tuple(_KEYS[:2]), removed=tuple(_KEYS[2:3])).to_dict()
    ),
]
DIGEST_SEED = _ADVERT.digest().encode()
TXT_SEED = advert.encode_fields(_ADVERT)

_TOKENS = np.arange(40, dtype=np.uint32)
API_SEEDS = [
    api.encode(msg)
    for msg in (
        api.Hello(id=1, namespace="team-a", client="fuzz"),
        api.PutRequest(id=2, tokens=_TOKENS, fingerprint=FP, level="q8"),
        api.PutCommit(id=3, segment="/kvpeer-x"),
        api.LookupRequest(id=4, tokens=_TOKENS, fingerprint=FP),
        api.FetchRequest(id=5, tokens=_TOKENS, fingerprint=FP, deadline_s=1.5, min_level="q4"),
        api.Release(id=6, segment="/kvpeer-y"),
        api.StatsRequest(id=7),
        api.PeersRequest(id=8),
        api.EvictRequest(id=9, all=True),
        api.LookupResult(id=4, matched_tokens=256, chunk_tokens=256, sources=["local"]),
        api.FetchResult(id=5, matched_tokens=256, chunk_tokens=256, recompute_from=256, levels=["q8"]),
        api.ErrorResponse(id=5, code=int(ErrorCode.NOT_FOUND), reason="nope"),
    )
]


# --------------------------------------------------------------------------- strategies
def _apply(seed: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (op, position, value) edits: flip a bit, set a byte, cut, insert, delete."""
    data = bytearray(seed)
    for op, pos, value in edits:
        at = pos % (len(data) + 1)
        if op == 0 and data:
            data[at % len(data)] ^= 1 << (value % 8)
        elif op == 1 and data:
            data[at % len(data)] = value
        elif op == 2:
            del data[at:]
        elif op == 3:
            data[at:at] = bytes([value]) * (1 + value % 4)
        elif op == 4:
            del data[at : at + 1 + value % 16]
    return bytes(data)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with 1-4 edits (every result differs from or equals its seed)."""
    edit = st.tuples(st.integers(0, 4), st.integers(0, 1 << 20), st.integers(0, 255))
    return st.builds(_apply, st.sampled_from(seeds), st.lists(edit, min_size=1, max_size=4))


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=40), st.binary(max_size=80),
)
WIRE_VALUES: st.SearchStrategy[Any] = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.binary(max_size=10)), inner, max_size=5),
    ),
    max_leaves=6,
)


def _envelope(version: Any, kind: Any, fields: dict[str, Any]) -> bytes:
    body = {"v": version, "t": kind, **fields}
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def structured(field_names: dict[str, list[str]], version: int) -> st.SearchStrategy[bytes]:
    """A valid envelope (mostly right version and type) with random values in its fields."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        kind = draw(st.one_of(st.sampled_from(sorted(field_names)), WIRE_VALUES))
        names = field_names.get(kind, []) if isinstance(kind, str) else []
        fields: dict[str, Any] = {}
        for name in names:
            if draw(st.integers(0, 5)):  # mostly present, sometimes missing
                fields[name] = draw(WIRE_VALUES)
        for name in draw(st.lists(st.text(max_size=6), max_size=2)):
            fields[name] = draw(WIRE_VALUES)
        chosen = draw(st.one_of(st.just(version), WIRE_VALUES))
        return _envelope(chosen, kind, fields)

    return build()


def _names(types: dict[str, Any]) -> dict[str, list[str]]:
    from dataclasses import fields

    return {t: [f.name for f in fields(cls)] for t, cls in types.items()}


TRANSPORT_FIELDS = _names(ALL_TRANSPORT_TYPES)
API_FIELDS = _names(api.MESSAGE_TYPES)


# --------------------------------------------------------------------------- targets
def feed_codec(data: bytes) -> None:
    """read_header / verify / decode: CodecError, or (only for an intact blob) its exact shape."""
    COUNTS["codec"] += 1
    try:
        header = codec.read_header(data)
    except KVPeerError:
        header = None
    try:
        codec.verify(data)
        k, v = codec.decode(data)
    except KVPeerError:
        return
    # Only a byte-identical seed may pass the BLAKE2b digest; it decodes to its stated shape.
    assert data in CODEC_SEEDS, "a modified blob passed verification"
    assert header is not None and tuple(k.shape) == header.shape == tuple(v.shape)


def feed_transport(data: bytes) -> None:
    COUNTS["transport_message"] += 1
    for types in (tm.SIGNALLING_TYPES, tm.CONTROL_TYPES):
        try:
            message = tm.decode(data, types, LIMIT)
        except KVPeerError:
            continue
        assert type(message) in types.values()


def feed_frame(frames: list[bytes]) -> None:
    """Frames through the header check and a blob assembler: the blob only if all are intact."""
    COUNTS["transport_frame"] += len(frames)
    assembler = blobs.BlobAssembler(5, 1 << 16)
    assembler.start(FRAME_START)
    for frame in frames:
        try:
            blob_id, _ = tm.decode_frame_header(frame)
            if blob_id == 5:
                assembler.add(frame)
        except KVPeerError:
            continue
    if assembler.complete:
        try:
            blob = assembler.result()
        except KVPeerError:
            return
        assert blob == FRAME_BLOB


def feed_discovery(data: bytes) -> None:
    COUNTS["discovery"] += 1
    decoders: list[Callable[[bytes], Any]] = [
        advert.decode_record,
        beacon.decode_beacon,
        digest.BloomDigest.decode,
        _inventory_from_bytes,
    ]
    for decode in decoders:
        try:
            decode(data)
        except KVPeerError:
            pass


def feed_txt(fields: dict[bytes, bytes | None]) -> None:
    COUNTS["discovery"] += 1
    try:
        advert.decode_fields(fields, ["10.0.0.1"])
    except KVPeerError:
        pass


def _inventory_from_bytes(data: bytes) -> inventory.InventoryUpdate:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # garbage before the inventory code: not what this target tests
        return inventory.InventoryUpdate(kind="full", epoch=0)
    return inventory.InventoryUpdate.from_dict(body)


def feed_api(data: bytes) -> None:
    """One framed API message: the frame splitter, then the body decoder."""
    COUNTS["api_message"] += 1
    decoder = api.FrameDecoder(max_frame=4096)
    decoder.feed(data)
    for item in decoder.frames():
        if isinstance(item, KVPeerError):
            continue
        try:
            message = api.decode_body(item)
        except KVPeerError:
            continue
        assert type(message) in api.MESSAGE_TYPES.values()
    try:
        api.decode_body(data)
    except KVPeerError:
        pass
