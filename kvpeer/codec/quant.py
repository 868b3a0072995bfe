"""Uniform scalar quantization of KV tensors with data-derived steps (numpy, no torch).

What the steps are, per (tensor-layer, head) and per channel, and which tokens stay exact, were
chosen from a Fisher-information map of SmolLM2's KV (README "Where the KL comes from"):

* **Base step from the geometric mean of the channel spans** of a head (not the widest channel,
  which let one outlier channel coarsen the whole head), times a level factor; values are
  coarser than keys by :data:`V_SCALE` (keys carried 60-75% of the KL at equal steps).
* **Per-channel step code** ``e`` (int8): channel step = base * 2**(-e/4), with ``e`` from the
  channel's RMS relative to the head's geometric mean RMS (:data:`CHANNEL_GAMMA`): large key
  channels meet large query channels, so they get finer steps.
* **Rotary-index prior** on key channels (:data:`ROTARY_PRIOR_OCTAVES`): in the rotate-half RoPE
  layout, channel c and c + D/2 share rotary frequency index c mod D/2, and after the rules above
  the slow (high-index) key channels still cost ~2.5 octaves more than the fast ones within a head
  (Fisher map, both texts alike); their steps get finer and the fast ones' coarser, mean unchanged.
* **Exact tokens**: besides position 0, tokens whose key in some head is far shorter than that
  head's median key (secondary attention sinks: 1-3 tokens of 256 carried ~half the KL) are kept
  bit-exact (:func:`exact_tokens`).

* **Tail steps**: when a chunk ends a prefix, its last tokens are what the next tokens read most
  (local heads; the last 128 positions carried ~60% of the KL that remained): they are
  quantized finer, in runs of tokens that share a step code (:data:`TAIL_RULE`, :func:`tail_runs`).

Steps are scale-free down to :data:`STEP_FLOOR` (~7.9e-31): fp32/bf16 data below ~1e-28 is
quantized coarser than its scale.

A zero point per channel in units of that channel's step centres the symbols (no fidelity
cost). Decoded value = symbol * step + zero * step in float32, identical on every host (a
channel's step is a float32 base times a fixed float32 table entry); the decoder recovers
exactly the integers the encoder wrote. All rules read only the chunk's own k and v.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpeer.errors import CodecError

# The smallest base step: scale-free above it (fp32/bf16 data down to ~1e-28 quantizes like any
# other), and channel steps stay normal float32 under any code the rules give. A head whose
# channels are all constant has no spread to take a step from: it keeps the 1e-12 it always had
# (its codes then fit the zero points; its blobs are unchanged).
STEP_FLOOR = 2.0**-100
_CONSTANT_HEAD_STEP = 1e-12
SYMBOL_LIMIT = 32767  # symbols travel as int16 at most
_SPAN_LIMIT = 16383  # a channel's span in steps stays well inside int16 (codes coarsen to fit)
_ZERO_LIMIT = 2.0**30  # |value| / step stays well inside int32 (zero points)
V_SCALE = 1.4  # value steps relative to key steps (Fisher map: keys dominate at equal steps)
CHANNEL_GAMMA = 0.5  # channel step ∝ (channel rms / head GM rms) ** -gamma
CODE_STEPS_PER_OCTAVE = 4
# Key channel steps from the fastest to the slowest rotary frequency span this many octaves
# (finer for the slow ones): screened 1.4 / 1.9 / 2.4 / 3.4 on the calibration text (README
# "Rotary-index prior"). 0 turns it off (models whose RoPE pairs neighbouring channels).
ROTARY_PRIOR_OCTAVES = 1.9
EXACT_KEY_NORM = 0.33  # tokens whose key, in some head, is < this x the head's median stay exact
MAX_EXACT = 16
# Tail steps, screened on the calibration text's Fisher map (README "Tail steps"): tokens this
# close to the chunk's last one (exclusive bound) get steps finer by code/4 octaves.
TAIL_RULE = ((8, 10), (16, 8), (64, 6), (128, 2))
MAX_TOKEN_RUNS = 8

# step multiplier per code e in -128..127: 2**(-e/4), a fixed float32 table (same on every host)
_OCTAVE = np.array([1.0, 2.0**-0.25, 2.0**-0.5, 2.0**-0.75], dtype=np.float64)
MULTIPLIERS = np.array(
    [_OCTAVE[e % 4] * 2.0 ** -(e // 4) for e in range(-128, 128)], dtype=np.float32
)


@dataclass(frozen=True, slots=True)
class Quantized:
    """Integers plus what it takes to restore them; arrays are numpy, shapes documented."""

    steps: np.ndarray  # float32 [N, H] base step per (tensor-layer, head)
    codes: np.ndarray  # int8 [N, H, D] per-channel step code
    zeros: np.ndarray  # int32 [N, H, D], in units of the channel step
    symbols: np.ndarray  # int16 [N, H, T, D]
    runs: tuple[tuple[int, int], ...] = ()  # (tokens, step code) along T; () = one run, code 0


def run_step(step: np.ndarray, code: int) -> np.ndarray:
    """float32 channel steps of a token run with step ``code`` (the same product on every host)."""
    return (step * MULTIPLIERS[code + 128]).astype(np.float32)


def channel_offset(step: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """float32 offset (zero point x channel step) that every token run shares."""
    return (zeros * step).astype(np.float32)


def run_spans(tokens: int, runs: tuple[tuple[int, int], ...]) -> list[tuple[int, int, int]]:
    """(start, stop, step code) of each token run; one code-0 run when there are none."""
    spans, start = [], 0
    for count, code in runs or ((tokens, 0),):
        spans.append((start, start + count, code))
        start += count
    return spans


def tail_runs(positions: np.ndarray, tokens: int) -> tuple[tuple[int, int], ...]:
    """(tokens, step code) runs over the sorted quantized ``positions`` of a chunk of ``tokens``
    that ends a prefix: finer codes towards its last token (:data:`TAIL_RULE`)."""
    distance = tokens - 1 - np.asarray(positions, np.int64)
    codes = np.zeros(distance.shape, np.int64)
    for bound, code in reversed(TAIL_RULE):
        codes[distance < bound] = code
    runs: list[tuple[int, int]] = []
    for code in map(int, codes):
        if runs and runs[-1][1] == code:
            runs[-1] = (runs[-1][0] + 1, code)
        else:
            runs.append((1, code))
    return tuple(runs) if any(code for _, code in runs) else ()


def channel_steps(steps: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float32 [N, H, D] step of every channel: base step x the code's table entry."""
    return (steps[:, :, None].astype(np.float32) * MULTIPLIERS[codes.astype(np.int64) + 128]).astype(np.float32)


