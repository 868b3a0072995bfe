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


_INT8 = 1
_INT16 = 2
_NIBBLE = 3


def encode_symbols(symbols: np.ndarray, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """int16 symbols (any shape, flattened in C order) -> mode byte + zstd frame.

    Narrow alphabets (all symbols in -8..7, the low levels) go two per byte: zstd's Huffman
    stage codes whole bytes, so packing pairs lets it spend under one bit per symbol.
    """
    flat = symbols.reshape(-1)
    lo, hi = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
    if -8 <= lo and hi <= 7:
        u = (flat + 8).astype(np.uint8)
        if u.size % 2:
            u = np.append(u, np.uint8(8))
        packed = u[0::2] | (u[1::2] << 4)
        return bytes((_NIBBLE,)) + compress(packed.tobytes(), level)
    if -128 <= lo and hi <= 127:
        return bytes((_INT8,)) + compress(flat.astype(np.int8).tobytes(), level)
    return bytes((_INT16,)) + compress(shuffle(flat.astype("<i2")), level)


def decode_symbols(payload: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: a flat array of ``count`` symbols (int8 or int16)."""
    if len(payload) < 1:
        raise CodecError("empty symbol payload")
    mode = payload[0]
    if mode == _NIBBLE:
        packed = np.frombuffer(decompress(payload[1:], (count + 1) // 2), dtype=np.uint8)
        out = np.empty(2 * packed.size, dtype=np.int8)
        out[0::2] = (packed & 0x0F).view(np.int8)
        out[1::2] = (packed >> 4).view(np.int8)
        out -= 8
        return out[:count]
    if mode == _INT8:
        return np.frombuffer(decompress(payload[1:], count), dtype=np.int8)
    if mode == _INT16:
        raw = decompress(payload[1:], 2 * count)
        return unshuffle(raw, np.dtype("<i2"), count).astype(np.int16)
    raise CodecError(f"unknown symbol mode {mode}")
