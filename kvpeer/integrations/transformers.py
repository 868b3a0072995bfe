"""kvpeer for Hugging Face transformers: KV out of a prefill, fetched KV into the model's cache.

Owns the conversion between kvpeer's canonical KV (``k``, ``v``: ``[layers, kv_heads, tokens,
head_dim]``) and transformers' cache objects (``DynamicCache``: one layer per decoder layer,
``keys``/``values`` ``[batch, kv_heads, tokens, head_dim]``), and small helpers that prefill and
put, fetch into a cache, and continue generation from the longest shared prefix. Works with
any decoder-only model on the standard dynamic cache (a sliding-window layer past its window
keeps only the window: such KV is refused, never shared); batch size 1.
transformers 4.56 or later (``DynamicCache(config=)`` and cache ``layers``).

transformers is imported lazily: importing this module does not need it.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpeer.api.client import KVPeerClient
from kvpeer.api.messages import PutResult
from kvpeer.errors import ApiError, ErrorCode, KVPeerError
from kvpeer.hashing import ModelFingerprint
from kvpeer.integrations._daemon import (
    ANSWER_GRACE_S,
    ASK_AGAIN_S,
    Backoff,
    DaemonConnection,
    RefusedFields,
    daemon_away,
    refused_field,
)

log = logging.getLogger(__name__)

FETCH_BACKOFF_S = 10.0  # after the daemon failed to answer a fetch, how long fetches are skipped


def kv_from_cache(cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` ``[layers, kv_heads, tokens, head_dim]`` of a batch-1 cache (copies once).

    Accepts a transformers ``Cache`` with ``.layers`` (4.56+), or the legacy tuple of
    ``(key, value)`` per layer. A sliding-window layer past its window is refused (ValueError): it
    holds only the last positions, which would be stored as the prefix's first ones.
    """
    if hasattr(cache, "layers"):
        pairs = []
        for layer in cache.layers:
            keys, values = layer.keys, layer.values
            if keys is not None and keys.dim() == 4:
                seen = int(layer.get_seq_length())
                if getattr(layer, "is_sliding", False) and keys.shape[-2] < seen:
                    raise ValueError(
                        f"a sliding-window layer holds only the last {keys.shape[-2]} of {seen} "
                        "positions, and kvpeer shares the KV of every position of a prefix"
                    )
                keys, values = keys[:, :, :seen], values[:, :, :seen]  # a static layer is longer
            pairs.append((keys, values))
    else:
        pairs = [(layer[0], layer[1]) for layer in cache]
    if not pairs or any(k is None or k.dim() != 4 for k, _ in pairs):
        raise ValueError("cache has no (initialized) layers of [batch, heads, tokens, dim]")
    if any(k.shape[0] != 1 for k, _ in pairs):
        raise ValueError("only batch size 1 caches convert to kvpeer KV")
    k = torch.stack([key[0] for key, _ in pairs])
    v = torch.stack([value[0] for _, value in pairs])
    return k, v


def cache_from_kv(k: torch.Tensor, v: torch.Tensor, model: Any) -> Any:
    """A ``DynamicCache`` for ``model`` holding ``k``/``v`` (copied: the cache owns its memory,
    so a fetched segment can be released right after)."""
    from transformers import DynamicCache

    return append_kv(DynamicCache(config=model.config), k, v, model)


def append_kv(cache: Any, k: torch.Tensor, v: torch.Tensor, model: Any) -> Any:
    """Append ``k``/``v`` (``[layers, kv_heads, tokens, head_dim]``) after what ``cache`` holds,
    copied (a split fetch's restored KV after the head the model prefilled); returns ``cache``."""
    _check_fits(k, v, model)
    param = next(model.parameters())
    for index in range(k.shape[0]):
        keys, values = cache.update(
            k[index].unsqueeze(0).to(device=param.device, dtype=param.dtype),
            v[index].unsqueeze(0).to(device=param.device, dtype=param.dtype),
            index,
        )
        # DynamicCache.update concatenates (one copy: a second one here would double the work
        # of a 2,048-token restore); a cache that kept the given tensors instead would still
        # point into the shared-memory segment the client is about to release.
        layer: Any = cache.layers[index]
        if _shares_memory(keys, k) or _shares_memory(values, v):
            layer.keys, layer.values = keys.clone(), values.clone()
    return cache


def _check_fits(k: torch.Tensor, v: torch.Tensor, model: Any) -> None:
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != layers:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not fit a model of {layers} layers")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _tokens(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        return [int(t) for t in tokens.reshape(-1).tolist()]
    return [int(t) for t in tokens]


