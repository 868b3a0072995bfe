"""The transport between two network namespaces: real aiortc over a veth/bridge LAN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-transfer"])
def test_killed_peer_is_reported_by_heartbeat_not_ice_consent(busy: bool) -> None:
    with Cluster(n_hosts=2) as cluster:
        a, b = cluster.hosts
        server, port = _serve(cluster, a, "--blob-bytes", str(1 << 20))
        extra = ["--busy", "--blob-bytes", str(1 << 20)] if busy else []
        watcher = cluster.popen(
            b,
            _client_argv("watch", b, a, port, "--request-timeout", "20", *extra),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "CONNECTED"
        if busy:
            assert watcher.stdout.readline().strip() == "FIRST"  # a transfer is under way
        killed_at = time.monotonic()
        os.killpg(server.pid, signal.SIGKILL)
        result = json.loads(watcher.stdout.readline())
        assert result["ok"]
        detection = result["down_at"] - killed_at
        print(f"peer death detected after {detection:.2f} s (peer_dead_after_s = 2.0)")
        # ICE consent expiry would take ~30 s; anything under 20 s came from the heartbeat.
        assert 0 < detection < 20


def _fetch_result(out: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr[-3000:]
    result: dict[str, object] = json.loads(lines[-1])
    return result


def test_loss_and_reordering_through_the_relay_every_frame_in_its_slot() -> None:
    with Cluster(n_hosts=2, relay=True) as cluster:
        a, b = cluster.hosts
        cluster.set_impairment(delay_ms=1, loss_pct=2, reorder_pct=3, seed=7)
        _, port = _serve(cluster, a, "--blob-bytes", str(1 << 20))
        out = cluster.run(
            b,
            _client_argv("fetch", b, a, port, "--blob-bytes", str(1 << 20), "--count", "8"),
            timeout=240,
            check=False,
        )
        result = _fetch_result(out)
        stats = cluster.stop_relay()
        assert result["ok"], result
        assert result["bytes_verified"] == 8 << 20  # byte-compared with the expected blobs
        assert stats is not None and stats["dropped"] > 0 and stats["reordered"] > 0


def test_one_percent_loss_on_a_40_ms_path_with_rate_control_every_byte_intact() -> None:
    with Cluster(n_hosts=2, relay=True) as cluster:
        a, b = cluster.hosts
        cluster.set_impairment(delay_ms=20, loss_pct=1, seed=11)
        _, port = _serve(cluster, a, "--blob-bytes", str(1 << 20), "--cc", "rate")
        argv = _client_argv(
            "fetch", b, a, port, "--blob-bytes", str(1 << 20), "--count", "12", "--cc", "rate"
        )
        result = _fetch_result(cluster.run(b, argv, timeout=120, check=False))
        stats = cluster.stop_relay()
        assert result["ok"], result
        assert result["bytes_verified"] == 12 << 20  # byte-compared with the expected blobs
        assert stats is not None and stats["dropped"] > 0
        sender = result["sender_sctp"]
        assert isinstance(sender, dict) and sender["congestion_control"] == "rate"
        # The losses were seen, and taken as random: no Reno halving.
        assert sender["random_losses"] > 0, sender


def test_peers_with_different_mtus_agree_on_a_packet_both_carry() -> None:
    # The bridge drops frames larger than the smaller MTU, as a real mixed LAN switch does:
    # a sender using its own 9000-byte MTU would never get a packet through.
    with Cluster(n_hosts=2, mtu=[9000, 1500]) as cluster:
        a, b = cluster.hosts
        _, port = _serve(cluster, a, "--blob-bytes", str(1 << 20))
        out = cluster.run(
            b,
            _client_argv("fetch", b, a, port, "--blob-bytes", str(1 << 20), "--count", "4"),
            timeout=120,
            check=False,
        )
        result = _fetch_result(out)
        assert result["ok"], result
        assert result["packet_bytes"] == 1500 - 48 - 40


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("buffer_high", [4 << 20, 1 << 30], ids=["flow-control", "none"])
def test_flow_control_bounds_sender_memory_while_receiver_stalls(buffer_high: int) -> None:
    blob = 3 << 20
    parallel = 16  # 48 MiB requested at once: without flow control all of it would queue
    with Cluster(n_hosts=2) as cluster:
        a, b = cluster.hosts
        server, port = _serve(
            cluster, a, "--blob-bytes", str(blob), "--dead-after", "60", "--heartbeat", "1",
            "--buffer-high", str(buffer_high),
        )  # fmt: skip
        client = cluster.popen(
            b,
            _client_argv(
                "fetch", b, a, port, "--blob-bytes", str(blob), "--count", "24",
                "--parallel", str(parallel), "--dead-after", "60", "--heartbeat", "1",
            ),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "CONNECTED"
        baseline = _rss_bytes(server.pid)  # blobs to serve are allocated at start-up
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], _rss_bytes(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            assert client.stdout.readline().strip() == "FIRST"
            os.killpg(client.pid, signal.SIGSTOP)  # the slowest receiver there is
            try:
                done.wait(3.0)  # the observation window, not a settle-sleep
            finally:
                os.killpg(client.pid, signal.SIGCONT)
            out, _ = client.communicate(timeout=240)
        finally:
            done.set()
            sampler.join()
        result = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
        assert result["ok"], result
        growth = peak[0] - baseline
        print(f"sender RSS grew {growth / 2**20:.1f} MiB (buffer_high {buffer_high >> 20} MiB)")
        if buffer_high > 64 << 20:
            assert growth > 32 << 20  # without flow control everything requested queues up
            return
        assert growth < 24 << 20  # bufferedAmount high water (4 MiB) plus copies, not 48 MiB


def test_peer_with_a_wrong_key_is_refused_between_namespaces() -> None:
    with Cluster(n_hosts=2) as cluster:
        a, b = cluster.hosts
        _, port = _serve(cluster, a, "--blob-bytes", "1024", "--log", "INFO")
        argv = _client_argv("fetch", b, a, port, "--count", "1")
        argv[argv.index("--psk-hex") + 1] = os.urandom(32).hex()
        result = _fetch_result(cluster.run(b, argv, timeout=60, check=False))
        assert result == {"ok": False, "error": result["error"]}
        assert str(result["error"]).startswith("AuthError")
        # What the refused peer saw is the generic refusal: no node id, no SDP, no key hint.
        assert "refused us: authentication failed" in str(result["error"])


def test_drops_in_the_senders_own_queue_are_resent_at_once() -> None:
    """A tbf with a tiny queue on the sender's interface drops whole bursts before they leave
    the host. With IP_RECVERR the send fails (ENOBUFS), the sender counts a local drop and
    resends those chunks; every byte arrives."""
    with Cluster(n_hosts=2, mtu=1500) as cluster:
        a, b = cluster.hosts
        # The bucket holds a whole GSO packet (tbf would split a larger one and report
        # nothing); the queue holds about one more.
        cluster.run(a, ["tc", "qdisc", "replace", "dev", a.ifname, "root", "tbf",
                        "rate", "50mbit", "burst", "70000", "limit", "80000"])  # fmt: skip
        _, port = _serve(cluster, a, "--blob-bytes", str(1 << 20))
        out = cluster.run(
            b,
            _client_argv("fetch", b, a, port, "--blob-bytes", str(1 << 20), "--count", "16"),
            timeout=120,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["ok"], result
        assert result["bytes_verified"] == 16 << 20
        sctp = result["sender_sctp"]
        assert sctp["local_drops"] > 0 and sctp["local_drop_chunks"] > 0, sctp
