"""vLLM connector: block <-> chunk mapping, paged layouts, and both connector halves against a
real daemon socket (vLLM itself does not install here; its request objects are stand-ins)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvpeer.api import messages as m
from kvpeer.api.client import KVPeerClient
from kvpeer.errors import ConfigError, ErrorCode, ProtocolError
from kvpeer.integrations import _daemon
from kvpeer.integrations.vllm import (
    LAYOUTS,
    BlockChunkMap,
    DaemonWaits,
    KVPeerConnector,
    KVPeerConnectorMetadata,
    SaveSpec,
    layer_index,
    read_paged,
    write_paged,
)
from tests.api.fakes import ServerThread, serving

BLOCK, CHUNK, LAYERS, HEADS, DIM, NUM_BLOCKS = 4, 16, 2, 3, 8, 32


def test_block_chunk_arithmetic() -> None:
    bmap = BlockChunkMap(block_size=16, chunk_tokens=256)
    assert bmap.blocks_per_chunk == 16
    assert bmap.loadable_tokens(prompt_len=600, matched_tokens=512) == 512
    assert bmap.loadable_tokens(prompt_len=512, matched_tokens=512) == 256  # keep 1 token to compute
    assert bmap.loadable_tokens(prompt_len=600, matched_tokens=300) == 256
    assert bmap.new_matched_tokens(600, num_computed=128, matched_tokens=512) == 384
    assert bmap.new_matched_tokens(600, num_computed=512, matched_tokens=512) == 0
    assert bmap.saveable_tokens(600) == 512
    assert bmap.blocks(list(range(100, 140)), 32, 64) == [102, 103]
    assert bmap.chunk_span(1, 300, 512) == (300, 512) and bmap.chunk_span(0, 300, 512) is None
    with pytest.raises(ValueError):
        bmap.blocks(list(range(4)), 0, 17)
    with pytest.raises(ConfigError):
        BlockChunkMap(block_size=48, chunk_tokens=256)
    assert layer_index("model.layers.12.self_attn.attn") == 12


def paged(layout: str) -> torch.Tensor:
    if layout == "blocks_heads_tokens_2d":
        return torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)
    return torch.zeros(2, NUM_BLOCKS, BLOCK, HEADS, DIM)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_write_read_round_trip(layout: str) -> None:
    blocks = [7, 2, 30, 11]
    k, v = torch.randn(HEADS, 16, DIM), torch.randn(HEADS, 16, DIM)
    cache = paged(layout)
    write_paged(cache, k, v, blocks, layout)
    k2, v2 = read_paged(cache, blocks, layout)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    # token 5 lives in the second block (id 2) at offset 1
    if layout == "blocks_heads_tokens_2d":
        assert torch.equal(cache[2, :, 1, :DIM], k[:, 5]) and torch.equal(cache[2, :, 1, DIM:], v[:, 5])
    else:
        assert torch.equal(cache[0, 2, 1], k[:, 5]) and torch.equal(cache[1, 2, 1], v[:, 5])
    untouched = [b for b in range(NUM_BLOCKS) if b not in blocks]
    assert read_paged(cache, untouched, layout)[0].abs().sum() == 0


# ----------------------------------------------------------------------------- connector halves


class FakeModelConfig:
    model = "tiny-vllm"
    revision = ""
    dtype = torch.float32
    hf_text_config = SimpleNamespace(rope_theta=10000.0, rope_scaling=None)

    def get_num_layers(self, parallel: Any) -> int:
        return LAYERS

    def get_num_kv_heads(self, parallel: Any) -> int:
        return HEADS

    def get_head_size(self) -> int:
        return DIM


def vllm_config(socket_path: object) -> Any:
    return SimpleNamespace(
        model_config=FakeModelConfig(),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(block_size=BLOCK),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={
            "kvpeer_socket": str(socket_path), "kvpeer_chunk_tokens": CHUNK, "kvpeer_level": "exact",
        }),
    )


def scheduler_output(req_id: str, tokens: list[int], block_ids: list[int], computed: int) -> Any:
    new = SimpleNamespace(req_id=req_id, prompt_token_ids=tokens, block_ids=(block_ids,),
                          num_computed_tokens=computed)
    cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                           num_scheduled_tokens={req_id: len(tokens) - computed})


@pytest.fixture
def api() -> Iterator[ServerThread]:
    with serving(chunk_tokens=CHUNK) as server:
        yield server


def engine(api: ServerThread, layout: str = LAYOUTS[0]) -> tuple[KVPeerConnector, dict[str, torch.Tensor]]:
    connector = KVPeerConnector(vllm_config(api.socket_path), SimpleNamespace(name="BOTH"))
    connector.layout = layout
    caches = {f"model.layers.{i}.self_attn.attn": paged(layout) for i in range(LAYERS)}
    connector.register_kv_caches(caches)
    return connector, caches


def request(req_id: str, tokens: list[int]) -> Any:
    return SimpleNamespace(request_id=req_id, prompt_token_ids=tokens)


def daemon_client(api: ServerThread) -> KVPeerClient:
    """Another client of the test daemon, to put or evict behind the engines' backs."""
    return KVPeerClient(api.socket_path, client_name="test")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_prefix_is_loaded_into_another_engines_blocks(api: ServerThread, layout: str) -> None:
    prompt = list(range(1000, 1040))  # 40 tokens: 2 whole chunks of 16
    truth_k, truth_v = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)

    # Engine A computes the prompt (we write its "computed" KV into its blocks) and saves it.
    a, a_caches = engine(api, layout)
    blocks_a = list(range(20, 30))
    assert a.get_num_new_matched_tokens(request("r1", prompt), 0) == (0, False)
    a.update_state_after_alloc(request("r1", prompt), None, 0)
    meta = a.build_connector_meta(scheduler_output("r1", prompt, blocks_a, 0))
    assert [(s.req_id, s.stop) for s in meta.saves] == [("r1", 32)] and not meta.loads
    for i, cache in enumerate(a_caches.values()):
        write_paged(cache, truth_k[i], truth_v[i], blocks_a, layout)
    a.bind_connector_metadata(meta)
    for name, cache in a_caches.items():
        a.save_kv_layer(name, cache, None)
    a.wait_for_save()
    a.clear_connector_metadata()
    assert a.flush_saves(10.0)  # saves go out from a thread of the connector's

    # Engine B has its own prefix-cache hit of one block (4 tokens) and loads the rest.
    b, b_caches = engine(api, layout)
    question = prompt + [7, 7, 7, 7]
    new, is_async = b.get_num_new_matched_tokens(request("r2", question), 4)
    assert (new, is_async) == (28, False)
    b.update_state_after_alloc(request("r2", question), None, new)
    blocks_b = [3, 9, 1, 14, 5, 8, 2, 11, 12, 13, 15]
    meta = b.build_connector_meta(scheduler_output("r2", question, blocks_b, 4))
    assert [(s.start, s.stop) for s in meta.loads] == [(4, 32)] and not meta.saves
    b.bind_connector_metadata(meta)
    b.start_load_kv(None)
    for name in b_caches:
        b.wait_for_layer_load(name)
    assert b.get_block_ids_with_load_errors() == set()
    fetches = [r for r in api.backend.requests if isinstance(r, m.FetchRequest)]
    assert [r.deadline_s for r in fetches] == [DaemonWaits().load_deadline_s]
    assert [r.kv_from for r in fetches] == [4]  # B's own hit is not fetched again
    for i, cache in enumerate(b_caches.values()):
        k, v = read_paged(cache, blocks_b[1:8], layout)  # tokens 4..32
        assert torch.equal(k, truth_k[i, :, 4:32]) and torch.equal(v, truth_v[i, :, 4:32])
        assert read_paged(cache, blocks_b[:1], layout)[0].abs().sum() == 0  # B's own hit: untouched
    b.clear_connector_metadata()
    assert b.request_finished(request("r2", question), blocks_b) == (False, None)
    a.shutdown()
    b.shutdown()


