"""Measure a model's per-layer quantization sensitivity and turn it into a :class:`CodecProfile`.

For each layer's K and each layer's V alone, add small uniform noise to the KV of a calibration
prefix (the exact sink token untouched) and measure the mean KL divergence of the next-token
distributions over a teacher-forced continuation. KL grows as sensitivity_i * step_i**2;
minimising total size at a fixed total KL gives step_i ∝ 1/sqrt(sensitivity_i) (the findings'
rule), expressed as a multiplier of the codec's per-head base step (quant.plan_steps). Run once per model (minutes on a
CPU); the result is stored by model fingerprint. The calibration text must not be the evaluated
text: the default is one half of Python's bundled pydoc topics, benchmarks evaluate the other.

Blocking, uses torch and transformers (imported by the caller's model); not for the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvpeer.codec import levels, quant
from kvpeer.codec.profile import CodecProfile

log = logging.getLogger(__name__)


def _topics() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def calibration_text() -> str:
    """Default calibration text: the even half of pydoc's topic help (ships with Python)."""
    return "\n\n".join(_topics()[0::2])


def evaluation_text() -> str:
    """The odd half of pydoc's topic help: disjoint from :func:`calibration_text`."""
    return "\n\n".join(_topics()[1::2])


@torch.no_grad()
def prefix_kv(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a prefix (batch 1), [layers, kv_heads, tokens, head_dim] each."""
    out = model(ids, use_cache=True)
    layers = out.past_key_values.layers
    return torch.stack([layer.keys[0] for layer in layers]), torch.stack([layer.values[0] for layer in layers])


def cache_from(model: Any, k: torch.Tensor, v: torch.Tensor) -> Any:
    """A transformers DynamicCache holding k, v [layers, kv_heads, tokens, head_dim]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    dtype = next(model.parameters()).dtype
    for i in range(k.shape[0]):
        cache.update(k[i][None].to(dtype), v[i][None].to(dtype), i)
    return cache


@torch.no_grad()
def continuation_logprobs(model: Any, k: torch.Tensor, v: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token logits over a teacher-forced continuation [1, C]."""
    prefix = k.shape[2]
    positions = torch.arange(prefix, prefix + cont.shape[1])[None]
    out = model(cont, past_key_values=cache_from(model, k, v), position_ids=positions, use_cache=True)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def mean_kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float((ref.exp() * (ref - test)).sum(-1).mean())


def calibrate(
    model: Any,
    tokenizer: Any,
    fingerprint: str,
    text: str | None = None,
    *,
    prefix_tokens: int = 512,
    continuation_tokens: int = 256,
    windows: int = 2,
    relative_noise: float = 0.05,
    sink: int = 1,
    progress: Callable[[str], None] | None = None,
) -> CodecProfile:
    """Probe every layer's K and V on ``text`` and return the model's profile.

    Per (tensor, layer): uniform noise of step ``relative_noise`` x the layer's RMS (sink
    excluded) gives KL_i; sensitivity S_i = KL_i / step_i**2 per unit of absolute step. The
    optimal absolute step is proportional to 1/sqrt(S_i); the codec's steps are the per-head
    base step times a multiplier, so the multiplier is that over the layer's mean q8 base step.
    (SmolLM2's shipped profile: these defaults, ~20 min on 2 busy cores.)
    """
    ids = tokenizer(text or calibration_text(), return_tensors="pt").input_ids[0]
    span = prefix_tokens + continuation_tokens
    if len(ids) < span * windows:
        raise ValueError(f"calibration text too short: {len(ids)} tokens")
    stride = len(ids) // windows
    gen = torch.Generator().manual_seed(0)
    sens: np.ndarray | None = None
    base: np.ndarray | None = None
    for w in range(windows):
        window = ids[w * stride : w * stride + span]
        k, v = prefix_kv(model, window[None, :prefix_tokens])
        cont = window[None, prefix_tokens:]
        ref = continuation_logprobs(model, k, v, cont)
        kv = torch.stack([k, v]).half().float()  # [2, L, H, T, D], as an fp16 engine holds it
        layers, heads = kv.shape[1], kv.shape[2]
        body = kv[:, :, :, sink:256].numpy().reshape(2 * layers, heads, -1, kv.shape[-1])
        window_base = quant.plan_steps(body, levels.get("q8").step_log2)[0].mean(axis=1)  # [2L] mean q8 base step
        if sens is None or base is None:
            sens, base = np.zeros(2 * layers), np.zeros(2 * layers)
        base += window_base / windows
        for t in range(2):
            for layer in range(layers):
                noisy = kv.clone()
                part = noisy[t, layer, :, sink:]
                step = float(relative_noise * part.pow(2).mean().sqrt())
                part += (torch.rand(part.shape, generator=gen) - 0.5) * step
                kl = mean_kl(ref, continuation_logprobs(model, noisy[0], noisy[1], cont))
                sens[t * layers + layer] += max(kl, 1e-12) / max(step, 1e-12) ** 2 / windows
                if progress:
                    progress(f"window {w} {'KV'[t]}{layer}: KL {kl:.3e}")
    assert sens is not None and base is not None
    # multiplier m_i = (1/sqrt(S_i)) / base_i; from_sensitivities takes x with m ∝ 1/sqrt(x)
    equivalent = sens * base**2
    n = len(equivalent) // 2
    return CodecProfile.from_sensitivities(
        fingerprint,
        list(equivalent[:n]),
        list(equivalent[n:]),
        source=f"calibrate: {windows}x({prefix_tokens}+{continuation_tokens}) tokens, uniform noise {relative_noise} rms per layer",
    )
