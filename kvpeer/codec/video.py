"""Video bitstreams of quantized KV (``hevc`` and ``ffv1``), encoded and decoded on the CPU by
PyAV (FFmpeg). The NVENC backend (:mod:`kvpeer.codec.nvenc`) produces the same ``hevc``
stream kind, so either side decodes what the other encoded.

Geometry (the header's shapes fix it; nothing about it travels in the stream): the channel-major
symbol stream [2*layers, heads, head_dim, tokens] is seen as 2*layers images of
heads*head_dim rows by tokens columns, offset to uint8 (symbol + 128). Three images make one
4:4:4 frame (Y, U, V planes), the last frame padded with copies of the last image. Widths and
heights are padded to a multiple of 8 by repeating the last column/row. Every chunk starts with an
IDR frame; no B-frames; every packet is flushed, so a stream decodes alone.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any

import numpy as np

from kvpeer.errors import CodecError

log = logging.getLogger(__name__)

PIX_FMT = "yuv444p"
_ENCODERS = {"hevc": "libx265", "ffv1": "ffv1"}
_DECODERS = {"hevc": "hevc", "ffv1": "ffv1"}


def _pad8(n: int) -> int:
    return max(8, (n + 7) // 8 * 8)


def geometry(images: int, rows: int, cols: int) -> tuple[int, int, int]:
    """(frames, height, width) of the frames holding ``images`` images of rows x cols."""
    return (images + 2) // 3, _pad8(rows), _pad8(cols)


def fits(stream: str, rows: int, cols: int) -> bool:
    """Can ``stream`` hold images of ``rows`` x ``cols``? Not without a column; x265 opens no
    plane of 8 pixels (the padded minimum) either way, so hevc needs more than 8 of each."""
    return cols > 0 and (stream != "hevc" or min(rows, cols) > 8)


def available(stream: str) -> bool:
    try:
        import av

        return _ENCODERS[stream] in av.codecs_available and _DECODERS[stream] in av.codecs_available
    except Exception:  # a broken FFmpeg install means "not available", never a crash
        return False


def _frames(symbols: np.ndarray) -> np.ndarray:
    """[N, rows, cols] int symbols -> uint8 planes [frames, 3, height, width]."""
    n, rows, cols = symbols.shape
    frames, height, width = geometry(n, rows, cols)
    img = (symbols.astype(np.int16) + 128).astype(np.uint8)
    padded = np.empty((frames * 3, height, width), np.uint8)
    padded[:n, :rows, :cols] = img
    padded[n:, :rows, :cols] = img[-1]
    padded[:, rows:, :cols] = padded[:, rows - 1 : rows, :cols]
    padded[:, :, cols:] = padded[:, :, cols - 1 : cols]
    return padded.reshape(frames, 3, height, width)


# libx265, lossless 4:4:4, IDR first, no B-frames, parameter sets in band
_HEVC_OPTIONS = {
    "x265-params": "lossless=1:bframes=0:keyint=1000:min-keyint=1000:scenecut=0:log-level=error:repeat-headers=1:info=0",
    "preset": "ultrafast",
}
_FFV1_OPTIONS = {"level": "3", "coder": "1", "context": "1", "g": "1000"}
# One slice codes best (ffv1's own count, 4 for small frames, is 4-9% larger), but ffv1 refuses
# one slice for frames wider than 352 or taller than 288: those take the count it picks. The
# count travels in the extradata, so the decoder needs neither.
_FFV1_ONE_SLICE = {**_FFV1_OPTIONS, "slices": "1"}


def _context(stream: str, width: int, height: int, options: dict[str, str]) -> Any:
    import av

    ctx: Any = av.CodecContext.create(_ENCODERS[stream], "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, PIX_FMT
    ctx.time_base = Fraction(1, 25)
    ctx.framerate = 25
    ctx.options = dict(options)
    ctx.thread_count = 1
    return ctx


def _encoder(stream: str, width: int, height: int) -> Any:
    """An opened encoder context: ffv1 with one slice where it takes one."""
    import av

    if stream == "ffv1":
        ctx = _context(stream, width, height, _FFV1_ONE_SLICE)
        try:
            ctx.open()
            return ctx
        except av.error.FFmpegError:
            pass  # wider than 352 or taller than 288: ffv1 picks the count
    ctx = _context(stream, width, height, _HEVC_OPTIONS if stream == "hevc" else _FFV1_OPTIONS)
    ctx.open()
    return ctx


def encode(symbols: np.ndarray, stream: str) -> bytes:
    """Encode int symbols [N, rows, cols] (all within -128..127) losslessly as ``stream``;
    CodecError if FFmpeg refuses."""
    if symbols.size and (symbols.min() < -128 or symbols.max() > 127):
        raise CodecError("symbols do not fit 8-bit video planes")
    planes = _frames(symbols)
    try:
        return _encode_planes(planes, stream)
    except Exception as exc:  # FFmpeg reports a refused geometry or option in many ways
        raise CodecError(f"{stream} encoder refused a {planes.shape[3]}x{planes.shape[2]} frame: {exc}") from None


def _encode_planes(planes: np.ndarray, stream: str) -> bytes:
    import av

    frames, _, height, width = planes.shape
    ctx = _encoder(stream, width, height)
    out: list[bytes] = []
    for i in range(frames):
        frame = av.VideoFrame(width, height, PIX_FMT)
        for p in range(3):
            plane: Any = frame.planes[p]
            buf = np.frombuffer(plane, np.uint8).reshape(height, plane.line_size)
            buf[:, :width] = planes[i, p]
        frame.pts = i
        out.extend(bytes(pkt) for pkt in ctx.encode(frame))
    out.extend(bytes(pkt) for pkt in ctx.encode(None))
    if stream == "ffv1":
        # ffv1 has no in-band parameter sets: its extradata goes first, length-prefixed.
        extra = bytes(ctx.extradata or b"")
        sizes = b"".join(len(p).to_bytes(4, "little") for p in out)
        return len(extra).to_bytes(4, "little") + extra + len(out).to_bytes(4, "little") + sizes + b"".join(out)
    return b"".join(out)


def _ffv1_packets(data: bytes, frames: int) -> tuple[bytes, list[bytes]]:
    view = memoryview(data)
    if len(view) < 8:
        raise CodecError("ffv1 stream truncated")
    n_extra = int.from_bytes(view[:4], "little")
    pos = 4 + n_extra
    if n_extra > 1 << 20 or pos + 4 > len(view):
        raise CodecError("ffv1 stream truncated")
    extra = bytes(view[4:pos])
    count = int.from_bytes(view[pos : pos + 4], "little")
    pos += 4
    if count != frames or pos + 4 * count > len(view):
        raise CodecError("ffv1 stream has the wrong frame count")
    sizes = [int.from_bytes(view[pos + 4 * i : pos + 4 * i + 4], "little") for i in range(count)]
    pos += 4 * count
    if pos + sum(sizes) != len(view):
        raise CodecError("ffv1 stream sizes do not add up")
    packets = []
    for size in sizes:
        packets.append(bytes(view[pos : pos + size]))
        pos += size
    return extra, packets


def decode(data: bytes | memoryview, stream: str, images: int, rows: int, cols: int) -> np.ndarray:
    """Decode a stream into int8 symbols [images, rows, cols]; CodecError on anything odd."""
    import av

    frames, height, width = geometry(images, rows, cols)
    try:
        ctx: Any = av.CodecContext.create(_DECODERS[stream], "r")
        ctx.thread_count = 1
        if stream == "ffv1":
            extra, raw_packets = _ffv1_packets(bytes(data), frames)
            ctx.extradata = extra
            ctx.width, ctx.height, ctx.pix_fmt = width, height, PIX_FMT
            packets = [av.Packet(p) for p in raw_packets]
        else:
            packets = list(ctx.parse(bytes(data))) + list(ctx.parse(None))
        decoded = []
        for pkt in [*packets, None]:
            for frame in ctx.decode(pkt):
                # At once: an HEVC stream states its own picture size, and frames far larger
                # than the header's would cost GBs and seconds each before a later check.
                if (frame.width, frame.height, frame.format.name) != (width, height, PIX_FMT):
                    raise CodecError(f"{stream} frame has the wrong geometry")
                decoded.append(frame)
            if len(decoded) > frames:
                break
    except CodecError:
        raise
    except Exception as exc:  # FFmpeg reports corrupt input in many ways
        raise CodecError(f"{stream} stream does not decode: {exc}") from None
    if len(decoded) != frames:
        raise CodecError(f"{stream} stream holds {len(decoded)} frames, expected {frames}")
    out = np.empty((frames * 3, height, width), np.uint8)
    for i, frame in enumerate(decoded):
        for p in range(3):
            plane = frame.planes[p]
            buf = np.frombuffer(plane, np.uint8).reshape(height, plane.line_size)
            out[3 * i + p] = buf[:, :width]
    return (out[:images, :rows, :cols].astype(np.int16) - 128).astype(np.int8)
