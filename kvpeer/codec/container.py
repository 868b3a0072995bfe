"""The blob container: a fixed header, a side-info section and a payload section.

Owns the byte layout of an encoded KV chunk and every check made on untrusted bytes before any
decoding work: magic, format version, known level/stream/dtype codes, size limits on every shape
and length, a CRC of the header (so :func:`parse_header` is cheap and trustworthy) and a BLAKE2b
digest over the whole blob (what a sender states and a receiver checks). It knows nothing of
quantization or entropy coding.

Layout (little-endian)::

    magic "KVPC" | version u8 | level u8 | stream u8 | dtype u8 | flags u8 | sink u8 | reserved u16
    layers u32 | kv_heads u32 | tokens u32 | head_dim u32 | side_len u32 | payload_len u32
    digest 32 bytes | header_crc u32 | side (side_len bytes) | payload (payload_len bytes)

The digest covers the header up to (not including) the digest, then side, then payload.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from kvpeer.errors import CodecError

MAGIC = b"KVPC"
FORMAT_VERSION = 3  # 2: per-channel step codes, exact tokens; 3: delta rows, 2-bit packing, scale-bucket frames, mean zero points
DIGEST_BYTES = 32

_PREFIX = struct.Struct("<4sBBBBBBHIIIIII")
_DIGEST_AT = _PREFIX.size
_CRC = struct.Struct("<I")
HEADER_BYTES = _PREFIX.size + DIGEST_BYTES + _CRC.size

# Limits applied before any allocation: a header cannot make us reserve more than this (callers
# of untrusted blobs bound it further: decode's out= or max_elements).
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_TOKENS = 1 << 20
MAX_HEAD_DIM = 4096
MAX_ELEMENTS = 1 << 31  # per tensor (k or v): 4 GiB of fp16
MAX_SECTION_BYTES = 1 << 31
MAX_SINK = 16

FLAG_KEYS_PRE_ROPE = 0x01
FLAG_TOKEN_RUNS = 0x02  # side info ends with token runs at their own step codes (tail steps)
FLAG_ENDS_PREFIX = 0x04  # encoded with tail=True: levels made from it (transcode) take tail steps
_KNOWN_FLAGS = FLAG_KEYS_PRE_ROPE | FLAG_TOKEN_RUNS | FLAG_ENDS_PREFIX

DTYPES: dict[int, str] = {1: "float16", 2: "bfloat16", 3: "float32"}
DTYPE_CODES = {name: code for code, name in DTYPES.items()}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# Bitstream formats of the payload (what is needed to decode it, not who produced it: an HEVC
# bitstream from NVENC and one from libx265 are the same stream kind).
STREAMS: dict[int, str] = {1: "zstd", 2: "ffv1", 3: "hevc", 4: "ans"}
STREAM_CODES = {name: code for code, name in STREAMS.items()}


def check_shape(shape: tuple[int, int, int, int]) -> None:
    """CodecError unless [layers, kv_heads, tokens, head_dim] is within the format's limits."""
    for name, value, limit in zip(
        ("layers", "kv_heads", "tokens", "head_dim"), shape, (MAX_LAYERS, MAX_KV_HEADS, MAX_TOKENS, MAX_HEAD_DIM),
        strict=True,
    ):
        if not 1 <= value <= limit:
            raise CodecError(f"{name}={value} outside 1..{limit}")
    elements = shape[0] * shape[1] * shape[2] * shape[3]
    if elements > MAX_ELEMENTS:
        raise CodecError(f"tensor of {elements} elements exceeds {MAX_ELEMENTS}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """Everything a blob states about itself; validated on construction."""

    level: str
    level_code: int
    stream: str
    dtype: str
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    side_len: int
    payload_len: int
    sink: int = 0  # exact tokens: their positions and values travel in the side info
    flags: int = 0
    digest: bytes = b""
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION:
            raise CodecError(f"unsupported codec format version {self.version}")
        if self.dtype not in DTYPE_CODES:
            raise CodecError(f"unsupported dtype {self.dtype!r}")
        if self.stream not in STREAM_CODES:
            raise CodecError(f"unsupported stream {self.stream!r}")
        check_shape(self.shape)
        for name, value in (("side_len", self.side_len), ("payload_len", self.payload_len)):
            if not 0 <= value <= MAX_SECTION_BYTES:
                raise CodecError(f"{name}={value} out of range")
        if not 0 <= self.sink <= min(MAX_SINK, self.tokens):
            raise CodecError(f"sink={self.sink} out of range")
        if self.flags & ~_KNOWN_FLAGS:
            raise CodecError(f"unknown flags {self.flags:#x}")
        if self.digest and len(self.digest) != DIGEST_BYTES:
            raise CodecError("digest has the wrong length")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.tokens, self.head_dim)

    @property
    def elements(self) -> int:
        return self.layers * self.kv_heads * self.tokens * self.head_dim

    @property
    def blob_len(self) -> int:
        return HEADER_BYTES + self.side_len + self.payload_len

    @property
    def keys_pre_rope(self) -> bool:
        return bool(self.flags & FLAG_KEYS_PRE_ROPE)

    @property
    def token_runs(self) -> bool:
        return bool(self.flags & FLAG_TOKEN_RUNS)

    @property
    def ends_prefix(self) -> bool:
        return bool(self.flags & FLAG_ENDS_PREFIX)


def _prefix_bytes(h: Header) -> bytes:
    return _PREFIX.pack(
        MAGIC,
        h.version,
        h.level_code,
        STREAM_CODES[h.stream],
        DTYPE_CODES[h.dtype],
        h.flags,
        h.sink,
        0,
        h.layers,
        h.kv_heads,
        h.tokens,
        h.head_dim,
        h.side_len,
        h.payload_len,
    )


def _digest(prefix: bytes | memoryview, side: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"kvpeer-codec")
    h.update(prefix)
    h.update(side)
    h.update(payload)
    return h.digest()


def pack(header: Header, side: bytes, payload: bytes) -> bytes:
    """Assemble a blob; ``header.side_len``/``payload_len`` must match the sections."""
    if header.side_len != len(side) or header.payload_len != len(payload):
        raise CodecError("section lengths do not match the header")
    prefix = _prefix_bytes(header)
    digest = _digest(prefix, side, payload)
    head = prefix + digest
    return b"".join((head, _CRC.pack(zlib.crc32(head)), side, payload))


def parse_header(blob: bytes | bytearray | memoryview, level_names: dict[int, str]) -> Header:
    """Parse and validate the header only (cheap); the blob length must match it exactly."""
    view = memoryview(blob)
    if len(view) < HEADER_BYTES:
        raise CodecError(f"blob of {len(view)} bytes is shorter than a header")
    head = view[: HEADER_BYTES - _CRC.size]
    (crc,) = _CRC.unpack_from(view, HEADER_BYTES - _CRC.size)
    if bytes(view[:4]) != MAGIC:
        raise CodecError("not a kvpeer codec blob (bad magic)")
    if zlib.crc32(head) != crc:
        raise CodecError("header checksum mismatch")
    (_, version, level_code, stream_code, dtype_code, flags, sink, reserved, layers, heads,
     tokens, head_dim, side_len, payload_len) = _PREFIX.unpack_from(view, 0)
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported codec format version {version}")
    if reserved != 0:
        raise CodecError("reserved header field is not zero")
    if level_code not in level_names:
        raise CodecError(f"unknown level code {level_code}")
    if stream_code not in STREAMS:
        raise CodecError(f"unknown stream code {stream_code}")
    if dtype_code not in DTYPES:
        raise CodecError(f"unknown dtype code {dtype_code}")
    header = Header(
        level=level_names[level_code],
        level_code=level_code,
        stream=STREAMS[stream_code],
        dtype=DTYPES[dtype_code],
        layers=layers,
        kv_heads=heads,
        tokens=tokens,
        head_dim=head_dim,
        side_len=side_len,
        payload_len=payload_len,
        sink=sink,
        flags=flags,
        digest=bytes(view[_DIGEST_AT : _DIGEST_AT + DIGEST_BYTES]),
        version=version,
    )
    if len(view) != header.blob_len:
        raise CodecError(f"blob is {len(view)} bytes, header says {header.blob_len}")
    return header


def sections(blob: bytes | bytearray | memoryview, header: Header) -> tuple[memoryview, memoryview]:
    """The side and payload sections of a blob whose header was parsed."""
    view = memoryview(blob)
    side_end = HEADER_BYTES + header.side_len
    return view[HEADER_BYTES:side_end], view[side_end : side_end + header.payload_len]


def verify(blob: bytes | bytearray | memoryview, header: Header) -> None:
    """Recompute the digest over the whole blob; CodecError if it differs from the header's."""
    view = memoryview(blob)
    side, payload = sections(view, header)
    actual = _digest(view[: _PREFIX.size], side, payload)
    if actual != header.digest:
        raise CodecError("blob digest mismatch (corrupted or truncated)")
