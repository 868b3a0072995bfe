"""Key rotation an operator can follow: each session counts the key it opened with, each peer
shows it, and two nodes that both hold the next key use it (else the old key never looks unused)."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvpeer.metrics import Metrics
from kvpeer.transport import PeerTransport, TransportConfig
from kvpeer.transport.auth import ClientHandshake, ServerHandshake

OLD, NEW = os.urandom(32), os.urandom(32)


class Handler:
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return None


def _transport(node_id: str, psk: bytes | None, next_psk: bytes | None = None) -> PeerTransport:
    config = TransportConfig(host="127.0.0.1", allow_loopback=True, psk=psk, next_psk=next_psk)
    return PeerTransport(node_id, config, Handler())


def test_two_rotating_sides_authenticate_with_the_next_key() -> None:
    """Both hold (old, new): the server took the first match, the old key, so no session ever
    showed that the old key could go."""
    client, server = ClientHandshake((OLD, NEW)), ServerHandshake((OLD, NEW))
    client.on_server_proof(server.on_client_proof(client.on_challenge(server.on_hello(client.hello()))))
    assert client.key_index == server.key_index == 1


def test_each_session_counts_and_shows_the_key_it_opened_with() -> None:
    async def body() -> dict[str, Any]:
        rotating = _transport("rot", OLD, NEW)
        others = [_transport("old", OLD), _transport("new", NEW), _transport("rot2", OLD, NEW)]
        for t in (rotating, *others):
            await t.start()
        try:
            for t in others:
                await t.connect("rot", "127.0.0.1", rotating.port)
            shown = {t.node_id: rotating.session_key(t.node_id) for t in others}
            assert shown == {"old": "current", "new": "next", "rot2": "next"}
            assert [t.session_key("rot") for t in others] == ["current", "current", "next"]
            assert rotating.session_key("stranger") is None
            return dict(rotating.counters)
        finally:
            for t in (rotating, *others):
                await t.close()

    counters = asyncio.run(asyncio.wait_for(body(), 60))
    assert counters["sessions_key_current"] == 1 and counters["sessions_key_next"] == 2

    metrics = Metrics(process=False)  # what the daemon exports of them
    metrics.watch_counters("transport", lambda: counters)
    exported = {
        sample.labels["event"]: sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        if sample.name == "kvpeer_transport_events_total"
    }
    assert exported["sessions_key_next"] == 2 and exported["sessions_key_current"] == 1


def test_without_a_key_sessions_say_none() -> None:
    async def body() -> tuple[str | None, int]:
        a, b = _transport("a", None), _transport("b", None)
        await a.start()
        await b.start()
        try:
            await a.connect("b", "127.0.0.1", b.port)
            return a.session_key("b"), a.counters["sessions_key_none"]
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(asyncio.wait_for(body(), 60)) == ("none", 1)


def test_the_daemon_reports_each_peers_key() -> None:
    daemon = pytest.importorskip("kvpeer.daemon")
    peer = SimpleNamespace(node_id="p1", addresses=("10.0.0.3",), port=7457, fingerprints=set(),
                           chunk_count=0, epoch=1)
    node = SimpleNamespace(
        discovery=SimpleNamespace(peers=lambda: {"p1": peer}),
        transport=SimpleNamespace(session_key=lambda peer_id: "next"),
    )
    (reported,) = asyncio.run(daemon.Daemon.peers(node))
    assert reported["key"] == "next"
