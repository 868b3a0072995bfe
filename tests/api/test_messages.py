"""Message validation and encode/decode pairs, without sockets."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest

from kvpeer.api import messages as m
from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.hashing import ModelFingerprint

FP = ModelFingerprint(name="tiny", layers=2, kv_heads=3, head_dim=8, dtype="float16", rope_theta=1e4)


def round_trip(message: m.Message) -> m.Message:
    frame = m.encode(message)
    assert m.frame_length(frame[:4]) == len(frame) - 4
    return m.decode_body(frame[4:])


@pytest.mark.parametrize(
    "message",
    [
        m.Hello(id=1, namespace="team-a", client="vllm 0.9"),
        m.PutCommit(id=2, segment="kvpeer-1-abcdefghijklmnopqrstuvwxyz"),
        m.Release(id=3, segment="kvpeer-1-abcdefghijklmnopqrstuvwxyz"),
        m.Cancel(id=4, fetch=3),
        m.StatsRequest(id=4),
        m.PeersRequest(id=5),
        m.EvictRequest(id=6, all=True),
        m.HelloOk(id=1, server="kvpeerd", namespace="team-a"),
        m.SegmentReady(id=2, segment="kvpeer-1-x", size=4096),
        m.PutResult(id=2, chunks=3, stored=1, chunk_tokens=256),
        m.LookupResult(id=3, matched_tokens=512, chunk_tokens=256, sources=["local", "node-b"]),
        m.FetchStarted(id=4, segment="kvpeer-1-x", size=8192),
        m.FetchProgress(id=4, index=1, level="q8"),
        m.FetchResult(id=4, segment="kvpeer-1-x", matched_tokens=512, chunk_tokens=256,
                      levels=["exact", "q8"], recompute_from=512),
        m.Released(id=5),
        m.Cancelled(id=4),
        m.StatsResult(id=6, stats={"a": 1, "nested": {"b": [1, 2]}}),
        m.PeersResult(id=7, peers=[{"node_id": "n1"}]),
        m.ErrorResponse(id=8, code=ErrorCode.BUSY, reason="later"),
    ],
)
def test_round_trip(message: m.Message) -> None:
    assert round_trip(message) == message


def test_token_requests_round_trip_tokens_and_fingerprint() -> None:
    tokens = [0, 1, 2**32 - 1, 7]
    for cls in (m.LookupRequest, m.FetchRequest):
        decoded = round_trip(cls(id=9, tokens=tokens, fingerprint=FP))
        assert isinstance(decoded, cls)
        assert decoded.tokens.tolist() == tokens and decoded.fingerprint == FP
    put = round_trip(m.PutRequest(id=1, tokens=np.arange(5), fingerprint=FP, level="exact", dtype="bfloat16"))
    assert isinstance(put, m.PutRequest) and put.level == "exact" and put.dtype == "bfloat16"
    fetch = round_trip(m.FetchRequest(id=2, tokens=[1], fingerprint=FP, deadline_s=0.5, min_level="q4"))
    assert isinstance(fetch, m.FetchRequest) and (fetch.deadline_s, fetch.min_level) == (0.5, "q4")


def test_recompute_speed_round_trips_and_is_left_off_the_wire_when_unset() -> None:
    fetch = round_trip(m.FetchRequest(id=2, tokens=[1], fingerprint=FP, recompute_tokens_per_s=120.0))
    assert isinstance(fetch, m.FetchRequest) and fetch.recompute_tokens_per_s == 120.0
    put = round_trip(m.PutRequest(id=3, tokens=[1], fingerprint=FP, prefill_s=2.5))
    assert isinstance(put, m.PutRequest) and put.prefill_s == 2.5
    # A daemon from before these fields refuses unknown ones: unset, they do not travel.
    assert "recompute_tokens_per_s" not in m.FetchRequest(tokens=[1], fingerprint=FP).to_wire()
    assert "prefill_s" not in m.PutRequest(tokens=[1], fingerprint=FP).to_wire()


def test_kv_from_round_trips_and_is_left_off_the_wire_when_zero() -> None:
    put = round_trip(m.PutRequest(id=3, tokens=range(10), fingerprint=FP, kv_from=4))
    assert isinstance(put, m.PutRequest) and (put.kv_from, put.kv_tokens) == (4, 6)
    fetch = round_trip(m.FetchRequest(id=4, tokens=range(10), fingerprint=FP, kv_from=9))
    assert isinstance(fetch, m.FetchRequest) and fetch.kv_from == 9
    result = round_trip(m.FetchResult(id=4, segment="s", matched_tokens=12, chunk_tokens=4,
                                      levels=["q8", "q8"], recompute_from=12, first_token=4))
    assert isinstance(result, m.FetchResult) and result.first_token == 4
    # Peers of an older version refuse unknown fields: at 0 they do not travel.
    assert "kv_from" not in m.PutRequest(tokens=[1], fingerprint=FP).to_wire()
    assert "kv_from" not in m.FetchRequest(tokens=[1], fingerprint=FP).to_wire()
    assert "first_token" not in m.FetchResult(matched_tokens=4, chunk_tokens=4, levels=["q8"]).to_wire()
    lookup = round_trip(m.LookupRequest(id=5, tokens=[1], fingerprint=FP, local_only=True))
    assert isinstance(lookup, m.LookupRequest) and lookup.local_only is True
    assert "local_only" not in m.LookupRequest(tokens=[1], fingerprint=FP).to_wire()
    with pytest.raises(ProtocolError):
        m.LookupRequest(tokens=[1], fingerprint=FP, local_only=1)  # type: ignore[arg-type]


def test_a_split_round_trips_and_is_left_off_the_wire_when_unset() -> None:
    fetch = round_trip(m.FetchRequest(id=4, tokens=range(10), fingerprint=FP, split=True))
    assert isinstance(fetch, m.FetchRequest) and fetch.split is True
    started = round_trip(m.FetchStarted(id=4, segment="s", size=10, first_token=8))
    assert isinstance(started, m.FetchStarted) and started.first_token == 8
    # A daemon or client of an older version refuses unknown fields: unset, they do not travel.
    assert "split" not in m.FetchRequest(tokens=[1], fingerprint=FP).to_wire()
    assert "first_token" not in m.FetchStarted(segment="s", size=10).to_wire()
    with pytest.raises(ProtocolError):
        m.FetchRequest(tokens=[1], fingerprint=FP, split="yes")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        m.FetchStarted(segment="s", size=10, first_token=-1)


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: m.PutRequest(tokens=[1, 2], fingerprint=FP, kv_from=2), ErrorCode.INVALID),  # no KV left
        (lambda: m.PutRequest(tokens=[1, 2], fingerprint=FP, kv_from=-1), ErrorCode.INVALID),
        (lambda: m.FetchRequest(tokens=[], fingerprint=FP, kv_from=1), ErrorCode.INVALID),
        (lambda: m.FetchRequest(tokens=[1], fingerprint=FP, kv_from=True), ErrorCode.INVALID),
        # first_token must start a restored chunk, and the levels must reach matched_tokens
        (lambda: m.FetchResult(matched_tokens=6, chunk_tokens=4, levels=["q8"], first_token=2),
         ErrorCode.INVALID),
        (lambda: m.FetchResult(matched_tokens=4, chunk_tokens=4, levels=["q8"], first_token=4),
         ErrorCode.INVALID),
        (lambda: m.FetchResult(matched_tokens=4, chunk_tokens=4, levels=[], first_token=4), ErrorCode.INVALID),
        (lambda: m.LookupRequest(tokens=[-1], fingerprint=FP), ErrorCode.INVALID),
        (lambda: m.LookupRequest(tokens=[2**32], fingerprint=FP), ErrorCode.INVALID),
        (lambda: m.LookupRequest(tokens=[[1, 2]], fingerprint=FP), ErrorCode.INVALID),
        (lambda: m.LookupRequest(tokens=["x"], fingerprint=FP), ErrorCode.INVALID),
        (lambda: m.FetchRequest(tokens=[1], fingerprint=FP, deadline_s=-1), ErrorCode.INVALID),
        (lambda: m.FetchRequest(tokens=[1], fingerprint=FP, deadline_s=float("nan")), ErrorCode.INVALID),
        (lambda: m.PutRequest(tokens=[1], fingerprint=FP, dtype="int8"), ErrorCode.INVALID),
        (lambda: m.PutRequest(tokens=[], fingerprint=FP), ErrorCode.INVALID),
        (lambda: m.PutRequest(tokens=[1], fingerprint=FP, prefill_s=0), ErrorCode.INVALID),
        (lambda: m.PutRequest(tokens=[1], fingerprint=FP, prefill_s="1"), ErrorCode.INVALID),
        (
            lambda: m.FetchRequest(tokens=[1], fingerprint=FP, recompute_tokens_per_s=-5),
            ErrorCode.INVALID,
        ),
        (
            lambda: m.FetchRequest(tokens=[1], fingerprint=FP, recompute_tokens_per_s=math.inf),
            ErrorCode.INVALID,
        ),
        (lambda: m.Hello(namespace=""), ErrorCode.INVALID),
        (lambda: m.Hello(namespace="x" * 300), ErrorCode.INVALID),
        (lambda: m.FetchResult(matched_tokens=5, chunk_tokens=4, levels=["q8"]), ErrorCode.INVALID),
        (lambda: m.PutResult(chunks=1, stored=2, chunk_tokens=4), ErrorCode.INVALID),
        (lambda: m.EvictRequest(all=False), ErrorCode.INVALID),
        (lambda: m.StatsRequest(id=-1), ErrorCode.INVALID),
    ],
)
def test_invalid_messages_are_refused_on_construction(build: object, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        build()  # type: ignore[operator]
    assert info.value.code == code


def body(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1", ErrorCode.MALFORMED),
        (msgpack.packb([1, 2]), ErrorCode.MALFORMED),
        (body(v=m.API_VERSION + 1, t="stats", id=1), ErrorCode.UNSUPPORTED_VERSION),
        (body(v=1, t="stats", id=1), ErrorCode.UNSUPPORTED_VERSION),  # before descriptors
        (body(t="stats", id=1), ErrorCode.UNSUPPORTED_VERSION),
        (body(v=m.API_VERSION, t="nope", id=1), ErrorCode.UNKNOWN_TYPE),
        (body(v=m.API_VERSION, t="stats", id=1, extra=3), ErrorCode.INVALID),
        (body(v=m.API_VERSION, t="lookup", id=1, tokens=b"\x00\x00\x00", fingerprint={}), ErrorCode.INVALID),
        (body(v=m.API_VERSION, t="lookup", id=1, tokens=b"", fingerprint={"name": "x"}), ErrorCode.INVALID),
        (body(v=m.API_VERSION, t="release", id=1), ErrorCode.INVALID),
        (body(v=m.API_VERSION, t="release", id="1", segment="s"), ErrorCode.INVALID),
    ],
)
def test_decode_rejects_bad_bodies(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_body(payload)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\x91" * 2_000, "nested too deeply"),  # msgpack's StackError has no text
        (b"\x91" * 100_000, "nested too deeply"),
        (b"\xc1", "begins no msgpack value"),  # nor has its FormatError
        (b"", "empty message"),  # msgpack said "incomplete input"
    ],
)
def test_a_malformed_body_is_answered_with_what_is_wrong(payload: bytes, says: str) -> None:
    """A hostile-client review got "not a msgpack message: " with nothing after the colon."""
    with pytest.raises(ProtocolError) as info:
        m.decode_body(payload)
    assert info.value.code == ErrorCode.MALFORMED
    assert says in info.value.reason and not info.value.reason.rstrip().endswith(":")


def test_fingerprint_hex_must_match_its_fields() -> None:
    wire = m.fingerprint_to_wire(FP)
    wire["hex"] = "00" * 16
    payload = body(v=m.API_VERSION, t="lookup", id=1, tokens=b"\x01\x00\x00\x00", fingerprint=wire)
    with pytest.raises(ProtocolError) as info:
        m.decode_body(payload)
    assert info.value.code == ErrorCode.INVALID


@pytest.mark.parametrize(
    ("field", "value"),
    [("rope_theta", [1]), ("rope_theta", True), ("rope_theta", float("nan")), ("layers", 2.5),
     ("layers", True), ("name", 7), ("dtype", None), ("rope_scaling", {})],
)  # fmt: skip
def test_a_fingerprint_field_of_the_wrong_type_is_refused_at_the_door(field: str, value: object) -> None:
    """It used to pass, fail later in the daemon as an internal error, and be saved to disk."""
    wire = m.fingerprint_to_wire(FP)
    wire.pop("hex", None)
    wire[field] = value
    payload = body(v=m.API_VERSION, t="lookup", id=1, tokens=b"\x01\x00\x00\x00", fingerprint=wire)
    with pytest.raises(ProtocolError) as info:
        m.decode_body(payload)
    assert info.value.code == ErrorCode.INVALID and "fingerprint" in info.value.reason


def test_a_fingerprint_of_no_real_model_shape_is_refused_at_the_door() -> None:
    """head_dim 2**29 passed: a one-token put then had the daemon reserve GiBs of shared memory."""
    wire = m.fingerprint_to_wire(FP)
    wire.pop("hex", None)
    wire.update(layers=1, kv_heads=1, head_dim=2**29)
    payload = body(v=m.API_VERSION, t="put", id=1, tokens=b"\x01\x00\x00\x00", fingerprint=wire)
    with pytest.raises(ProtocolError) as info:
        m.decode_body(payload)
    assert info.value.code == ErrorCode.INVALID and "head_dim must be in 1..4096" in info.value.reason


def test_request_id_is_recovered_from_a_body_that_fails_validation() -> None:
    assert m.request_id_of(body(v=m.API_VERSION, t="release", id=42)) == 42
    assert m.request_id_of(b"\xc1") == 0


def test_frame_decoder_splits_skips_oversized_and_resyncs() -> None:
    decoder = m.FrameDecoder(max_frame=16)
    good = m.encode(m.StatsRequest(id=1))
    assert len(good) - 4 <= 16
    stream = good + struct.pack(">I", 100) + b"x" * 100 + good
    out: list[object] = []
    for i in range(0, len(stream), 7):  # arbitrary split points
        decoder.feed(stream[i : i + 7])
        out.extend(decoder.frames())
    assert not decoder.pending
    assert [type(x).__name__ for x in out] == ["bytes", "ProtocolError", "bytes"]
    assert isinstance(out[1], ProtocolError) and out[1].code == ErrorCode.TOO_LARGE
    assert m.decode_body(out[2]) == m.StatsRequest(id=1)  # type: ignore[arg-type]


def test_a_request_of_max_tokens_fits_a_frame() -> None:
    tokens = np.arange(m.MAX_TOKENS, dtype=np.uint32)
    for cls in (m.LookupRequest, m.FetchRequest, m.PutRequest):
        decoded = round_trip(cls(id=1, tokens=tokens, fingerprint=FP))
        assert isinstance(decoded, cls) and np.array_equal(decoded.tokens, tokens)


def test_encode_refuses_oversized_messages() -> None:
    with pytest.raises(ProtocolError) as info:
        m.encode(m.StatsResult(stats={"blob": b"x" * (m.MAX_FRAME_BYTES + 1)}))
    assert info.value.code == ErrorCode.TOO_LARGE
