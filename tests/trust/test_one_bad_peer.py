"""One peer that fails in a way nobody planned for costs its own answer, not the request: the
daemon plans a lookup or fetch from the peers that did answer."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from tests.trust.fuzzing import FP

daemon = pytest.importorskip("kvpeer.daemon")


def test_a_peer_failing_with_an_unexpected_error_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A bad peer's ``has`` raised AssertionError (aiortc, before connect() wrapped it): _plan let
    it through and every lookup and fetch failed as INTERNAL."""

    async def peer_request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if peer_id == "bad":
            raise AssertionError
        return {"have": [True] * len(body["keys"])}

    unsynced = {
        name: SimpleNamespace(node_id=name, fingerprints={FP.hex}, epoch=1) for name in ("bad", "good")
    }
    node = SimpleNamespace(
        store=SimpleNamespace(has=lambda key: False),
        peer_table=SimpleNamespace(longest_prefix=lambda keys, fp: (0, []), epoch=lambda peer: None),
        discovery=SimpleNamespace(peers=lambda: unsynced),
        _peer_request=peer_request,
    )
    keys = [bytes([i]) * 32 for i in range(3)]
    with caplog.at_level(logging.INFO, logger="kvpeer.daemon"):
        plan = asyncio.run(asyncio.wait_for(daemon.Daemon._plan(node, keys, FP, 5.0), 30))
    assert plan.sources == ["good"] * 3
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "bad" in r.getMessage()]
    assert len(warned) == 1 and "AssertionError" in warned[0].getMessage()
