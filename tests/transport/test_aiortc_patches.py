"""The aiortc patches: fail loudly when an aiortc upgrade moves what they rely on."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import re
import struct
import types
from types import SimpleNamespace
from typing import Any

import aiortc
import pytest
from aiortc import rtcdtlstransport, rtcsctptransport
from aiortc.rtcsctptransport import DataChunk, InboundStream, RTCSctpTransport, SackChunk

from kvpeer.transport import PeerTransport, TransportConfig, aiortc_patches
from kvpeer.transport.netinfo import sctp_packet_size

# What the patched methods of RTCSctpTransport read or replace; all must still exist.
_SCTP_ATTRIBUTES = (
    "_forward_tsn_chunk", "_fast_recovery_exit", "_fast_recovery_transmit", "_sent_queue",
    "_outbound_queue", "_flight_size", "_cwnd", "_t3_handle", "_sack_misordered",
    "_sack_duplicates", "_sack_needed", "_association_state", "_last_sacked_tsn",
    "_local_tsn",
    # read or set by the fast DATA reader and the batched send (_DataReader, _data_packet)
    "_inbound_streams", "_last_received_tsn", "_local_verification_tag", "_reconfig_deferred",
    "_advertised_rwnd", "_local_port", "_remote_port", "_remote_verification_tag",
)  # fmt: skip
# What the patches read or set on DataChunk (annotated on the class, set in aiortc's _send).
# (_in_flight: _flight_size_decrease does nothing twice, which _local_drop relies on.)
_DATA_CHUNK_ATTRIBUTES = (
    "_acked", "_retransmit", "_misses", "_sent_count", "_sent_time", "_in_flight",
)  # fmt: skip


def test_pinned_version_and_patch_points_exist() -> None:
    assert aiortc.__version__ == aiortc_patches.AIORTC_VERSION, (
        "aiortc was upgraded: re-check kvpeer/transport/aiortc_patches.py, then update the pin"
    )
    for name in ("_send", "_receive_sack_chunk", "_t3_expired"):
        assert "USERDATA_MAX_LENGTH" in getattr(RTCSctpTransport, name).__code__.co_names, name
    assert "SCTP_RTO_MIN" in RTCSctpTransport._update_rto.__code__.co_names
    assert "_ssthresh" in RTCSctpTransport._receive_sack_chunk.__code__.co_names
    for name in ("_transmit", "_send_sack", "_send_chunk", "_t3_start", "_t3_restart",
                 "_flight_size_increase", "_receive_data_chunk", "_mark_received",
                 "_get_inbound_stream", "_receive", "_reset_deferred_streams",
                 "_maybe_abandon", "_flight_size_decrease"):  # fmt: skip
        assert callable(getattr(RTCSctpTransport, name)), name
    for attribute in _DATA_CHUNK_ATTRIBUTES:
        assert attribute in DataChunk.__annotations__, attribute
    # T3 expiry must still mark chunks itself (we unmark the gap-acknowledged ones after it)
    # and schedule the transmit rather than run it.
    t3 = inspect.getsource(RTCSctpTransport._t3_expired)
    assert "_retransmit = True" in t3 and "ensure_future(self._transmit())" in t3
    # RTCSctpTransport.__init__ asks for the current event loop: give it one of its own, so the
    # test does not depend on an earlier test having left a loop set.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        transport = RTCSctpTransport.__new__(RTCSctpTransport)
        RTCSctpTransport.__init__(transport, _FakeDtls())  # type: ignore[arg-type]
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    for attribute in _SCTP_ATTRIBUTES:
        assert hasattr(transport, attribute), attribute
    stream = InboundStream()
    assert stream.reassembly == [] and callable(stream.add_chunk) and callable(stream.pop_messages)
    # Our _receive_data_chunk must do what aiortc's does, apart from the shortcut.
    stock = inspect.getsource(RTCSctpTransport._receive_data_chunk)
    for step in ("_mark_received(chunk.tsn)", "_get_inbound_stream(chunk.stream_id)",
                 "add_chunk(chunk)", "_advertised_rwnd -= len(chunk.user_data)",
                 "pop_messages()", "_reset_deferred_streams()"):  # fmt: skip
        assert step in stock, step
    # The send loop inlines _flight_size_increase and serialises DATA packets itself.
    increase = inspect.getsource(RTCSctpTransport._flight_size_increase)
    assert "chunk._in_flight = True" in increase
    assert "self._flight_size += chunk._book_size" in increase
    # The fast reader does _handle_data's tag rule and its "SACK if needed" itself, relies on
    # _send_sack clearing what it owes, and calls _reset_deferred_streams only when a reset
    # waits (aiortc's does nothing otherwise).
    handle = inspect.getsource(RTCSctpTransport._handle_data)
    assert "expected_tag = self._local_verification_tag" in handle
    assert "if self._sack_needed:" in handle and "await self._send_sack()" in handle
    sack = inspect.getsource(RTCSctpTransport._send_sack)
    assert "self._sack_duplicates.clear()" in sack and "self._sack_needed = False" in sack
    reset = inspect.getsource(RTCSctpTransport._reset_deferred_streams)
    assert "request = self._reconfig_deferred" in reset and "if request is not None" in reset
    # DATA chunks are built with __new__ and their fields set one by one: __init__ must set
    # no other field.
    init = inspect.getsource(DataChunk.__init__)
    assert set(re.findall(r"self\.(\w+)", init)) == {
        "flags", "tsn", "stream_id", "stream_seq", "protocol", "user_data"
    }, "DataChunk.__init__ changed: check _new_chunk's users in aiortc_patches"
    serialize = inspect.getsource(rtcsctptransport.serialize_packet)
    assert 'pack("<L", checksum)' in serialize and "crc32c(header" in serialize
    aiortc_patches.apply()
    dtls = rtcdtlstransport.RTCDtlsTransport
    for name in ("_recv_next", "_write_ssl"):
        consts = getattr(dtls, name).__code__.co_consts
        assert aiortc_patches.DTLS_BUFFER in consts and 1500 not in consts, name


class _FakeDtls:
    """Just enough of RTCDtlsTransport for RTCSctpTransport.__init__."""

    state = "new"
    transport: Any = None

    def _register_data_receiver(self, receiver: Any) -> None:
        pass


def test_a_sack_comes_every_32_packets_and_at_least_twice_a_lan_window() -> None:
    """32 packets at MTU 1500; at MTU 9000, 32 packets (284 KB) are about the whole LAN window
    (256 KiB + 4 packets): only the delay timer would acknowledge, so 16 there."""
    assert aiortc_patches.sack_every(1412 - aiortc_patches.SCTP_OVERHEAD) == 32
    assert aiortc_patches.sack_every(8912 - aiortc_patches.SCTP_OVERHEAD) == 16
    assert aiortc_patches.sack_every(16_384 - aiortc_patches.SCTP_OVERHEAD) == 9
    window = 256 * 1024 + 4 * 16_356
    for userdata in range(500, 16_357, 97):
        every = aiortc_patches.sack_every(userdata)
        assert 2 <= every <= 32 and every * userdata <= window / 1.7


def test_packet_size_agreement() -> None:
    kwargs = {"maximum": 16_384, "minimum": 1_189}
    assert sctp_packet_size(1500, 9000, **kwargs) == 1412
    assert sctp_packet_size(9000, 9000, **kwargs) == 8912
    assert sctp_packet_size(65536, 65536, **kwargs) == 16_384
    assert sctp_packet_size(1280, 1500, **kwargs) == 1192
    assert sctp_packet_size(1000, 1500, **kwargs) == 1_189  # aiortc's own floor


class _ServesOneBlob:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    async def handle_request(self, *_: Any) -> dict[str, Any]:
        return {}

    async def open_blob(self, *_: Any) -> bytes:
        return self.blob


async def _loopback_pair(config: TransportConfig, blob: bytes) -> tuple[PeerTransport, PeerTransport]:
    """Two started transports on loopback, each serving ``blob`` for any key."""
    a = PeerTransport("a", config, _ServesOneBlob(blob))
    b = PeerTransport("b", config, _ServesOneBlob(blob))
    await a.start()
    await b.start()
    return a, b


def test_patched_session_uses_big_packets_and_fewer_sacks() -> None:
    async def body() -> tuple[int, int, int, bool]:
        key = os.urandom(32)
        config = TransportConfig(host="127.0.0.1", allow_loopback=True, psk=key)
        blob = os.urandom(4 << 20)

        a, b = await _loopback_pair(config, blob)
        try:
            session = await a.connect("b", "127.0.0.1", b.port)
            sctp = session._pc.sctp  # the association of the fetching side
            counts = {"sack": 0, "other": 0}
            send_chunk = sctp._send_chunk

            async def counting(chunk: Any) -> None:
                counts["sack" if isinstance(chunk, SackChunk) else "other"] += 1
                await send_chunk(chunk)

            sctp._send_chunk = counting
            fetched = await session.fetch_blob(b"k", "")
            userdata = sctp._send.__globals__["USERDATA_MAX_LENGTH"]
            return session.packet_bytes, userdata, counts["sack"], fetched == blob
        finally:
            await a.close()
            await b.close()

    packet, userdata, sacks, intact = asyncio.run(asyncio.wait_for(body(), 60))
    assert intact
    assert packet == 16_384 and userdata == 16_384 - aiortc_patches.SCTP_OVERHEAD
    data_packets = (4 << 20) // userdata
    assert sacks < data_packets / 3, (sacks, data_packets)  # stock: one SACK per packet


def test_capped_socket_buffers_are_warned(caplog: Any) -> None:
    import logging
    import socket

    aiortc_patches._buffer_warned = False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with caplog.at_level(logging.WARNING, logger="kvpeer.transport.aiortc_patches"):
            rcv, snd = aiortc_patches.size_socket_buffers(sock, 1 << 30)
    assert rcv < 1 << 30 and snd < 1 << 30
    assert "net.core.rmem_max" in caplog.text


def _receiver_state(last: int) -> SimpleNamespace:
    return SimpleNamespace(
        _last_received_tsn=last, _sack_misordered=set(), _sack_duplicates=[],
        _kvpeer_highest_tsn=None, _kvpeer_sack_now=False,
    )  # fmt: skip


def test_mark_received_matches_aiortc_and_flags_gap_changes() -> None:
    for name in ("uint32_gt", "uint32_gte", "tsn_plus_one"):
        assert callable(getattr(rtcsctptransport, name)), name
    rng = random.Random(5)
    for _ in range(50):
        first = rng.randrange(0, 2**31)
        arrivals = list(range(first, first + 200))
        rng.shuffle(arrivals)
        # Mostly in order with some reordering and duplicates, like a lossy path.
        arrivals = sorted(arrivals, key=lambda t: t + rng.gauss(0, 5))
        arrivals += rng.sample(arrivals, 20)
        stock, ours = _receiver_state(first - 1), _receiver_state(first - 1)
        for tsn in arrivals:
            expected = RTCSctpTransport._mark_received(stock, tsn)  # type: ignore[arg-type]
            assert aiortc_patches._mark_received(ours, tsn) == expected
            assert ours._last_received_tsn == stock._last_received_tsn
            assert ours._sack_misordered == stock._sack_misordered
            assert sorted(ours._sack_duplicates) == sorted(stock._sack_duplicates)
    # In order: no urgent SACK. A jump (new hole): urgent. Filling the hole: urgent.
    state = _receiver_state(99)
    assert not aiortc_patches._mark_received(state, 100) and not state._kvpeer_sack_now
    aiortc_patches._mark_received(state, 102)
    assert state._kvpeer_sack_now
    state._kvpeer_sack_now = False
    aiortc_patches._mark_received(state, 103)
    assert not state._kvpeer_sack_now and state._sack_misordered == {102, 103}
    aiortc_patches._mark_received(state, 101)
    assert state._kvpeer_sack_now and state._last_received_tsn == 103
    assert not state._sack_misordered


def test_mark_received_across_the_tsn_wrap() -> None:
    state = _receiver_state(2**32 - 3)
    for tsn in (2**32 - 1, 0, 1, 2**32 - 2):
        aiortc_patches._mark_received(state, tsn)
    assert state._last_received_tsn == 1 and not state._sack_misordered


def test_record_path_patch_points_exist() -> None:
    """What the DTLS record path and the datagram demux read in aiortc, aioice and pyOpenSSL."""
    import aioice.ice
    from OpenSSL import SSL
    from OpenSSL.SSL import _lib

    for name in ("SSL_write", "SSL_read", "BIO_read", "BIO_write"):
        assert callable(getattr(_lib, name)), name
    dtls = rtcdtlstransport.RTCDtlsTransport
    init = inspect.getsource(dtls.__init__)
    for attribute in ("__handshake_done", "__rx_bytes", "__rx_packets", "__tx_bytes",
                      "__tx_packets", "_rx_srtp", "_data_receiver"):  # fmt: skip
        assert f"self.{attribute}" in init, attribute
    recv_next = inspect.getsource(dtls._recv_next)
    for step in ("first_byte > 19 and first_byte < 64", "self._ssl.bio_write(data)",
                 "except SSL.ZeroReturnError", "await self._write_ssl()",
                 "self._data_receiver._handle_data(data)", "self._rx_srtp.unprotect"):  # fmt: skip
        assert step in recv_next, step
    assert "self._ssl.send(data)" in inspect.getsource(dtls._send_data)
    context = SSL.Context(SSL.DTLS_METHOD)
    connection = SSL.Connection(context, None)  # memory BIOs, as aiortc creates it
    for attribute in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error"):
        assert getattr(connection, attribute, None) is not None, attribute
    assert "_network_host" in inspect.getsource(aioice.ice.CandidatePair.remote_addr.fget)
    assert "self._nominated.get(component)" in inspect.getsource(aioice.ice.Connection.sendto)
    received = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    assert "self.receiver.data_received(data, self.local_candidate.component)" in received


def test_record_path_carries_the_session_and_survives_an_empty_datagram() -> None:
    import socket

    async def body() -> tuple[bool, bool, bool]:
        config = TransportConfig(host="127.0.0.1", allow_loopback=True, psk=os.urandom(32))
        blob = os.urandom(1 << 20)

        a, b = await _loopback_pair(config, blob)
        try:
            session = await a.connect("b", "127.0.0.1", b.port)
            first = await session.fetch_blob(b"k", "") == blob
            dtls = session._pc.sctp.transport
            used = dtls._kvpeer_records is not None
            # Anyone can send to the ICE port: aioice queued an empty datagram as data and
            # aiortc's DTLS reader died on it, closing the connection.
            local = dtls.transport._connection._nominated[1].local_candidate
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"", (local.host, local.port))
            await asyncio.sleep(0.05)  # the datagram is handled (or not) on the next loop turn
            second = await session.fetch_blob(b"k", "", timeout=10) == blob
            return first, used, second
        finally:
            await a.close()
            await b.close()

    first, used, second = asyncio.run(asyncio.wait_for(body(), 60))
    assert first and used
    assert second


def test_send_batch_keeps_datagram_boundaries_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of equal records leave in one sendmsg (UDP GSO, when on) and arrive as the same
    datagrams."""
    import socket

    monkeypatch.setattr(aiortc_patches, "UDP_GSO", True)

    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        tx.bind(("127.0.0.1", 0))
        sent_alone: list[bytes] = []

        class Transport:
            def get_extra_info(self, name: str) -> Any:
                return tx if name == "socket" else None

            def get_write_buffer_size(self) -> int:
                return 0

            def sendto(self, data: bytes, addr: Any) -> None:
                sent_alone.append(data)
                tx.sendto(data, addr)

        host, port = rx.getsockname()
        pair = SimpleNamespace(
            protocol=SimpleNamespace(transport=Transport()),
            remote_candidate=SimpleNamespace(_network_host=host, port=port),
        )
        path = aiortc_patches._RecordPath.__new__(aiortc_patches._RecordPath)
        path.ice = SimpleNamespace(_nominated={1: pair})
        path.gso, path.gso_protocol, path.batch = None, None, None
        path.gso_ok = True
        sizes = [1000] * 5 + [500] + [1000] * 70 + [300, 300, 9000]
        records = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        aiortc_patches._send_batch(path, records)
        received = [rx.recv(65536) for _ in records]
        path.close()
    assert received == records
    assert len(sent_alone) < len(records) / 4  # the runs went as segmented sends


