"""The namespace harness: hosts reach each other, multicast crosses the bridge, nothing leaks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvpeer.testing.netns import Cluster, parse_rate

# Joins 224.0.0.251 on eth0 and prints the first datagram it gets (what zeroconf relies on).
_MCAST_RECV = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5599))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(sys.argv[1])))
s.settimeout(20)
print("ready", flush=True)
for _ in range(2):
    print(s.recv(100).decode(), flush=True)
"""
_MCAST_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
s.sendto(b"hello-unicast", (sys.argv[2], 5599))
s.sendto(b"hello-mcast", ("224.0.0.251", 5599))
"""


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_parse_rate() -> None:
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("2.5Mbit") == 2_500_000
    with pytest.raises(ValueError):
        parse_rate("fast")


@pytest.mark.cluster
def test_hosts_unicast_multicast_mtu_and_shaping() -> None:
    with Cluster(n_hosts=2, mtu=[1500, 9000]) as cluster:
        a, b = cluster.hosts
        assert a.ip != b.ip and a.netns != b.netns
        assert {a.netns, b.netns, cluster.bridge_netns} <= _netns_names()
        assert "UP" in cluster.run(a, ["ip", "link", "show", "lo"]).stdout
        assert "mtu 9000" in cluster.run(b, ["ip", "link", "show", "eth0"]).stdout

        recv = cluster.popen(
            b, [sys.executable, "-c", _MCAST_RECV, b.ip], stdout=subprocess.PIPE, text=True
        )
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        cluster.run(a, [sys.executable, "-c", _MCAST_SEND, a.ip, b.ip])
        assert recv.stdout.readline().strip() == "hello-unicast"
        assert recv.stdout.readline().strip() == "hello-mcast"
        recv.wait(timeout=10)

        cluster.set_rate(a, "10mbit")
        assert "tbf" in cluster.run(a, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        cluster.set_rate(a, None)
        assert "tbf" not in cluster.run(a, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert not {a.netns, b.netns, cluster.bridge_netns} & _netns_names()


@pytest.mark.cluster
def test_close_on_exception_kills_processes_and_removes_namespaces() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster(n_hosts=1) as cluster:
            names = {cluster.hosts[0].netns, cluster.bridge_netns}
            proc = cluster.popen(cluster.hosts[0], ["sleep", "600"])
            raise RuntimeError("boom")
    assert proc.wait(timeout=10) != 0
    assert not names & _netns_names()


@pytest.mark.cluster
def test_two_clusters_have_distinct_names() -> None:
    with Cluster(n_hosts=1) as one, Cluster(n_hosts=1) as two:
        assert one.hosts[0].netns != two.hosts[0].netns
        assert one.bridge_netns != two.bridge_netns
