"""Wire messages and bulk frames: round trips, and every kind of bad input rejected typed."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.transport import messages as m
from kvpeer.transport.blobs import BlobAssembler, blob_start, iter_frames

KEY = bytes(range(32))

LIMIT = 1 << 20


@pytest.mark.parametrize(
    "message",
    [
        m.Request(id=7, method="has", body={"keys": [b"\x01" * 32]}),
        m.Response(id=7, body={"have": [True]}),
        m.Error(id=3, code=ErrorCode.NOT_FOUND, reason="gone"),
        m.Ping(seq=1, sent=12.5),
        m.BlobRequest(id=9, key=b"k" * 32, level="q8"),
        m.Bye(),
    ],
)
def test_control_round_trip(message: m.Message) -> None:
    assert m.decode(m.encode(message, LIMIT), m.CONTROL_TYPES, LIMIT) == message


def test_decode_rejects_with_codes() -> None:
    def code(data: bytes) -> ErrorCode:
        with pytest.raises(ProtocolError) as info:
            m.decode(data, m.CONTROL_TYPES, 64)
        return info.value.code

    assert code(b"\xc1") == ErrorCode.MALFORMED
    assert code(msgpack.packb([1, 2])) == ErrorCode.MALFORMED
    assert code(msgpack.packb({"v": 2, "t": "bye"})) == ErrorCode.UNSUPPORTED_VERSION
    assert code(msgpack.packb({"v": 1, "t": "nope"})) == ErrorCode.UNKNOWN_TYPE
    assert code(msgpack.packb({"v": 1, "t": "ping", "seq": True, "sent": 1.0})) == ErrorCode.INVALID
    assert code(msgpack.packb({"v": 1, "t": "ping", "seq": 1})) == ErrorCode.INVALID
    assert code(b"\x00" * 65) == ErrorCode.TOO_LARGE
    # A signalling message is not accepted on the control channel.
    hello = m.encode(m.Hello(nonce=b"n" * 32), LIMIT)
    assert code(hello) == ErrorCode.UNKNOWN_TYPE
    with pytest.raises(ProtocolError):
        m.encode(m.Request(id=1, method="x", body={"a": b"x" * 100}), 64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_protocol_error(data: bytes) -> None:
    try:
        m.decode(data, m.CONTROL_TYPES, LIMIT)
    except ProtocolError:
        pass


def test_frames_assemble_out_of_order_and_before_start() -> None:
    blob = bytes(range(256)) * 1000
    frames = list(iter_frames(5, blob, 4096))
    assembler = BlobAssembler(5, 1 << 20)
    for frame in reversed(frames[1:]):
        assert m.decode_frame_header(frame)[0] == 5
        assembler.add(frame)
    assembler.start(blob_start(5, blob, 4096, key=KEY, level="q8"))
    assert not assembler.complete
    assembler.add(frames[0])
    assert assembler.complete
    assert assembler.result() == blob


def test_frame_corruption_duplicates_and_digest() -> None:
    blob = b"x" * 10_000
    frames = list(iter_frames(1, blob, 4096))
    bad = bytearray(frames[0])
    bad[-1] ^= 1
    with pytest.raises(ProtocolError) as info:
        m.decode_frame_header(bytes(bad))
    assert info.value.code == ErrorCode.INTEGRITY

    assembler = BlobAssembler(1, 1 << 20)
    assembler.start(blob_start(1, blob, 4096, key=KEY, level="q8"))
    assembler.add(frames[0])
    with pytest.raises(ProtocolError):
        assembler.add(frames[0])

    # Frames of a different blob content under the stated digest: caught at the end.
    liar = BlobAssembler(1, 1 << 20)
    liar.start(blob_start(1, b"y" * 10_000, 4096, key=KEY, level="q8"))
    for frame in frames:
        liar.add(frame)
    with pytest.raises(ProtocolError) as info:
        liar.result()
    assert info.value.code == ErrorCode.INTEGRITY


def test_assembler_bounds_size() -> None:
    blob = b"z" * 50_000
    assembler = BlobAssembler(2, 20_000)
    with pytest.raises(ProtocolError):
        assembler.start(blob_start(2, blob, 4096, key=KEY, level="q8"))
    early = BlobAssembler(2, 10_000)
    frames = list(iter_frames(2, blob, 4096))
    with pytest.raises(ProtocolError):
        for frame in frames:
            early.add(frame)


def test_assembler_counts_each_held_frame_not_only_its_payload() -> None:
    """Empty or tiny frames cost bookkeeping the payload bytes do not show: before BlobStart
    their count is bounded, and a BlobStart of tiny frames is refused."""
    early = BlobAssembler(4, 10_000)
    with pytest.raises(ProtocolError) as raised:
        for index in range(10_000):
            early.add(m.encode_frame(4, index, b""))
    assert raised.value.code == ErrorCode.TOO_LARGE and index < 200
    tiny = BlobAssembler(4, 10_000)
    with pytest.raises(ProtocolError):
        tiny.start(blob_start(4, b"x" * 5000, 64 + m.FRAME_HEADER.size, key=KEY, level="q8"))
    small_blob = BlobAssembler(4, 10_000)  # one short frame is what a small blob is
    small_blob.start(blob_start(4, b"x" * 10, 64 + m.FRAME_HEADER.size, key=KEY, level="q8"))
    small_blob.add(m.encode_frame(4, 0, b"x" * 10))
    assert small_blob.result() == b"x" * 10


def test_a_blob_stating_another_key_or_level_is_refused() -> None:
    blob = b"x" * 5000
    wrong_key = BlobAssembler(3, 1 << 20, key=bytes(32), level="q8")
    with pytest.raises(ProtocolError) as raised:
        wrong_key.start(blob_start(3, blob, 4096, key=KEY, level="q8"))
    assert raised.value.code == ErrorCode.INTEGRITY
    wrong_level = BlobAssembler(3, 1 << 20, key=KEY, level="q8")
    with pytest.raises(ProtocolError) as raised:
        wrong_level.start(blob_start(3, blob, 4096, key=KEY, level="q3"))
    assert raised.value.code == ErrorCode.INTEGRITY
    any_level = BlobAssembler(3, 1 << 20, key=KEY)
    any_level.start(blob_start(3, blob, 4096, key=KEY, level="q3"))


def test_encode_refuses_map_keys_that_decode_would_refuse() -> None:
    """msgpack packs an int key; the peer's strict decode refuses the whole message, so the
    request it answers would wait out its timeout. Refused here, where the bug is."""
    with pytest.raises(ProtocolError) as info:
        m.encode(m.Response(id=1, body={"per_level": [{"ok": 1}, {0: 1}]}), LIMIT)
    assert info.value.code == ErrorCode.INVALID and "map key 0 (int)" in info.value.reason
    body = {"s": {"b": [b"x", (1, {b"k": None})]}, b"raw": 1}
    assert m.decode(m.encode(m.Response(id=1, body=body), LIMIT), m.CONTROL_TYPES, LIMIT) == m.Response(
        id=1, body={"s": {"b": [b"x", [1, {b"k": None}]]}, b"raw": 1}
    )


def test_a_refused_message_still_names_its_type_and_id() -> None:
    int_keys = msgpack.packb({"v": 1, "t": "resp", "id": 5, "body": {0: 1}})
    with pytest.raises(ProtocolError) as info:
        m.decode(int_keys, m.CONTROL_TYPES, LIMIT)
    assert info.value.code == ErrorCode.MALFORMED and "undecodable" in info.value.reason
    assert "int is not allowed for map key" in info.value.reason  # not "not msgpack"
    assert m.peek_type_and_id(int_keys) == ("resp", 5)
    assert m.peek_type_and_id(msgpack.packb({"t": "err", "id": True})) is None
    assert m.peek_type_and_id(msgpack.packb([1, 2])) is None
    assert m.peek_type_and_id(b"\x81") is None  # a map cut short


def test_peeking_a_huge_refused_message_reads_only_its_start() -> None:
    """A message over the size limit is refused, then peeked: a peer could make its first key
    an array of millions of items, each built on the event loop."""
    items = 2_000_000
    costly = b"\x81\xdd" + items.to_bytes(4, "big") + b"\x00" * items + b"\x01"
    tracemalloc.start()
    try:
        assert m.peek_type_and_id(costly) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # was a 2M-item list: 16 MB
    big = msgpack.packb({"v": 1, "t": "resp", "id": 7, "body": {"pad": b"x" * 1_000_000, 0: 1}})
    assert m.peek_type_and_id(big) == ("resp", 7)  # "t" and "id" come first


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_peeking_garbage_never_raises(data: bytes) -> None:
    m.peek_type_and_id(data)


def test_an_error_code_from_a_newer_peer_reads_as_internal_with_its_reason() -> None:
    newer = msgpack.packb({"v": 1, "t": "err", "id": 2, "code": 14, "reason": "rate limited"})
    error = m.decode(newer, m.CONTROL_TYPES, LIMIT)
    assert isinstance(error, m.Error)
    exc = error.as_exception("peer x")
    assert exc.code == ErrorCode.INTERNAL and exc.reason == "peer x: error code 14: rate limited"
    assert m.Error(id=2, code=ErrorCode.BUSY, reason="later").as_exception("p").code == ErrorCode.BUSY


def test_an_error_built_from_an_exception_fits_the_wire() -> None:
    error = m.Error.of(4, ProtocolError(ErrorCode.NOT_FOUND, "x" * 2000))
    assert error.code == ErrorCode.NOT_FOUND and len(error.reason) == m.MAX_REASON


def test_an_assembler_reserves_its_stated_size_or_what_it_holds() -> None:
    blob = bytes(range(256)) * 40  # 10 KiB in frames of 4 KiB
    start = blob_start(3, blob, 4096, key=KEY, level="")
    frames = list(iter_frames(3, blob, 4096))
    asm = BlobAssembler(3, LIMIT, key=KEY)
    asm.add(frames[0])
    early = asm.reserved_bytes
    assert 4096 - 16 < early < 4096 + 256  # a frame before BlobStart: its payload and overhead
    asm.start(start)
    assert asm.reserved_bytes == len(blob)  # the stated size from then on
    for frame in frames[1:]:
        asm.add(frame)
    assert asm.reserved_bytes >= len(blob) and asm.complete
    reserved = asm.reserved_bytes
    assert asm.result() == blob and asm.reserved_bytes == reserved  # released by the owner