def exact_tokens(keys: np.ndarray, limit: int = MAX_EXACT) -> np.ndarray:
    """Sorted token positions to keep exact: 0, plus sink-like tokens of ``keys`` [L, H, T, D].

    A secondary attention sink has, in some head, a key far shorter than that head's median
    key: on SmolLM2 the min over (layer, head) of norm / median norm is ~0.29 for exactly the
    tokens that carried half the KL and >= 0.3 for all others. At most ``limit`` positions, the
    most extreme first.
    """
    tokens = keys.shape[2]
    if tokens == 0 or limit <= 0:
        return np.zeros(0, np.int64)
    picked = [0]
    if tokens > 8:
        # fp32 keys past ~1e19 square to inf: their scores become inf below (never a pick),
        # without numpy's overflow warnings on every encode of such a chunk.
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.sqrt(np.square(keys, dtype=np.float32).sum(-1))  # [L, H, T]
            median = np.median(norms, axis=-1, keepdims=True)
            score = (norms / np.maximum(median, np.float32(1e-30))).min(axis=(0, 1))  # [T]
        score[~np.isfinite(score)] = np.inf
        for t in np.argsort(score, kind="stable").tolist():
            if len(picked) >= limit or not score[t] < EXACT_KEY_NORM:
                break
            if t != 0:
                picked.append(t)
    return np.array(sorted(picked), np.int64)