def cache_argument(model: Any) -> str:
    # transformers 5 names it ``cache``; ``past_key_values`` is a deprecated alias there, and a
    # model's forward takes unknown keywords silently: once the alias goes, the cache would be
    # ignored and the prompt's rest computed without its prefix.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The cache a forward pass returned (``output.cache`` in transformers 5, else
    ``output.past_key_values``)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def prefill(model: Any, tokens: Sequence[int] | torch.Tensor, cache: Any = None) -> Any:
    """Run the model over ``tokens`` (continuing ``cache`` if given); returns its output
    (:func:`cache_of` gives its cache)."""
    ids = torch.tensor([_tokens(tokens)], device=next(model.parameters()).device)
    before = cache.get_seq_length() if cache is not None else 0
    with torch.no_grad():
        output = model(ids, use_cache=True, **{cache_argument(model): cache})
    after = cache_of(output).get_seq_length()
    if after != before + ids.shape[1]:
        raise RuntimeError(
            f"the model did not continue the given cache ({before} + {ids.shape[1]} tokens "
            f"gave {after}): this transformers version passes the cache another way"
        )
    return output


def prefill_and_put(
    client: KVPeerClient,
    model: Any,
    tokens: Sequence[int] | torch.Tensor,
    fingerprint: ModelFingerprint,
    level: str | None = None,
) -> PutResult:
    """Prefill ``tokens`` and put their KV into the daemon (full chunks are stored)."""
    output = prefill(model, tokens)
    k, v = kv_from_cache(cache_of(output))
    return client.put(_tokens(tokens), k, v, fingerprint, level=level)


#: Connections kept per client, one per timeout (the blocking client's timeout is per connection).
FETCH_CONNECTIONS = 4


@dataclass(slots=True, kw_only=True)
class _Fetches:
    """The fetch helpers' own connections to a client's daemon and namespace, one per timeout,
    and their back-off: the client's connection waits its own timeout (60 s by default), and
    cannot be dropped without closing the client for good. They end with the client."""

    connections: OrderedDict[float, DaemonConnection] = field(default_factory=OrderedDict)
    backoff: Backoff = field(default_factory=lambda: Backoff(FETCH_BACKOFF_S))
    refused: RefusedFields = field(default_factory=RefusedFields)  # fields the daemon predates

    def abort(self) -> None:
        with _fetches_lock:
            connections = list(self.connections.values())
        for connection in connections:
            connection.abort()


_fetches: weakref.WeakKeyDictionary[Any, _Fetches] = weakref.WeakKeyDictionary()
_fetches_lock = threading.Lock()


def _fetches_for(client: KVPeerClient, deadline_s: float | None) -> tuple[_Fetches, DaemonConnection]:
    """The client's fetch helpers' state, and the connection whose timeout fits ``deadline_s``."""
    timeout_s = deadline_s + ANSWER_GRACE_S if deadline_s else client.timeout_s
    with _fetches_lock:
        fetches = _fetches.get(client)
        if fetches is None:
            fetches = _fetches[client] = _Fetches()
            client.on_close(fetches.abort)
        connection = fetches.connections.pop(timeout_s, None) or _connection(client, timeout_s)
        fetches.connections[timeout_s] = connection  # the most recently used last
        for old_timeout, old in list(fetches.connections.items())[:-FETCH_CONNECTIONS]:
            if old.lock.acquire(blocking=False):  # one in use stays until it is idle
                try:
                    old.drop()
                finally:
                    old.lock.release()
                del fetches.connections[old_timeout]
    if client.closed:  # closed before its callback was set: these end with it all the same
        fetches.abort()
    return fetches, connection


def _connection(client: KVPeerClient, timeout_s: float) -> DaemonConnection:
    return DaemonConnection(client.socket_path, client.namespace or "default", timeout_s=timeout_s,
                            client_name=f"{client.client_name} fetches")


def fetch_cache(
    client: KVPeerClient,
    model: Any,
    tokens: Sequence[int] | torch.Tensor,
    fingerprint: ModelFingerprint,
    deadline_s: float | None = None,
    min_level: str | None = None,
    *,
    split: bool = False,
    recompute_tokens_per_s: float | None = None,
) -> tuple[Any, int]:
    """``(cache, matched_tokens)``: the longest available prefix of ``tokens`` as a cache.

    ``split``: where the daemon finds it sooner (a slow link), ``model`` prefills the prompt's
    first chunks here while the rest is fetched; the cache holds both, and ``matched_tokens``
    counts both (a fetch that fails after that keeps the prefilled head). ``recompute_tokens_per_s``:
    how fast ``model`` prefills here (the daemon splits only when it knows, from this or from
    puts stating their prefill time).
    Nothing available (or a daemon error, logged): an empty cache and 0. A daemon that cannot
    help must never stop generation, so errors here degrade to recomputation: the fetch goes on
    a connection of its own to ``client``'s daemon and namespace, whose wait ends
    :data:`ANSWER_GRACE_S` past ``deadline_s`` (without one, at the client's timeout); after
    the daemon failed to answer, fetches are skipped for :data:`FETCH_BACKOFF_S`. That
    connection (one per deadline) ends with ``client``; a closed client raises ApiError.
    """
    fetched = _fetch_cache(client, model, tokens, fingerprint, deadline_s, min_level, split,
                           recompute_tokens_per_s)
    return fetched.cache, fetched.matched


