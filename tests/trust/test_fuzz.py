"""Fuzzing every decoder of untrusted bytes: each input is rejected typed or decodes validly.

Derandomized hypothesis with fixed budgets (no example database), so a run is repeatable and
the default suite stays fast: about 11,500 inputs in all (frames count one by one). ``benchmarks.faults`` runs these same
functions and reports the count.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.trust import fuzzing as fz

# Budgets per target; their sum is what the default suite fuzzes.
BUDGETS = {
    "codec": 2500,
    "transport_mutated": 2000,
    "transport_structured": 500,
    "frames": 600,
    "discovery_mutated": 1500,
    "discovery_txt": 800,
    "api_mutated": 2000,
    "api_structured": 500,
}


def _settings(name: str) -> Any:
    return settings(
        max_examples=BUDGETS[name],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


@_settings("codec")
@given(fz.mutated(fz.CODEC_SEEDS))
def test_codec_containers(data: bytes) -> None:
    fz.feed_codec(data)


@_settings("transport_mutated")
@given(st.one_of(fz.mutated(fz.TRANSPORT_SEEDS), st.binary(max_size=300)))
def test_transport_messages_mutated(data: bytes) -> None:
    fz.feed_transport(data)


@_settings("transport_structured")
@given(fz.structured(fz.TRANSPORT_FIELDS, version=1))
def test_transport_messages_structured(data: bytes) -> None:
    fz.feed_transport(data)


@_settings("frames")
@given(st.lists(st.one_of(st.sampled_from(fz.FRAME_SEEDS), fz.mutated(fz.FRAME_SEEDS)), max_size=6))
def test_transport_frames(frames: list[bytes]) -> None:
    fz.feed_frame(frames)


@_settings("discovery_mutated")
@given(st.one_of(fz.mutated([*fz.DISCOVERY_SEEDS, fz.DIGEST_SEED]), st.binary(max_size=200)))
def test_discovery_records_beacons_inventory(data: bytes) -> None:
    fz.feed_discovery(data)


_TXT_KEYS = st.sampled_from([b"v", b"id", b"p", b"fp", b"e", b"n", b"d0", b"d1", b"x"])


@_settings("discovery_txt")
@given(
    st.dictionaries(_TXT_KEYS, st.one_of(st.none(), st.binary(max_size=300)), max_size=9),
    st.booleans(),
)
def test_discovery_txt_fields(noise: dict[bytes, bytes | None], overlay: bool) -> None:
    fields: dict[bytes, bytes | None] = {**fz.TXT_SEED, **noise} if overlay else noise
    fz.feed_txt(fields)


def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@_settings("api_mutated")
@given(st.one_of(fz.mutated(fz.API_SEEDS), st.binary(max_size=300)))
def test_api_messages_mutated(data: bytes) -> None:
    fz.feed_api(data)


@_settings("api_structured")
@given(fz.structured(fz.API_FIELDS, version=1).map(_framed))
def test_api_messages_structured(data: bytes) -> None:
    fz.feed_api(data)


def test_the_budget_is_at_least_ten_thousand() -> None:
    assert sum(BUDGETS.values()) >= 10_000
