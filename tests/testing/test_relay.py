"""The impairment relay: its sans-IO scheduler, and a routed cluster through it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvpeer.testing.netns import Cluster
from kvpeer.testing.relay import Impairment


def test_delay_loss_and_reorder_decisions() -> None:
    imp = Impairment(delay_s=0.010, loss=0.2, reorder=0.1, reorder_extra_s=0.005, seed=3)
    for i in range(1000):
        imp.submit(i.to_bytes(4, "big"), now=i * 0.001)
    assert imp.due(0.0095) == []  # nothing before its delay
    out = [int.from_bytes(p, "big") for p in imp.due(10.0)]
    assert 150 < imp.dropped < 250 and len(out) + imp.dropped == 1000
    assert imp.reordered > 0
    assert out != sorted(out)  # some packets were overtaken
    assert len(imp) == 0 and imp.next_release() is None


@pytest.mark.cluster
def test_routed_cluster_carries_traffic_with_delay() -> None:
    with Cluster(n_hosts=2, relay=True) as cluster:
        a, b = cluster.hosts
        cluster.set_impairment(delay_ms=25)
        server = cluster.popen(
            b,
            [sys.executable, "-c", _ECHO],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        out = cluster.run(a, [sys.executable, "-c", _PING, b.ip])
        rtt = float(out.stdout)
        assert rtt >= 0.050  # two relay crossings of 25 ms each: the delay is really added
        stats = cluster.stop_relay()
        assert stats is not None and stats["passed"] >= 2


_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 7000))
s.settimeout(30)
print("ready", flush=True)
data, peer = s.recvfrom(100)
s.sendto(data, peer)
"""
_PING = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
t = time.perf_counter()
s.sendto(b"x", (sys.argv[1], 7000))
s.recv(10)
print(time.perf_counter() - t)
"""
