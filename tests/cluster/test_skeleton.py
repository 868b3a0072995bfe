"""Walking skeleton: two real daemons in network namespaces share a real model's prefix KV."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kvpeer.api.client import KVPeerClient
from kvpeer.integrations.transformers import cache_from_kv, greedy_continue, kv_from_cache
from kvpeer.testing.cluster import DaemonCluster

pytestmark = [pytest.mark.cluster, pytest.mark.model, pytest.mark.slow]

PREFIX_TOKENS = 600  # two full 256-token chunks + a partial one that is never shared


def test_prefix_put_on_a_is_fetched_bit_identical_through_b(smollm2, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = (Path(__file__).parents[2] / "examples" / "data" / "handbook.txt").read_text()
    tokens = smollm2.tokenizer(text)["input_ids"][:PREFIX_TOKENS]
    with torch.no_grad():
        prefill = smollm2.model(torch.tensor([tokens]), use_cache=True)
    k, v = kv_from_cache(prefill.past_key_values)

    with DaemonCluster(2, workdir=tmp_path) as cluster:
        node_a, node_b = cluster.nodes
        with KVPeerClient(socket_path=node_a.socket_path) as client_a:
            put = client_a.put(tokens, k, v, smollm2.fingerprint, level="exact")
        assert put.chunks == 2

        cluster.wait_until_peer_holds(node_b, node_a.node_id, timeout_s=30)
        with KVPeerClient(socket_path=node_b.socket_path) as client_b:
            # B pulled A's inventory over the authenticated session (not just the TXT digest).
            deadline = time.monotonic() + 10
            while client_b.stats()["peer_inventories"].get(node_a.node_id) != 2:
                assert time.monotonic() < deadline, client_b.stats()
                time.sleep(0.1)
            with client_b.fetch(tokens, smollm2.fingerprint, min_level="exact") as result:
                assert result.matched_tokens == 512
                assert list(result.levels) == ["exact", "exact"]
                fetched_k, fetched_v = result.k.clone(), result.v.clone()
            stats_b = client_b.stats()

    assert stats_b["bytes_from_peers"] > 0, "B must have fetched over the network, not locally"
    assert torch.equal(fetched_k, k[:, :, :512, :])
    assert torch.equal(fetched_v, v[:, :, :512, :])

    fetched_cache = cache_from_kv(fetched_k, fetched_v, smollm2.model)
    with torch.no_grad():
        local_cache = smollm2.model(torch.tensor([tokens[:512]]), use_cache=True).past_key_values
    assert greedy_continue(smollm2.model, tokens, fetched_cache, 512, 12) == greedy_continue(
        smollm2.model, tokens, local_cache, 512, 12
    )
