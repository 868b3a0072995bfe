"""Discovery between real kvpeerd daemons in namespaces (issue 9): prefixes seen by peers,
models kept apart, clean stop and SIGKILL. KV is random: no model is needed to exercise
discovery, only a fingerprint."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpeer.hashing import ModelFingerprint

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WAIT_S = 30.0
MODEL_X = ModelFingerprint(name="test-x", layers=2, kv_heads=2, head_dim=16, dtype="float16")
MODEL_Y = ModelFingerprint(name="test-y", layers=2, kv_heads=2, head_dim=16, dtype="float16")


def wait_until(check, what: str, timeout_s: float = WAIT_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        time.sleep(0.05)  # polling the daemon's API; returns as soon as the state is reached
    return result


def test_daemons_share_prefixes_per_model_and_drop_stopped_peers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    from kvpeer.api.client import KVPeerClient
    from kvpeer.testing.cluster import DaemonCluster

    tokens = np.random.default_rng(3).integers(0, 30_000, 512).tolist()
    k = torch.randn(2, 2, 512, 16, dtype=torch.float16)
    with DaemonCluster(3, workdir=tmp_path) as cluster:
        a, b, c = cluster.nodes
        with KVPeerClient(socket_path=b.socket_path) as client_b:
            wait_until(lambda: len(client_b.peers()) == 2, "B sees A and C")
            # Same tokens, two models: A serves model X, C serves model Y.
            with KVPeerClient(socket_path=a.socket_path) as client_a:
                client_a.put(tokens, k, k.clone(), MODEL_X, level="exact")
            with KVPeerClient(socket_path=c.socket_path) as client_c:
                client_c.put(tokens, k, k.clone(), MODEL_Y, level="exact")
            cluster.wait_until_peer_holds(b, a.node_id, timeout_s=WAIT_S)
            cluster.wait_until_peer_holds(b, c.node_id, timeout_s=WAIT_S)
            peers = {p["node_id"]: p for p in client_b.peers()}
            assert peers[a.node_id]["fingerprints"] == [MODEL_X.hex]
            assert peers[c.node_id]["fingerprints"] == [MODEL_Y.hex]

            found_x = wait_until(
                lambda: (r := client_b.lookup(tokens, MODEL_X)).matched_tokens == 512 and r,
                "B finds model X's prefix",
            )
            assert set(found_x.sources) == {a.node_id}  # never C, which serves model Y
            found_y = client_b.lookup(tokens, MODEL_Y)
            assert found_y.matched_tokens == 512 and set(found_y.sources) == {c.node_id}

            # A clean stop says goodbye: gone from B, and B's log says why.
            cluster.stop_node(c, signal.SIGTERM)
            wait_until(lambda: c.node_id not in {p["node_id"] for p in client_b.peers()},
                       "C gone from B after SIGTERM")
            assert re.search(rf"peer {c.node_id} removed \(goodbye\)", b.log_text()), b.log_text()

            # SIGKILL says nothing: heartbeats (transport session or discovery) drop it.
            killed_at = time.monotonic()
            cluster.stop_node(a, signal.SIGKILL)
            wait_until(lambda: client_b.peers() == [], "A gone from B after SIGKILL")
            print(f"SIGKILLed peer dropped after {time.monotonic() - killed_at:.1f} s")
            assert re.search(
                rf"peer {a.node_id} removed \((timeout|transport)\)", b.log_text()
            ), b.log_text()
            assert client_b.lookup(tokens, MODEL_X).matched_tokens == 0
