"""The ``zstd`` payload stream: integer or raw-byte planes compressed with zstandard.

Symbols are narrowed to one byte per symbol when they fit (most levels) and byte-shuffled
otherwise, so zstd's Huffman stage sees one byte distribution at a time. Decompression checks
the frame's declared size against the size the header implies before allocating anything.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from kvpeer.errors import CodecError

DEFAULT_ZSTD_LEVEL = 3


SYMBOL_MIN_MATCH = 7  # zstd's longest minimum match: short matches in packed symbols cost more than
# the Huffman-coded literals they replace (q3 payload 7% smaller, q8 0.1%, same speed; measured)


def compress(data: bytes | memoryview, level: int = DEFAULT_ZSTD_LEVEL, min_match: int = 0) -> bytes:
    """One zstd frame that states its content size; ``min_match`` 0 keeps the level's own."""
    if not min_match:
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    params = zstandard.ZstdCompressionParameters.from_level(level, min_match=min_match, write_content_size=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


_local = threading.local()  # a decompressor per thread (one instance is not thread-safe; ~10 us to make)


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def decompress(frame: bytes | memoryview, expected: int) -> bytes:
    """Decompress one frame that must hold exactly ``expected`` bytes."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame: {exc}") from None
    if size != expected:
        raise CodecError(f"zstd frame holds {size} bytes, expected {expected}")
    try:
        out = _decompressor().decompress(frame, max_output_size=expected)
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


# Packing kinds (low 2 bits of a row's mode byte)
_CRUMB = 0  # -2..1, four per byte
_INT8 = 1
_INT16 = 2
_NIBBLE = 3  # -8..7, two per byte
_DELTA = 4  # mode bit: the row holds its first symbol, then differences of successive tokens
_SCALE_SHIFT = 3  # mode bits 3-7: the residuals' scale bucket (half octaves of mean |residual|)
# payload formats of this module: symbols all within int8 / some wider (5: v2's frames, refused)
_MARKER_INT8, _MARKER_INT16 = 6, 7


def _pack(flat: np.ndarray, kind: int) -> bytes:
    if kind == _CRUMB:
        u = (flat + 2).astype(np.uint8)
        u = np.append(u, np.full(-u.size % 4, 2, np.uint8))
        return (u[0::4] | (u[1::4] << 2) | (u[2::4] << 4) | (u[3::4] << 6)).tobytes()
    if kind == _NIBBLE:
        u = (flat + 8).astype(np.uint8)
        if u.size % 2:
            u = np.append(u, np.uint8(8))
        return (u[0::2] | (u[1::2] << 4)).tobytes()
    if kind == _INT8:
        return flat.astype(np.int8).tobytes()
    return shuffle(flat.astype("<i2"))


# a packed crumb byte -> its four int8 symbols, as one little-endian u32 (one gather decodes)
_CRUMB_TABLE = (
    np.stack([((np.arange(256) >> (2 * i)) & 3) - 2 for i in range(4)], axis=1).astype(np.int8).view("<u4").reshape(256)
)


def _unpack(raw: bytes, kind: int, count: int) -> np.ndarray:
    if kind == _CRUMB:
        return np.take(_CRUMB_TABLE, np.frombuffer(raw, dtype=np.uint8)).view(np.int8)[:count]
    if kind == _NIBBLE:
        packed = np.frombuffer(raw, dtype=np.uint8)
        out = np.empty(2 * packed.size, dtype=np.int8)
        out[0::2] = (packed & 0x0F).view(np.int8)
        out[1::2] = (packed >> 4).view(np.int8)
        out -= 8
        return out[:count]
    if kind == _INT8:
        return np.frombuffer(raw, dtype=np.int8)
    return unshuffle(raw, np.dtype("<i2"), count)


def _packed_len(kind: int, count: int) -> int:
    if kind == _CRUMB:
        return (count + 3) // 4
    return (count + 1) // 2 if kind == _NIBBLE else count * (2 if kind == _INT16 else 1)


def _scale_bucket(mean_abs: np.ndarray) -> np.ndarray:
    """Half octaves of a row's mean |residual| (0 for an all-zero row), 0..31."""
    return np.clip(np.rint(2 * np.log2(mean_abs + 0.25)) + 4, 0, 31).astype(np.int64)


def _residuals(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the symbols or their token-to-token differences, whichever is smaller.

    Slow key channels (low rotary frequencies) drift smoothly along the tokens: their
    differences are ~1.6x narrower than the symbols (~20% of SmolLM2's rows). Differences must
    stay int16, so a row whose steps exceed that keeps its symbols.
    """
    wide = rows.astype(np.int32)
    diff = np.empty_like(wide)
    diff[:, :1] = wide[:, :1]
    np.subtract(wide[:, 1:], wide[:, :-1], out=diff[:, 1:])
    raw_scale = np.abs(wide).mean(axis=1)
    diff_scale = np.abs(diff).mean(axis=1)
    fits = np.abs(diff).max(axis=1) <= 32767
    delta = fits & (diff_scale + 0.25 < (raw_scale + 0.25) * 2.0**-0.25)
    return np.where(delta[:, None], diff, wide), delta


def _row_modes(res: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """uint8 mode per row: packing kind | delta flag | scale bucket of the residuals."""
    lo, hi = res.min(axis=1), res.max(axis=1)
    kind = np.where(
        (lo >= -2) & (hi <= 1), _CRUMB,
        np.where((lo >= -8) & (hi <= 7), _NIBBLE, np.where((lo >= -128) & (hi <= 127), _INT8, _INT16)),
    )
    scale = _scale_bucket(np.abs(res).mean(axis=1))
    return (kind | (delta.astype(np.int64) * _DELTA) | (scale << _SCALE_SHIFT)).astype(np.uint8)


def encode_symbols(symbols: np.ndarray, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """int16 symbols [rows, ...] -> bytes; each row (one channel's tokens) gets its own mode.

    Per row: the symbols or their token-to-token differences (:func:`_residuals`), packed four
    per byte when they lie in -2..1, two per byte in -8..7, one in -128..127, else byte-shuffled
    int16 (zstd's Huffman stage codes whole bytes: packing lets it spend under one bit per
    symbol and code neighbouring tokens jointly). Rows of one mode (packing, delta, and the
    half-octave scale of their residuals) share one zstd frame, so each Huffman table fits
    one width of distribution. Layout: marker byte (6: every symbol fits int8, 7: some do not)
    | u32 length + zstd frame of one mode
    byte per row | per mode present, ascending: u32 frame length + frame.
    """
    rows = symbols.reshape(symbols.shape[0], -1) if symbols.ndim > 1 else symbols.reshape(1, -1)
    narrow = True
    if rows.shape[1]:
        res, delta = _residuals(rows)
        modes = _row_modes(res, delta)
        narrow = bool(rows.min() >= -128 and rows.max() <= 127)
    else:
        res, modes = rows, np.zeros(rows.shape[0], np.uint8)
    mode_frame = compress(modes.tobytes(), level)
    marker = _MARKER_INT8 if narrow else _MARKER_INT16  # lets the decoder keep int8 (faster dequantize)
    out = [bytes((marker,)), len(mode_frame).to_bytes(4, "little"), mode_frame]
    for mode in np.unique(modes).tolist():
        picked = np.flatnonzero(modes == mode)
        chosen = res if picked.size == rows.shape[0] else res[picked]
        frame = compress(_pack(chosen.reshape(-1), mode & 3), level, SYMBOL_MIN_MATCH)
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
    """Inverse of :func:`encode_symbols`: [rows, count // rows] symbols (int8 or int16), in
    writable memory (never a view of the read-only decompressed bytes: torch takes the symbols
    without a copy, and warns on read-only arrays).

    Every mode byte is a valid mode; a forged one (or a forged int8 marker) can only give wrong,
    wrapped symbols of the right shape, which the blob digest already rules out.
    """
    view = memoryview(payload)
    if rows < 1 or count % rows or len(view) < 1 or view[0] not in (_MARKER_INT8, _MARKER_INT16):
        raise CodecError("bad symbol payload")
    dtype = np.int8 if view[0] == _MARKER_INT8 else np.int16
    per_row = count // rows
    frame, pos = _frame_at(view, 1)
    modes = np.frombuffer(decompress(frame, rows), np.uint8)
    out: np.ndarray | None = None
    for mode in np.unique(modes).tolist():
        picked = np.flatnonzero(modes == mode)
        frame, pos = _frame_at(view, pos)
        n = picked.size * per_row
        kind = mode & 3
        values = _unpack(decompress(frame, _packed_len(kind, n)), kind, n).reshape(picked.size, per_row)
        if mode & _DELTA:
            values = np.cumsum(values, axis=1, dtype=dtype)  # exact: the symbols fit ``dtype``
        if picked.size == rows and values.flags.writeable:
            out = values  # one mode for all rows: no copy
        else:
            if out is None:
                out = np.empty((rows, per_row), dtype)
            out[picked] = values
    if pos != len(view) or out is None:
        raise CodecError("trailing bytes after the symbol frames")
    return out


def encode_runs(symbols: np.ndarray, counts: list[int], level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """[rows, tokens] symbols whose token runs (``counts``, summing to ``tokens``) were quantized
    at different steps: each run is coded apart (u32 length + :func:`encode_symbols`), so a fine
    run's wide symbols do not widen the other runs' packing and tables. One run: encode_symbols."""
    if len(counts) <= 1:
        return encode_symbols(symbols, level)
    out, start = [], 0
    for count in counts:
        part = encode_symbols(np.ascontiguousarray(symbols[:, start : start + count]), level)
        out += [len(part).to_bytes(4, "little"), part]
        start += count
    return b"".join(out)


def decode_runs(payload: bytes | memoryview, rows: int, counts: list[int]) -> np.ndarray:
    """Inverse of :func:`encode_runs`: [rows, sum(counts)] symbols (int8 if every run's are)."""
    if len(counts) <= 1:
        return decode_symbols(payload, rows * sum(counts), rows)
    view = memoryview(payload)
    parts, pos = [], 0
    for count in counts:
        frame, pos = _frame_at(view, pos)
        parts.append(decode_symbols(frame, rows * count, rows))
    if pos != len(view):
        raise CodecError("trailing bytes after the symbol runs")
    dtype = np.int8 if all(p.dtype == np.int8 for p in parts) else np.int16
    return np.concatenate(parts, axis=1, dtype=dtype)
