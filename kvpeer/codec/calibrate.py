"""Measure a model's per-(tensor, layer, head) quantization sensitivity as a :class:`CodecProfile`.

A Fisher-information map of a teacher-forced continuation w.r.t. every K/V element of a
calibration prefix (:func:`fisher_diagonal`) predicts the KL a quantizer adds: 0.5 * sum(F *
error**2), error**2 ~ step**2 / 12. With the codec's own per-channel steps at multiplier 1
(quant.plan_steps on each 256-token chunk, exact tokens left out since they cost nothing), a
head's cost C_h = sum over its elements of F * channel_step**2 is its KL per unit of squared
multiplier. Minimising the size (-log2 of the step per element, equal element counts per head)
at a fixed total KL gives multiplier_h ∝ 1/sqrt(C_h), normalised to a geometric mean of 1 and
clamped (:meth:`CodecProfile.from_sensitivities`). Before that, the same costs kept per channel
move bits between a head's channels (:func:`channel_offsets`), and the head costs are those the
moved steps leave. The plain rules' step ratios between levels are fixed, so one profile serves
every level, except that each level is checked on the calibration windows (:func:`level_kls`) and
one the profile does not improve keeps the plain steps. Run once per model (minutes on a CPU); the result
is stored by model fingerprint. The calibration text must not be the evaluated text: the
default is one half of Python's bundled pydoc topics, benchmarks evaluate the other.

Blocking, uses torch and transformers (imported by the caller's model); not for the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpeer.codec import core, levels, quant
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
    from kvpeer.integrations.transformers import cache_of

    out = model(ids, use_cache=True)
    layers = cache_of(out).layers
    return torch.stack([layer.keys[0] for layer in layers]), torch.stack([layer.values[0] for layer in layers])


def cache_from(model: Any, k: torch.Tensor, v: torch.Tensor) -> Any:
    """A transformers DynamicCache holding k, v [layers, kv_heads, tokens, head_dim]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    dtype = next(model.parameters()).dtype
    for i in range(k.shape[0]):
        cache.update(k[i][None].to(dtype), v[i][None].to(dtype), i)
    return cache


def _with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The forward keyword that hands ``model`` its cache (transformers 5: ``cache``)."""
    from kvpeer.integrations.transformers import cache_argument

    return {cache_argument(model): cache}


@torch.no_grad()
def continuation_logprobs(model: Any, k: torch.Tensor, v: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token logits over a teacher-forced continuation [1, C]."""
    prefix = k.shape[2]
    positions = torch.arange(prefix, prefix + cont.shape[1])[None]
    out = model(cont, position_ids=positions, use_cache=True, **_with_cache(model, cache_from(model, k, v)))
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def mean_kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float((ref.exp() * (ref - test)).sum(-1).mean())


