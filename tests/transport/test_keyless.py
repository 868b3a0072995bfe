"""Running without a cluster key is allowed (the demo, tests) but said loudly where the LAN can
reach the node: at start and by kvpeerd --check-config."""

from __future__ import annotations

import logging
import os

import pytest

from kvpeer.transport import PeerTransport, TransportConfig
from kvpeer.transport.config import KEYLESS_RISK


class Handler:
    async def handle_request(self, peer_id: str, method: str, body: dict[str, object]) -> dict[str, object]:
        return {}

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return None


@pytest.mark.parametrize(
    ("host", "psk", "level"),
    [("192.0.2.1", None, logging.ERROR), ("127.0.0.1", None, logging.WARNING), ("192.0.2.1", os.urandom(32), None)],
    ids=["lan-keyless", "loopback-keyless", "lan-keyed"],
)
def test_a_keyless_transport_names_the_risk_at_error_level_where_the_lan_reaches_it(
    caplog: pytest.LogCaptureFixture, host: str, psk: bytes | None, level: int | None
) -> None:
    """It was one warning, easy to miss, while any LAN host could join as a full peer."""
    config = TransportConfig(host=host, allow_loopback=True, psk=psk, mtu=1500)
    assert config.keyless_risk == level
    with caplog.at_level(logging.INFO, logger="kvpeer.transport.peer"):
        PeerTransport("n", config, Handler())
    said = [r.levelno for r in caplog.records if r.getMessage() == KEYLESS_RISK]
    assert said == ([] if level is None else [level])
    assert "reads every cached prefix" in KEYLESS_RISK and "openssl rand -hex 32" in KEYLESS_RISK
