"""Real zeroconf across a bridge: three discovery agents in three network namespaces."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvpeer.discovery.harness import AgentProcess, start_agents

pytestmark = [pytest.mark.cluster]

WAIT_S = 30.0  # generous: 2 shared cores; every wait ends as soon as the event arrives
FP_A = "aa" * 16
FP_B = "bb" * 16


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    _need_root()
    from kvpeer.testing.netns import Cluster

    with Cluster(n_hosts=3, prefix="kvpd") as net:
        specs = [
            (
                host,
                f"n{i}",
                [
                    "--interface", host.ip, "--port", "7457",
                    "--fingerprint", FP_B if i == 2 else FP_A,
                    "--peer-timeout", "4", "--heartbeat", "1", "--update-interval", "0.5",
                    "--log-level", "info",
                ],
            )
            for i, host in enumerate(net.hosts)
        ]
        procs = start_agents(net.popen, specs)
        try:
            yield procs
        finally:
            for agent in procs:
                agent.kill()


def test_three_nodes_see_each_other_updates_goodbye_and_kill(agents: list[AgentProcess]) -> None:
    a, b, c = agents
    for me in agents:
        for other in agents:
            if other is not me:
                me.wait_event("added", WAIT_S, peer=other.node_id)

    # An inventory change reaches the others as a new epoch and digest in the TXT record.
    key = os.urandom(32).hex()
    a.send(op="add", keys=[key, os.urandom(32).hex()], first=[key])
    epoch = a.wait_event("added_keys", WAIT_S)["epoch"]
    for other in (b, c):
        seen = other.wait_for(
            lambda e: e.get("event") == "updated" and e.get("peer") == "n0" and e["epoch"] == epoch,
            WAIT_S,
        )
        assert seen["chunks"] == 2 and seen["epoch_changed"]
        assert seen["fingerprints"] == [FP_A]

    # A clean stop sends a goodbye: removed for that reason, not by the liveness timeout.
    assert a.quit() == 0
    for other in (b, c):
        gone = other.wait_event("removed", WAIT_S, peer="n0")
        assert gone["reason"] == "goodbye"

    # SIGKILL sends nothing: the heartbeat silence (peer_timeout_s) drops it; zeroconf alone
    # would keep its records for their TTL (minutes).
    c.kill()
    gone = b.wait_event("removed", WAIT_S, peer="n2")
    assert gone["reason"] == "timeout"
    b.send(op="peers")
    assert b.wait_event("peers", WAIT_S)["peers"] == []
