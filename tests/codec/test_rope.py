"""Keys quantized before RoPE: exact rotation pair, blob carries theta/start, transcode keeps it."""

from __future__ import annotations

import pytest
import torch

from kvpeer import codec
from kvpeer.codec.rope import RopeSpec, rotate, unrotate


def _rotated_kv(start: int) -> tuple[torch.Tensor, torch.Tensor, RopeSpec]:
    g = torch.Generator().manual_seed(5)
    spec = RopeSpec(theta=10000.0, start=start)
    pre = torch.randn(2, 2, 48, 16, generator=g)
    k = rotate(pre, spec, 0)
    return k.half(), torch.randn(2, 2, 48, 16, generator=g).half(), spec


def test_rotation_pair_is_inverse() -> None:
    x = torch.randn(3, 5, 16)
    spec = RopeSpec(theta=1e5, start=1000)
    assert torch.allclose(rotate(unrotate(x, spec, 7), spec, 7), x, atol=1e-5)


@pytest.mark.parametrize("level", ["q8", "q4"])
def test_pre_rope_round_trip(level: str) -> None:
    k, v, spec = _rotated_kv(start=512)
    blob = codec.encode(k, v, level, rope=spec)
    assert codec.read_header(blob).keys_pre_rope
    k2, v2 = codec.decode(blob)  # no rope info needed to decode
    plain = codec.decode(codec.encode(k, v, level))
    assert torch.equal(k2[:, :, 0], k[:, :, 0])
    err_rope = float((k2.float() - k.float()).abs().mean())
    err_plain = float((plain[0].float() - k.float()).abs().mean())
    assert err_rope < 2 * err_plain  # same order of error: the rotation is undone correctly
    assert torch.equal(v2, plain[1])
    lower = codec.transcode(blob, "q3")
    assert codec.read_header(lower).keys_pre_rope
    assert codec.decode(lower)[0].shape == k.shape


def test_bad_rope_rejected() -> None:
    with pytest.raises(codec.CodecError):
        RopeSpec(theta=float("nan"))
    with pytest.raises(codec.CodecError):
        RopeSpec(theta=1e4, start=-1)
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, 1, 8, 5, generator=g).half()
    with pytest.raises(codec.CodecError):
        codec.encode(k, k, "q8", rope=RopeSpec(theta=1e4))
