"""The transport between two network namespaces: real aiortc over a veth/bridge LAN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kvpeer.testing.netns import Cluster, Host

pytestmark = pytest.mark.cluster
PSK = os.urandom(32).hex()
ENDPOINT = [sys.executable, "-m", "kvpeer.transport.endpoint"]


def _serve(cluster: Cluster, host: Host, *extra: str) -> tuple[subprocess.Popen[str], int]:
    proc = cluster.popen(
        host,
        [*ENDPOINT, "serve", "--node-id", "server", "--host", host.ip, "--psk-hex", PSK, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", f"server did not start: {line}"
    return proc, int(line[1])


def _client_argv(role: str, host: Host, server: Host, port: int, *extra: str) -> list[str]:
    return [
        *ENDPOINT, role, "--node-id", "client", "--host", host.ip, "--psk-hex", PSK,
        "--peer-id", "server", "--peer-host", server.ip, "--peer-port", str(port), *extra,
    ]  # fmt: skip


def test_fetch_between_namespaces_every_byte_checked() -> None:
    with Cluster(n_hosts=2, mtu=1500) as cluster:
        a, b = cluster.hosts
        _, port = _serve(cluster, a, "--blob-bytes", str(1 << 20))
        out = cluster.run(
            b,
            _client_argv("fetch", b, a, port, "--blob-bytes", str(1 << 20), "--count", "8"),
            timeout=120,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["ok"], result
        assert result["bytes_verified"] == 8 << 20
        assert result["packet_bytes"] <= 1500 - 48 - 40  # agreed from the 1500-byte MTUs


def test_killed_peer_is_reported_by_heartbeat_not_ice_consent() -> None:
    with Cluster(n_hosts=2) as cluster:
        a, b = cluster.hosts
        server, port = _serve(cluster, a, "--blob-bytes", "1024")
        watcher = cluster.popen(
            b,
            _client_argv("watch", b, a, port, "--request-timeout", "20"),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "CONNECTED"
        killed_at = time.monotonic()
        os.killpg(server.pid, signal.SIGKILL)
        result = json.loads(watcher.stdout.readline())
        assert result["ok"]
        detection = result["down_at"] - killed_at
        print(f"peer death detected after {detection:.2f} s (peer_dead_after_s = 2.0)")
        # ICE consent expiry would take ~30 s; anything under 20 s came from the heartbeat.
        assert 0 < detection < 20