def _receiving_association(patched: bool) -> tuple[Any, list[tuple[int, int, bytes]]]:
    """An established RTCSctpTransport that only receives (call inside an event loop); with
    *patched*, the receive side of configure_association. Returns it and what it delivers."""
    sctp = RTCSctpTransport.__new__(RTCSctpTransport)
    RTCSctpTransport.__init__(sctp, _FakeDtls())  # type: ignore[arg-type]
    sctp._association_state = RTCSctpTransport.State.ESTABLISHED
    sctp._local_verification_tag = 1234
    sctp._last_received_tsn = 999
    delivered: list[tuple[int, int, bytes]] = []

    async def receive(stream_id: int, pp_id: int, data: bytes) -> None:
        delivered.append((stream_id, pp_id, data))

    async def send_chunk(chunk: Any) -> None:
        pass  # SACKs go nowhere

    sctp._receive = receive  # type: ignore[method-assign]
    sctp._send_chunk = send_chunk  # type: ignore[method-assign]
    if patched:
        sctp._receive_data_chunk = types.MethodType(aiortc_patches._receive_data_chunk, sctp)  # type: ignore[method-assign]
        sctp._mark_received = types.MethodType(aiortc_patches._mark_received, sctp)  # type: ignore[method-assign]
        sctp._kvpeer_highest_tsn = None  # type: ignore[attr-defined]
        sctp._kvpeer_sack_now = False  # type: ignore[attr-defined]
        sctp._kvpeer_sack_every = aiortc_patches.sack_every(1384)  # type: ignore[attr-defined]
        sack = aiortc_patches._DelayedSack(sctp)
        sctp._send_sack = sack.on_sack_needed  # type: ignore[method-assign]
        sctp._kvpeer_reader = aiortc_patches._DataReader(sctp, sack)  # type: ignore[attr-defined]
    return sctp, delivered


