"""Keys before RoPE: un-rotate keys before quantizing, re-rotate after decoding.

Quantization noise on pre-RoPE keys moved the model's output 15-30% less than the same noise on
rotated keys (shared/findings/codec.md). Only the default (unscaled) rotary embedding of
Llama-style models in the rotate-half convention is supported; a blob records theta and the
chunk's first absolute position, so decode needs no side information. Encode and decode use the
same float64-derived angles, so the pair is an exact rotation up to float32 rounding.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from kvpeer.errors import CodecError

_PACKED = struct.Struct("<dI")
PACKED_BYTES = _PACKED.size
MAX_POSITION = 1 << 31


@dataclass(frozen=True, slots=True, kw_only=True)
class RopeSpec:
    """Rotary embedding of the keys in a chunk: base ``theta``, absolute position of token 0."""

    theta: float
    start: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.theta) and 1.0 < self.theta <= 1e12):
            raise CodecError(f"rope theta {self.theta} out of range")
        if not 0 <= self.start < MAX_POSITION:
            raise CodecError(f"rope start position {self.start} out of range")

    def pack(self) -> bytes:
        return _PACKED.pack(self.theta, self.start)

    @classmethod
    def unpack(cls, raw: bytes) -> RopeSpec:
        if len(raw) != PACKED_BYTES:
            raise CodecError("rope info has the wrong size")
        theta, start = _PACKED.unpack(raw)
        return cls(theta=theta, start=start)


def _cos_sin(spec: RopeSpec, first: int, count: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if head_dim % 2:
        raise CodecError("RoPE needs an even head_dim")
    if spec.start + first + count > MAX_POSITION:
        raise CodecError("rope positions out of range")
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    positions = torch.arange(spec.start + first, spec.start + first + count, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(keys: torch.Tensor, spec: RopeSpec, first: int) -> torch.Tensor:
    """Pre-RoPE float32 keys from rotated keys [..., tokens, head_dim] at positions first.."""
    cos, sin = _cos_sin(spec, first, keys.shape[-2], keys.shape[-1])
    k = keys.float()
    return k * cos - _rotate_half(k) * sin


def rotate(keys: torch.Tensor, spec: RopeSpec, first: int) -> torch.Tensor:
    """Rotated float32 keys from pre-RoPE keys [..., tokens, head_dim]."""
    cos, sin = _cos_sin(spec, first, keys.shape[-2], keys.shape[-1])
    k = keys.float()
    return k * cos + _rotate_half(k) * sin
