"""Discovery across two routed subnets (no multicast forwarding): etcd with a real server, and static peers.

Topology, all in fresh namespaces: host A (subnet 1, also runs etcd) -- router -- hosts B and C
(subnet 2, one bridge). mDNS cannot cross the router; etcd can.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpeer.discovery.harness import AgentProcess, start_agents

pytestmark = [pytest.mark.cluster]

WAIT_S = 30.0
_counter = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class RoutedNet:
    """Two subnets joined by a router namespace; unique names, removed even on failure."""

    def __init__(self) -> None:
        self.name = f"kvpe{os.getpid()}x{next(_counter)}"
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.router, self.a, self.sw = f"{self.name}r", f"{self.name}a", f"{self.name}s"
        self.b, self.c = f"{self.name}b", f"{self.name}c"
        self.ip = {self.a: "10.214.1.2", self.b: "10.214.2.2", self.c: "10.214.2.3"}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        for ns in (self.router, self.a, self.sw, self.b, self.c):
            self._ns(ns)
        r = self.router
        # Subnet 1: router <-> A directly.
        _ip("-n", r, "link", "add", "r1", "type", "veth", "peer", "name", "eth0", "netns", self.a)
        _ip("-n", r, "addr", "add", "10.214.1.1/24", "dev", "r1")
        _ip("-n", self.a, "addr", "add", "10.214.1.2/24", "dev", "eth0")
        # Subnet 2: router, B and C on a bridge.
        _ip("-n", self.sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.sw, "link", "set", "br0", "up")
        _ip("-n", r, "link", "add", "r2", "type", "veth", "peer", "name", "pr", "netns", self.sw)
        _ip("-n", r, "addr", "add", "10.214.2.1/24", "dev", "r2")
        for i, host in enumerate((self.b, self.c)):
            port = f"p{i}"
            _ip("-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host)
            _ip("-n", self.sw, "link", "set", port, "master", "br0")
            _ip("-n", self.sw, "link", "set", port, "up")
            _ip("-n", host, "addr", "add", f"{self.ip[host]}/24", "dev", "eth0")
        _ip("-n", self.sw, "link", "set", "pr", "master", "br0")
        _ip("-n", self.sw, "link", "set", "pr", "up")
        for dev in ("r1", "r2"):
            _ip("-n", r, "link", "set", dev, "up")
        for host, gw in ((self.a, "10.214.1.1"), (self.b, "10.214.2.1"), (self.c, "10.214.2.1")):
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", host, "route", "add", "default", "via", gw)
        # Unicast forwarding only: the kernel never routes link-local multicast (mDNS).
        subprocess.run(
            ["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True, capture_output=True, timeout=30,
        )

    def popen(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()


def _wait_etcd(net: RoutedNet, url: str) -> None:
    probe = f"import urllib.request; urllib.request.urlopen('{url}/health', timeout=2).read()"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["ip", "netns", "exec", net.b, sys.executable, "-c", probe],
            capture_output=True, timeout=30,
        )
        if done.returncode == 0:
            return
        time.sleep(0.3)  # polling a server that is starting; the loop ends at readiness
    raise TimeoutError("etcd did not become healthy")


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[tuple[RoutedNet, list[AgentProcess]]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("etcd") is None:
        pytest.skip("etcd server not installed (Debian package etcd-server)")
    pytest.importorskip("aetcd")
    net = RoutedNet()
    try:
        url = "http://10.214.1.2:2379"
        net.popen(
            net.a,
            [
                "etcd", "--name", "t", "--data-dir", str(tmp_path / "etcd"),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "t=http://127.0.0.1:2380",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_etcd(net, url)
        common = ["--backend", "etcd", "--etcd", url, "--peer-timeout", "3", "--heartbeat", "1",
                  "--update-interval", "0.2", "--log-level", "info"]
        specs = [
            (ns, f"e{i}", ["--interface", net.ip[ns], *common])
            for i, ns in enumerate((net.a, net.b, net.c))
        ]
        agents = start_agents(net.popen, specs)
        yield net, agents
    finally:
        net.close()


def test_etcd_finds_peers_across_subnets(routed: tuple[RoutedNet, list[AgentProcess]]) -> None:
    _, (a, b, c) = routed
    for me in (a, b, c):
        for other in (a, b, c):
            if other is not me:
                seen = me.wait_event("added", WAIT_S, peer=other.node_id)
                assert seen["addresses"]  # the peer's own routable address

    key = os.urandom(32).hex()
    b.send(op="add", keys=[key], first=[key])
    epoch = b.wait_event("added_keys", WAIT_S)["epoch"]
    a.wait_for(lambda e: e.get("event") == "updated" and e.get("epoch") == epoch, WAIT_S)

    # Clean stop: key deleted at once. Killed: the lease (3 s) expires and etcd deletes it.
    assert b.quit() == 0
    a.wait_event("removed", WAIT_S, peer="e1")
    c.kill()
    a.wait_event("removed", WAIT_S, peer="e2")
    a.send(op="peers")
    assert a.wait_event("peers", WAIT_S)["peers"] == []


def test_static_peers_across_subnets(tmp_path: Path) -> None:
    """Static backend over the same router: unicast beacons need no multicast and no registry.
    C lists only A; A learns C from C's beacons and answers, so the pair is symmetric."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    net = RoutedNet()
    try:
        a_ip, b_ip, c_ip = net.ip[net.a], net.ip[net.b], net.ip[net.c]
        common = ["--backend", "static", "--peer-timeout", "4", "--heartbeat", "1",
                  "--log-level", "info"]
        specs = [
            (net.a, "s0", ["--interface", a_ip, "--static-peer", f"{b_ip}:7457", *common]),
            (net.b, "s1", ["--interface", b_ip, "--static-peer", f"{a_ip}:7457", *common]),
            (net.c, "s2", ["--interface", c_ip, "--static-peer", f"{a_ip}:7457", *common]),
        ]
        a, b, c = start_agents(net.popen, specs, log_dir=tmp_path)
        for me, other in ((a, b), (b, a), (a, c), (c, a)):
            me.wait_event("added", WAIT_S, peer=other.node_id)
        assert c.quit() == 0
        assert a.wait_event("removed", WAIT_S, peer="s2")["reason"] == "goodbye"
        b.kill()
        assert a.wait_event("removed", WAIT_S, peer="s1")["reason"] == "timeout"
    finally:
        net.close()