def test_data_reader_does_what_aiortc_does_with_each_packet() -> None:
    """The one-DATA-chunk reader against aiortc's own receive path, packet by packet, on a
    lossy, reordering, duplicating arrival order of fragmented messages: the same messages
    delivered in the same order, the same cumulative TSN, holes, duplicates and window; bad
    checksums and other tags dropped; bundled and control packets left to aiortc."""
    from OpenSSL.SSL import _ffi

    rng = random.Random(3)
    packets: list[bytes] = []
    tsn = 1000
    for seq in range(40):
        size = rng.choice((1, 1383, 1384 * 3, 5000, 20_000))
        pieces = [rng.randbytes(min(1384, size - i)) for i in range(0, size, 1384)]
        for index, piece in enumerate(pieces):
            chunk = DataChunk()
            chunk.flags = (index == 0) * 2 | (index == len(pieces) - 1)  # FIRST / LAST
            chunk.tsn, chunk.stream_id, chunk.stream_seq = tsn, seq % 3, seq // 3
            chunk.protocol, chunk.user_data = 53, piece
            packets.append(rtcsctptransport.serialize_packet(5000, 5000, 1234, chunk))
            tsn += 1
    arrivals = sorted(packets, key=lambda p: packets.index(p) + rng.gauss(0, 4))
    arrivals = [p for p in arrivals if rng.random() > 0.03] + arrivals[:20]  # losses, dups
    arrivals += packets  # the retransmissions: everything arrives in the end
    extra = [
        packets[0][:-1] + bytes([packets[0][-1] ^ 1]),  # bad checksum
        rtcsctptransport.serialize_packet(5000, 5000, 99, DataChunk()),  # another tag
        rtcsctptransport.serialize_packet(5000, 5000, 1234, SackChunk()),  # control
    ]

    async def body() -> None:
        stock, stock_out = _receiving_association(patched=False)
        ours, ours_out = _receiving_association(patched=True)
        reader = ours._kvpeer_reader
        buffer = _ffi.new("char[]", 32_768)
        view = _ffi.buffer(buffer)
        others: list[bytes] = []
        stock_handle, ours_handle = stock._handle_data, ours._handle_data

        async def other(data: bytes) -> None:
            others.append(data)
            await ours_handle(data)

        for packet in arrivals + extra:
            await stock_handle(packet)
            view[: len(packet)] = packet
            status = reader.read(view, len(packet))
            if status > 0:
                await reader.follow(status)
            elif status == reader.OTHER:
                await other(view[: len(packet)])
            assert ours._last_received_tsn == stock._last_received_tsn
            assert ours._sack_misordered == stock._sack_misordered
            assert ours._advertised_rwnd == stock._advertised_rwnd
            assert not ours._sack_duplicates  # reported at once (stock: a SACK per packet)
        assert ours_out == stock_out and len(stock_out) == 40
        assert ours._last_received_tsn == tsn - 1
        # A bundled packet (two chunks) is aiortc's; so is anything but DATA.
        assert others == extra[2:]
        bundled = packets[0] + bytes(DataChunk())
        view[: len(bundled)] = bundled
        assert reader.read(view, len(bundled)) == reader.OTHER
        assert view[: len(bundled)] == bundled  # untouched for aiortc's checksum check

    asyncio.run(body())


