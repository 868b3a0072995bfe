"""Per-model profiles: validation, JSON round trip, storage, and their effect on steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvpeer import codec
from kvpeer.codec import profile as profiles
from kvpeer.codec.profile import CodecProfile


def test_from_sensitivities_normalises_and_orders() -> None:
    p = CodecProfile.from_sensitivities("m", [1.0, 4.0], [16.0, 1.0])
    ws = p.multipliers()
    assert abs(ws[0] * ws[1] * ws[2] * ws[3] - 1.0) < 1e-9  # geometric mean 1
    assert ws[2] < ws[1] < ws[0]  # more sensitive -> finer step


def test_json_and_store_round_trip(tmp_path: Path) -> None:
    p = CodecProfile.from_sensitivities("abc", [1.0, 2.0], [3.0, 4.0], source="test")
    assert CodecProfile.from_json(p.to_json()) == p
    profiles.save(p, tmp_path)
    assert profiles.load("abc", tmp_path) == p
    assert profiles.load("missing", tmp_path) is None


@pytest.mark.parametrize("text", ["{", "[]", '{"version": 9}', '{"version": 2, "model": "m", "k": [1], "v": []}',
                                  '{"version": 2, "model": "m", "k": [0], "v": [1]}'])
def test_bad_profiles_rejected(text: str) -> None:
    with pytest.raises(codec.CodecError):
        CodecProfile.from_json(text)


def test_profile_changes_steps_and_decodes_without_it() -> None:
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 64, 16, generator=g).half()
    v = torch.randn(2, 2, 64, 16, generator=g).half()
    fine_v = CodecProfile(model="m", k=(2.0, 2.0), v=(0.25, 1.0))
    plain = codec.decode(codec.encode(k, v, "q6"))
    tuned = codec.decode(codec.encode(k, v, "q6", profile=fine_v))
    err = lambda a, b: float((a.float() - b.float()).abs().max())  # noqa: E731
    assert err(tuned[1][0], v[0]) < err(plain[1][0], v[0])  # V of layer 0: finer
    assert err(tuned[0][0], k[0]) > err(plain[0][0], k[0])  # K: coarser
    with pytest.raises(codec.CodecError):
        codec.encode(k, v, "q4", profile=CodecProfile(model="m", k=(1.0,), v=(1.0,)))