def plan_steps(
    x: np.ndarray, level_log2: float, tensors: int = 2, rotary_prior: float = ROTARY_PRIOR_OCTAVES
) -> tuple[np.ndarray, np.ndarray]:
    """Base steps [N, H] and channel codes [N, H, D] for float32 ``x`` [N, H, T, D].

    ``level_log2``: the level's base step as log2 of a fraction of the head's geometric-mean
    channel span. The first N/tensors rows are keys, the rest values (coarser by V_SCALE).
    ``rotary_prior``: octaves between the key channels of the fastest and the slowest rotary
    frequency (rotate-half layout); 0 for none.
    """
    n, heads, tokens, dim = x.shape
    if not np.all(np.isfinite(x)):
        raise CodecError("non-finite values: only the exact level keeps them")
    if tokens == 0:
        return np.ones((n, heads), np.float32), np.zeros((n, heads, dim), np.int8)
    span = (x.max(axis=2) - x.min(axis=2)).astype(np.float64)  # [N, H, D]
    floor = _relative_floor(span.max(axis=-1, keepdims=True))
    gm_span = np.exp(np.log(np.maximum(span, floor)).mean(axis=-1))  # [N, H]
    steps = gm_span * 2.0**level_log2
    if tensors == 2:
        steps[n // 2 :] *= V_SCALE
    rms = np.sqrt(np.square(x, dtype=np.float64).mean(axis=2))  # [N, H, D]
    rms_floor = _relative_floor(rms.max(axis=-1, keepdims=True))
    log_rel = np.log2(np.maximum(rms, rms_floor))
    log_rel -= log_rel.mean(axis=-1, keepdims=True)
    codes = np.rint(CODE_STEPS_PER_OCTAVE * CHANNEL_GAMMA * log_rel)
    if rotary_prior and dim >= 4 and dim % 2 == 0:
        codes[: n // tensors] += rotary_codes(dim, rotary_prior)
    return fit_codes(x, steps.astype(np.float32), codes)


def _relative_floor(widest: np.ndarray) -> np.ndarray:
    """1e-3 of a head's widest channel statistic: no channel sets the head's step or code from
    much narrower than that. Relative at any scale (an absolute 1e-12 here made every fp32 head
    narrower than 1e-9 look constant); 1e-12 only where the head has no spread at all."""
    return np.where(widest > 0, widest * 1e-3, _CONSTANT_HEAD_STEP)


# Below this many tokens the fastest RoPE pairs have not turned enough to tell (assume rotate-half).
ROTARY_DETECT_TOKENS = 64
# Mean |ln(rms_c / rms_c+D/2)| over the fastest quarter of key pairs below which the keys look
# like rotate-half RoPE (see looks_rotate_half for what real models measure).
ROTARY_DETECT_LOG_RATIO = 0.1


def looks_rotate_half(keys: np.ndarray) -> bool:
    """Do ``keys`` [L, H, T, D] look like RoPE in the rotate-half layout (channel c paired with
    c + D/2)? A pair's rotation mixes its two channels, and the fastest pairs turn many times
    over a chunk, so their two channels end up with the same RMS: SmolLM2's keys (512 tokens)
    measure a mean |ln ratio| of 0.026 over the fastest quarter of pairs, its values (no RoPE)
    0.22. Too few tokens or an odd head_dim: True, the common layout."""
    tokens, dim = keys.shape[2], keys.shape[3]
    if tokens < ROTARY_DETECT_TOKENS or dim < 8 or dim % 2:
        return True
    half = dim // 2
    fast = half // 4
    rms = np.sqrt(np.square(keys, dtype=np.float64).mean(axis=2))  # [L, H, D]
    rms = np.maximum(rms, rms.max(axis=-1, keepdims=True) * 1e-6 + 1e-30)
    ratio = np.log(rms[..., :fast] / rms[..., half : half + fast])
    return float(np.abs(ratio).mean()) < ROTARY_DETECT_LOG_RATIO


def rotary_codes(dim: int, octaves: float) -> np.ndarray:
    """Step codes [dim] that refine key channels by rotary frequency index (rotate-half layout:
    channels c and c + dim/2 share index c mod dim/2; a higher index turns slower), mean ~0."""
    index = np.arange(dim) % (dim // 2)
    return np.rint(CODE_STEPS_PER_OCTAVE * octaves * (index / (dim // 2 - 1) - 0.5))


def fit_codes(x: np.ndarray, steps: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps (at least :data:`STEP_FLOOR`) and int8 codes with no channel so fine that its span
    exceeds the symbol range."""
    steps = np.maximum(steps.astype(np.float64), STEP_FLOOR)
    if x.shape[2]:
        span = (x.max(axis=2) - x.min(axis=2)).astype(np.float64)
        constant = span.max(axis=-1) == 0  # [N, H]
        steps = np.where(constant, np.maximum(steps, _CONSTANT_HEAD_STEP), steps)
        # zero points (value / step) must fit int32 too: constant channels far from 0
        coarsest_needed = np.maximum(span / _SPAN_LIMIT, np.abs(x).max(axis=2) / _ZERO_LIMIT)
        # the base step alone must cover what the coarsest code (x 2**32) cannot
        steps = np.maximum(steps, coarsest_needed.max(axis=-1) * 2.0**-31)
        ratio = np.maximum(coarsest_needed / steps[:, :, None], 1e-30)
        codes = np.minimum(codes, np.floor(-CODE_STEPS_PER_OCTAVE * np.log2(ratio)))
    return steps.astype(np.float32), np.clip(codes, -128, 127).astype(np.int8)


def quantize(
    x: np.ndarray, steps: np.ndarray, codes: np.ndarray, runs: tuple[tuple[int, int], ...] = ()
) -> Quantized:
    """Quantize float32 ``x`` [N, H, T, D] with base ``steps`` [N, H] and ``codes`` [N, H, D].

    ``runs``: (tokens, step code) along T (:func:`tail_runs`); a run's code is lowered where its
    finer steps would overflow the symbols, and the runs kept are in the result."""
    if x.ndim != 4 or steps.shape != x.shape[:2] or codes.shape != (*x.shape[:2], x.shape[3]):
        raise CodecError("quantize: shapes do not match")
    steps = np.maximum(steps.astype(np.float32), np.float32(STEP_FLOOR))
    if x.shape[2] == 0:
        zeros = np.zeros(codes.shape, np.int32)
        return Quantized(steps=steps, codes=codes, zeros=zeros, symbols=np.zeros(x.shape, np.int16))
    step = channel_steps(steps, codes)[:, :, None, :]
    scaled = x / step
    # the channel's mean, not its mid-range: the entropy stage's tables centre on 0 (1% smaller)
    zeros = np.rint(scaled.mean(axis=2, dtype=np.float64)).astype(np.int32)
    q = np.rint(scaled) - zeros[:, :, None, :]
    if q.size and np.abs(q).max() > SYMBOL_LIMIT:
        raise CodecError("quantization step too small for the value range")
    if runs:
        runs = _quantize_runs(x, q, step[:, :, 0, :], zeros, runs)
    return Quantized(steps=steps, codes=codes, zeros=zeros, symbols=q.astype(np.int16), runs=runs)


def _quantize_runs(
    x: np.ndarray, q: np.ndarray, step: np.ndarray, zeros: np.ndarray, runs: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], ...]:
    """Re-quantize ``q``'s token runs of nonzero code at their finer steps (in place)."""
    if sum(count for count, _ in runs) != x.shape[2] or len(runs) > MAX_TOKEN_RUNS:
        raise CodecError("token runs do not cover the tokens")
    offset = channel_offset(step, zeros)[:, :, None, :]
    kept = []
    for start, stop, code in run_spans(x.shape[2], runs):
        part = slice(start, stop)
        while code > 0:
            finer = np.rint((x[:, :, part, :] - offset) / run_step(step, code)[:, :, None, :])
            if np.abs(finer).max(initial=0) <= SYMBOL_LIMIT:
                q[:, :, part, :] = finer
                break
            code -= 1  # this run's values span too many of its steps: a little coarser
        kept.append((stop - start, max(code, 0)))
    return tuple(kept) if any(code for _, code in kept) else ()


def dequantize(q: Quantized) -> np.ndarray:
    """float32 [N, H, T, D] from the integers and side info (same arithmetic as the decoder's)."""
    step = channel_steps(q.steps, q.codes)
    offset = channel_offset(step, q.zeros)[:, :, None, :]
    values = q.symbols.astype(np.float32)
    for start, stop, code in run_spans(values.shape[2], q.runs):
        values[:, :, start:stop, :] *= run_step(step, code)[:, :, None, :]
    values += offset
    return values
