"""benchmarks.tiny_model: the second architecture trains, saves, loads and its KV round-trips."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from benchmarks import tiny_model  # noqa: E402
from kvpeer import codec  # noqa: E402
from kvpeer.codec.calibrate import evaluation_text, prefix_kv  # noqa: E402
from kvpeer.models import load_model, model_fingerprint  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_few_steps_make_a_loadable_gpt2_whose_kv_the_codec_takes(tmp_path: Path) -> None:
    args = argparse.Namespace(
        out=str(tmp_path / "m"), minutes=1.0, steps=3, layers=1, width=64, batch=2, lr=2e-3,
        corpus_bytes=300_000, tokens_per_s=1000.0, seed=0,
    )
    result = tiny_model.train(args)
    assert result["steps"] == 3 and result["corpus_tokens"] > 10_000
    model, tokenizer = load_model(args.out)
    assert len(tokenizer) == tiny_model.VOCAB
    fp = model_fingerprint(model)
    assert (fp.layers, fp.kv_heads, fp.head_dim, fp.rope_theta) == (1, 1, 64, 0.0)  # no RoPE
    ids = tokenizer(evaluation_text()[:4000], return_tensors="pt").input_ids[:, :40]
    k, v = prefix_kv(model, ids)
    assert k.shape == (1, 1, 40, 64)
    blob = codec.encode(k.half(), v.half(), "q5", rotate_half=False)
    k2, v2 = codec.decode(blob)
    assert k2.shape == k.shape and torch.isfinite(k2).all() and torch.isfinite(v2).all()