def _step(conn: KVPeerConnector, caches: dict[str, torch.Tensor], req_id: str, tokens: list[int],
          blocks: list[int], hit: int, truth: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """One scheduler + worker step of a prompt with vLLM's own prefix hit of ``hit`` tokens:
    the worker "computes" the rest (writes ``truth`` into its blocks) and saves what it is told."""
    new, _ = conn.get_num_new_matched_tokens(request(req_id, tokens), hit)
    conn.update_state_after_alloc(request(req_id, tokens), None, new)
    meta = conn.build_connector_meta(scheduler_output(req_id, tokens, blocks, hit))
    for i, cache in enumerate(caches.values()):
        write_paged(cache, truth[0][i, :, : len(blocks) * BLOCK], truth[1][i, :, : len(blocks) * BLOCK], blocks)
    _work(conn, caches, meta)
    return meta


def _work(conn: KVPeerConnector, caches: dict[str, torch.Tensor], meta: Any) -> None:
    """The worker's part of a step: loads, the forward pass's saves, then the saves sent."""
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    for name, cache in caches.items():
        conn.save_kv_layer(name, cache, None)
    conn.wait_for_save()
    conn.clear_connector_metadata()
    assert conn.flush_saves(10.0)


def test_a_conversations_next_turn_saves_only_the_kv_past_what_the_daemon_holds(api: ServerThread) -> None:
    """Each turn re-sends the whole history: its KV was copied out of vLLM and through shared
    memory again every turn (quadratic in the conversation), though the daemon held it."""
    history = list(range(6000, 6036))  # turn 1: 36 tokens, 2 whole chunks
    turn_2 = history + list(range(7000, 7040))  # 76 tokens, 4 whole chunks
    truth = torch.randn(LAYERS, HEADS, 80, DIM), torch.randn(LAYERS, HEADS, 80, DIM)
    conn, caches = engine(api)
    blocks = list(range(20))
    _step(conn, caches, "t1", history, blocks[:9], 0, truth)
    meta = _step(conn, caches, "t2", turn_2, blocks[:19], 36, truth)  # vLLM's own hit: turn 1
    assert [(s.stop, s.kv_from) for s in meta.saves] == [(64, 32)]
    puts = [r for r in api.backend.requests if isinstance(r, m.PutRequest)]
    assert [(len(r.tokens), r.kv_from) for r in puts] == [(32, 0), (64, 32)]
    with daemon_client(api) as client, client.fetch(turn_2, conn.fingerprint) as result:
        assert result.matched_tokens == 64
        assert torch.equal(result.k, truth[0][:, :, :64]) and torch.equal(result.v, truth[1][:, :, :64])
    conn.shutdown()


def test_a_short_next_turn_within_vllms_own_hit_saves_nothing(api: ServerThread) -> None:
    """vLLM's own hit covered every whole chunk, so there was no lookup: the save copied the
    whole history out again (kv_from 0) though this step computed no whole chunk."""
    history = list(range(6100, 6136))
    truth = torch.randn(LAYERS, HEADS, 48, DIM), torch.randn(LAYERS, HEADS, 48, DIM)
    conn, caches = engine(api)
    blocks = list(range(12))
    _step(conn, caches, "t1", history, blocks[:9], 0, truth)
    meta = _step(conn, caches, "t2", history + [1, 2, 3, 4, 5, 6], blocks[:11], 36, truth)
    assert not meta.saves and not meta.loads
    assert [len(r.tokens) for r in api.backend.requests if isinstance(r, m.PutRequest)] == [32]
    conn.shutdown()


def test_a_prefix_only_vllms_own_cache_holds_is_saved_and_one_the_daemon_holds_is_not(
    api: ServerThread,
) -> None:
    """With vLLM's own hit covering every whole chunk there was no lookup: such a prompt was
    never saved (or, at a chunk boundary, its whole history copied again)."""
    history = list(range(6300, 6336))
    truth = torch.randn(LAYERS, HEADS, 48, DIM), torch.randn(LAYERS, HEADS, 48, DIM)
    conn, caches = engine(api)
    blocks = list(range(12))
    # The daemon lost the prefix (restart, eviction, a dropped save): vLLM's hit covers it.
    meta = _step(conn, caches, "lost", history + [1, 2, 3, 4, 5, 6], blocks[:11], 36, truth)
    assert [(s.stop, s.kv_from) for s in meta.saves] == [(32, 0)]
    # Now it holds chunks 0-1; a turn that ends on a chunk boundary copies only chunk 2.
    meta = _step(conn, caches, "boundary", history + list(range(12)), blocks, 36, truth)
    assert [(s.stop, s.kv_from) for s in meta.saves] == [(48, 32)]
    with daemon_client(api) as client, client.fetch(history + list(range(12)) + [0], conn.fingerprint) as result:
        assert result.matched_tokens == 48 and torch.equal(result.k, truth[0][:, :, :48])
    conn.shutdown()


def test_a_prompt_vllms_own_cache_covers_is_looked_up_locally_only(
    api: ServerThread, caplog: pytest.LogCaptureFixture,
) -> None:
    """Such a lookup only says where the save starts: asking peers the daemon has not synced
    with could hold vLLM's scheduler for kvpeer_lookup_timeout_s on every fully cached prompt.
    A daemon that predates it refuses it once; such prompts then get a plain lookup."""
    prompt = list(range(6400, 6442))
    conn, _ = engine(api)
    conn.get_num_new_matched_tokens(request("partial", prompt), 4)
    conn.get_num_new_matched_tokens(request("covered", prompt), 36)
    lookups = [r for r in api.backend.requests if isinstance(r, m.LookupRequest)]
    assert [r.local_only for r in lookups] == [False, True]

    lookup = api.backend.lookup

    async def older(ctx: Any, req: Any) -> Any:
        if req.local_only:
            raise ProtocolError(ErrorCode.INVALID, "lookup: unknown fields ['local_only']")
        return await lookup(ctx, req)

    api.backend.lookup = older  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="kvpeer.integrations.vllm")
    for req_id in ("a", "b"):
        assert conn.get_num_new_matched_tokens(request(req_id, prompt), 36) == (0, False)
        assert conn._requests[req_id].num_computed == 36  # answered: the save knows what is held
    assert sum("predates local-only" in r.message for r in caplog.records) == 1
    assert [r.local_only for r in api.backend.requests if isinstance(r, m.LookupRequest)][2:] == [False, False]
    assert conn._daemon_usable()  # a refused field is not a daemon away: no back-off
    conn.shutdown()