def test_data_packets_are_serialised_as_aiortc_does() -> None:
    rng = random.Random(7)
    for size in (*range(10), 1383, 1384, 8884):
        chunk = DataChunk()
        chunk.flags, chunk.tsn, chunk.stream_id = rng.randrange(16), rng.randrange(2**32), 7
        chunk.stream_seq, chunk.protocol = rng.randrange(2**16), 53
        chunk.user_data = rng.randbytes(size)
        ports = (5000, 5001, rng.randrange(2**32))
        assert aiortc_patches._data_packet(ports, chunk) == rtcsctptransport.serialize_packet(
            *ports, chunk
        ), size


def test_coalesced_datagrams_are_split_into_their_records() -> None:
    """UDP GRO hands over a burst as one buffer: each DTLS record goes on as its own datagram."""

    def record(kind: int, payload: bytes) -> bytes:
        return (
            bytes([kind, 0xFE, 0xFD, 0, 1]) + bytes(6) + len(payload).to_bytes(2, "big") + payload
        )

    records = [record(23, os.urandom(n)) for n in (1400, 1400, 1400, 900)]
    assert aiortc_patches._split_records(b"".join(records)) == records
    assert aiortc_patches._split_records(b"".join(records) + records[0][:100]) == records
    queued: list[bytes] = []
    stun: list[bytes] = []
    protocol = SimpleNamespace(
        datagram_received=lambda data, addr: stun.append(data),
        receiver=SimpleNamespace(data_received=lambda data, component: queued.append(data)),
        local_candidate=SimpleNamespace(component=1),
    )
    aiortc_patches._demux_dtls_first(protocol)
    protocol.datagram_received(b"".join(records), ("10.0.0.1", 1))
    assert queued == records
    # A handshake datagram (several records of a flight) goes on whole, as aiortc expects.
    flight = record(22, b"hello") + record(22, b"certificate")
    protocol.datagram_received(flight, ("10.0.0.1", 1))
    binding = bytes([0, 1]) + bytes(18)  # STUN: first byte 0-3
    protocol.datagram_received(binding, ("10.0.0.1", 1))
    assert queued[-1] == flight and stun == [binding]
    # Once the record path reads (the handshake is done), a coalesced read is queued whole:
    # it takes the records apart itself, one queue hop per read.
    protocol.receiver._kvpeer_whole_reads = True
    protocol.datagram_received(b"".join(records), ("10.0.0.1", 1))
    assert queued[-1] == b"".join(records)
    # GRO puts a smaller datagram of the same flow last: a STUN consent check is aioice's, in
    # either mode (dropped as a "truncated record", six missed checks closed the connection).
    consent = bytes([0, 1, 0, 8]) + bytes(16) + bytes(8)
    protocol.datagram_received(b"".join(records) + consent, ("10.0.0.1", 1))
    assert queued[-1] == b"".join(records) and stun[-1] == consent
    protocol.receiver._kvpeer_whole_reads = False
    del queued[:]
    protocol.datagram_received(b"".join(records) + consent, ("10.0.0.1", 1))
    assert queued == records and stun[-2:] == [consent, consent]
    protocol.datagram_received(b"".join(records) + records[0][:100], ("10.0.0.1", 1))
    assert len(stun) == 3  # a truncated DTLS record is no STUN: dropped by the split, as before


