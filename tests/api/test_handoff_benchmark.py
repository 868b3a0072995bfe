"""`python -m benchmarks.handoff --json` runs and reports a checked zero-copy hand-off."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_handoff_benchmark_reports_zero_copy_and_no_leak() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.handoff", "--tokens", "256", "512", "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["zero_copy"] is True
    assert result["leaked_segments"] == 0
    assert result["speedup_vs_socket_copy"] > 0
    assert [row["tokens"] for row in result["rows"]] == [256, 512]
