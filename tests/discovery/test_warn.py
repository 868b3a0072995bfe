import logging

import pytest

from kvpeer.discovery._warn import WarnRarely


def test_warn_rarely_with_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    now = 0.0
    warn = WarnRarely(logging.getLogger("test"), period_s=60.0, burst=2, clock=lambda: now)
    with caplog.at_level(logging.DEBUG):
        for i in range(10):
            warn("bad %d", i)
        now = 61.0
        warn("bad %d", 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["bad 0", "bad 1", "bad 10 (8 more like it since the last warning)"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 8