@dataclass(slots=True)
class _Fetched:
    cache: Any
    matched: int = 0  # tokens the cache holds
    head: int = 0  # ...of which this model prefilled the first ones (a split fetch)


def _fetch_cache(
    client: KVPeerClient, model: Any, tokens: Sequence[int] | torch.Tensor, fingerprint: ModelFingerprint,
    deadline_s: float | None, min_level: str | None, split: bool, recompute_tokens_per_s: float | None,
) -> _Fetched:
    """:func:`fetch_cache`, saying how much of the cache a split left to ``model``."""
    from transformers import DynamicCache

    if client.closed:  # as any call on a closed client: not a daemon to back off from
        raise ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")
    fetches, connection = _fetches_for(client, deadline_s)
    got = _Fetched(DynamicCache(config=model.config))  # what a failure leaves
    if not fetches.backoff.allows(time.monotonic()):
        return got
    split = split and fetches.refused.takes("split", time.monotonic())
    try:
        with connection.lock:
            ids = _tokens(tokens)
            fetch, split = _start_fetch(connection, fetches, ids, fingerprint, deadline_s, min_level,
                                        recompute_tokens_per_s, split)
            # A timed-out connection is dropped before the handle's release, which would read
            # on for the fetch's final answer.
            with fetch as result, connection.dropped_on_timeout():
                if split:
                    first = result.wait_first_token()
                    if first < len(ids):  # (the prompt's length: nothing will be restored)
                        # Prefilled while the daemon restores the rest; kept if that fails.
                        got = _Fetched(_prefill_head(model, ids[:first]), first, first)
                        result.wait()
                        _append_restored(got, result, model)
                else:
                    matched = result.matched_tokens
                    if matched:
                        got = _Fetched(cache_from_kv(result.k, result.v, model), matched)
    except (KVPeerError, OSError) as exc:
        if client.closed:  # closed or aborted meanwhile, by the caller: no daemon trouble
            return got
        if not daemon_away(exc):
            log.warning("kvpeer fetch failed (%s); computing the prompt past %d tokens", exc, got.matched)
        elif fetches.backoff.failed(time.monotonic()):
            log.warning("kvpeer daemon did not answer a fetch (%s): computing prompts without it, "
                        "trying again every %g s", exc, FETCH_BACKOFF_S)
        else:
            log.debug("kvpeer daemon still not answering a fetch: %s", exc)
        return got
    if fetches.backoff.succeeded():
        log.info("kvpeer daemon answers fetches again")
    return got


def _start_fetch(
    connection: DaemonConnection, fetches: _Fetches, ids: list[int], fingerprint: ModelFingerprint,
    deadline_s: float | None, min_level: str | None, recompute_tokens_per_s: float | None, split: bool,
) -> tuple[Any, bool]:
    """The fetch handle and whether it is a split; a split asked of a daemon that predates it
    (it refuses the field, at once) becomes a plain fetch, and this client's fetches ask for
    none for :data:`~kvpeer.integrations._daemon.ASK_AGAIN_S`."""
    def start(split: bool) -> Any:
        return connection.client().fetch(ids, fingerprint, deadline_s=deadline_s, min_level=min_level,
                                         recompute_tokens_per_s=recompute_tokens_per_s, split=split)

    fetch = start(split)
    if not split:
        return fetch, False
    try:
        with connection.dropped_on_timeout():
            fetch.wait_first_token()
    except ApiError as exc:
        fetch.release(wait=False)
        if not refused_field(exc, "split"):
            raise
        if fetches.refused.refused("split", time.monotonic()):
            log.info("the kvpeer daemon predates split fetches: fetching whole prefixes (asking "
                     "again every %g s)", ASK_AGAIN_S)
        return start(False), False
    except BaseException:
        fetch.release(wait=False)
        raise
    return fetch, True


