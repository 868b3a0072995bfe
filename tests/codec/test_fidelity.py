"""The default level keeps SmolLM2's next-token distribution (KL bound), measured end to end."""

from __future__ import annotations

import pytest
import torch

from kvpeer import codec

pytestmark = [pytest.mark.model, pytest.mark.slow]

KL_BOUND_DEFAULT = 2e-4  # README: q8 measures ~8e-5 over 1,024 positions; 128 here are noisier


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    pytest.importorskip("transformers")
    from kvpeer.models import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_default_level_kl_bound(smollm2: tuple[object, object]) -> None:
    from benchmarks import _kv

    model, tok = smollm2
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