class _RefusingSocket:
    """A send socket whose kernel refuses some sends with *error* (sendmsg: every call)."""

    def __init__(self, error: int, refuse_single: bool = False) -> None:
        self.error, self.refuse_single = error, refuse_single
        self.sent: list[bytes] = []

    def sendmsg(self, buffers: list[bytes], *args: Any) -> int:
        raise OSError(self.error, os.strerror(self.error))

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.refuse_single:
            raise OSError(self.error, os.strerror(self.error))
        self.sent.append(data)
        return len(data)

    def recvmsg(self, *args: Any) -> Any:
        raise BlockingIOError

    def close(self) -> None:
        pass


def _path_sending_to(sock: _RefusingSocket, fallback: list[bytes]) -> Any:
    transport = SimpleNamespace(
        get_write_buffer_size=lambda: 0, sendto=lambda data, addr: fallback.append(data)
    )
    protocol = SimpleNamespace(transport=transport)
    pair = SimpleNamespace(
        protocol=protocol, remote_candidate=SimpleNamespace(_network_host="10.0.0.2", port=9)
    )
    path = aiortc_patches._RecordPath.__new__(aiortc_patches._RecordPath)
    path.ice = SimpleNamespace(_nominated={1: pair})
    path.batch, path.batch_chunks, path.gso_ok = None, [], True
    path.gso, path.gso_protocol = sock, protocol
    return path


