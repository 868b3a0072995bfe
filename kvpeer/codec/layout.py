"""How quantized KV is arranged for the entropy coder, and the measurements behind the choice.

The stream layout is channel-major: for each (tensor, layer, head), each channel's tokens are
contiguous ([2*layers, heads, head_dim, tokens]). A channel's values share one zero point and
a similar spread, so runs of one channel give zstd's Huffman stage and match finder a steadier
distribution than token rows that mix 64 channels of different widths (measured in
benchmarks/codec.py --layouts; numbers in kvpeer/codec/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

from kvpeer.codec import quant


def to_stream(symbols: np.ndarray) -> np.ndarray:
    """[N, H, T, D] symbols -> contiguous channel-major [N, H, D, T]."""
    return np.ascontiguousarray(symbols.transpose(0, 1, 3, 2))


def channel_scale(
    steps: np.ndarray, zeros: np.ndarray, runs: tuple[tuple[int, int], ...] = ()
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """float32 channel steps per token-run step code, and the channel ``offset`` (zero x step):
    a value is symbol x its run's step + offset, computed in float32 (the same arithmetic on
    every host and in every decode path)."""
    codes = {code for _, code in runs} | {0}
    step = {code: torch.from_numpy(quant.run_step(steps, code)) for code in sorted(codes)}
    return step, torch.from_numpy(quant.channel_offset(steps, zeros))


def clamp_limit(
    steps: np.ndarray, zeros: np.ndarray, runs: tuple[tuple[int, int], ...], symbols: np.ndarray,
    dtype: torch.dtype, rotated: bool = False,
) -> float | None:
    """The largest finite value of ``dtype`` if a decoded value could pass it, else None.

    A finite input within half a step of fp16's maximum (65504) can dequantize past it, and the
    cast would make it inf; clamping to the maximum only moves such a value towards the input.
    Bounded per channel by |offset| + the widest symbol x the coarsest run step (x2 for keys
    ``rotated`` after decoding, which mixes pairs of channels): first with the widest symbol the
    symbols' dtype holds (side info only), then, if that is not enough, with the widest present
    (one pass over the 1-2 byte symbols), so an ordinary chunk pays no pass over its values. bf16
    and float32 never need it: decode's step check keeps every value below a quarter of float32's
    maximum."""
    limit = float(torch.finfo(dtype).max)
    coarsest = np.max([quant.run_step(steps, code) for code in {code for _, code in runs} | {0}], axis=0)
    offset = np.abs(quant.channel_offset(steps, zeros).astype(np.float64))

    def reaches(widest: int) -> bool:
        # 1.001: room for the float32 rounding of symbol x step + offset
        bound = (offset + widest * coarsest.astype(np.float64)).max(initial=0.0)
        return bool(bound * (2.0 if rotated else 1.0) * 1.001 >= limit)

    if not reaches(int(np.iinfo(symbols.dtype).max) + 1):
        return None
    widest = max(-int(symbols.min(initial=0)), int(symbols.max(initial=0)))
    return limit if reaches(widest) else None


def dequantize_stream(
    symbols: np.ndarray, steps: np.ndarray, zeros: np.ndarray, tokens: int,
    runs: tuple[tuple[int, int], ...] = (),
) -> torch.Tensor:
    """Channel-major float32 values [N, H, D, T] from channel-major symbols.

    ``steps`` [N, H, D] per channel, ``zeros`` [N, H, D] (in steps), ``runs`` the token runs'
    step codes. Computes symbol * step + zero * step in float32 with in-place torch ops (two
    passes over the data on one thread, fastest measured); the same on every host.
    """
    n, heads, dim = zeros.shape
    step, offset = channel_scale(steps, zeros, runs)
    values = torch.from_numpy(symbols).view(n, heads, dim, tokens).to(torch.float32)
    for start, stop, code in quant.run_spans(tokens, runs):
        values[..., start:stop].mul_(step[code][:, :, :, None])
    return values.add_(offset[:, :, :, None])
