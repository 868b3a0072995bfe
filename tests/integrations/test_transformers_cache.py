"""The transformers hand-off on tiny random models (no weights to load): which caches convert
to kvpeer KV, and that a prefill really continues the cache it is given."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import torch

from kvpeer.api import messages as m
from kvpeer.api.client import KVPeerClient
from kvpeer.errors import ApiError, ErrorCode
from kvpeer.hashing import ModelFingerprint, chunk_keys
from kvpeer.integrations import _daemon
from kvpeer.integrations import transformers as hf
from tests.api.fakes import ScriptedDaemon, send, serving

transformers = pytest.importorskip("transformers")


def tiny(kind: str, **extra: Any) -> Any:
    common = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    if kind == "mistral":
        config = transformers.MistralConfig(**common, **extra)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common, **extra)
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    return model.eval()


def test_full_attention_cache_converts_with_every_position() -> None:
    model = tiny("llama")
    out = hf.prefill(model, list(range(1, 41)))
    k, v = hf.kv_from_cache(hf.cache_of(out))
    assert k.shape == v.shape == (2, 2, 40, 8)


def test_a_sliding_window_cache_past_its_window_is_refused_not_stored_as_the_wrong_positions() -> None:
    model = tiny("mistral", sliding_window=16)
    cache = hf.cache_of(hf.prefill(model, list(range(1, 41))))  # past the window: it keeps the last 15
    with pytest.raises(ValueError, match="sliding-window layer holds only the last"):
        hf.kv_from_cache(cache)


def test_a_sliding_window_cache_within_its_window_holds_every_position() -> None:
    model = tiny("mistral", sliding_window=64)
    k, _ = hf.kv_from_cache(hf.cache_of(hf.prefill(model, list(range(1, 41)))))
    full, _ = hf.kv_from_cache(hf.cache_of(hf.prefill(tiny("llama"), list(range(1, 41)))))
    assert k.shape == full.shape == (2, 2, 40, 8)


class NoDaemon:
    """A client whose daemon is down: fetches (on the helpers' own connection to its socket)
    fail, puts are recorded."""

    socket_path = "/nonexistent/kvpeer.sock"
    namespace = "default"
    timeout_s = 1.0
    client_name = "test"
    closed = False

    def __init__(self) -> None:
        self.puts: list[int] = []

    def on_close(self, callback: Any) -> None:
        pass

    def put(self, tokens: list[int], *args: Any, **kwargs: Any) -> None:
        self.puts.append(len(tokens))


class Tokenizer:
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def test_generate_with_put_on_a_sliding_window_model_answers_and_shares_nothing() -> None:
    model = tiny("mistral", sliding_window=16)
    client = NoDaemon()
    fp = ModelFingerprint(name="tiny", layers=2, kv_heads=2, head_dim=8, dtype="float32")
    text, matched = hf.generate_with_kvpeer(
        client, model, Tokenizer(), list(range(1, 41)), fp, max_new_tokens=4, put=True  # type: ignore[arg-type]
    )
    assert matched == 0 and len(text.split()) == 4
    assert client.puts == []


def test_a_full_attention_model_still_puts_after_generating() -> None:
    model = tiny("llama")
    client = NoDaemon()
    fp = ModelFingerprint(name="tiny", layers=2, kv_heads=2, head_dim=8, dtype="float32")
    hf.generate_with_kvpeer(client, model, Tokenizer(), list(range(1, 41)), fp, max_new_tokens=4, put=True)  # type: ignore[arg-type]
    assert client.puts == [40]


class Recorder(NoDaemon):
    """A daemon that holds the first ``held`` tokens' chunks (a fetch restores them) and records
    each put's tokens, kv_from and KV length; ``older``: it refuses kv_from as unknown."""

    def __init__(self, held: int, older: bool = False) -> None:
        super().__init__()
        self.held, self.older = held, older
        self.calls: list[tuple[int, int, int]] = []

    def put(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor, fp: Any, kv_from: int = 0) -> None:
        if kv_from and self.older:
            raise ApiError(ErrorCode.INVALID, "put: unknown fields ['kv_from']")
        self.calls.append((len(tokens), kv_from, k.shape[2]))


@pytest.mark.parametrize("older", [False, True])
def test_generate_puts_only_the_kv_past_the_fetched_prefix(monkeypatch: pytest.MonkeyPatch, older: bool) -> None:
    model = tiny("llama")
    prompt = list(range(1, 41))
    full = hf.cache_of(hf.prefill(model, prompt[:16]))
    monkeypatch.setattr(hf, "_fetch_cache", lambda *args: hf._Fetched(full, 16))
    client = Recorder(held=16, older=older)
    fp = ModelFingerprint(name="tiny", layers=2, kv_heads=2, head_dim=8, dtype="float32")
    hf.generate_with_kvpeer(client, model, Tokenizer(), prompt, fp, max_new_tokens=4, put=True)  # type: ignore[arg-type]
    # The fetched 16 tokens' KV is the daemon's already; an older daemon gets the whole prompt.
    assert client.calls == ([(40, 0, 40)] if older else [(40, 16, 24)])


def test_prefill_continues_the_given_cache_and_says_so_when_the_model_ignores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny("llama")
    cache = hf.cache_of(hf.prefill(model, list(range(1, 21))))
    assert hf.cache_of(hf.prefill(model, [21, 22], cache)).get_seq_length() == 22
    # A transformers that renamed the argument again: the model would take the old name
    # silently and compute the rest without its prefix.
    monkeypatch.setattr(hf, "cache_argument", lambda model: "past_key_valuez")
    with pytest.raises(RuntimeError, match="did not continue the given cache"):
        hf.prefill(model, [23], cache)


class HelloOnly(ScriptedDaemon):
    """A hung daemon: its socket accepts and it said hello, but no request is ever answered."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.Hello):
            super().handle(conn, index, message)


def test_a_fetch_from_a_hung_daemon_waits_past_its_deadline_once_then_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client waited its own timeout (60 s) for every fetch, whatever the deadline."""
    monkeypatch.setattr(hf, "FETCH_BACKOFF_S", 0.3)
    model = tiny("llama")
    fp = ModelFingerprint(name="tiny", layers=2, kv_heads=2, head_dim=8, dtype="float32")
    prompt = list(range(1, 41))
    with HelloOnly() as daemon, KVPeerClient(daemon.socket_path) as client:
        started = time.monotonic()
        cache, matched = hf.fetch_cache(client, model, prompt, fp, deadline_s=0.5)
        assert matched == 0 and cache.get_seq_length() == 0
        assert time.monotonic() - started < 0.5 + hf.ANSWER_GRACE_S + 1.0
        started = time.monotonic()
        assert hf.fetch_cache(client, model, prompt, fp, deadline_s=0.5)[1] == 0  # backing off
        assert time.monotonic() - started < 0.2 and len(daemon.received(m.FetchRequest)) == 1
        time.sleep(0.3)  # the back-off's period
        assert hf.fetch_cache(client, model, prompt, fp, deadline_s=0.5)[1] == 0
        fetched_on = [index for index, message in daemon.seen if isinstance(message, m.FetchRequest)]
        assert len(fetched_on) == 2 and fetched_on[0] != fetched_on[1]  # the hung connection was dropped


TINY_FP = ModelFingerprint(name="tiny", layers=2, kv_heads=2, head_dim=8, dtype="float32")


def test_a_split_fetch_prefills_the_head_here_and_puts_the_fetched_rest_after_it() -> None:
    model = tiny("llama")
    prompt = list(range(1, 41))
    with serving(chunk_tokens=16) as api, KVPeerClient(api.socket_path) as client:
        hf.prefill_and_put(client, model, prompt, TINY_FP)  # chunks 0 and 1
        api.backend.split_head = 1
        cache, matched = hf.fetch_cache(client, model, prompt, TINY_FP, split=True, recompute_tokens_per_s=1e3)
        request = api.backend.requests[-1]
        assert isinstance(request, m.FetchRequest) and request.split and request.recompute_tokens_per_s == 1e3
    assert matched == 32 and cache.get_seq_length() == 32  # chunk 0 prefilled here, chunk 1 fetched
    k, v = hf.kv_from_cache(cache)
    k0, v0 = hf.kv_from_cache(hf.cache_of(hf.prefill(model, prompt[:32])))
    assert torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
    assert hf.greedy_continue(model, prompt, cache, matched, 6) == hf.greedy_continue(model, prompt, None, 0, 6)


class RefusesSplit(ScriptedDaemon):
    """A daemon from before split fetches: it refuses the field, and holds nothing."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.FetchRequest):
            if message.split:
                send(conn, m.ErrorResponse(id=message.id, code=ErrorCode.INVALID,
                                           reason="fetch: unknown fields ['split']"))
            else:
                send(conn, m.FetchResult(id=message.id, chunk_tokens=16))
        else:
            super().handle(conn, index, message)


def test_a_split_asked_of_a_daemon_from_before_splits_is_a_plain_fetch() -> None:
    model = tiny("llama")
    with RefusesSplit() as daemon, KVPeerClient(daemon.socket_path) as client:
        cache, matched = hf.fetch_cache(client, model, list(range(1, 41)), TINY_FP, split=True)
        assert (matched, cache.get_seq_length()) == (0, 0)
        assert [request.split for request in daemon.received(m.FetchRequest)] == [True, False]


@pytest.mark.parametrize("length", [50, 48])
def test_a_put_after_a_split_stores_the_head_prefilled_here(length: int) -> None:
    """The head was left to this model because this node does not hold it (a peer does): the
    put after generating must store it, even when the fetch covered the whole prompt."""
    model = tiny("llama")
    prompt = list(range(1, length + 1))
    with serving(chunk_tokens=16) as api, KVPeerClient(api.socket_path) as client:
        hf.prefill_and_put(client, model, prompt, TINY_FP)  # chunks 0..2
        first_key = chunk_keys(prompt, TINY_FP.digest(), "default", 16)[0]
        del api.backend.chunks[first_key]  # as if chunk 0 were only on a peer
        api.backend.split_head = 1
        _, matched = hf.generate_with_kvpeer(client, model, Tokenizer(), prompt, TINY_FP,  # type: ignore[arg-type]
                                             max_new_tokens=2, put=True, split=True, recompute_tokens_per_s=1e3)
        assert matched == 48 and first_key in api.backend.chunks
        # The head, and the prompt past what was restored; the restored chunks are not put back.
        puts = [(len(r.tokens), r.kv_from) for r in api.backend.requests if isinstance(r, m.PutRequest)]
        assert puts[1:] == ([(16, 0), (50, 48)] if length == 50 else [(16, 0)])


def test_a_split_fetch_of_kv_that_does_not_fit_the_model_is_refused_as_a_plain_one_is() -> None:
    model = tiny("llama")  # 2 layers
    one_layer = ModelFingerprint(name="tiny", layers=1, kv_heads=2, head_dim=8, dtype="float32")
    prompt = list(range(1, 33))
    k, v = hf.kv_from_cache(hf.cache_of(hf.prefill(model, prompt)))
    with serving(chunk_tokens=16) as api, KVPeerClient(api.socket_path) as client:
        client.put(prompt, k[:1].contiguous(), v[:1].contiguous(), one_layer)
        with pytest.raises(ValueError, match="does not fit"):
            hf.fetch_cache(client, model, prompt, one_layer)
        api.backend.split_head = 1
        with pytest.raises(ValueError, match="does not fit"):
            hf.fetch_cache(client, model, prompt, one_layer, split=True, recompute_tokens_per_s=1e3)


def test_a_daemon_from_before_splits_is_asked_for_one_once() -> None:
    model = tiny("llama")
    with RefusesSplit() as daemon, KVPeerClient(daemon.socket_path) as client:
        for _ in range(3):
            hf.fetch_cache(client, model, list(range(1, 41)), TINY_FP, split=True)
        assert [request.split for request in daemon.received(m.FetchRequest)] == [True, False, False, False]


def test_a_split_fetch_failing_after_the_head_keeps_the_head() -> None:
    model = tiny("llama")
    prompt = list(range(1, 41))
    with serving(chunk_tokens=16) as api, KVPeerClient(api.socket_path) as client:
        hf.prefill_and_put(client, model, prompt, TINY_FP)
        api.backend.split_head = 1
        api.backend.fail_after_allocate = True  # chunk 1 never comes
        cache, matched = hf.fetch_cache(client, model, prompt, TINY_FP, split=True, recompute_tokens_per_s=1e3)
    assert matched == 16 and cache.get_seq_length() == 16
    assert hf.greedy_continue(model, prompt, cache, matched, 4) == hf.greedy_continue(model, prompt, None, 0, 4)


def test_a_daemon_that_refused_a_split_is_asked_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused split was never asked again for the client's life, even of a daemon upgraded
    under it: the client reconnects after a restart without a failure to tell it so."""
    monkeypatch.setattr(_daemon, "ASK_AGAIN_S", 0.3)
    model = tiny("llama")
    prompt = list(range(1, 41))
    with RefusesSplit() as daemon, KVPeerClient(daemon.socket_path) as client:
        hf.fetch_cache(client, model, prompt, TINY_FP, split=True)
        hf.fetch_cache(client, model, prompt, TINY_FP, split=True)  # not asked meanwhile
        assert [request.split for request in daemon.received(m.FetchRequest)] == [True, False, False]
        (fetched_on,) = {index for index, message in daemon.seen if isinstance(message, m.FetchRequest)}
        daemon.drop(fetched_on)  # as the daemon does when it stops (for an upgrade, say)
        time.sleep(0.3)
        hf.fetch_cache(client, model, prompt, TINY_FP, split=True)
        assert [request.split for request in daemon.received(m.FetchRequest)][3:] == [True, False]
