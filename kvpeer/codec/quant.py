"""Uniform scalar quantization of KV tensors (numpy, no torch).

One step per (tensor, layer, head); a per-channel zero point expressed in steps, so the grid is
the same for every channel and the zero point only centres the symbols (cheap side info that
costs nothing in fidelity). Decoded value = (symbol + zero) * step, computed identically on every
host, so a re-encode of decoded data at the same steps gives back the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpeer.errors import CodecError

_TINY = np.float32(1e-12)
SYMBOL_LIMIT = 32767  # symbols travel as int16 at most


@dataclass(frozen=True, slots=True)
class Quantized:
    """Integers plus what it takes to restore them; arrays are numpy, shapes documented."""

    steps: np.ndarray  # float32 [L, H]
    zeros: np.ndarray  # int32 [L, H, D], in units of the step
    symbols: np.ndarray  # int16 [L, H, T, D]


def base_steps(x: np.ndarray, bits: int) -> np.ndarray:
    """Step per (layer, head) so the widest channel of the head spans 2**bits - 3 steps."""
    span = (x.max(axis=2) - x.min(axis=2)).max(axis=-1)  # [L, H]
    return np.maximum(span / np.float32(2**bits - 3), _TINY).astype(np.float32)


def quantize(x: np.ndarray, steps: np.ndarray) -> Quantized:
    """Quantize float32 ``x`` [L, H, T, D] with ``steps`` [L, H] (already final)."""
    if x.ndim != 4 or steps.shape != x.shape[:2]:
        raise CodecError("quantize: shapes do not match")
    steps = np.maximum(steps.astype(np.float32), _TINY)
    if x.shape[2] == 0:
        zeros = np.zeros((*x.shape[:2], x.shape[3]), np.int32)
        return Quantized(steps=steps, zeros=zeros, symbols=np.zeros(x.shape, np.int16))
    scaled = x / steps[:, :, None, None]
    mid = (scaled.max(axis=2) + scaled.min(axis=2)) * np.float32(0.5)
    zeros = np.rint(mid).astype(np.int32)
    q = np.rint(scaled) - zeros[:, :, None, :]
    if q.size and np.abs(q).max() > SYMBOL_LIMIT:
        raise CodecError("quantization step too small for the value range")
    return Quantized(steps=steps, zeros=zeros, symbols=q.astype(np.int16))


def dequantize(q: Quantized) -> np.ndarray:
    """float32 [L, H, T, D] from the integers and side info."""
    values = q.symbols.astype(np.float32)
    values += q.zeros[:, :, None, :].astype(np.float32)
    values *= q.steps[:, :, None, None]
    return values
