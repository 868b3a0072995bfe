"""Tail steps: the last tokens of a chunk that ends a prefix are quantized finer, in token runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpeer import codec
from kvpeer.codec import container, core, quant, zstd_stream

SHAPE = (2, 2, 256, 16)


def _kv() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(SHAPE, generator=g) * 2
    v = torch.randn(SHAPE, generator=g)
    k[:, :, 250] *= 0.01  # a short key near the end: kept exact, inside the tail
    return k.half(), v.half()


def test_tail_runs_follow_the_distance_from_the_last_token() -> None:
    positions = np.array([p for p in range(300) if p != 295])  # one exact token inside the tail
    runs = quant.tail_runs(positions, 300)
    assert runs == ((172, 0), (64, 2), (48, 6), (8, 8), (7, 10))
    assert sum(count for count, _ in runs) == len(positions)
    assert quant.tail_runs(np.arange(0), 0) == ()


@pytest.mark.parametrize("level", ["q8", "q5", "q3"])
def test_tail_steps_refine_only_the_last_tokens(level: str) -> None:
    k, v = _kv()
    plain = codec.encode(k, v, level, tail=False)
    tail = codec.encode(k, v, level)
    assert codec.read_header(tail).token_runs and not codec.read_header(plain).token_runs
    assert len(plain) < len(tail)
    (kp, vp), (kt, vt) = codec.decode(plain), codec.decode(tail)
    body = slice(0, SHAPE[2] - 128)
    assert torch.equal(kp[:, :, body], kt[:, :, body]) and torch.equal(vp[:, :, body], vt[:, :, body])
    assert torch.equal(kt[:, :, 250], k[:, :, 250])  # exact stays exact inside the tail
    for original, coarse, fine in ((k, kp, kt), (v, vp, vt)):
        last = slice(SHAPE[2] - 8, None)
        err_coarse = (coarse[:, :, last].float() - original[:, :, last].float()).abs().mean()
        err_fine = (fine[:, :, last].float() - original[:, :, last].float()).abs().mean()
        assert err_fine < err_coarse * 0.3  # 2.5 octaves finer there, fp16 rounding aside
    assert codec.read_header(codec.transcode(tail, "q3")).token_runs
    assert not codec.read_header(codec.transcode(plain, "q3")).token_runs


def test_an_exact_chunk_that_ends_a_prefix_gives_tail_steps_to_its_lower_levels() -> None:
    """The daemon may store a prefix's last chunk lossless and make lower levels on demand."""
    k, v = _kv()
    ends, middle = codec.encode(k, v, "exact"), codec.encode(k, v, "exact", tail=False)
    assert codec.read_header(ends).ends_prefix and not codec.read_header(middle).ends_prefix
    assert torch.equal(codec.decode(ends)[0], k)
    assert codec.transcode(ends, "q5") == codec.encode(k, v, "q5")
    assert codec.transcode(middle, "q5") == codec.encode(k, v, "q5", tail=False)
    assert codec.read_header(codec.transcode(ends, "q5")).token_runs


def test_a_run_too_fine_for_the_symbols_is_made_coarser() -> None:
    x = np.zeros((1, 1, 20, 2), np.float32)
    x[0, 0, :, 0] = np.linspace(-1, 1, 20)
    steps = np.full((1, 1), 2.0 / 30000, np.float32)  # |x - mean| reaches 15,000 steps at code 0
    q = quant.quantize(x, steps, np.zeros((1, 1, 2), np.int8), runs=((10, 0), (10, 8)))
    assert q.runs == ((10, 0), (10, 4))  # x 4 would reach 60,000; x 2 (code 4) fits int16
    assert np.abs(q.symbols).max() <= quant.SYMBOL_LIMIT
    assert np.abs(quant.dequantize(q) - x).max() <= steps[0, 0] * 0.5 * 1.01


