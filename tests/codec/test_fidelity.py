"""The default level keeps SmolLM2's next-token distribution (KL bound), measured end to end."""

from __future__ import annotations

import pytest
import torch

from kvpeer import codec
from tests.conftest import LoadedModel

pytestmark = [pytest.mark.model, pytest.mark.slow]

KL_BOUND_DEFAULT = 2e-4  # README: q8 measures ~4e-5 over 1,024 positions; 128 here are noisier


def test_default_level_kl_bound(smollm2: LoadedModel) -> None:
    from benchmarks import _kv

    model, tok = smollm2.model, smollm2.tokenizer
    torch.set_num_threads(2)
    (window,) = _kv.windows(tok, _kv.evaluation_text(), 256, 128, 1)
    k, v = _kv.prefix_kv(model, window.prefix)
    ref = _kv.continuation_logprobs(model, k, v, window.continuation)
    kl = {}
    for level in (codec.DEFAULT_LEVEL, "q4"):
        k2, v2 = codec.decode(codec.encode(k.half(), v.half(), level))
        test = _kv.continuation_logprobs(model, k2.float(), v2.float(), window.continuation)
        kl[level] = _kv.mean_kl(ref, test)
    assert kl[codec.DEFAULT_LEVEL] <= KL_BOUND_DEFAULT
    assert kl["q4"] > kl[codec.DEFAULT_LEVEL]


def test_tail_steps_lower_the_continuations_kl(smollm2: LoadedModel) -> None:
    """A prefix encoded with tail steps (the plain call) keeps its continuation closer than one
    without them (README: 0.3-0.5x the KL over 1,024 positions for 6-13% more bytes)."""
    from benchmarks import _kv

    model, tok = smollm2.model, smollm2.tokenizer
    torch.set_num_threads(2)
    (window,) = _kv.windows(tok, _kv.evaluation_text(), 256, 128, 1)
    k, v = _kv.prefix_kv(model, window.prefix)
    ref = _kv.continuation_logprobs(model, k, v, window.continuation)
    kl, size = {}, {}
    for tail in (False, True):
        blob = codec.encode(k.half(), v.half(), "q5", tail=tail)
        k2, v2 = codec.decode(blob)
        kl[tail] = _kv.mean_kl(ref, _kv.continuation_logprobs(model, k2.float(), v2.float(), window.continuation))
        size[tail] = len(blob)
    assert size[True] > size[False]
    assert kl[True] < 0.8 * kl[False]


def test_shipped_profile_lowers_kl_at_equal_size(smollm2: LoadedModel) -> None:
    """The daemon's path (profile = the model's fingerprint hex) beats the plain call at q6 (README: 0.5x)."""
    from benchmarks import _kv
    from kvpeer.codec import profile as profiles

    model, tok = smollm2.model, smollm2.tokenizer
    torch.set_num_threads(2)
    fingerprint = smollm2.fingerprint.hex
    assert profiles.load(fingerprint) is not None, "no shipped profile for load_model()'s fingerprint"
    (window,) = _kv.windows(tok, _kv.evaluation_text(), 256, 128, 1)
    k, v = _kv.prefix_kv(model, window.prefix)
    ref = _kv.continuation_logprobs(model, k, v, window.continuation)
    kl, size = {}, {}
    for name, profile in (("plain", None), ("profile", fingerprint)):
        blob = codec.encode(k.half(), v.half(), "q6", profile=profile)
        k2, v2 = codec.decode(blob)  # no profile needed to decode
        size[name] = len(blob)
        kl[name] = _kv.mean_kl(ref, _kv.continuation_logprobs(model, k2.float(), v2.float(), window.continuation))
    assert kl["profile"] < kl["plain"], kl
    assert abs(size["profile"] / size["plain"] - 1) < 0.03, size
