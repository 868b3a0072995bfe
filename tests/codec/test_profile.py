"""Per-model profiles: validation, JSON round trip, storage, and their effect on steps."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from kvpeer import codec
from kvpeer.codec import profile as profiles
from kvpeer.codec.profile import CodecProfile


def test_from_sensitivities_normalises_and_orders() -> None:
    p = CodecProfile.from_sensitivities("m", [1.0, 4.0], [16.0, 1.0])
    ws = p.multipliers()
    assert abs(ws[0] * ws[1] * ws[2] * ws[3] - 1.0) < 1e-3  # geometric mean 1 (4 significant digits)
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


def _pair(seed: int, heads: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, heads, 48, 16, generator=g).half(), torch.randn(2, heads, 48, 16, generator=g).half()


def test_per_head_profile_round_trip_and_grid(tmp_path: Path) -> None:
    p = CodecProfile.from_sensitivities("h", [1.0, 4.0, 9.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 3.0, 1.0, 8.0],
                                        heads=3, limit=2.0, source="t")
    assert p.layers == 2 and p.heads == 3
    assert CodecProfile.from_json(p.to_json()) == p
    profiles.save(p, tmp_path)
    assert profiles.load("h", tmp_path) == p
    assert all(0.5 <= w <= 2.0 for w in p.multipliers())  # clamped
    assert abs(sum(math.log(w) for w in p.multipliers())) / 12 < 1e-3  # geometric mean 1 after clamping
    grid = p.grid(3)
    assert len(grid) == 4 and grid[0] == list(p.k[:3]) and grid[3] == list(p.v[3:])
    assert CodecProfile(model="m", k=(1.0, 2.0), v=(1.0, 1.0)).grid(4)[1] == [2.0] * 4  # per-layer: every head
    with pytest.raises(codec.CodecError):
        p.grid(2)
    scaled = dataclasses.replace(p, level_scale={"q4": 1.5})
    assert CodecProfile.from_json(scaled.to_json()) == scaled
    assert scaled.grid(3, "q4")[2] == [1.5 * w for w in p.v[:3]] and scaled.grid(3, "q8") == grid


@pytest.mark.parametrize("text", [
    '{"version": 2, "model": "m", "heads": 2, "k": [1, 1, 1], "v": [1, 1, 1]}',  # not a multiple of heads
    '{"version": 2, "model": "m", "heads": 0, "k": [1], "v": [1]}',
    '{"version": 2, "model": "m", "heads": true, "k": [1], "v": [1]}',
    '{"version": 2, "model": "m", "heads": "2", "k": [1, 1], "v": [1, 1]}',
    '{"version": 2, "model": "m", "k": [1, "nan"], "v": [1, 1]}',
    '{"version": 2, "model": "", "k": [1], "v": [1]}',
    '{"version": 2, "model": "m", "k": "ab", "v": [1, 1]}',
    '{"version": 2, "model": "m", "k": [1], "v": [1], "level_scale": {"q9": 1.0}}',
    '{"version": 2, "model": "m", "k": [1], "v": [1], "level_scale": {"exact": 1.0}}',
    '{"version": 2, "model": "m", "k": [1], "v": [1], "level_scale": {"q4": 100.0}}',
    '{"version": 2, "model": "m", "k": [1], "v": [1], "level_scale": [1.0]}',
])
def test_bad_per_head_profiles_rejected(text: str) -> None:
    with pytest.raises(codec.CodecError):
        CodecProfile.from_json(text)


def test_per_head_profile_decodes_without_it_and_steps_travel_in_the_blob() -> None:
    k, v = _pair(7)
    # head 1 of layer 0's keys 4x finer, head 2 of layer 1's values 4x coarser
    prof = CodecProfile(model="m", heads=3, k=(1.0, 0.25, 1.0, 1.0, 1.0, 1.0), v=(1.0, 1.0, 1.0, 1.0, 1.0, 4.0))
    plain_blob = codec.encode(k, v, "q5")
    blob = codec.encode(k, v, "q5", profile=prof)
    # decode takes no profile: same values twice, and the same shapes/dtypes as the input
    k1, v1 = codec.decode(blob)
    k2, v2 = codec.decode(bytes(blob))
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and k1.shape == k.shape and v1.dtype == v.dtype
    kp, vp = codec.decode(plain_blob)
    err = lambda a, b: float((a.float() - b.float()).abs().max())  # noqa: E731
    assert err(k1[0, 1], k[0, 1]) < err(kp[0, 1], k[0, 1]) / 2  # finer head
    assert err(k1[0, 0], k[0, 0]) == err(kp[0, 0], k[0, 0])  # untouched head: identical
    assert err(v1[1, 2], v[1, 2]) > err(vp[1, 2], v[1, 2]) * 2  # coarser head
    with pytest.raises(codec.CodecError):
        codec.encode(*_pair(8, heads=2), "q5", profile=prof)  # 3 heads per layer vs 2
    coarser = dataclasses.replace(prof, level_scale={"q5": 2.0})  # the level's scale: coarser everywhere
    assert len(codec.encode(k, v, "q5", profile=coarser)) < len(blob)
    assert codec.encode(k, v, "q6", profile=coarser) == codec.encode(k, v, "q6", profile=prof)


def test_corrupted_profile_blob_is_codec_error() -> None:
    k, v = _pair(9)
    prof = CodecProfile.from_sensitivities("m", [1.0, 2.0, 4.0, 8.0, 1.0, 1.0], [1.0] * 6, heads=3, limit=4.0)
    blob = bytearray(codec.encode(k, v, "q4", profile=prof))
    for i in range(0, len(blob), 13):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(codec.CodecError):
            codec.decode(bytes(bad))
    with pytest.raises(codec.CodecError):
        codec.decode(bytes(blob[:-1]))


def test_stored_smollm2_profile_is_valid() -> None:
    stored = sorted(Path(profiles.__file__).with_name("profiles").glob("*.json"))
    for path in stored:
        p = CodecProfile.from_json(path.read_text())
        assert p.model == path.stem and profiles.load(p.model) == p
        assert abs(sum(math.log(w) for w in p.multipliers())) / len(p.multipliers()) < 1e-3


def test_a_float32_calibration_serves_the_same_model_in_other_dtypes(tmp_path: Path) -> None:
    from kvpeer.hashing import ModelFingerprint

    fp32 = ModelFingerprint(name="m", layers=2, kv_heads=1, head_dim=8, dtype="float32", rope_theta=1e4)
    bf16 = dataclasses.replace(fp32, dtype="bfloat16")
    other = dataclasses.replace(fp32, name="other", dtype="bfloat16")
    assert bf16.hex != fp32.hex  # KV of different dtypes is never exchanged
    calibrated = CodecProfile.from_sensitivities(fp32.hex, [1.0, 2.0], [3.0, 4.0])
    profiles.save(calibrated, tmp_path)
    assert profiles.for_fingerprint(fp32, tmp_path) == calibrated
    assert profiles.for_fingerprint(bf16, tmp_path) == calibrated
    assert profiles.for_fingerprint(other, tmp_path) is None
    own = CodecProfile.from_sensitivities(bf16.hex, [2.0, 1.0], [1.0, 1.0])
    profiles.save(own, tmp_path)
    assert profiles.for_fingerprint(bf16, tmp_path) == own  # the engine's own dtype first


def test_a_profile_can_leave_levels_on_the_plain_steps(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(2, 2, 64, 16, generator=g).half() for _ in range(2))
    base = CodecProfile.from_sensitivities("m", [1.0, 30.0, 1.0, 30.0], [30.0, 1.0, 1.0, 1.0], heads=2)
    skipping = dataclasses.replace(base, skip_levels=("q5",))
    assert CodecProfile.from_json(skipping.to_json()) == skipping
    assert codec.encode(k, v, "q5", profile=skipping) == codec.encode(k, v, "q5")
    assert codec.encode(k, v, "q6", profile=skipping) == codec.encode(k, v, "q6", profile=base)
    assert codec.encode(k, v, "q6", profile=skipping) != codec.encode(k, v, "q6")
    for bad in (("exact",), ("q9",)):
        with pytest.raises(codec.CodecError):
            dataclasses.replace(base, skip_levels=bad)
    with pytest.raises(codec.CodecError):
        CodecProfile.from_json(skipping.to_json().replace('"skip_levels": [\n  "q5"\n ]', '"skip_levels": "q5"'))
    wrong_layers = CodecProfile.from_sensitivities("m", [1.0] * 6, [1.0] * 6, heads=2, source="3 layers")
    with pytest.raises(codec.CodecError, match="layers"):  # checked even where it would not apply
        codec.encode(k, v, "q5", profile=dataclasses.replace(wrong_layers, skip_levels=("q5",)))


def test_channel_offsets_refine_and_coarsen_single_channels() -> None:
    g = torch.Generator().manual_seed(12)
    k, v = (torch.randn(2, 2, 128, 16, generator=g).half() for _ in range(2))
    offsets = [0] * (2 * 2 * 2 * 16)
    offsets[3] = 8  # K, layer 0, head 0, channel 3: two octaves finer
    offsets[5] = -8  # ... channel 5: two octaves coarser
    base = CodecProfile.from_sensitivities("m", [1.0] * 4, [1.0] * 4, heads=2)
    prof = dataclasses.replace(base, channels=tuple(offsets))
    assert CodecProfile.from_json(prof.to_json()) == prof and prof.head_dim == 16
    plain_k, _ = codec.decode(codec.encode(k, v, "q5", profile=base, tail=False))
    tuned_k, _ = codec.decode(codec.encode(k, v, "q5", profile=prof, tail=False))  # no profile to decode

    def err(decoded: torch.Tensor, channel: int) -> float:
        return float((decoded[0, 0, 1:, channel].float() - k[0, 0, 1:, channel].float()).abs().max())

    assert err(tuned_k, 3) < 0.4 * err(plain_k, 3)
    assert err(tuned_k, 5) > 2.5 * err(plain_k, 5)
    assert torch.equal(tuned_k[1], plain_k[1]) and torch.equal(tuned_k[0, 1], plain_k[0, 1])  # others untouched
    with pytest.raises(codec.CodecError, match="channel offsets"):
        codec.encode(k[:, :, :, :8].contiguous(), v[:, :, :, :8].contiguous(), "q5", profile=prof)
    for bad in ((1,) * 7, (99,) + (0,) * 127):
        with pytest.raises(codec.CodecError):
            dataclasses.replace(base, channels=bad)
    with pytest.raises(codec.CodecError):
        CodecProfile.from_json(prof.to_json().replace('"0 0 0 8 0 -8', '"0 0 0 0.5 0 -8'))
    with pytest.raises(codec.CodecError):
        CodecProfile.from_json(prof.to_json().replace('"0 0 0 8 0 -8', '"0 0 0 8 -8'))  # a short line
    assert '"0 0 0 8 0 -8 0 0 0 0 0 0 0 0 0 0"' in prof.to_json()  # one line per head


def test_calibrated_channel_offsets_follow_cost_and_keep_the_rate() -> None:
    import numpy as np

    from kvpeer.codec import calibrate

    costs = np.ones((2, 1, 8))
    costs[0, 0, 2] = 2.0**8  # a channel 8 octaves costlier: finer, within the clamp
    costs[0, 0, 6] = 2.0**-2
    offsets = calibrate.channel_offsets(costs)
    assert offsets[0, 0, 2] == calibrate.CHANNEL_OFFSET_CLAMP and offsets[0, 0, 6] < 0
    assert not offsets[1].any()  # equal costs: nothing moves
    assert abs(offsets[0, 0].mean()) < 1.0


def test_a_rewritten_profile_is_read_again(tmp_path: Path) -> None:
    first = CodecProfile.from_sensitivities("m", [1.0, 2.0], [3.0, 4.0])
    profiles.save(first, tmp_path)
    assert profiles.load("m", tmp_path) == first
    assert profiles.load("m", tmp_path) is profiles.load("m", tmp_path)  # parsed once
    second = CodecProfile.from_sensitivities("m", [4.0, 2.0], [3.0, 1.0])
    profiles.save(second, tmp_path)
    assert profiles.load("m", tmp_path) == second
    profiles.path_for("m", tmp_path).unlink()
    assert profiles.load("m", tmp_path) is None