def test_a_load_that_fails_drops_the_save_of_its_step_and_later_saves_start_where_it_stopped(
    api: ServerThread,
) -> None:
    """That step's forward pass read the failed blocks unwritten, so its save put KV computed
    on them; and a later save (chunked prefill) skipped the chunks vLLM recomputed, as the
    scheduler planned it from the load."""
    prompt = list(range(6500, 6565))  # 65 tokens: 4 whole chunks
    truth = torch.randn(LAYERS, HEADS, 68, DIM), torch.randn(LAYERS, HEADS, 68, DIM)
    conn, caches = engine(api)
    with daemon_client(api) as client:
        client.put(prompt[:48], truth[0][:, :, :48], truth[1][:, :, :48], conn.fingerprint)
        new, _ = conn.get_num_new_matched_tokens(request("same-step", prompt), 0)
        conn.update_state_after_alloc(request("same-step", prompt), None, new)
        meta = conn.build_connector_meta(scheduler_output("same-step", prompt, list(range(17)), 0))
        client.evict_all()  # the load fails
    _work(conn, caches, meta)
    assert meta.saves and conn.get_block_ids_with_load_errors()
    assert not [r for r in api.backend.requests if isinstance(r, m.PutRequest) and len(r.tokens) == 64]
    assert "same-step" not in conn._load_short  # its one save was this step's: not kept
    # A later step's save of a request whose load stopped short starts at that chunk, once.
    conn._load_short["later"] = 16
    spec = SaveSpec(req_id="later", tokens=prompt, block_ids=list(range(17)), stop=64, kv_from=48)
    assert conn._save_from(spec) == 16 and conn._save_from(spec) == 48
    conn.shutdown()


