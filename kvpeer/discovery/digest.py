"""A compact Bloom-filter digest of the prefixes a node holds (its first-chunk keys).

Sized so that it fits, with the rest of the advertisement, in under 1 KB of TXT: at most
`MAX_DIGEST_BYTES`. Bit positions come from the bytes of each entry directly (double hashing
over two 64-bit words), so entries must be uniform hashes.

What a node publishes is keyed (`keyed_entries`): chunk keys are unkeyed hashes of public
inputs (tokens, model fingerprint, namespace name), so a digest of the keys themselves lets
any host on the LAN test whether a guessed prompt or document is cached. Entries are MACs of
the chunk keys under a key derived from the cluster key; only key holders can test them.
Pure code: no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable

from kvpeer.errors import ErrorCode, ProtocolError

DIGEST_VERSION = 1
MAX_DIGEST_BYTES = 640  # 5,120 bits: ~1% false positives at ~530 prefixes
MIN_DIGEST_BYTES = 8
BITS_PER_KEY = 10  # ~1% false positives at the optimal hash count
MAX_HASHES = 12
HEADER_BYTES = 2  # version, hash count
_HEADER = HEADER_BYTES
KEY_ID_BYTES = 4
_ENTRY_BYTES = 16  # what _positions reads


class BloomDigest:
    """An immutable Bloom filter over 32-byte chunk keys."""

    __slots__ = ("_bits", "_m", "hashes")

    def __init__(self, bits: bytes, hashes: int) -> None:
        if not MIN_DIGEST_BYTES <= len(bits) <= MAX_DIGEST_BYTES:
            raise ProtocolError(ErrorCode.INVALID, f"digest of {len(bits)} bytes")
        if not 1 <= hashes <= MAX_HASHES:
            raise ProtocolError(ErrorCode.INVALID, f"digest with {hashes} hashes")
        self._bits = bits
        self._m = len(bits) * 8
        self.hashes = hashes

    @classmethod
    def build(cls, keys: Collection[bytes], max_bytes: int = MAX_DIGEST_BYTES) -> BloomDigest:
        """Smallest filter (up to ``max_bytes``) giving ~1% false positives for ``keys``."""
        n = len(keys)
        cap = max(MIN_DIGEST_BYTES, min(MAX_DIGEST_BYTES, max_bytes))
        size = min(cap, max(MIN_DIGEST_BYTES, math.ceil(n * BITS_PER_KEY / 8)))
        m = size * 8
        hashes = max(1, min(MAX_HASHES, round(m / max(n, 1) * math.log(2))))
        bits = bytearray(size)
        for key in keys:
            for pos in _positions(key, hashes, m):
                bits[pos >> 3] |= 1 << (pos & 7)
        return cls(bytes(bits), hashes)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes | bytearray) or len(key) < 16:
            return False
        bits = self._bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in _positions(bytes(key), self.hashes, self._m))

    def fill_ratio(self) -> float:
        """Share of bits set: near 1.0 the filter answers "maybe" to everything."""
        return sum(bin(b).count("1") for b in self._bits) / self._m

    def encode(self) -> bytes:
        return bytes((DIGEST_VERSION, self.hashes)) + self._bits

    @classmethod
    def decode(cls, data: bytes) -> BloomDigest:
        """Raises ProtocolError for a wrong version, size or hash count."""
        if len(data) < _HEADER + MIN_DIGEST_BYTES or len(data) > _HEADER + MAX_DIGEST_BYTES:
            raise ProtocolError(ErrorCode.INVALID, f"digest of {len(data)} bytes")
        if data[0] != DIGEST_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"digest version {data[0]}")
        return cls(bytes(data[_HEADER:]), data[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BloomDigest) and other.encode() == self.encode()

    def __hash__(self) -> int:
        return hash(self.encode())

    def __repr__(self) -> str:
        return f"BloomDigest({self._m} bits, {self.hashes} hashes, {self.fill_ratio():.0%} full)"


def key_id(key: bytes) -> bytes:
    """Names the key a keyed digest was built with, so that a reader holding another key (a
    rotation under way) answers "maybe" instead of reading random bits as "not held". A hash of
    a 256-bit key: it tells nothing of the key."""
    return hashlib.blake2b(key, digest_size=KEY_ID_BYTES, person=b"kvpeer-bloom-id").digest()


def keyed_entries(key: bytes, chunk_keys: Iterable[bytes]) -> list[bytes]:
    """What a keyed digest holds for ``chunk_keys``: their MACs under a key derived from the
    cluster key (never the cluster key itself, which authenticates sessions)."""
    derived = hashlib.blake2b(key, digest_size=32, person=b"kvpeer-bloom").digest()
    mac = hashlib.blake2b(key=derived, digest_size=_ENTRY_BYTES)
    entries = []
    for chunk_key in chunk_keys:
        h = mac.copy()
        h.update(chunk_key)
        entries.append(h.digest())
    return entries


def _positions(key: bytes, hashes: int, m: int) -> list[int]:
    h1 = int.from_bytes(key[0:8], "little")
    h2 = int.from_bytes(key[8:16], "little") | 1
    return [(h1 + i * h2) % m for i in range(hashes)]
