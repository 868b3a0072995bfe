"""transformers integration with SmolLM2: fetched KV continues generation exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvpeer.api.client import KVPeerClient
from kvpeer.integrations.transformers import (
    cache_from_kv,
    fetch_cache,
    generate,
    generate_with_kvpeer,
    greedy_continue,
    kv_from_cache,
    prefill,
    prefill_and_put,
)
from tests.api.fakes import ServerThread, serving

pytestmark = pytest.mark.model

CHUNK = 256
STEPS = 12


@pytest.fixture(scope="module")
def api() -> Iterator[ServerThread]:
    with serving(chunk_tokens=CHUNK) as server:
        yield server


@pytest.fixture(scope="module")
def prompt(smollm2) -> list[int]:  # type: ignore[no-untyped-def]
    text = (Path(__file__).parents[2] / "examples" / "data" / "handbook.txt").read_text()
    return [int(t) for t in smollm2.tokenizer(text)["input_ids"][:600]]


def test_kv_cache_conversion_round_trips(smollm2, prompt: list[int]) -> None:  # type: ignore[no-untyped-def]
    k, v = kv_from_cache(prefill(smollm2.model, prompt[:40]).past_key_values)
    fp = smollm2.fingerprint
    assert k.shape == (fp.layers, fp.kv_heads, 40, fp.head_dim) == v.shape
    cache = cache_from_kv(k, v, smollm2.model)
    k2, v2 = kv_from_cache(cache)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    # The cache owns its memory: the source (a fetched segment) may go away.
    k.zero_()
    assert torch.equal(kv_from_cache(cache)[0], k2)


def test_generation_from_fetched_kv_equals_plain_generation(
    smollm2, api: ServerThread, prompt: list[int]
) -> None:  # type: ignore[no-untyped-def]
    model, fp = smollm2.model, smollm2.fingerprint
    with KVPeerClient(api.socket_path, namespace="gen") as client:
        put = prefill_and_put(client, model, prompt, fp)
        assert (put.chunks, put.stored) == (2, 2)
        cache, matched = fetch_cache(client, model, prompt, fp)
    assert matched == 512 and cache.get_seq_length() == 512

    fetched = greedy_continue(model, prompt, cache, matched, STEPS)
    local_cache = prefill(model, prompt[:512]).past_key_values
    assert fetched == greedy_continue(model, prompt, local_cache, 512, STEPS)
    plain = greedy_continue(model, prompt, None, 0, STEPS)  # the whole prompt, no cache
    assert fetched == plain


def test_generation_after_a_split_fetch_equals_plain_generation(
    smollm2, api: ServerThread, prompt: list[int]
) -> None:  # type: ignore[no-untyped-def]
    """The daemon leaves the first chunk to the model, which prefills it while the second comes."""
    model, fp = smollm2.model, smollm2.fingerprint
    with KVPeerClient(api.socket_path, namespace="split") as client:
        prefill_and_put(client, model, prompt, fp)
        api.backend.split_head = 1
        try:
            cache, matched = fetch_cache(client, model, prompt, fp, split=True, recompute_tokens_per_s=500.0)
        finally:
            api.backend.split_head = 0
    assert matched == 2 * CHUNK and cache.get_seq_length() == 2 * CHUNK
    assert greedy_continue(model, prompt, cache, matched, STEPS) == greedy_continue(model, prompt, None, 0, STEPS)


def test_partial_match_computes_the_rest(smollm2, api: ServerThread, prompt: list[int]) -> None:  # type: ignore[no-untyped-def]
    model, fp, tok = smollm2.model, smollm2.fingerprint, smollm2.tokenizer
    shared = prompt[:300]  # one full chunk is shared ...
    question = shared + tok(" Question: when must the dome stay closed?")["input_ids"]
    with KVPeerClient(api.socket_path, namespace="partial") as client:
        prefill_and_put(client, model, shared, fp)
        text, matched = generate_with_kvpeer(client, model, tok, question, fp, max_new_tokens=STEPS)
        assert matched == CHUNK  # ... the rest of the prompt was computed here
        assert text == generate(model, tok, question, None, 0, STEPS)


def test_prompt_fully_covered_by_chunks_still_generates(
    smollm2, api: ServerThread, prompt: list[int]
) -> None:  # type: ignore[no-untyped-def]
    model, fp, tok = smollm2.model, smollm2.fingerprint, smollm2.tokenizer
    exact = prompt[:CHUNK]
    with KVPeerClient(api.socket_path, namespace="full") as client:
        first, matched0 = generate_with_kvpeer(
            client, model, tok, exact, fp, max_new_tokens=STEPS, put=True
        )
        second, matched1 = generate_with_kvpeer(client, model, tok, exact, fp, max_new_tokens=STEPS)
    assert (matched0, matched1) == (0, CHUNK)
    assert first == second


def test_fetch_cache_connections_end_with_the_client_and_are_kept_per_deadline(
    smollm2, api: ServerThread, prompt: list[int]
) -> None:  # type: ignore[no-untyped-def]
    """The helpers' own fetch connection outlived the client (close() left it open, and
    fetch_cache on the closed client still restored; abort() did not stop a blocked fetch),
    and each new deadline dropped it and connected again."""
    from kvpeer.errors import ApiError
    from kvpeer.integrations import transformers as hf

    client = KVPeerClient(api.socket_path, namespace="closing")
    _, first = hf._fetches_for(client, 1.0)
    _, other = hf._fetches_for(client, 2.0)
    _, back = hf._fetches_for(client, 1.0)
    assert back is first and other is not first  # one per timeout, kept
    first.client()  # connected
    client.close()
    with pytest.raises(ApiError):
        first.client()  # ended with the client, for good
    with pytest.raises(ApiError):  # as client.lookup on it would
        fetch_cache(client, smollm2.model, prompt, smollm2.fingerprint, deadline_s=1.0)
