"""How quantized KV is arranged for the entropy coder, and the measurements behind the choice.

The stream layout is channel-major: for each (tensor, layer, head), each channel's tokens are
contiguous ([2*layers, heads, head_dim, tokens]). A channel's values share one zero point and
a similar spread, so runs of one channel give zstd's Huffman stage and match finder a steadier
distribution than token rows that mix 64 channels of different widths (measured in
benchmarks/codec.py --layouts; numbers in kvpeer/codec/README.md).
"""

from __future__ import annotations

import numpy as np


def to_stream(symbols: np.ndarray) -> np.ndarray:
    """[N, H, T, D] symbols -> contiguous channel-major [N, H, D, T]."""
    return np.ascontiguousarray(symbols.transpose(0, 1, 3, 2))


def dequantize_stream(symbols: np.ndarray, steps: np.ndarray, zeros: np.ndarray, tokens: int) -> np.ndarray:
    """Channel-major float32 values [N, H, D, T] from a flat channel-major symbol stream.

    ``steps`` [N, H], ``zeros`` [N, H, D] (in steps). (symbol + zero) * step, in float32, is
    the same on every host.
    """
    n, heads, dim = zeros.shape
    values = symbols.reshape(n, heads, dim, tokens).astype(np.float32)
    values += zeros[:, :, :, None]
    values *= steps[:, :, None, None]
    return values