def fisher_diagonal(model: Any, k: torch.Tensor, v: torch.Tensor, cont: torch.Tensor, samples: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element Fisher information of the continuation's next-token distributions w.r.t. K, V.

    Expected KL(original || perturbed) per position ≈ 0.5 * sum(F * noise_variance) for small
    independent noise, so F times a quantizer's step**2 / 12 says where a codec's KL comes from.
    Estimated from ``samples`` backward passes, each with one next token drawn per position
    from the model's own distribution (cross-position terms vanish in expectation).
    """
    with torch.no_grad():
        probs = continuation_logprobs(model, k, v, cont).exp()
    gen = torch.Generator().manual_seed(seed)
    fk, fv = torch.zeros_like(k), torch.zeros_like(v)
    positions = torch.arange(k.shape[2], k.shape[2] + cont.shape[1])[None]
    for _ in range(samples):
        kk, vv = k.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
        out = model(cont, position_ids=positions, use_cache=True, **_with_cache(model, cache_from(model, kk, vv)))
        drawn = torch.multinomial(probs, 1, generator=gen)
        torch.log_softmax(out.logits[0].float(), -1).gather(1, drawn).sum().backward()
        assert kk.grad is not None and vv.grad is not None
        fk += kk.grad**2
        fv += vv.grad**2
    scale = 1.0 / (samples * cont.shape[1])
    return fk * scale, fv * scale


# Channel offsets take this fraction of the calibration windows' within-head log cost spread:
# held out (calibration -> evaluation text, SmolLM2, Fisher-predicted) 0.25 / 0.5 / 0.75 / 1 gave
# KL 0.87 / 0.81 / 0.79 / 0.80x; keys' channel costs correlate 0.88 between the texts, values' 0.53.
CHANNEL_SHRINK = 0.75
CHANNEL_OFFSET_CLAMP = 8  # quarter octaves: at most 2 octaves finer or coarser than the plain rule


def channel_costs(kv: np.ndarray, info: np.ndarray, level_log2: float, sink: int = 1, chunk: int = 256,
                  rotary: bool = True) -> np.ndarray:
    """C [2*layers, heads, head_dim]: per channel, the sum of Fisher x the codec's channel step**2
    at multiplier 1 (its KL per unit of squared step multiplier).

    ``kv``, ``info``: float32 [2, layers, heads, tokens, head_dim] (values and their Fisher
    diagonal). Cut into ``chunk``-token chunks as the daemon encodes them; exact tokens skipped.
    ``rotary``: the model has RoPE, so the codec's rotary-index prior shapes the key steps.
    """
    _, layers, heads, tokens, dim = kv.shape
    cost = np.zeros((2 * layers, heads, dim))
    prior = quant.ROTARY_PRIOR_OCTAVES if rotary else 0.0
    for start in range(0, tokens, chunk):
        x = kv[:, :, :, start : start + chunk].reshape(2 * layers, heads, -1, dim)
        f = info[:, :, :, start : start + chunk].reshape(2 * layers, heads, -1, dim)
        body = np.ones(x.shape[2], bool)
        if sink:
            body[quant.exact_tokens(x[:layers], min(x.shape[2], quant.MAX_EXACT))] = False
        steps, codes = quant.plan_steps(np.ascontiguousarray(x[:, :, body]), level_log2, rotary_prior=prior)
        step = quant.channel_steps(steps, codes).astype(np.float64)  # [2L, H, D]
        cost += (f[:, :, body].astype(np.float64) * step[:, :, None, :] ** 2).sum(axis=2)
    return cost


def channel_offsets(costs: np.ndarray, shrink: float = CHANNEL_SHRINK) -> np.ndarray:
    """int [2*layers, heads, head_dim] step-code offsets (quarter octaves, positive = finer) that
    move bits between a head's channels by their costs, mean ~0 per head (equal rate): the
    equal-rate optimum step ∝ cost**-0.5, taken ``shrink`` of the way (the costs are noisy)."""
    logs = np.log2(np.maximum(costs, 1e-30))
    centred = logs - logs.mean(axis=-1, keepdims=True)
    offsets = np.rint(quant.CODE_STEPS_PER_OCTAVE * 0.5 * shrink * centred)
    return np.clip(offsets, -CHANNEL_OFFSET_CLAMP, CHANNEL_OFFSET_CLAMP).astype(np.int64)


def calibrate(
    model: Any,
    tokenizer: Any,
    fingerprint: str,
    text: str | None = None,
    *,
    prefix_tokens: int = 512,
    continuation_tokens: int = 256,
    windows: int = 4,
    samples: int = 6,
    limit: float = 8.0,
    sink: int = 1,
    rotary: bool = True,
    channels: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CodecProfile:
    """Fisher-map ``windows`` spans of ``text`` and return the model's per-head profile.

    Each window: the KV of a ``prefix_tokens`` prefix (fp16-rounded, as engines hold it) and
    ``samples`` backward passes over the next ``continuation_tokens``. Costs add up over windows;
    multipliers end within [1/limit, limit]. ``rotary``: the model has RoPE (rotate-half), as the
    daemon decides from its fingerprint's theta. ``channels``: also per-channel step offsets within
    each head (:func:`channel_offsets`); the head multipliers are then fitted to the costs those
    leave. SmolLM2 with these defaults: ~4 min on 2 busy cores.
    """
    ids = tokenizer(text or calibration_text(), return_tensors="pt").input_ids[0]
    span = prefix_tokens + continuation_tokens
    if len(ids) < span * windows:
        raise ValueError(f"calibration text too short: {len(ids)} tokens")
    for p in model.parameters():
        p.requires_grad_(False)  # gradients w.r.t. the cache only
    stride = len(ids) // windows
    step_log2 = levels.get(levels.DEFAULT_LEVEL).step_log2  # any level: the ratios are the same
    per_window = []
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    checks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (k, v, continuation)
    for w in range(windows):
        window = ids[w * stride : w * stride + span]
        k, v = prefix_kv(model, window[None, :prefix_tokens])
        k, v = k.half().float(), v.half().float()
        fk, fv = fisher_diagonal(model, k, v, window[None, prefix_tokens:], samples, seed=w)
        checks.append((k, v, window[None, prefix_tokens:]))
        kv = torch.stack([k, v]).numpy()
        chunks += [(k[:, :, i : i + 256].half().contiguous(), v[:, :, i : i + 256].half().contiguous())
                   for i in range(0, prefix_tokens, 256)]
        per_window.append(channel_costs(kv, torch.stack([fk, fv]).numpy(), step_log2, sink, rotary=rotary))
        if progress:
            progress(f"window {w + 1}/{windows}: predicted q8 KL {0.5 / 12 * per_window[-1].sum():.2e}")
    by_channel = np.sum(per_window, axis=0)
    offsets = channel_offsets(by_channel) if channels else np.zeros(by_channel.shape, np.int64)
    # a head's cost with its channels' steps moved: step x 2**(-offset/4), cost x step**2
    cost = (by_channel * 2.0 ** (-offsets / 2.0)).sum(axis=-1)
    layers, heads = cost.shape[0] // 2, cost.shape[1]
    agreement = _log_correlation([c.sum(axis=-1) for c in per_window])
    log.info("per-head cost: window-to-window correlation of log cost %.2f", agreement)
    profile = CodecProfile.from_sensitivities(
        fingerprint,
        [float(c) for c in cost[:layers].ravel()],
        [float(c) for c in cost[layers:].ravel()],
        heads=heads,
        limit=limit,
        source=(
            f"calibrate: Fisher map, {windows}x({prefix_tokens}+{continuation_tokens}) tokens of the calibration "
            f"text, {samples} samples per window; window-to-window r(log cost) {agreement:.2f}; clamp x{limit:g}; "
            + (f"channel offsets x{CHANNEL_SHRINK:g} of the log cost spread; " if channels else "")
            + "level scales: equal size on those windows' chunks"
        ),
    )
    if channels:
        profile = dataclasses.replace(profile, channels=tuple(int(c) for c in offsets.ravel()))
    scales = equal_size_scales(profile, chunks, rotary=rotary)
    if progress:
        progress("level scales (equal size): " + ", ".join(f"{name} {x:.3f}" for name, x in scales.items()))
    profile = dataclasses.replace(profile, level_scale=scales)
    kls = level_kls(model, profile, checks, rotary=rotary)
    skip = tuple(name for name, (plain, profiled) in kls.items() if profiled >= plain)
    if progress:
        progress("KL on the calibration windows, plain / profile: " + ", ".join(
            f"{name} {plain:.2e} / {profiled:.2e}" for name, (plain, profiled) in kls.items()))
        progress(f"levels kept on the plain steps: {', '.join(skip) or 'none'}")
    return dataclasses.replace(profile, skip_levels=skip)


def level_kls(model: Any, profile: CodecProfile, windows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              chunk: int = 256, rotary: bool = True) -> dict[str, tuple[float, float]]:
    """Per lossy level, the mean KL of the continuations with the plain steps and with
    ``profile``, each prefix coded as the daemon stores it (``chunk``-token chunks, tail steps on
    the last). Equal sizes (the level scales), so a profile that does not lower a level's KL on
    its own calibration windows has nothing to offer there: the Fisher model's step**2/12 noise
    no longer holds at the coarsest levels (a GPT-2 trained here: q3 KL 1.9x worse with it)."""
    def coded(k: torch.Tensor, v: torch.Tensor, level: str, tuned: CodecProfile | None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for start in range(0, k.shape[2], chunk):
            last = start + chunk >= k.shape[2]
            blob = core.encode(k[:, :, start : start + chunk].half().contiguous(),
                               v[:, :, start : start + chunk].half().contiguous(), level, profile=tuned,
                               tail=last, rotate_half=rotary)
            parts.append(core.decode(blob))
        return torch.cat([p[0] for p in parts], 2).float(), torch.cat([p[1] for p in parts], 2).float()

    out = {}
    refs = [continuation_logprobs(model, k, v, cont) for k, v, cont in windows]
    for name in (n for n in levels.LEVELS if not levels.get(n).lossless):
        pair = []
        for tuned in (None, profile):
            kls = [mean_kl(ref, continuation_logprobs(model, *coded(k, v, name, tuned), cont))
                   for (k, v, cont), ref in zip(windows, refs, strict=True)]
            pair.append(sum(kls) / len(kls))
        out[name] = (pair[0], pair[1])
    return out


def equal_size_scales(profile: CodecProfile, chunks: list[tuple[torch.Tensor, torch.Tensor]],
                      rounds: int = 7, rotary: bool = True) -> dict[str, float]:
    """Per lossy level, the common factor on ``profile`` that encodes ``chunks`` to the plain call's size.

    Geometric mean 1 keeps the nominal rate, but at few bits per element the entropy coder's
    rate does not fall as fast as -log2(step) for heads made coarser, so a level's size drifts;
    bisection on log2 of the factor within ±1 octave (``rounds`` halvings) pins it.
    """
    def size(level: str, scale: float | None) -> int:
        tuned = None if scale is None else dataclasses.replace(profile, level_scale={level: scale})
        return sum(len(core.encode(k, v, level, profile=tuned, tail=False, rotate_half=rotary)) for k, v in chunks)

    scales = {}
    for spec in (levels.get(name) for name in levels.LEVELS if not levels.get(name).lossless):
        target = size(spec.name, None)
        low, high = -1.0, 1.0  # log2 of the factor; a larger factor gives a smaller blob
        for _ in range(rounds):
            mid = 0.5 * (low + high)
            if size(spec.name, 2.0**mid) > target:
                low = mid
            else:
                high = mid
        scales[spec.name] = float(f"{2.0 ** (0.5 * (low + high)):.4g}")
    return scales


def _log_correlation(costs: list[np.ndarray]) -> float:
    """Mean pairwise correlation of log per-head costs between windows (1.0 with one window)."""
    logs = [np.log(np.maximum(c.ravel(), 1e-30)) for c in costs]
    pairs = [np.corrcoef(a, b)[0, 1] for i, a in enumerate(logs) for b in logs[i + 1 :]]
    return float(np.mean(pairs)) if pairs else 1.0


def main() -> None:
    """``python -m kvpeer.codec.calibrate [--model PATH_OR_GGUF] [--out DIR]``: store a profile."""
    import argparse

    from kvpeer.codec import profile as profiles
    from kvpeer.models import load_model, model_fingerprint

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=None, help="local transformers dir or GGUF (default SmolLM2)")
    parser.add_argument("--out", default=None, help="profile directory (default: the shipped profiles)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--limit", type=float, default=8.0)
    parser.add_argument("--no-channels", action="store_true", help="per-head multipliers only, no channel offsets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model, tok = load_model(args.model)
    fingerprint = model_fingerprint(model)
    profile = calibrate(model, tok, fingerprint.hex, windows=args.windows, samples=args.samples,
                        limit=args.limit, rotary=fingerprint.rope_theta > 0, channels=not args.no_channels,
                        progress=print)
    print(f"{profile.source}\nwritten to {profiles.save(profile, Path(args.out) if args.out else None)}")


if __name__ == "__main__":
    main()