def test_send_batch_reports_datagrams_the_egress_queue_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With IP_RECVERR, a qdisc drop fails the send with ENOBUFS: those records come back as
    dropped (congestion); a GSO refusal switches GSO off and drops nothing."""
    import errno

    monkeypatch.setattr(aiortc_patches, "UDP_GSO", True)
    records = [b"\x17" * 1000] * 4 + [b"\x17" * 300]
    fallback: list[bytes] = []
    path = _path_sending_to(_RefusingSocket(errno.ENOBUFS), fallback)
    assert aiortc_patches._send_batch(path, records) == ([0, 1, 2, 3, 4], True)
    assert path.gso_ok and not fallback

    path = _path_sending_to(_RefusingSocket(errno.ENOBUFS, refuse_single=True), fallback)
    path.gso_ok = False  # one sendto per record: each refusal is its own record
    assert aiortc_patches._send_batch(path, records[3:]) == ([0, 1], True)

    path = _path_sending_to(_RefusingSocket(errno.ECONNREFUSED), fallback)
    assert aiortc_patches._send_batch(path, records) == ([0, 1, 2, 3, 4], False)

    sock = _RefusingSocket(errno.EIO)
    path = _path_sending_to(sock, fallback)
    assert aiortc_patches._send_batch(path, records) == ([], False)
    assert not path.gso_ok and fallback == records  # this run through the event loop
    assert aiortc_patches._send_batch(path, records[:2]) == ([], False)
    assert sock.sent == records[:2]  # later ones one sendto each


def test_a_local_drop_marks_its_chunks_for_retransmission_and_cuts_the_window() -> None:
    """The chunks of dropped records are marked at once (no three SACKs, no T3), leave the
    flight, and the rate control takes the drop as congestion."""
    from kvpeer.transport.congestion import RateControl, RateControlParams

    chunks = [
        SimpleNamespace(tsn=i, _acked=False, _retransmit=False, _abandoned=False,
                        _max_retransmits=None, _expiry=None, _sent_count=1, _book_size=1000)
        for i in range(4)
    ]  # fmt: skip
    rate = RateControl(RateControlParams(packet_bytes=1000, min_cwnd_bytes=8000))
    rate._cwnd = 100_000
    decreased: list[Any] = []
    sctp = SimpleNamespace(
        _kvpeer_local_drops=0, _kvpeer_local_drop_chunks=0, _kvpeer_rtx_pending=False,
        _kvpeer_rate=rate, _cwnd=100_000, _flight_size=4000,
        _maybe_abandon=lambda chunk: False, _flight_size_decrease=decreased.append,
    )  # fmt: skip
    # Records 0 (a SACK), 1-4 (chunks 0-3); the kernel refused records 2 and 3.
    batch = [(i + 1, chunk) for i, chunk in enumerate(chunks)]
    aiortc_patches._local_drop(sctp, [2, 3], batch, congested=True)
    assert [c._retransmit for c in chunks] == [False, True, True, False]
    assert decreased == chunks[1:3] and sctp._kvpeer_rtx_pending
    assert sctp._kvpeer_local_drops == 2 and sctp._kvpeer_local_drop_chunks == 2
    assert rate.local_drops == 2 and rate.congestion_events == 1 and not rate.startup
    assert sctp._cwnd == rate.cwnd < 100_000


def test_icmp_errors_that_ip_recverr_queues_are_drained() -> None:
    """With IP_RECVERR an unconnected socket also queues ICMP errors on its error queue (held
    against the receive buffer, the socket polling as in error until read): drained when the
    event loop reports the error, which still reaches the protocol."""
    import socket

    errors: list[Exception] = []

    class Protocol(asyncio.DatagramProtocol):
        def error_received(self, exc: Exception) -> None:
            errors.append(exc)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            Protocol, local_addr=("127.0.0.1", 0)
        )
        sock = transport.get_extra_info("socket")
        aiortc_patches._report_local_drops(sock, protocol)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        transport.sendto(b"x", ("127.0.0.1", port))  # nobody listens: ICMP port unreachable
        for _ in range(200):
            if errors:
                break
            await asyncio.sleep(0.01)
        try:
            assert errors and isinstance(errors[0], ConnectionRefusedError), errors
            with socket.socket(fileno=os.dup(sock.fileno())) as dup, pytest.raises(BlockingIOError):
                dup.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
        finally:
            transport.close()

    asyncio.run(body())


def _short_data_chunk_packet(tag: int) -> bytes:
    """An SCTP packet with a valid checksum whose one DATA chunk is 8 bytes long (its header
    alone is 16): aiortc's parser raises struct.error on it, which it does not catch."""
    header = struct.pack("!HHL", 5000, 5000, tag)
    chunk = struct.pack("!BBH", 0, 3, 8) + bytes(4)
    checksum = rtcsctptransport.crc32c(header + bytes(4) + chunk)
    return header + struct.pack("<L", checksum) + chunk


