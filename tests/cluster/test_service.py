"""kvpeerd as a service: a fake systemd's notify socket, /healthz and /metrics, SIGTERM, restarts.

One real daemon in a network namespace (its metrics port is on that namespace's loopback, so
scrapes run inside it). The daemon's life: /healthz 503 while starting, READY=1 only once the
API answers as ready, watchdog pings, chunks put and seen in /metrics, SIGTERM -> STOPPING=1 and
exit 0, restart and kill -9 + restart keep the inventory and the bytes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvpeer import codec
from kvpeer.api.client import KVPeerClient
from kvpeer.hashing import ModelFingerprint
from kvpeer.store import decode_record
from kvpeer.testing.cluster import DaemonCluster, Node

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FP = ModelFingerprint(name="ops-test-model", layers=2, kv_heads=2, head_dim=16, dtype="float16")
GRACE_S = 10.0
HEALTHZ = "http://127.0.0.1:9457/healthz"
METRICS = "http://127.0.0.1:9457/metrics"

# Runs inside the daemon's namespace: prints each change of /healthz's status until it is 200.
HEALTH_WATCHER = """
import sys, time, urllib.error, urllib.request
deadline, last = time.monotonic() + 90, None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError:
        code = None  # not listening yet
    if code is not None and code != last:
        print(code, flush=True)
        last = code
    if code == 200:
        break
    time.sleep(0.02)
