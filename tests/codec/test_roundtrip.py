"""Round trips per level, bit-exactness of `exact`, header/verify/digest/transcode contract."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from kvpeer import codec
from kvpeer.codec import container, core, quant, zstd_stream

SHAPE = (3, 2, 40, 16)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _kv(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SHAPE, generator=g) * 3 + 1
    v = torch.randn(SHAPE, generator=g) * 0.5
    k[:, :, 0] *= 40  # an attention-sink-like outlier token
    return k.to(dtype), v.to(dtype)


def _channel_steps(blob: bytes) -> torch.Tensor:
    """[2, L, H, D] per-channel steps, read from the blob's side info."""
    header = codec.read_header(blob)
    side, _ = container.sections(blob, header)
    raw = zstd_stream.decompress(side, core._side_len(header))
    n, heads, dim = 2 * header.layers, header.kv_heads, header.head_dim
    steps = np.frombuffer(raw, "<f4", n * heads).reshape(n, heads)
    codes = np.frombuffer(raw, np.int8, n * heads * dim, offset=n * heads * 4).reshape(n, heads, dim)
    return torch.from_numpy(quant.channel_steps(steps, codes)).view(2, header.layers, heads, dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_is_bit_exact(dtype: torch.dtype) -> None:
    k, v = _kv(dtype)
    k[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]).to(dtype)
    k2, v2 = codec.decode(codec.encode(k, v, "exact"))
    assert k2.dtype == dtype and k2.shape == k.shape
    assert torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(v2.view(torch.uint8), v.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", codec.LEVELS[1:])
def test_quantized_round_trip_error_bound(dtype: torch.dtype, level: str) -> None:
    k, v = _kv(dtype)
    blob = codec.encode(k, v, level)
    k2, v2 = codec.decode(blob)
    steps = _channel_steps(blob)
    assert k2.shape == k.shape and k2.dtype == dtype and v2.dtype == dtype
    for a, b in ((k, k2), (v, v2)):
        assert torch.equal(a[:, :, 0], b[:, :, 0]), "sink token must be exact"
        # error per channel <= half that channel's step (recorded in the blob) plus output rounding
        err = (a.float() - b.float()).abs().amax(dim=2)  # [L, H, D]
        rounding = a.float().abs().amax(dim=2) * (2**-7 if dtype == torch.bfloat16 else 2**-10)
        assert torch.all(err <= steps[0 if a is k else 1] * 0.5 * 1.001 + rounding + 1e-6)


def test_levels_get_smaller() -> None:
    g = torch.Generator().manual_seed(1)
    # smooth-ish data, like real KV: strictly smaller per level
    k = torch.randn(4, 2, 256, 32, generator=g).half()
    v = torch.randn(4, 2, 256, 32, generator=g).half()
    sizes = [len(codec.encode(k, v, level)) for level in codec.LEVELS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_header_verify_digest() -> None:
    k, v = _kv(torch.float16)
    blob = codec.encode(k, v, "q8")
    hdr = codec.read_header(blob)
    assert (hdr.level, hdr.dtype, hdr.shape) == ("q8", "float16", SHAPE)
    assert codec.digest(blob) == hdr.digest and len(hdr.digest) == 32
    codec.verify(blob)
    assert codec.digest(codec.encode(k, v, "q8")) == hdr.digest, "encoding is deterministic"


def test_transcode_down_only() -> None:
    k, v = _kv(torch.float16)
    top = codec.encode(k, v, "exact")
    lower = codec.transcode(top, "q4")
    assert codec.read_header(lower).level == "q4"
    k2, _ = codec.decode(lower)
    assert k2.shape == k.shape
    assert codec.transcode(lower, "q4") == lower
    with pytest.raises(codec.CodecError):
        codec.transcode(lower, "q8")


def test_level_rank_and_contract() -> None:
    assert codec.level_rank("exact") == 0
    assert [codec.level_rank(x) for x in codec.LEVELS] == list(range(len(codec.LEVELS)))
    assert codec.DEFAULT_LEVEL in codec.LEVELS and codec.LEVELS[0] == "exact"
    assert "zstd" in codec.available_backends()
    with pytest.raises(codec.CodecError):
        codec.level_rank("q99")


def test_bad_inputs_rejected() -> None:
    k, v = _kv(torch.float16)
    with pytest.raises(codec.CodecError):
        codec.encode(k, v[:, :, :5], "q8")
    with pytest.raises(codec.CodecError):
        codec.encode(k.int(), v.int(), "q8")
    with pytest.raises(codec.CodecError):
        codec.encode(k, v, "nope")


def test_single_token_chunk() -> None:
    k, v = _kv(torch.float16)
    k1, v1 = k[:, :, :1].contiguous(), v[:, :, :1].contiguous()
    k2, v2 = codec.decode(codec.encode(k1, v1, "q4"))
    assert torch.equal(k2, k1) and torch.equal(v2, v1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["exact", "q8", "q3"])
@pytest.mark.parametrize("rope", [False, True])
def test_decode_into_views_equals_decode_then_copy(dtype: torch.dtype, level: str, rope: bool) -> None:
    """``decode(blob, out=...)`` writes the same values as ``decode(blob)`` copied there, into
    strided views of a bigger tensor (a chunk of a shared-memory segment), of the blob's dtype
    or another, touching nothing outside them."""
    k, v = _kv(dtype)
    k[:, :, 7] *= 0.001  # a short key: kept exact too, so the body has several spans
    spec = codec.RopeSpec(theta=10000.0, start=40) if rope else None
    blob = codec.encode(k, v, level, rope=spec)
    reference = codec.decode(blob)
    layers, heads, tokens, dim = SHAPE
    for out_dtype in (dtype, torch.float32):
        segment = torch.full((2, layers, heads, 3 * tokens, dim), 5.0, dtype=out_dtype)
        views = (segment[0, :, :, tokens : 2 * tokens], segment[1, :, :, tokens : 2 * tokens])
        returned = codec.decode(blob, out=views)
        assert returned[0] is views[0] and returned[1] is views[1]
        for got, want in zip(views, reference, strict=True):
            assert torch.equal(got, want.to(out_dtype))
        assert bool((segment[..., :tokens, :] == 5).all() and (segment[..., 2 * tokens :, :] == 5).all())


def test_decode_into_a_wrong_shape_is_a_codec_error() -> None:
    k, v = _kv(torch.float16)
    blob = codec.encode(k, v, "q8")
    layers, heads, tokens, dim = SHAPE
    with pytest.raises(codec.CodecError, match="does not fit"):
        codec.decode(blob, out=(torch.empty(layers, heads, tokens + 1, dim), torch.empty(SHAPE)))
    with pytest.raises(codec.CodecError, match="does not fit"):
        codec.decode(blob, out=(torch.empty(SHAPE, dtype=torch.int16), torch.empty(SHAPE)))


@pytest.mark.parametrize("level", codec.LEVELS[1:])
@pytest.mark.parametrize("rope", [False, True])
def test_finite_fp16_near_its_maximum_decodes_finite(level: str, rope: bool) -> None:
    """A value within half a step of 65504 dequantizes past it in float32: decode clamps it to
    fp16's maximum instead of letting the cast make it inf (into ``out=`` views too)."""
    ramp = torch.linspace(-65504, 65504, 32).half()
    k = ramp.view(1, 1, 32, 1).expand(2, 1, 32, 8).contiguous()
    v = ramp.flip(0).view(1, 1, 32, 1).expand(2, 1, 32, 8).contiguous()
    spec = codec.RopeSpec(theta=10000.0, start=3) if rope else None
    blob = codec.encode(k, v, level, rope=spec)
    steps = _channel_steps(blob)
    decoded = codec.decode(blob)
    for out_dtype in (torch.float16, torch.float32):
        views = (torch.empty(k.shape, dtype=out_dtype), torch.empty(k.shape, dtype=out_dtype))
        into = codec.decode(blob, out=views)
        assert all(torch.equal(a, b.to(out_dtype)) for a, b in zip(into, decoded, strict=True))
    for index, (a, b) in enumerate(((k, decoded[0]), (v, decoded[1]))):
        assert bool(b.isfinite().all()), f"{level}: finite input decoded to inf"
        if not rope:  # error within half the channel's step (a rotation spreads it over a pair)
            err = (a.float() - b.float()).abs().amax(dim=2)
            assert torch.all(err <= steps[index] * 0.5 * 1.001 + 32)  # + fp16's half ulp there


@pytest.mark.filterwarnings("error")
def test_decode_neither_warns_nor_swaps_the_warning_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes run on executor threads at once: ``warnings.catch_warnings`` swaps process-wide
    state and is not thread-safe (overlapping decodes left an "ignore UserWarning" filter
    installed for the whole daemon). Nor may decode warn: its symbols are writable memory."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 1, 64, 2, generator=g).half(), torch.randn(1, 1, 64, 2, generator=g).half()
    blob = codec.encode(k, v, "q8", sink=0, tail=False)  # its rows share one int8 mode: no copy

    swaps = []
    real = warnings.catch_warnings

    def counted(*args: Any, **kwargs: Any) -> warnings.catch_warnings:
        swaps.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(warnings, "catch_warnings", counted)
    reference = codec.decode(blob)
    into = codec.decode(blob, out=(torch.empty(k.shape), torch.empty(k.shape)))
    monkeypatch.undo()
    assert not swaps, "decode swapped the process-wide warning filters"
    assert torch.equal(into[0], reference[0].float()) and torch.equal(into[1], reference[1].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["q8", "q3"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # huge keys: no numpy overflow warnings
def test_encode_never_writes_a_blob_its_decoder_refuses(dtype: torch.dtype, level: str, tail: bool) -> None:
    """Huge finite fp32/bf16 values make steps that decode's range check refuses (from ~4e33 at
    q3, ~7e34 at q8): encode refuses them first, pointing at the exact level."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 32, 8, generator=g).clamp(-3, 3) / 3
    refused = 0
    for magnitude in (1e30, 1e33, 3e33, 1e34, 1e35, 1e36, 1e37, 1e38):
        x = (base * magnitude).to(dtype)
        try:
            blob = codec.encode(x, x, level, tail=tail)
        except codec.CodecError as exc:
            assert "exact level" in str(exc)
            refused += 1
            continue
        k2, v2 = codec.decode(blob)
        assert bool(k2.isfinite().all() and v2.isfinite().all())
    assert refused >= 3
    x = (base * 1e38).to(dtype)
    assert torch.equal(codec.decode(codec.encode(x, x, "exact"))[0], x)


@pytest.mark.parametrize("level", ["exact", "q8"])
def test_malformed_encode_calls_are_codec_errors_at_every_level(level: str) -> None:
    """Checked up front, the same at every level: empty dimensions (a lossy level raised a
    ValueError), tensors without data (NotImplementedError), a level that is not a name
    (TypeError) and an unknown backend (accepted by ``exact``, which writes zstd anyway)."""
    k, v = _kv(torch.float16)
    for shape in ((0, 2, 4, 4), (1, 0, 4, 4), (1, 2, 0, 4), (1, 2, 4, 0)):
        empty = torch.zeros(shape, dtype=torch.float16)
        with pytest.raises(codec.CodecError, match="outside"):
            codec.encode(empty, empty, level)
    meta = torch.empty(SHAPE, dtype=torch.float16, device="meta")
    sparse = k.float().to_sparse()
    for bad in (meta, sparse):
        with pytest.raises(codec.CodecError, match="holding data"):
            codec.encode(bad, bad, level)
    with pytest.raises(codec.CodecError, match="unknown backend"):
        codec.encode(k, v, level, backend="bogus")
    for name in ([level], None, 8):
        with pytest.raises(codec.CodecError, match="level"):
            codec.encode(k, v, name)  # type: ignore[arg-type]