def test_a_malformed_packet_from_the_peer_is_dropped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """What aiortc's parser raises past its own ValueError (here struct.error) used to close
    the DTLS transport: the record path drops the packet, warns once, and keeps receiving."""
    packet = _short_data_chunk_packet(1234)

    async def body() -> None:
        stock, _ = _receiving_association(patched=False)
        with pytest.raises(struct.error):  # the packet is what the fix is about
            await stock._handle_data(packet)
        ours, delivered = _receiving_association(patched=True)
        dtls = SimpleNamespace()
        with caplog.at_level(logging.DEBUG, logger=aiortc_patches.__name__):
            for _ in range(3):
                await aiortc_patches._handle_sctp_packet(dtls, ours, packet)
        warnings = [r for r in caplog.records if "malformed SCTP packet" in r.getMessage()]
        assert [r.levelno for r in warnings] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
        # ... and the association still takes the next good packet.
        chunk = DataChunk()
        chunk.flags, chunk.tsn, chunk.stream_id, chunk.stream_seq = 3, 1000, 1, 0
        chunk.protocol, chunk.user_data = 53, b"after"
        good = rtcsctptransport.serialize_packet(5000, 5000, 1234, chunk)
        await aiortc_patches._handle_sctp_packet(dtls, ours, good)
        assert delivered == [(1, 53, b"after")]

    asyncio.run(body())


def test_data_before_the_handshake_set_the_peers_tsn_is_dropped() -> None:
    """aiortc raises TypeError on DATA while its last received TSN is still None; the fast
    reader drops such a packet (nothing marked, nothing delivered, no SACK owed)."""
    from OpenSSL.SSL import _ffi

    async def body() -> None:
        ours, delivered = _receiving_association(patched=True)
        ours._last_received_tsn = None
        chunk = DataChunk()
        chunk.flags, chunk.tsn, chunk.stream_id, chunk.stream_seq = 3, 7, 1, 0
        chunk.protocol, chunk.user_data = 53, b"early"
        packet = rtcsctptransport.serialize_packet(5000, 5000, 1234, chunk)
        buffer = _ffi.new("char[]", 2048)
        view = _ffi.buffer(buffer)
        view[: len(packet)] = packet
        ours._sack_needed = False
        assert ours._kvpeer_reader.read(view, len(packet)) == 0
        assert ours._last_received_tsn is None and not ours._sack_needed and delivered == []

    asyncio.run(body())


