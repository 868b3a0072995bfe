"""Real zeroconf across a bridge: three discovery agents in three network namespaces."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpeer.discovery.harness import AgentProcess, start_agents

pytestmark = [pytest.mark.cluster]

WAIT_S = 30.0  # generous: 2 shared cores; every wait ends as soon as the event arrives
FP_A = "aa" * 16
FP_B = "bb" * 16


def wait_log(path: Path, words: tuple[str, ...]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not all(w in (text := path.read_text()) for w in words):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never mentioned {words}:\n{text}")
        time.sleep(0.1)  # polling a log file that another process is writing


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")


# Services of our type whose TXT must be refused: a wrong version, and a TXT id that does
# not match the instance name (an attempt to pass as another node).
ROGUE = """
import asyncio, socket, sys
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
async def main():
    ip = sys.argv[1]
    zc = AsyncZeroconf(interfaces=[ip])
    for name, props in (("rogue", {"v": "9", "id": "rogue"}),
                        ("evil", {"v": "1", "id": "n1", "p": "1", "e": "1", "n": "1"})):
        info = AsyncServiceInfo("_kvpeer._tcp.local.", name + "._kvpeer._tcp.local.", port=9,
                                properties=props, server=name + ".local.",
                                addresses=[socket.inet_aton(ip)])
        await (await zc.async_register_service(info))
    print("registered", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    _need_root()
    from kvpeer.testing.netns import Cluster

    with Cluster(n_hosts=4, prefix="kvpd") as net:
        rogue = net.popen(
            net.hosts[3], [sys.executable, "-c", ROGUE, net.hosts[3].ip],
            stdout=subprocess.PIPE, text=True,
        )
        assert rogue.stdout is not None and rogue.stdout.readline().strip() == "registered"
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
            for i, host in enumerate(net.hosts[:3])
        ]
        procs = start_agents(net.popen, specs, log_dir=tmp_path)
        try:
            yield procs
        finally:
            for agent in procs:
                agent.kill()


def test_three_nodes_see_each_other_updates_goodbye_and_kill(
    agents: list[AgentProcess], tmp_path: Path
) -> None:
    a, b, c = agents
    for me in agents:
        for other in agents:
            if other is not me:
                me.wait_event("added", WAIT_S, peer=other.node_id)
    # The rogue services were on the LAN before the agents started: each agent resolved and
    # refused them (logged once), and never reported them as peers.
    for agent in agents:
        wait_log(tmp_path / f"{agent.node_id}.log", ("rogue", "evil"))

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
    assert not [e for ag in agents for e in ag.events if e.get("peer") in ("rogue", "evil")]