"""
SCRAPE = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def wait_for_line(node: Node, wanted: str, timeout_s: float = 60.0) -> list[str]:
    """sd_notify lines received until ``wanted`` arrives (inclusive)."""
    assert node.notify is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        node.notify.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = node.notify.recv(4096)
        except TimeoutError:
            break
        seen.extend(data.decode().splitlines())
        if wanted in seen:
            return seen
    raise AssertionError(f"no {wanted} within {timeout_s}s (got {seen}):\n{node.log_text()}")


def scrape(cluster: DaemonCluster, node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = cluster.net.run(node.host, [sys.executable, "-c", SCRAPE, METRICS]).stdout
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_daemon_lifecycle_under_a_fake_systemd(tmp_path: Path) -> None:
    tokens = list(range(1000, 1600))  # two full 256-token chunks
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 600, 16, generator=gen).half()
    v = torch.randn(2, 2, 600, 16, generator=gen).half()
    config = {"metrics": {"enabled": True}, "daemon": {"shutdown_grace_s": GRACE_S}}
    with DaemonCluster(1, workdir=tmp_path, config=config, start=False) as cluster:
        node = cluster.nodes[0]
        watcher = cluster.net.popen(
            node.host, [sys.executable, "-c", HEALTH_WATCHER, HEALTHZ],
            stdout=subprocess.PIPE, text=True,
        )
        cluster.start_node(node, wait=False, env={"WATCHDOG_USEC": "400000"})
        before_ready = wait_for_line(node, "READY=1")
        assert "STOPPING=1" not in before_ready
        with KVPeerClient(socket_path=node.socket_path) as client:
            assert client.stats()["ready"] is True  # READY came after the API, store, discovery
            health, _ = watcher.communicate(timeout=90)
            assert health.split() == ["503", "200"], "/healthz must be 503 until ready"
            lines = wait_for_line(node, "WATCHDOG=1", timeout_s=30)
            lines += wait_for_line(node, "WATCHDOG=1", timeout_s=30)
            assert lines.count("WATCHDOG=1") >= 2

            put = client.put(tokens, k, v, FP, level="exact")
            assert put.chunks == 2 and put.stored == 2
            _wait_for_disk(client)
        # Only the prefix's last full chunk is flagged as its end (its lower levels take the
        # codec's tail steps), though 88 tokens of the prefix follow it.
        flagged = {
            start: codec.read_header(blob).ends_prefix
            for start, blob in ((_chunk_start(blob, k), blob) for blob in _stored_blobs(node, "exact"))
        }
        assert flagged == {0: False, 256: True}
        metrics = scrape(cluster, node)
        assert metrics[("kvpeer_ready", ())] == 1
        assert metrics[("kvpeer_store_chunks", ())] == 2
        assert metrics[("kvpeer_store_bytes", (("tier", "disk"),))] > 0
        assert metrics[("kvpeer_store_events_total", (("event", "puts"),))] >= 2  # + warmed levels
        assert metrics[("kvpeer_codec_encode_seconds_count", (("level", "exact"),))] == 2
        assert metrics[("kvpeer_api_events_total", (("event", "requests"),))] >= 2
        # the cap on peers' inventories is exported, zero or not
        assert metrics[("kvpeer_inventory_events_total", (("event", "inventory_keys_refused"),))] == 0

        assert cluster.stop_node(node, timeout_s=GRACE_S + 15) == 0, node.log_text()
        wait_for_line(node, "STOPPING=1", timeout_s=5)

        # A restart keeps the inventory; so does a crash.
        for crash in (False, True):
            cluster.start_node(node)
            with KVPeerClient(socket_path=node.socket_path) as client:
                assert client.stats()["chunks"] == 2
                assert client.lookup(tokens, FP).matched_tokens == 512
                with client.fetch(tokens, FP) as result:
                    assert result.matched_tokens == 512
                    assert torch.equal(result.k, k[:, :, :512, :])
                    assert torch.equal(result.v, v[:, :, :512, :])
            metrics = scrape(cluster, node)
            assert metrics[("kvpeer_fetches_total", (("outcome", "complete"),))] == 1
            assert metrics[("kvpeer_chunk_hits_total", (("source", "local"),))] == 2
            assert metrics[("kvpeer_prefix_tokens_total", (("result", "recompute"),))] == 0
            code = cluster.stop_node(node, sig=signal.SIGKILL if crash else signal.SIGTERM)
            assert code == (-signal.SIGKILL if crash else 0), node.log_text()


def _wait_for_disk(client: KVPeerClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while client.stats()["store"]["pending_entries"] and time.monotonic() < deadline:
        time.sleep(0.05)


def _stored_blobs(node: Node, level: str) -> list[bytes]:
    """The blobs of ``level`` in a node's disk tier, read back through the store's record format."""
    out = []
    for path in sorted((node.workdir / "state" / "store").rglob(f"*.{level}")):
        out.append(decode_record(path.read_bytes(), bytes.fromhex(path.stem), level))
    return out


def _chunk_start(blob: bytes, k: torch.Tensor) -> int:
    """Which 256-token chunk of ``k`` an exact blob holds."""
    decoded, _ = codec.decode(blob)
    starts = [s for s in range(0, k.shape[2] - 255, 256) if torch.equal(decoded, k[:, :, s : s + 256])]
    assert len(starts) == 1
    return starts[0]


def test_full_disk_is_reported_and_the_daemon_keeps_serving_from_ram(tmp_path: Path) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        n_chunks = 48  # 64 KiB each at the exact level: 3 MiB into a 2 MiB file system
        tokens = list(range(n_chunks * 256))
        gen = torch.Generator().manual_seed(5)  # random: the exact level cannot shrink it much
        k = torch.randn(2, 2, len(tokens), 16, generator=gen).half()
        v = torch.randn(2, 2, len(tokens), 16, generator=gen).half()
        config = {"store": {"dir": str(mount / "store"), "disk_bytes": "1GiB"}}
        with DaemonCluster(1, workdir=tmp_path / "cluster", config=config) as cluster:
            node = cluster.nodes[0]
            with KVPeerClient(socket_path=node.socket_path) as client:
                client.put(tokens, k, v, FP, level="exact")
                deadline = time.monotonic() + 60  # disk writes are write-behind: wait for them
                stats = client.stats()
                while stats["store"]["pending_entries"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                    stats = client.stats()
                assert stats["store"]["disk_errors"] > 0
                assert "no space left on device" in stats["store"]["last_disk_error"]
                assert stats["chunks"] == n_chunks  # the RAM tier holds what the disk could not
                with client.fetch(tokens, FP) as result:
                    assert result.matched_tokens == len(tokens)
                    assert torch.equal(result.v, v)
            assert node.process is not None and node.process.poll() is None
            assert "no space left on device" in node.log_text()
            assert cluster.stop_node(node) == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_without_systemd_the_daemon_runs_and_stops_cleanly(tmp_path: Path) -> None:
    config = {"metrics": {"enabled": True}, "log": {"json": True}}
    with DaemonCluster(1, workdir=tmp_path, config=config, start=False) as cluster:
        node = cluster.nodes[0]
        cluster.start_node(node, wait=False, env={"NOTIFY_SOCKET": ""})
        watcher = cluster.net.run(node.host, [sys.executable, "-c", HEALTH_WATCHER, HEALTHZ],
                                  timeout=120)
        assert watcher.stdout.split()[-1:] == ["200"], node.log_text()
        with KVPeerClient(socket_path=node.socket_path) as client:
            assert client.stats()["ready"] is True
        assert cluster.stop_node(node, timeout_s=GRACE_S + 15) == 0, node.log_text()
        assert list(node.notifications(timeout_s=0.5)) == []  # nothing was sent anywhere
        records = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
        assert any(r["logger"] == "kvpeer.daemon" and "ready" in r["message"] for r in records)