def _with_runs(blob: bytes, table: np.ndarray) -> bytes:
    """The blob with its token-run table replaced, re-signed (digest and CRC hold)."""
    h = codec.read_header(blob)
    side, payload = container.sections(blob, h)
    raw = bytearray(zstd_stream.decompress(bytes(side), core._side_len(h)))
    raw[len(raw) - core.RUNS_BYTES :] = table.tobytes()
    new_side = zstd_stream.compress(bytes(raw))
    return container.pack(dataclasses.replace(h, side_len=len(new_side)), new_side, bytes(payload))


def _table(runs: list[tuple[int, int]]) -> np.ndarray:
    table = np.zeros(quant.MAX_TOKEN_RUNS, core._RUN)
    table[: len(runs)] = runs
    return table


@pytest.mark.parametrize(("runs", "match"), [
    ([(100, 0), (10, 2)], "token runs do not cover"),  # too few tokens
    ([(128, 0), (64, 2), (48, 6), (8, 8), (7, 10), (0, 0), (1, 0)], "token runs do not cover"),  # entry after the end
])
def test_a_forged_run_table_is_a_codec_error(runs: list[tuple[int, int]], match: str) -> None:
    k, v = _kv()
    blob = codec.encode(k, v, "q8")
    assert codec.read_header(blob).token_runs
    with pytest.raises(codec.CodecError, match=match):
        codec.decode(_with_runs(blob, _table(runs)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # sink detection's norms overflow at 1e33
@pytest.mark.parametrize("code", [-128, 127])
def test_a_forged_run_code_gives_finite_values_or_a_codec_error(code: int) -> None:
    k, v = _kv()
    k = k.float() * 1e33  # steps near float32's top: x 2**32 (code -128) leaves it
    blob = codec.encode(k, v.float(), "q8")
    runs = [(127, 0), (64, 2), (48, 6), (8, 8), (8, code)]  # position 0 exact
    try:
        k2, v2 = codec.decode(_with_runs(blob, _table(runs)))
    except codec.CodecError as exc:
        assert "channel step out of range" in str(exc)
    else:
        assert code == 127 and bool(torch.isfinite(k2).all() and torch.isfinite(v2).all())


def test_the_untouched_run_table_decodes() -> None:
    k, v = _kv()
    blob = codec.encode(k, v, "q5")
    h = codec.read_header(blob)
    side, _ = container.sections(blob, h)
    raw = zstd_stream.decompress(bytes(side), core._side_len(h))
    table = np.frombuffer(raw[len(raw) - core.RUNS_BYTES :], core._RUN)
    assert torch.equal(codec.decode(_with_runs(blob, table.copy()))[0], codec.decode(blob)[0])


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 300),
    level=st.sampled_from(["q8", "q5", "q3"]),
    short=st.lists(st.integers(0, 299), max_size=4),
    sink=st.sampled_from([0, 1]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_decode_into_equals_decode_for_any_tail(
    tokens: int, level: str, short: list[int], sink: int, dtype: torch.dtype
) -> None:
    """Exact tokens anywhere (inside runs, at their edges), chunks shorter than the tail, any
    dtype: decode(out=) writes what decode() returns, and the integers survive (error bound)."""
    g = torch.Generator().manual_seed(tokens)
    k = torch.randn(2, 1, tokens, 8, generator=g)
    v = torch.randn(2, 1, tokens, 8, generator=g)
    for t in short:
        if t < tokens:
            k[:, :, t] *= 0.01  # a sink-like token: kept exact when sink=1
    k, v = k.to(dtype), v.to(dtype)
    blob = codec.encode(k, v, level, sink=sink)
    ref = codec.decode(blob)
    out = torch.full((2, 1, tokens, 8), 7.0), torch.full((2, 1, tokens, 8), 7.0)
    codec.decode(blob, out=out)
    for got, want, original in zip(out, ref, (k, v), strict=True):
        assert torch.equal(got, want.float())
        assert bool(torch.isfinite(got).all())
        # q3's half step on unit-variance data, an octave coarser on the fastest rotary channels
        assert float((want.float() - original.float()).abs().max()) < 1.5