def test_no_save_over_blocks_a_load_failed_to_write_this_step_or_the_next(api: ServerThread) -> None:
    """Another request sharing the failed blocks (vLLM caches them at allocation) read them
    unwritten too, and with async scheduling the next step is planned before vLLM hears of the
    failure: both saves put KV computed on unwritten blocks."""
    prompt = list(range(6600, 6665))
    conn, caches = engine(api)
    conn._load_errors = {2, 3}  # a load of this step failed to write blocks 2 and 3
    shared = SaveSpec(req_id="B", tokens=prompt, block_ids=[0, 1, 2, 3] + list(range(20, 32)), stop=64)
    apart = SaveSpec(req_id="C", tokens=prompt, block_ids=list(range(40, 57)), stop=64)
    assert conn._over_failed_blocks(shared) and not conn._over_failed_blocks(apart)
    assert conn.get_block_ids_with_load_errors() == {2, 3}  # vLLM reads them after the step
    conn.wait_for_save()
    assert conn._over_failed_blocks(shared)  # the step planned before vLLM recomputed them
    conn.wait_for_save()
    assert not conn._over_failed_blocks(shared)  # recomputed since
    conn.shutdown()


def test_a_save_keeps_the_rows_it_started_with_when_the_daemon_turns_out_older_mid_step(
    api: ServerThread,
) -> None:
    """The saving thread learning (from another save) that the daemon predates kv_from between
    two layers of a step made the next layer copy more rows than its buffer held: a RuntimeError
    out of save_kv_layer, inside vLLM's forward pass."""
    prompt = list(range(6200, 6240))
    conn, caches = engine(api)
    conn.bind_connector_metadata(KVPeerConnectorMetadata(
        saves=[SaveSpec(req_id="r", tokens=prompt, block_ids=list(range(10)), stop=32, kv_from=16)]
    ))
    names = list(caches)
    conn.save_kv_layer(names[0], caches[names[0]], None)
    conn._refused.refused("kv_from", time.monotonic())  # as _predates_kv_from says, from the saving thread
    conn.save_kv_layer(names[1], caches[names[1]], None)
    k_all, _ = conn._staged["r"]
    assert k_all.shape[2] == 16  # tokens 16..32, as the first layer began
    conn.clear_connector_metadata()
    conn.shutdown()


def _older_than_kv_from(backend: Any) -> Any:
    """Make ``backend`` a daemon from before kv_from: it refuses the field as unknown (INVALID).
    Returns what upgrades it again."""
    put, fetch = backend.put, backend.fetch

    def older(method: Any, kind: str) -> Any:
        async def call(ctx: Any, req: Any, kv_or_sink: Any) -> Any:
            if req.kv_from:
                raise ProtocolError(ErrorCode.INVALID, f"{kind}: unknown fields ['kv_from']")
            return await method(ctx, req, kv_or_sink)
        return call

    def upgrade() -> None:
        backend.put, backend.fetch = put, fetch

    backend.put, backend.fetch = older(put, "put"), older(fetch, "fetch")
    return upgrade


