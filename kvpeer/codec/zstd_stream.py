"""The ``zstd`` payload stream: integer or raw-byte planes compressed with zstandard.

Symbols are narrowed to one byte per symbol when they fit (most levels) and byte-shuffled
otherwise, so zstd's Huffman stage sees one byte distribution at a time. Decompression checks
the frame's declared size against the size the header implies before allocating anything.
"""

from __future__ import annotations

import numpy as np
import zstandard

from kvpeer.errors import CodecError

DEFAULT_ZSTD_LEVEL = 3


def compress(data: bytes | memoryview, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def decompress(frame: bytes | memoryview, expected: int) -> bytes:
    """Decompress one frame that must hold exactly ``expected`` bytes."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame: {exc}") from None
    if size != expected:
        raise CodecError(f"zstd frame holds {size} bytes, expected {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from None
    if len(out) != expected:
        raise CodecError("zstd frame decompressed to the wrong size")
    return out


def shuffle(raw: np.ndarray) -> bytes:
    """Byte planes of a flat array: all first bytes, then all second bytes, ..."""
    width = raw.dtype.itemsize
    return np.ascontiguousarray(raw.reshape(-1).view(np.uint8).reshape(-1, width).T).tobytes()


def unshuffle(planes: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    u8 = np.frombuffer(planes, dtype=np.uint8).reshape(width, count)
    return np.ascontiguousarray(u8.T).view(dtype).reshape(count)


def encode_symbols(symbols: np.ndarray, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """int16 symbols -> width byte + zstd frame."""
    flat = symbols.reshape(-1)
    if flat.size == 0 or (flat.min() >= -128 and flat.max() <= 127):
        return b"\x01" + compress(flat.astype(np.int8).tobytes(), level)
    return b"\x02" + compress(shuffle(flat.astype("<i2")), level)


def decode_symbols(payload: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: int16 array of ``count`` symbols."""
    if len(payload) < 1:
        raise CodecError("empty symbol payload")
    width = payload[0]
    if width == 1:
        raw = decompress(payload[1:], count)
        return np.frombuffer(raw, dtype=np.int8).astype(np.int16)
    if width == 2:
        raw = decompress(payload[1:], 2 * count)
        return unshuffle(raw, np.dtype("<i2"), count).astype(np.int16)
    raise CodecError(f"unknown symbol width {width}")