def _sack_sender(last: int, misordered: set[int], duplicates: list[int]) -> tuple[SimpleNamespace, list[Any]]:
    sent: list[Any] = []

    async def send_chunk(chunk: Any) -> None:
        sent.append(chunk)

    state = SimpleNamespace(
        _last_received_tsn=last, _sack_misordered=set(misordered), _sack_duplicates=list(duplicates),
        _advertised_rwnd=123_456, _sack_needed=True, _send_chunk=send_chunk,
    )  # fmt: skip
    return state, sent


def test_sack_matches_aiortc_away_from_the_wrap() -> None:
    rng = random.Random(11)
    for _ in range(100):
        last = rng.randrange(0, 2**31)
        held = {last + rng.randrange(2, 300) for _ in range(rng.randrange(0, 40))}
        duplicates = [last - rng.randrange(0, 5) for _ in range(rng.randrange(0, 3))]
        stock, stock_sent = _sack_sender(last, held, duplicates)
        ours, our_sent = _sack_sender(last, held, duplicates)
        asyncio.run(RTCSctpTransport._send_sack(stock))  # type: ignore[arg-type]
        asyncio.run(aiortc_patches._send_sack(ours))
        assert bytes(our_sent[0]) == bytes(stock_sent[0])
        assert not ours._sack_needed and not ours._sack_duplicates


def test_sack_gap_blocks_stay_ordered_and_merged_across_the_tsn_wrap() -> None:
    last = 2**32 - 5  # received up to here; 2**32 - 4 is missing
    held = {2**32 - 3, 2**32 - 2, 2**32 - 1, 0, 1, 4}
    assert aiortc_patches.sack_gaps(last, held) == [(2, 6), (9, 9)]
    state, sent = _sack_sender(last, held, [])
    asyncio.run(aiortc_patches._send_sack(state))
    parsed = SackChunk(flags=0, body=bytes(sent[0])[4:])
    assert parsed.cumulative_tsn == last and parsed.gaps == [(2, 6), (9, 9)]
    # aiortc's own builder, for the record: blocks out of order and split at the wrap
    stock, stock_sent = _sack_sender(last, held, [])
    asyncio.run(RTCSctpTransport._send_sack(stock))  # type: ignore[arg-type]
    assert stock_sent[0].gaps != parsed.gaps


def test_sack_reports_only_gap_blocks_its_16_bit_fields_hold() -> None:
    """One lost TSN and 70,000 small chunks after it: offsets past 65,535 used to reach the
    SACK, and building it raised struct.error. Now the blocks stop at the 16-bit limit (the
    one crossing it is cut), their number is capped, and the SACK fits the smallest packet."""
    last = 1000
    held = {last + 2 + i for i in range(70_000)}
    assert aiortc_patches.sack_gaps(last, held) == [(2, 0xFFFF)]
    state, sent = _sack_sender(last, held, [])
    asyncio.run(aiortc_patches._send_sack(state))
    parsed = SackChunk(flags=0, body=bytes(sent[0])[4:])
    assert parsed.cumulative_tsn == last and parsed.gaps == [(2, 0xFFFF)]
    # Every other TSN held, past the wrap too: only the lowest blocks, all in range.
    last = 2**32 - 10
    held = {(last + 2 * i) % 2**32 for i in range(1, 40_000)}
    state, sent = _sack_sender(last, held, list(range(500)))
    asyncio.run(aiortc_patches._send_sack(state))
    packet = bytes(sent[0])
    parsed = SackChunk(flags=0, body=packet[4:])
    assert parsed.gaps == [(2 * i, 2 * i) for i in range(1, aiortc_patches.MAX_SACK_GAP_BLOCKS + 1)]
    assert parsed.cumulative_tsn == last
    assert len(parsed.duplicates) == aiortc_patches.MAX_SACK_DUPLICATES
    assert 12 + len(packet) <= 1_189
    assert not state._sack_duplicates and not state._sack_needed


def test_a_sack_that_cannot_be_built_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A SACK that fails to build (struct.error) neither leaves an unretrieved exception in the
    delayed-SACK task nor escapes the fast reader's follow(), which closed the session."""

    async def send_now() -> None:
        raise struct.error("'H' format requires 0 <= number <= 65535")

    async def body() -> None:
        sctp = SimpleNamespace(_kvpeer_sack_now=False)
        sack = aiortc_patches._DelayedSack(sctp)
        sack.send_now = send_now
        await sack._send_quietly()  # the timer's task
        await aiortc_patches._DataReader(sctp, sack).follow(aiortc_patches._DataReader.SACK)
        await sack.send()

    with caplog.at_level(logging.DEBUG, logger="kvpeer.transport.aiortc_patches"):
        asyncio.run(body())
    levels = [r.levelno for r in caplog.records if "could not send a SACK" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