def test_a_daemon_that_predates_kv_from_gets_whole_prompts_again(
    api: ServerThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older daemon refuses the field (INVALID, unknown fields): a load asks again from chunk
    0 and restores; the save already staged from kv_from is dropped, the next ones copy it all."""
    backend = api.backend
    _older_than_kv_from(backend)
    caplog.set_level(logging.INFO, logger="kvpeer.integrations.vllm")
    prompt, other = list(range(8000, 8040)), list(range(8100, 8140))
    truth = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    blank = torch.zeros_like(truth[0]), torch.zeros_like(truth[1])
    blocks = list(range(10))
    saver, caches = engine(api)
    with daemon_client(api) as client:
        for tokens in (prompt, other):
            client.put(tokens[:16], truth[0][:, :, :16], truth[1][:, :, :16], saver.fingerprint)

    # vLLM's own hit covers what the daemon holds: nothing to load, a save from token 16.
    meta = _step(saver, caches, "s1", prompt, blocks, 16, truth)
    assert not meta.loads and [(s.stop, s.kv_from) for s in meta.saves] == [(32, 16)]
    assert not saver._takes_kv_from()  # that save was refused, and dropped
    _step(saver, caches, "s2", prompt, blocks, 16, truth)
    saver.shutdown()

    # A load asks again from chunk 0, and the save of its step copies it all.
    loader, caches = engine(api)
    meta = _step(loader, caches, "r1", other, blocks, 4, blank)
    assert [(s.start, s.stop) for s in meta.loads] == [(4, 16)]
    assert [(s.stop, s.kv_from) for s in meta.saves] == [(32, 16)]
    assert loader.get_block_ids_with_load_errors() == set() and not loader._takes_kv_from()
    for i, cache in enumerate(caches.values()):
        k, _ = read_paged(cache, blocks[1:4], LAYOUTS[0])
        assert torch.equal(k, truth[0][i, :, 4:16])
    loader.shutdown()
    puts = [(len(r.tokens), r.kv_from) for r in backend.requests if isinstance(r, m.PutRequest)]
    assert puts == [(16, 0), (16, 0), (32, 0), (32, 0)]  # the test's two, s2, r1
    assert sum("predates kv_from" in r.message for r in caplog.records) == 2  # once per connector
    monkeypatch.setattr(_daemon, "ASK_AGAIN_S", 0.0)  # five minutes later: asked again
    assert loader._takes_kv_from() and saver._takes_kv_from()


def _older_daemon_holding_16_tokens_of(api: ServerThread, *prompts: list[int]) -> Any:
    """A daemon from before kv_from holding each prompt's first 16 tokens, and a connector on it:
    ``(upgrade, conn, caches, truth)``, ``truth`` the KV those and later tokens have."""
    upgrade = _older_than_kv_from(api.backend)
    truth = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    conn, caches = engine(api)
    with daemon_client(api) as client:
        for tokens in prompts:
            client.put(tokens[:16], truth[0][:, :, :16], truth[1][:, :, :16], conn.fingerprint)
    return upgrade, conn, caches, truth


def test_after_a_refusal_kv_from_is_tried_again_by_saves_and_loads_at_no_loss(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kv_from, refused once, was never sent again for the engine's life, even to the daemon
    upgraded under it. Tried again after ASK_AGAIN_S, a save staged from kv_from would be lost
    to a daemon still that old, so a save staged whole tries it, and puts the whole prompt if it
    is refused; a load tries it too (it falls back to chunk 0)."""
    backend = api.backend
    prompt, other, blocks = list(range(8200, 8240)), list(range(8300, 8340)), list(range(10))
    upgrade, conn, caches, truth = _older_daemon_holding_16_tokens_of(api, prompt, other)

    def puts() -> list[tuple[int, int]]:
        return [(len(r.tokens), r.kv_from) for r in backend.requests if isinstance(r, m.PutRequest)]

    def turn(n: int) -> list[int]:  # the held 16 tokens, then a tail of its own to save
        return prompt[:16] + list(range(9000 + 100 * n, 9024 + 100 * n))

    _step(conn, caches, "s1", turn(1), blocks, 16, truth)  # its save, from 16, refused and lost
    _step(conn, caches, "s2", turn(2), blocks, 16, truth)  # within ASK_AGAIN_S: whole, no try
    monkeypatch.setattr(_daemon, "ASK_AGAIN_S", 0.0)
    _step(conn, caches, "s3", turn(3), blocks, 16, truth)  # tried, refused: whole all the same
    assert puts()[2:] == [(32, 0), (32, 0)] and not conn._refused.confirmed("kv_from")
    upgrade()
    _step(conn, caches, "s4", turn(4), blocks, 16, truth)  # no load: the save's try is taken
    _step(conn, caches, "s5", turn(5), blocks, 16, truth)  # staged from kv_from again
    assert puts()[4:] == [(32, 16), (32, 16)] and conn._refused.confirmed("kv_from")
    with daemon_client(api) as client, client.fetch(turn(4)[:32], conn.fingerprint) as result:
        assert result.matched_tokens == 32 and torch.equal(result.k[:, :, 16:32], truth[0][:, :, 16:32])
    conn.shutdown()


def test_a_try_of_kv_from_starts_where_the_requests_load_stopped(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The try put from the lookup's kv_from, past chunks a load that stopped short had found
    gone: the daemon kept the chunks after the hole, which no fetch could reach."""
    backend = api.backend
    upgrade = _older_than_kv_from(backend)
    conn, caches = engine(api)
    truth = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    prompt, blocks = list(range(8600, 8640)), list(range(10))
    for i, cache in enumerate(caches.values()):
        write_paged(cache, truth[0][i], truth[1][i], blocks)
    conn._refused.refused("kv_from", time.monotonic())  # as an earlier save's refusal said
    monkeypatch.setattr(_daemon, "ASK_AGAIN_S", 0.0)
    upgrade()
    conn._load_short["r"] = 0  # its load, in an earlier step, stopped at chunk 0
    _work(conn, caches, KVPeerConnectorMetadata(
        saves=[SaveSpec(req_id="r", tokens=prompt, block_ids=blocks, stop=32, kv_from=16)]
    ))
    puts = [(len(r.tokens), r.kv_from) for r in backend.requests if isinstance(r, m.PutRequest)]
    assert puts == [(32, 0)]
    with daemon_client(api) as client:
        assert client.lookup(prompt[:32], conn.fingerprint).matched_tokens == 32
    conn.shutdown()


def test_a_load_past_vllms_own_hit_tries_kv_from_again_too(api: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = api.backend
    prompt, other, blocks = list(range(8400, 8440)), list(range(8500, 8540)), list(range(10))
    upgrade, conn, caches, truth = _older_daemon_holding_16_tokens_of(api, prompt, other)
    _step(conn, caches, "s1", prompt, blocks, 16, truth)  # refused
    monkeypatch.setattr(_daemon, "ASK_AGAIN_S", 0.0)
    upgrade()
    meta = _step(conn, caches, "r1", other, blocks, 4, truth)  # a load tries it, and it is taken
    assert [(s.start, s.stop) for s in meta.loads] == [(4, 16)]
    assert [r.kv_from for r in backend.requests if isinstance(r, m.FetchRequest)][-1] == 4
    assert conn._refused.confirmed("kv_from")
    conn.shutdown()


BEYOND_TOKENS = {
    "lora": {"lora_request": SimpleNamespace(lora_name="adapter-A", lora_int_id=1)},
    "image": {"mm_features": [SimpleNamespace(identifier="img-1", mm_position=SimpleNamespace(offset=4, length=28))]},
    "image-older-vllm": {"mm_hashes": ["img-1"], "mm_positions": [SimpleNamespace(offset=4, length=28)]},
    "prompt-embeds": {"prompt_embeds": torch.zeros(40, 8)},
    "cache-salt": {"cache_salt": "tenant-1"},
}


@pytest.mark.parametrize("extra", BEYOND_TOKENS.values(), ids=BEYOND_TOKENS.keys())
def test_a_request_whose_kv_is_not_its_tokens_alone_neither_loads_nor_saves(
    api: ServerThread, extra: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    """kvpeer keys KV by token ids and the base model: another adapter, image or tenant with the
    same token ids (an image's placeholder ids are the same for every image) was given its KV."""
    prompt = list(range(4000, 4040))
    conn, _ = engine(api)
    with daemon_client(api) as client:
        client.put(prompt, torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM), conn.fingerprint)
    caplog.set_level(logging.INFO, logger="kvpeer.integrations.vllm")
    for req_id in ("r1", "r2"):
        special = SimpleNamespace(request_id=req_id, prompt_token_ids=prompt, **extra)
        assert conn.get_num_new_matched_tokens(special, 0) == (0, False)
        conn.update_state_after_alloc(special, None, 0)
    assert len([r for r in caplog.records if "neither loads nor saves" in r.message]) == 1

    other = list(range(5000, 5040))  # computed here: not saved either
    conn.get_num_new_matched_tokens(SimpleNamespace(request_id="r3", prompt_token_ids=other, **extra), 0)
    meta = conn.build_connector_meta(scheduler_output("r3", other, list(range(10)), 0))
    assert not meta.saves and not meta.loads
    conn.shutdown()


def test_chunks_gone_between_lookup_and_load_are_reported_for_recompute(api: ServerThread) -> None:
    prompt = list(range(2000, 2040))
    k, v = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    b, _ = engine(api)
    with daemon_client(api) as client:
        client.put(prompt, k, v, b.fingerprint)
        new, _ = b.get_num_new_matched_tokens(request("r3", prompt), 0)
        assert new == 32
        b.update_state_after_alloc(request("r3", prompt), None, new)
        blocks = list(range(10))
        meta = b.build_connector_meta(scheduler_output("r3", prompt, blocks, 0))
        client.evict_all()  # the daemon loses the chunks before the worker loads
    b.bind_connector_metadata(meta)
    b.start_load_kv(None)
    assert b.get_block_ids_with_load_errors() == set(blocks[:8])
    b.shutdown()


def test_request_resumed_after_preemption_loads_into_its_new_blocks(api: ServerThread) -> None:
    """After a preemption vLLM asks again, allocates fresh blocks and schedules the request as a
    *cached* one listed in ``resumed_req_ids``: the tokens it was promised must be loaded there."""
    prompt = list(range(3000, 3040))
    truth_k, truth_v = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    b, caches = engine(api)
    with daemon_client(api) as client:
        client.put(prompt, truth_k, truth_v, b.fingerprint)
    new, _ = b.get_num_new_matched_tokens(request("r", prompt), 0)
    b.update_state_after_alloc(request("r", prompt), None, new)
    meta = b.build_connector_meta(scheduler_output("r", prompt, list(range(10)), 0))
    assert [(s.start, s.stop) for s in meta.loads] == [(0, 32)]

    # Preempted: its blocks are freed. Resumed with its own prefix-cache hit of one block.
    new, _ = b.get_num_new_matched_tokens(request("r", prompt), 4)
    assert new == 28
    b.update_state_after_alloc(request("r", prompt), None, new)
    blocks = [31, 3, 17, 5, 22, 8, 12, 27, 1, 19]
    cached = SimpleNamespace(req_ids=["r"], resumed_req_ids={"r"}, new_block_ids=[(blocks,)],
                             num_computed_tokens=[4 + new])
    meta = b.build_connector_meta(SimpleNamespace(
        scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={"r": 40 - 32},
    ))
    assert [(s.req_id, s.start, s.stop, s.block_ids) for s in meta.loads] == [("r", 4, 32, blocks)]
    b.bind_connector_metadata(meta)
    b.start_load_kv(None)
    assert b.get_block_ids_with_load_errors() == set()
    for i, cache in enumerate(caches.values()):
        k, v = read_paged(cache, blocks[1:8], LAYOUTS[0])
        assert torch.equal(k, truth_k[i, :, 4:32]) and torch.equal(v, truth_v[i, :, 4:32])
    b.clear_connector_metadata()

    # A later step of the same request (not resumed) loads nothing again.
    cached = SimpleNamespace(req_ids=["r"], resumed_req_ids=set(), new_block_ids=[None],
                             num_computed_tokens=[40])
    meta = b.build_connector_meta(SimpleNamespace(
        scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={"r": 1},
    ))
    assert not meta.loads and not meta.saves
    b.shutdown()


def test_without_a_layout_given_the_one_that_fits_vllms_caches_is_taken(api: ServerThread) -> None:
    """vLLM's FlashAttention cache is [2, blocks, block, heads, dim]: with the default layout
    every load and save raised inside vLLM's forward pass."""
    prompt = list(range(6000, 6040))
    truth_k, truth_v = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    conn = KVPeerConnector(vllm_config(api.socket_path), SimpleNamespace(name="BOTH"))
    caches = {f"model.layers.{i}.self_attn.attn": paged("kv_blocks_tokens_heads") for i in range(LAYERS)}
    conn.register_kv_caches(caches)
    assert conn.layout == "kv_blocks_tokens_heads"
    with daemon_client(api) as client:
        client.put(prompt, truth_k, truth_v, conn.fingerprint)
    new, _ = conn.get_num_new_matched_tokens(request("r", prompt), 0)
    conn.update_state_after_alloc(request("r", prompt), None, new)
    conn.bind_connector_metadata(conn.build_connector_meta(scheduler_output("r", prompt, list(range(10)), 0)))
    conn.start_load_kv(None)
    assert conn.get_block_ids_with_load_errors() == set()
    k, v = read_paged(caches["model.layers.1.self_attn.attn"], list(range(8)), conn.layout)
    assert torch.equal(k, truth_k[1, :, :32]) and torch.equal(v, truth_v[1, :, :32])
    conn.shutdown()


@pytest.mark.parametrize("layout, shape", [
    ("blocks_heads_tokens_2d", (2, NUM_BLOCKS, BLOCK, HEADS, DIM)),  # FlashAttention's
    ("kv_blocks_tokens_heads", (NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)),
    (None, (NUM_BLOCKS, 2, BLOCK, HEADS, DIM)),  # FlashInfer's: no layout fits
    (None, (NUM_BLOCKS, HEADS + 1, BLOCK, 2 * DIM)),  # not this model's heads
])
def test_caches_the_layout_does_not_fit_are_refused_naming_the_setting_and_shape(
    tmp_path: Any, layout: str | None, shape: tuple[int, ...],
) -> None:
    config = vllm_config(tmp_path / "kvpeer.sock")
    if layout is not None:
        config.kv_transfer_config.kv_connector_extra_config["kvpeer_layout"] = layout
    conn = KVPeerConnector(config, SimpleNamespace(name="BOTH"))
    with pytest.raises(ConfigError, match=r"kvpeer_layout.*") as refused:
        conn.register_kv_caches({f"model.layers.{i}.self_attn.attn": torch.zeros(shape) for i in range(LAYERS)})
    assert str(shape) in str(refused.value)
    conn.shutdown()


def test_an_unknown_layout_is_refused_at_construction(tmp_path: Any) -> None:
    config = vllm_config(tmp_path / "kvpeer.sock")
    config.kv_transfer_config.kv_connector_extra_config["kvpeer_layout"] = "flashinfer"
    with pytest.raises(ConfigError, match="kvpeer_layout 'flashinfer'"):
        KVPeerConnector(config, SimpleNamespace(name="BOTH"))


def test_an_unexpected_error_in_a_load_is_a_load_error_not_an_exception_into_vllm(
    api: ServerThread, caplog: pytest.LogCaptureFixture,
) -> None:
    """Caches taken from the forward context (vLLM versions without register_kv_caches) are not
    checked: a layout that does not fit them raised out of start_load_kv."""
    prompt = list(range(7000, 7040))
    conn = KVPeerConnector(vllm_config(api.socket_path), SimpleNamespace(name="BOTH"))
    with daemon_client(api) as client:
        client.put(prompt, torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM), conn.fingerprint)
    caplog.set_level(logging.DEBUG, logger="kvpeer.integrations.vllm")
    unfit = paged("kv_blocks_tokens_heads")
    context = SimpleNamespace(no_compile_layers={
        f"model.layers.{i}.self_attn.attn": SimpleNamespace(kv_cache=unfit) for i in range(LAYERS)})
    for req_id in ("r1", "r2"):
        new, _ = conn.get_num_new_matched_tokens(request(req_id, prompt), 0)
        conn.update_state_after_alloc(request(req_id, prompt), None, new)
        conn.bind_connector_metadata(conn.build_connector_meta(scheduler_output(req_id, prompt, list(range(10)), 0)))
        conn.start_load_kv(context)
        assert conn.get_block_ids_with_load_errors() == set(range(8))
        conn.clear_connector_metadata()
    logged = [r for r in caplog.records if r.name == "kvpeer.integrations.vllm" and r.exc_info]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.DEBUG]  # the traceback once
    conn.shutdown()


