"""Malformed, truncated and bit-flipped blobs raise CodecError, never anything else."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpeer import codec
from kvpeer.codec import container


def _blob(level: str, rope: codec.RopeSpec | None = None) -> bytes:
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, 24, 8, generator=g).half()
    v = torch.randn(2, 2, 24, 8, generator=g).half()
    return codec.encode(k, v, level, rope=rope)


BLOBS = {level: _blob(level) for level in ("exact", "q8", "q3")}
BLOBS["q4-rope"] = _blob("q4", codec.RopeSpec(theta=1e4, start=256))


def _decode_or_codec_error(data: bytes, shape: tuple[int, ...]) -> None:
    try:
        k, v = codec.decode(data)
    except codec.CodecError:
        return
    # only an intact blob may decode, and then to the stated shape
    assert k.shape == shape and v.shape == shape


@pytest.mark.parametrize("level", sorted(BLOBS))
def test_every_truncation_rejected(level: str) -> None:
    blob = BLOBS[level]
    for cut in list(range(0, container.HEADER_BYTES + 8)) + [len(blob) - 1, len(blob) // 2]:
        with pytest.raises(codec.CodecError):
            codec.decode(blob[:cut])
        with pytest.raises(codec.CodecError):
            codec.verify(blob[:cut])


@pytest.mark.parametrize("level", sorted(BLOBS))
def test_every_single_bit_flip_in_header_and_samples_rejected(level: str) -> None:
    blob = bytearray(BLOBS[level])
    positions = list(range(container.HEADER_BYTES)) + list(range(container.HEADER_BYTES, len(blob), 7))
    for pos in positions:
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(codec.CodecError):
                codec.decode(bytes(bad))
            with pytest.raises(codec.CodecError):
                codec.verify(bytes(bad))


def test_appended_bytes_rejected() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(BLOBS["q8"] + b"\x00")


def test_header_cannot_claim_huge_tensor() -> None:
    h = codec.read_header(BLOBS["q8"])
    with pytest.raises(codec.CodecError):
        container.Header(
            level="q8", level_code=8, stream="zstd", dtype="float16", layers=1024, kv_heads=1024,
            tokens=1 << 20, head_dim=4096, side_len=0, payload_len=0,
        )
    assert h.elements == 2 * 2 * 24 * 8


def test_decode_of_an_untrusted_blob_can_bound_its_size_before_allocating() -> None:
    h = codec.read_header(BLOBS["q8"])
    k, _ = codec.decode(BLOBS["q8"], max_elements=h.elements)
    assert k.numel() == h.elements
    with pytest.raises(codec.CodecError, match="at most"):
        codec.decode(BLOBS["q8"], max_elements=h.elements - 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    level=st.sampled_from(sorted(BLOBS)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_decode(level: str, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(BLOBS[level])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_codec_error(bytes(data), (2, 2, 24, 8))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(container.MAGIC + data)


@settings(max_examples=200, deadline=None)
@given(level=st.sampled_from(sorted(BLOBS)), data=st.data())
def test_fuzz_reforged_header(level: str, data: st.DataObject) -> None:
    """Re-sign a header with random fields (valid CRC and digest): decode must still be safe."""
    blob = BLOBS[level]
    h = codec.read_header(blob)
    side, payload = container.sections(blob, h)
    side, payload = bytes(side), bytes(payload)
    try:
        forged = container.Header(
            level=data.draw(st.sampled_from(list(codec.LEVELS))),
            level_code=0,
            stream="zstd",
            dtype=data.draw(st.sampled_from(["float16", "bfloat16", "float32"])),
            layers=data.draw(st.integers(1, 4)),
            kv_heads=data.draw(st.integers(1, 4)),
            tokens=data.draw(st.integers(1, 30)),
            head_dim=data.draw(st.integers(1, 16)),
            side_len=len(side),
            payload_len=len(payload),
            sink=data.draw(st.integers(0, 1)),
        )
    except codec.CodecError:
        return
    from kvpeer.codec import levels

    forged = container.Header(**{**_fields(forged), "level_code": levels.get(forged.level).code})
    _decode_or_codec_error(container.pack(forged, side, payload), forged.shape)


def _fields(h: container.Header) -> dict[str, object]:
    return {name: getattr(h, name) for name in h.__slots__}


@pytest.mark.parametrize(("base_step", "code"), [(1e38, -128), (1e-38, 127), (float("nan"), 0), (-1.0, 0), (0.0, 0)])
def test_a_forged_step_out_of_float32_range_is_a_codec_error(base_step: float, code: int) -> None:
    """A peer's blob (re-signed, so digest and CRC hold) whose base step x channel code leaves
    float32 would decode to inf/NaN or zero steps: refused instead."""
    import dataclasses

    import numpy as np

    from kvpeer.codec import core, zstd_stream

    blob = BLOBS["q8"]
    h = codec.read_header(blob)
    side, payload = container.sections(blob, h)
    raw = bytearray(zstd_stream.decompress(bytes(side), core._side_len(h)))
    pairs = 2 * h.layers * h.kv_heads
    raw[0:4] = np.float32(base_step).astype("<f4").tobytes()  # first (tensor-layer, head)
    raw[pairs * 4] = code & 0xFF  # its first channel's step code
    new_side = zstd_stream.compress(bytes(raw))
    forged = dataclasses.replace(h, side_len=len(new_side))
    with pytest.raises(codec.CodecError, match="channel step out of range"):
        codec.decode(container.pack(forged, new_side, bytes(payload)))


def test_a_lossy_chunk_longer_than_the_exact_position_field_is_refused() -> None:
    k = torch.zeros(1, 1, 65537, 1, dtype=torch.float16)
    with pytest.raises(codec.CodecError, match="at most 65536 tokens"):
        codec.encode(k, k, "q8")


def test_an_hevc_stream_of_larger_pictures_than_its_header_stops_at_the_first_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The HEVC bitstream states its own picture size: a re-signed blob whose stream holds far
    larger frames than the header's geometry must fail on the first one, not after decoding
    (and holding) them all: at 8192x8192 that was GBs and seconds per chunk."""
    from fractions import Fraction

    import av
    import numpy as np

    k, v = torch.randn(2, 2, 64, 32).half(), torch.randn(2, 2, 64, 32).half()
    honest = codec.encode(k, v, "q8", backend="hevc", sink=0, tail=False)
    header = codec.read_header(honest)
    side, _ = container.sections(honest, header)
    encoder = av.CodecContext.create("libx265", "w")
    encoder.width = encoder.height = 256
    encoder.pix_fmt, encoder.time_base, encoder.framerate = "yuv444p", Fraction(1, 25), 25
    encoder.options = {"x265-params": "bframes=0:log-level=error:repeat-headers=1", "preset": "ultrafast"}
    packets = []
    for i in range(6):
        frame = av.VideoFrame(256, 256, "yuv444p")
        for plane in frame.planes:
            np.frombuffer(plane, np.uint8)[:] = 128
        frame.pts = i
        packets += [bytes(p) for p in encoder.encode(frame)]
    payload = b"".join(packets + [bytes(p) for p in encoder.encode(None)])
    fields = {n: getattr(header, n) for n in header.__slots__ if n not in ("payload_len", "digest")}
    forged = container.pack(container.Header(**fields, payload_len=len(payload)), bytes(side), payload)

    decoded: list[object] = []
    create = av.CodecContext.create

    class Counting:
        def __init__(self, ctx: object) -> None:
            self._ctx = ctx

        def __getattr__(self, name: str) -> object:
            return getattr(self._ctx, name)

        def __setattr__(self, name: str, value: object) -> None:
            if name == "_ctx":
                object.__setattr__(self, name, value)
            else:
                setattr(self._ctx, name, value)

        def decode(self, packet: object) -> list[object]:
            frames = list(self._ctx.decode(packet))  # type: ignore[attr-defined]
            decoded.extend(frames)
            return frames

    monkeypatch.setattr(av.CodecContext, "create", lambda *a, **kw: Counting(create(*a, **kw)))
    with pytest.raises(codec.CodecError, match="geometry"):
        codec.decode(forged)
    assert len(decoded) == 1