def _prefill_head(model: Any, ids: list[int]) -> Any:
    from transformers import DynamicCache

    return cache_of(prefill(model, ids)) if ids else DynamicCache(config=model.config)


def _append_restored(got: _Fetched, result: Any, model: Any) -> None:
    """Put a split fetch's restored KV (tokens ``[got.matched, matched_tokens)``) after the head."""
    if result.matched_tokens <= got.matched:
        return  # nothing (more) restored: the rest of the prompt is the model's
    append_kv(got.cache, result.k, result.v, model)
    got.matched = result.matched_tokens


def greedy_continue(
    model: Any,
    tokens: Sequence[int] | torch.Tensor,
    cache: Any,
    matched: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[int]:
    """Greedy continuation of ``tokens`` from a cache that holds their first ``matched`` tokens.

    Only ``tokens[matched:]`` are computed. A cache holding the whole prompt is cut back by
    one token: the last prompt token must run to give the first new token's logits.
    """
    ids = _tokens(tokens)
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    if matched >= len(ids):
        extra = cache.get_seq_length() - (len(ids) - 1)
        matched = len(ids) - 1
        if extra > 0:
            cache.crop(-extra)  # negative: "remove this many" (transformers 4.x and 5.x agree)
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    output = prefill(model, ids[matched:], cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(output.logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stops:
            break
        output = prefill(model, [nxt], cache_of(output))
    return out


def generate(
    model: Any,
    tokenizer: Any,
    tokens: Sequence[int] | torch.Tensor,
    cache: Any,
    matched: int,
    max_new_tokens: int = 32,
) -> str:
    """Greedy answer text for ``tokens``, from a cache holding their first ``matched`` tokens."""
    out = greedy_continue(
        model, tokens, cache, matched, max_new_tokens, eos_token_id=tokenizer.eos_token_id
    )
    return str(tokenizer.decode(out, skip_special_tokens=True))


def generate_with_kvpeer(
    client: KVPeerClient,
    model: Any,
    tokenizer: Any,
    tokens: Sequence[int] | torch.Tensor,
    fingerprint: ModelFingerprint,
    max_new_tokens: int = 32,
    deadline_s: float | None = None,
    put: bool = False,
    *,
    split: bool = False,
    recompute_tokens_per_s: float | None = None,
) -> tuple[str, int]:
    """Fetch the longest shared prefix, compute only the rest, answer: ``(text, matched)``.

    ``put=True`` also stores the prompt's KV afterwards (taken from the cache generation
    filled, not recomputed), for the next engine that needs it: the KV past the fetched prefix,
    which the daemon holds already (``kv_from``). ``split``, ``recompute_tokens_per_s``: as
    :func:`fetch_cache`'s (``matched`` then counts the tokens prefilled here while the rest
    was fetched).
    """
    fetched = _fetch_cache(client, model, tokens, fingerprint, deadline_s, None, split, recompute_tokens_per_s)
    cache, matched = fetched.cache, fetched.matched
    ids = _tokens(tokens)
    text = generate(model, tokenizer, ids, cache, matched, max_new_tokens)
    if put and (matched < len(ids) or fetched.head):
        try:
            k, v = kv_from_cache(cache)
        except ValueError as exc:
            log.warning("kvpeer put failed (%s); the prefix is not shared", exc)
            return text, matched
        head = fetched.head
        # A split's head was left to this model because this node does not hold it. The chunks
        # restored after it are not put: decoded KV is not this node's own (the fetch keeps the
        # blobs it brought, as far as the store takes them).
        if head:
            _put_logged(lambda: client.put(ids[:head], k[:, :, :head], v[:, :, :head], fingerprint))
        if matched < len(ids):
            _put_logged(lambda: _put_from(client, ids, k, v, fingerprint, matched))
    return text, matched


def _put_logged(put: Callable[[], object]) -> None:
    try:
        put()
    except (KVPeerError, ValueError) as exc:
        log.warning("kvpeer put failed (%s); the prefix is not shared", exc)


def _put_from(
    client: KVPeerClient, ids: list[int], k: torch.Tensor, v: torch.Tensor, fingerprint: ModelFingerprint,
    kv_from: int,
) -> None:
    """Put the KV of ``ids`` from token ``kv_from`` on (``k``/``v`` hold it all); a daemon that
    predates kv_from (it refuses the field) is given the whole prompt."""
    end = len(ids)
    try:
        client.put(ids, k[:, :, kv_from:end], v[:, :, kv_from:end], fingerprint, kv_from=kv_from)
    except ApiError as exc:
        if not kv_from or not refused_field(exc, "kv_from"):
            raise
        client.put(ids, k[:, :, :end], v[:, :, :end], fingerprint)