def test_an_unexpected_error_in_a_save_drops_that_save_not_vllms_step(
    api: ServerThread, caplog: pytest.LogCaptureFixture,
) -> None:
    """save_kv_layer runs inside vLLM's forward pass: a bug in a save's staging (here a layer
    whose cache the layout does not fit) raised out of it. Now that save is dropped, its room
    given back, the traceback logged once, and the next step's saves go on."""
    prompt = list(range(7100, 7140))
    truth = torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM)
    conn, caches = engine(api)
    caplog.set_level(logging.DEBUG, logger="kvpeer.integrations.vllm")
    names = list(caches)
    unfit = paged("kv_blocks_tokens_heads")
    for req_id in ("r1", "r2"):
        conn.get_num_new_matched_tokens(request(req_id, prompt), 0)
        conn.update_state_after_alloc(request(req_id, prompt), None, 0)
        conn.bind_connector_metadata(conn.build_connector_meta(scheduler_output(req_id, prompt, list(range(10)), 0)))
        conn.save_kv_layer(names[0], caches[names[0]], None)  # staged, room reserved
        conn.save_kv_layer(names[1], unfit, None)  # raises inside: dropped
        conn.wait_for_save()
        conn.clear_connector_metadata()
        assert conn.flush_saves(10.0) and conn._saver.waiting_bytes == 0
    logged = [r for r in caplog.records if r.name == "kvpeer.integrations.vllm" and r.exc_info]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.DEBUG]  # the traceback once
    assert not [r for r in api.backend.requests if isinstance(r, m.PutRequest)]
    meta = _step(conn, caches, "r3", list(range(7200, 7240)), list(range(10)), 0, truth)
    assert [r.kv_from for r in api.backend.requests if isinstance(r, m.PutRequest)] == [0] and meta.saves
    assert conn.saves_dropped == 0  # a failed save is not one dropped for want of room
    conn.shutdown()


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_a_quantized_kv_cache_is_refused_at_construction(tmp_path: Any, cache_dtype: str) -> None:
    """Loads would cast bf16 KV into fp8 blocks without the layers' k/v scales: wrong output."""
    config = vllm_config(tmp_path / "kvpeer.sock")
    config.cache_config.cache_dtype = cache_dtype
    with pytest.raises(ConfigError, match=cache_dtype):
        KVPeerConnector(config, SimpleNamespace(name="BOTH"))


