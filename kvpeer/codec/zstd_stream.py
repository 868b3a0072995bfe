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
_PER_ROW = 5
_MODES = (_NIBBLE, _INT8, _INT16)


def _pack(flat: np.ndarray, mode: int) -> bytes:
    if mode == _NIBBLE:
        u = (flat + 8).astype(np.uint8)
        if u.size % 2:
            u = np.append(u, np.uint8(8))
        return (u[0::2] | (u[1::2] << 4)).tobytes()
    if mode == _INT8:
        return flat.astype(np.int8).tobytes()
    return shuffle(flat.astype("<i2"))


def _unpack(raw: bytes, mode: int, count: int) -> np.ndarray:
    if mode == _NIBBLE:
        packed = np.frombuffer(raw, dtype=np.uint8)
        out = np.empty(2 * packed.size, dtype=np.int8)
        out[0::2] = (packed & 0x0F).view(np.int8)
        out[1::2] = (packed >> 4).view(np.int8)
        out -= 8
        return out[:count]
    if mode == _INT8:
        return np.frombuffer(raw, dtype=np.int8)
    return unshuffle(raw, np.dtype("<i2"), count)


def _packed_len(mode: int, count: int) -> int:
    return (count + 1) // 2 if mode == _NIBBLE else count * (2 if mode == _INT16 else 1)


def _row_modes(rows: np.ndarray) -> np.ndarray:
    """uint8 mode per row: packing kind (low 2 bits) | bit length of the largest |symbol| << 2."""
    if not rows.size:
        return np.full(rows.shape[0], _NIBBLE, np.uint8)
    lo, hi = rows.min(axis=1).astype(np.int32), rows.max(axis=1).astype(np.int32)
    kind = np.where((lo >= -8) & (hi <= 7), _NIBBLE, np.where((lo >= -128) & (hi <= 127), _INT8, _INT16))
    width = np.ceil(np.log2(np.maximum(-lo, hi).astype(np.float64) + 1)).astype(np.int64)
    return (kind | (np.minimum(width, 15) << 2)).astype(np.uint8)


def encode_symbols(symbols: np.ndarray, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """int16 symbols [rows, ...] -> bytes; each row (one channel's tokens) gets its own mode.

    Rows whose symbols all lie in -8..7 go two per byte (zstd's Huffman stage codes whole bytes,
    so packing pairs lets it spend under one bit per symbol), rows within -128..127 one per byte,
    wider rows as byte-shuffled int16. Rows of one mode (packing and spread: the bit length of
    their largest symbol) are compressed together in one frame, so each frame's Huffman table
    fits one spread (2-3% smaller than one table per packing, measured) and an outlier channel
    widens only its own row. Layout: marker byte (5) | u32 length + zstd frame of one mode byte
    per row | per mode present, ascending: u32 frame length + frame.
    """
    rows = symbols.reshape(symbols.shape[0], -1) if symbols.ndim > 1 else symbols.reshape(1, -1)
    modes = _row_modes(rows)
    mode_frame = compress(modes.tobytes(), level)
    out = [bytes((_PER_ROW,)), len(mode_frame).to_bytes(4, "little"), mode_frame]
    for mode in np.unique(modes).tolist():
        picked = np.flatnonzero(modes == mode)
        chosen = rows if picked.size == rows.shape[0] else rows[picked]
        frame = compress(_pack(chosen.reshape(-1), mode & 3), level)
        out.append(len(frame).to_bytes(4, "little"))
        out.append(frame)
    return b"".join(out)


def _frame_at(view: memoryview, pos: int) -> tuple[memoryview, int]:
    if pos + 4 > len(view):
        raise CodecError("symbol payload truncated")
    size = int.from_bytes(view[pos : pos + 4], "little")
    pos += 4
    if pos + size > len(view):
        raise CodecError("symbol payload truncated")
    return view[pos : pos + size], pos + size


def decode_symbols(payload: bytes | memoryview, count: int, rows: int = 1) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: [rows, count // rows] symbols (int8 or int16)."""
    view = memoryview(payload)
    if rows < 1 or count % rows or len(view) < 1 or view[0] != _PER_ROW:
        raise CodecError("bad symbol payload")
    per_row = count // rows
    frame, pos = _frame_at(view, 1)
    modes = np.frombuffer(decompress(frame, rows), np.uint8)
    if not np.isin(modes & 3, _MODES).all():
        raise CodecError("unknown symbol mode")
    out: np.ndarray | None = None
    for mode in np.unique(modes).tolist():
        picked = np.flatnonzero(modes == mode)
        frame, pos = _frame_at(view, pos)
        n = picked.size * per_row
        kind = mode & 3
        values = _unpack(decompress(frame, _packed_len(kind, n)), kind, n).reshape(picked.size, per_row)
        if picked.size == rows:
            out = values  # one mode for all rows: no copy
        else:
            if out is None:
                out = np.empty((rows, per_row), np.int16 if (modes & 3 == _INT16).any() else np.int8)
            out[picked] = values
    if pos != len(view) or out is None:
        raise CodecError("trailing bytes after the symbol frames")
    return out
