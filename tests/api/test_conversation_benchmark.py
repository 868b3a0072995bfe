"""`python -m benchmarks.conversation --json` runs a real daemon and moves less with kv_from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_conversation_benchmark_moves_only_each_turns_new_kv_with_kv_from() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.conversation", "--turns", "3", "--turn-tokens", "256",
         "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert [row["tokens"] for row in rows] == [256, 512, 768]
    # Whole prompts move the history again each turn; kv_from moves one turn's KV.
    assert [row["put_mb_whole"] for row in rows] == [pytest.approx(5.625 * t) for t in (1, 2, 3)]
    assert [row["put_mb_kv_from"] for row in rows] == [pytest.approx(5.625)] * 3
    assert [row["fetch_mb_kv_from"] for row in rows] == [pytest.approx(5.625)] * 3
    assert result["fetch_mb_whole"] == pytest.approx(2 * result["fetch_mb_kv_from"])