def test_an_explicit_plain_kv_cache_dtype_is_the_fingerprints(api: ServerThread) -> None:
    config = vllm_config(api.socket_path)
    for cache_dtype, dtype in (("auto", "float32"), ("bfloat16", "bfloat16")):
        config.cache_config.cache_dtype = cache_dtype
        connector = KVPeerConnector(config, SimpleNamespace(name="BOTH"))
        assert connector.fingerprint.dtype == dtype
        connector.shutdown()


def kv_cache_config(*spec_names: str) -> Any:
    """A stand-in for vLLM's ``KVCacheConfig``: one group per spec class name."""
    groups = [SimpleNamespace(layer_names=[], kv_cache_spec=type(name, (), {})()) for name in spec_names]
    return SimpleNamespace(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)


@pytest.mark.parametrize("specs", [("FullAttentionSpec", "SlidingWindowSpec"), ("SlidingWindowSpec",),
                                   ("FullAttentionSpec", "MambaSpec"), ("MLAAttentionSpec",)])
def test_a_model_whose_kv_is_not_one_full_attention_group_is_refused(tmp_path: Any, specs: tuple[str, ...]) -> None:
    """The connector loads into and saves from the first group's blocks only, in a full-attention
    layout: other groups would keep unwritten blocks, sliding windows freed ones."""
    with pytest.raises(ConfigError, match=specs[-1]):
        KVPeerConnector(vllm_config(tmp_path / "kvpeer.sock"), SimpleNamespace(name="BOTH"),
                        kv_cache_config(*specs))


def test_one_full_attention_group_is_taken(api: ServerThread) -> None:
    connector = KVPeerConnector(vllm_config(api.socket_path), SimpleNamespace(name="BOTH"),
                                kv_cache_config("FullAttentionSpec"))
    connector.shutdown()
