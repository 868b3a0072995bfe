"""benchmarks.tiny_model: the second architecture trains, saves, loads and its KV round-trips;
calibrating it keeps the plain steps at levels where its profile would lose."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from benchmarks import tiny_model  # noqa: E402
from kvpeer import codec  # noqa: E402
from kvpeer.codec import calibrate  # noqa: E402
from kvpeer.codec.calibrate import evaluation_text, prefix_kv  # noqa: E402
from kvpeer.models import load_model, model_fingerprint  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("tiny") / "m"
    args = argparse.Namespace(
        out=str(out), minutes=1.0, steps=3, layers=1, width=64, batch=2, lr=2e-3,
        corpus_bytes=300_000, tokens_per_s=1000.0, seed=0,
    )
    return tiny_model.train(args), out


def test_a_few_steps_make_a_loadable_gpt2_whose_kv_the_codec_takes(trained: tuple[dict[str, Any], Path]) -> None:
    result, out = trained
    assert result["steps"] == 3 and result["corpus_tokens"] > 10_000
    model, tokenizer = load_model(out)
    assert len(tokenizer) == tiny_model.VOCAB
    fp = model_fingerprint(model)
    assert (fp.layers, fp.kv_heads, fp.head_dim, fp.rope_theta) == (1, 1, 64, 0.0)  # no RoPE
    ids = tokenizer(evaluation_text()[:4000], return_tensors="pt").input_ids[:, :40]
    k, v = prefix_kv(model, ids)
    assert k.shape == (1, 1, 40, 64)
    blob = codec.encode(k.half(), v.half(), "q5", rotate_half=False)
    k2, v2 = codec.decode(blob)
    assert k2.shape == k.shape and torch.isfinite(k2).all() and torch.isfinite(v2).all()


def test_calibration_keeps_the_plain_steps_where_the_profile_loses(
    trained: tuple[dict[str, Any], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model(trained[1])
    measured: dict[str, tuple[float, float]] = {}
    real = calibrate.level_kls

    def spy(*args: Any, **kwargs: Any) -> dict[str, tuple[float, float]]:
        measured.update(real(*args, **kwargs))
        # whatever this 3-step model measures: q3 loses with the profile, q8 gains
        return {**measured, "q3": (1e-3, 2e-3), "q8": (2e-3, 1e-3)}

    monkeypatch.setattr(calibrate, "level_kls", spy)
    profile = calibrate.calibrate(model, tokenizer, model_fingerprint(model).hex, windows=1, samples=1, rotary=False)
    lossy = [name for name in codec.LEVELS if name != "exact"]
    assert sorted(measured) == sorted(lossy)
    # KLs of a 3-step model are ~0 (float rounding can make one a hair negative)
    assert all(math.isfinite(a) and math.isfinite(b) and min(a, b) > -1e-6 for a, b in measured.values())
    assert "q3" in profile.skip_levels and "q8" not in profile.skip_levels
    assert set(profile.skip_levels) <= set(lossy)
