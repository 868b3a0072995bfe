"""Data-derived steps, per-channel codes, exact tokens and per-row symbol modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpeer import codec
from kvpeer.codec import layout, quant, rope, zstd_stream
from kvpeer.codec.rope import RopeSpec


def _x(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 2, 100, 16)).astype(np.float32)
    x[:, :, :, 3] *= 30  # an outlier channel
    return x


def test_outlier_channel_gets_a_finer_code_and_does_not_set_the_head_step() -> None:
    x = _x()
    steps, codes = quant.plan_steps(x, -6.5)
    assert np.all(codes[:, :, 3] > codes[:, :, 0])  # larger rms -> finer step
    span = (x.max(axis=2) - x.min(axis=2)).max(axis=-1)
    assert np.all(steps < span / 253)  # the widest channel no longer sets the step


def test_symbols_and_dequantized_values_survive_the_stream_exactly() -> None:
    x = _x(1)
    steps, codes = quant.plan_steps(x, -6.5)
    q = quant.quantize(x, steps, codes)
    stream = layout.to_stream(q.symbols)
    rows = stream.reshape(-1, stream.shape[-1])
    back = zstd_stream.decode_symbols(zstd_stream.encode_symbols(rows), rows.size, rows.shape[0])
    assert np.array_equal(back.astype(np.int16), rows)
    modes = {int(abs(r).max()) > 127 for r in rows}
    assert modes == {True, False}, "the test should mix int8 and int16 rows"
    values = layout.dequantize_stream(back, quant.channel_steps(q.steps, q.codes), q.zeros, x.shape[2])
    expected = quant.dequantize(q).transpose(0, 1, 3, 2)
    assert np.array_equal(values.numpy(), expected)


def test_codes_never_overflow_the_symbol_range() -> None:
    x = _x(2)
    x[:, :, :, 5] *= 1e4
    steps, codes = quant.plan_steps(x, -6.5)
    q = quant.quantize(x, steps, codes)
    assert np.abs(q.symbols).max() <= quant.SYMBOL_LIMIT


def test_sink_like_tokens_are_kept_exact() -> None:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(3, 2, 64, 16, generator=g) * 2 + 1
    v = torch.randn(3, 2, 64, 16, generator=g)
    k[:, :, 17] *= 0.2  # a secondary sink: tiny key norm
    k, v = k.half(), v.half()
    blob = codec.encode(k, v, "q4")
    assert codec.read_header(blob).sink == 2  # position 0 and 17
    k2, v2 = codec.decode(blob)
    for t in (0, 17):
        assert torch.equal(k2[:, :, t], k[:, :, t]) and torch.equal(v2[:, :, t], v[:, :, t])
    assert not torch.equal(k2[:, :, 16], k[:, :, 16])
    assert codec.read_header(codec.encode(k, v, "q4", sink=0)).sink == 0


def test_non_finite_values_need_the_exact_level() -> None:
    k = torch.zeros(1, 1, 8, 4)
    k[0, 0, 3, 1] = float("inf")
    with pytest.raises(codec.CodecError):
        codec.encode(k, k.clone(), "q8")
    assert torch.equal(codec.decode(codec.encode(k, k.clone(), "exact"))[0], k)


def test_bad_mode_frame_is_a_codec_error() -> None:
    rows = np.zeros((4, 10), np.int16)
    payload = bytearray(zstd_stream.encode_symbols(rows))
    with pytest.raises(codec.CodecError):
        zstd_stream.decode_symbols(bytes(payload[:-1]), rows.size, 4)
    with pytest.raises(codec.CodecError):
        zstd_stream.decode_symbols(bytes(payload), rows.size, 5)
    payload[0] = 4
    with pytest.raises(codec.CodecError):
        zstd_stream.decode_symbols(bytes(payload), rows.size, 4)


@pytest.mark.parametrize("tokens", [1, 2, 9])
@pytest.mark.parametrize("sink", [0, 1])
def test_tiny_chunks_and_constant_channels_far_from_zero(tokens: int, sink: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    k = torch.randn(2, 1, tokens, 8, generator=g)
    k[0, 0, :, 3] = 1000.0  # constant channel: zero span, large offset (zero point must fit int32)
    v = torch.zeros(2, 1, tokens, 8)
    for level in codec.LEVELS:
        k2, v2 = codec.decode(codec.encode(k.half(), v.half(), level, sink=sink))
        assert k2.shape == k.shape and torch.all(v2 == 0)
        assert float((k2.float() - k.half().float()).abs().max()) < 0.5


def _modes(payload: bytes, rows: int) -> np.ndarray:
    frame, _ = zstd_stream._frame_at(memoryview(payload), 1)
    return np.frombuffer(zstd_stream.decompress(frame, rows), np.uint8)


def test_drifting_rows_are_coded_as_differences_and_come_back_exact() -> None:
    rng = np.random.default_rng(5)
    walk = np.cumsum(rng.integers(-3, 4, size=(6, 301)), axis=1).astype(np.int16)  # slow channels
    noise = rng.integers(-40, 40, size=(6, 301)).astype(np.int16)
    rows = np.concatenate([walk, noise])
    payload = zstd_stream.encode_symbols(rows)
    modes = _modes(payload, rows.shape[0])
    assert np.all(modes[:6] & zstd_stream._DELTA) and not np.any(modes[6:] & zstd_stream._DELTA)
    back = zstd_stream.decode_symbols(payload, rows.size, rows.shape[0])
    assert np.array_equal(back.astype(np.int16), rows)
    # the same symbols in token order of no drift (shuffled along the tokens) cost more
    shuffled = np.array([rng.permutation(r) for r in walk])
    assert len(zstd_stream.encode_symbols(walk)) < 0.8 * len(zstd_stream.encode_symbols(shuffled))


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 257])
def test_every_packing_round_trips_at_any_row_length(tokens: int) -> None:
    rng = np.random.default_rng(tokens)
    rows = np.stack([
        np.resize([-2, 1, 0, -1], tokens),  # four per byte
        rng.integers(-8, 8, tokens),  # two per byte
        rng.integers(-128, 128, tokens),
        rng.integers(-16000, 16000, tokens),
        np.resize([-16000, 16000], tokens),  # differences would leave int16: kept as symbols
        np.zeros(tokens),
    ]).astype(np.int16)
    payload = zstd_stream.encode_symbols(rows)
    kinds = _modes(payload, rows.shape[0]) & 3
    if tokens > 3:  # (shorter rows may be cheaper as differences, in another packing)
        assert list(kinds[:4]) == [zstd_stream._CRUMB, zstd_stream._NIBBLE, zstd_stream._INT8, zstd_stream._INT16]
    assert np.array_equal(zstd_stream.decode_symbols(payload, rows.size, rows.shape[0]).astype(np.int16), rows)


def test_forged_mode_bytes_give_a_codec_error_or_right_shaped_symbols() -> None:
    rows = np.random.default_rng(7).integers(-100, 100, size=(8, 33)).astype(np.int16)
    payload = zstd_stream.encode_symbols(rows)
    frame, pos = zstd_stream._frame_at(memoryview(payload), 1)
    for forged in range(256):
        modes = zstd_stream.compress(bytes([forged]) * 8)
        blob = bytes([payload[0]]) + len(modes).to_bytes(4, "little") + modes + bytes(payload[pos:])
        try:
            out = zstd_stream.decode_symbols(blob, rows.size, rows.shape[0])
        except codec.CodecError:
            continue
        assert out.shape == rows.shape


def test_narrow_symbols_decode_as_int8_even_from_differences() -> None:
    rng = np.random.default_rng(9)
    walk = np.cumsum(rng.integers(-2, 3, size=(4, 200)), axis=1)
    rows = np.clip(walk, -128, 127).astype(np.int16)  # every symbol fits int8, rows drift
    payload = zstd_stream.encode_symbols(rows)
    assert np.all(_modes(payload, 4) & zstd_stream._DELTA)
    back = zstd_stream.decode_symbols(payload, rows.size, 4)
    assert back.dtype == np.int8 and np.array_equal(back.astype(np.int16), rows)
    rows[0, 7] = 300  # one wide symbol: int16 out
    assert zstd_stream.decode_symbols(zstd_stream.encode_symbols(rows), rows.size, 4).dtype == np.int16


def test_rotary_prior_refines_slow_key_channels_only() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 2, 200, 16)).astype(np.float32)  # every channel alike
    _, plain = quant.plan_steps(x, -6.5, rotary_prior=0.0)
    _, prior = quant.plan_steps(x, -6.5)
    shift = prior.astype(int) - plain.astype(int)
    index = np.arange(16) % 8  # rotate-half: channels c and c + 8 share a frequency
    assert np.all(shift[:2, :, index == 7] > 0) and np.all(shift[:2, :, index == 0] < 0)  # keys
    assert np.array_equal(shift[:2, :, :8], shift[:2, :, 8:])
    assert not shift[2:].any()  # values: no rotary structure
    assert abs(shift[:2].mean()) < 0.5  # finer and coarser balance: the rate stays


def test_rotate_half_false_encodes_without_the_prior() -> None:
    g = torch.Generator().manual_seed(8)
    k, v = (torch.randn(2, 2, 64, 16, generator=g).half() for _ in range(2))
    with_prior = codec.encode(k, v, "q5", rotate_half=True)
    without = codec.encode(k, v, "q5", rotate_half=False)
    assert with_prior != without
    for blob in (with_prior, without):  # both decode with no side information
        k2, _ = codec.decode(blob)
        assert k2.shape == k.shape and float((k2.float() - k.float()).abs().max()) < 0.5


def _keys_with_channel_scales(rotary: bool, tokens: int = 256, dim: int = 64) -> torch.Tensor:
    """Keys whose channels differ in scale (as real ones do), rotated by RoPE (rotate-half,
    theta 1e4) or not."""
    g = torch.Generator().manual_seed(9)
    scales = torch.exp(torch.randn(3, 2, 1, dim, generator=g))
    k = (torch.randn(3, 2, tokens, dim, generator=g) + 0.5) * scales
    return rope.rotate(k, RopeSpec(theta=1e4, start=0), 0) if rotary else k


def test_keys_are_read_for_the_rotate_half_layout() -> None:
    """The rotary prior is for rotate-half RoPE; a model without it (GPT-2's learned positions)
    must not get it, and the plain call has only the KV to tell by."""
    rotated, plain = _keys_with_channel_scales(True), _keys_with_channel_scales(False)
    assert quant.looks_rotate_half(rotated.numpy())
    assert not quant.looks_rotate_half(plain.numpy())
    assert quant.looks_rotate_half(plain[:, :, :16].numpy())  # too few tokens to tell: the default
    v = torch.randn(plain.shape, generator=torch.Generator().manual_seed(10))
    for k, rotary in ((rotated, True), (plain, False)):
        k16, v16 = k.half(), v.half()
        assert codec.encode(k16, v16, "q5") == codec.encode(k16, v16, "q5", rotate_half=rotary)


def test_decoded_symbols_are_writable_even_in_one_int8_mode() -> None:
    """torch takes the symbols without a copy and warns on read-only memory: one int8 mode for
    every row must not hand back a view of the decompressed bytes."""
    rows = np.tile(np.random.default_rng(11).integers(-100, 100, size=64), (3, 1)).astype(np.int16)
    payload = zstd_stream.encode_symbols(rows)
    assert len(set(_modes(payload, 3).tolist())) == 1
    back = zstd_stream.decode_symbols(payload, rows.size, 3)
    assert back.flags.writeable and np.array_equal(back.astype(np.int16), rows)


@pytest.mark.parametrize("octaves", [-40, -60, -90])
def test_steps_scale_with_tiny_data(octaves: int) -> None:
    """Steps and codes follow the data down by any power of two (an absolute 1e-12 floor made
    fp32/bf16 values ~1e-13 decode to 0), and fp32 / bf16 round trips keep their relative error."""
    x = _x()
    steps, codes = quant.plan_steps(x, -6.35)
    tiny_steps, tiny_codes = quant.plan_steps(x * np.float32(2.0**octaves), -6.35)
    assert np.array_equal(tiny_steps, steps * np.float32(2.0**octaves)) and np.array_equal(tiny_codes, codes)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 64, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        k = (base * 2.0**octaves).to(dtype)
        k2, _ = codec.decode(codec.encode(k, k, "q8", sink=0, tail=False))
        assert float((k2.float() - k.float()).abs().max() / k.float().abs().max()) < 0.03
