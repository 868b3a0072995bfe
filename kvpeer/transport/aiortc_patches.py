"""Every change kvpeer makes to aiortc / aioice internals, in one place, for aiortc 1.16.0 only.

Pure-Python SCTP pays per packet and per SACK, so the CPU cost per GB is set by how many
packets and acknowledgements move (shared/findings/transport.md). The changes, and why:

* :func:`gather_host_candidates` (aioice): offer exactly the LAN address the daemon was given.
  aioice offers every address of every interface and never 127.0.0.1; a single-host setup then
  has no path, and a real LAN would see docker-bridge candidates. Loopback is offered only with
  ``allow_loopback`` and only when that address *is* loopback. Also sizes the UDP socket
  buffers (aioice asks for 256 KiB: a 1 MiB congestion window overflows it and every drop
  costs a >= 1 s retransmission timeout), and warns when the host caps them.
* :func:`configure_association` (aiortc SCTP), per association:
  - packet size agreed from both peers' MTUs, instead of the 1,189-byte module constant;
  - delayed SACK: acknowledge every :func:`sack_every` packets or after ``SACK_DELAY_S``, at once
    on a new or filled gap or duplicates (RFC 9260 6.2 allows every second packet; the
    sender's window is grown per SACK, so the burst limit is raised with it);
  - received TSNs are tracked in O(1) per packet (aiortc sorts all TSNs held above a hole on
    every packet; also wrong across the 32-bit TSN wrap), and the SACK's gap blocks are built
    in serial-number order (aiortc's came out of order across the wrap: :func:`sack_gaps`)
    and only as many as the SACK's 16-bit fields and one packet hold;
  - a retransmission timeout of at least 200 ms instead of 1 s (a LAN, not the Internet);
  - the peer's advertised receive window is respected (aiortc ignores it, so its window only
    stops growing at a loss), and the window we advertise is sized (``receive_window_bytes``);
  - a chunk is fast-retransmitted once, not again every three SACKs while its
    retransmission is in flight (RFC 9260 7.2.4); a lost retransmission is struck again
    once three packets sent after it have arrived (like TCP's RACK), not left to T3;
  - the congestion window (``congestion_control``): ``"rate"`` hands it to
    :class:`~kvpeer.transport.congestion.RateControl` (delivery rate x min RTT; random loss
    does not shrink it, and a T3 expiry does not drop it to one packet); ``"reno"`` keeps
    aiortc's, where a fast retransmit while the RTT shows no standing queue does not halve
    the window (``loss_tolerant``: loss-based halving caps a 40 ms, 1 %-loss path at a few
    Mbit/s, Mathis et al.) and slow start counts the packets a SACK acknowledges (RFC 3465);
  - a T3 expiry does not resend chunks the peer already acknowledged in gap reports
    (aiortc resends the whole sent queue; Linux SCTP skips them);
  - a packet that is exactly one DATA chunk is read in one synchronous call
    (:class:`_DataReader`): no chunk list, type dispatch, body copies or the five coroutines
    aiortc awaits per packet; only a completed message or a SACK due now is awaited;
  - a DATA chunk that cannot complete a message skips the reassembly scan (aiortc's is
    quadratic in the fragments of a message);
  - the retransmit scan over the whole sent queue is skipped when nothing can be marked for
    retransmission (no gap report and no T3 expiry since the last full scan).
* :func:`apply` (process-wide, behaviour-neutral for small packets): DTLS reads and writes use
  literal 1,500-byte buffers; SCTP packets above that need 16 KiB + record overhead.
* the record path, per connection once the DTLS handshake is done (:func:`_install_record_path`,
  :func:`_demux_dtls_first`): each record is written and read with OpenSSL's own calls into
  reusable buffers (pyOpenSSL allocates a buffer per call and raises WantReadError for every
  empty read, i.e. once per packet received) and sent straight to the nominated pair's socket
  (aiortc went through four coroutine layers per packet); aioice hands DTLS datagrams (first
  byte 20-63, RFC 7983) to the connection without parsing them as STUN first (a ValueError
  per packet) and drops empty datagrams (any host could close a connection with one: aiortc's
  DTLS reader died on ``data[0]``). Together about half the CPU per packet at MTU 1500.
* a transmit burst leaves in one ``sendmsg`` per run of equal-size records with UDP
  segmentation offload (:func:`_send_batch`; Linux >= 4.18, else one send per packet): the
  kernel's per-datagram send path was the sender's largest cost once the Python layers shrank.
  While such a burst is gathered, its new DATA chunks are serialised (one copy of the payload,
  not three), encrypted and kept in one loop (:func:`_send_new_chunks`), without aiortc's two
  coroutines and six calls per packet.
  The receiving socket asks for UDP GRO, so such a burst arrives as one read; once the
  handshake is done that read is queued whole and the record path hands its DTLS records to
  OpenSSL one by one, as the datagrams they were sent in (before, :func:`_split_records`
  queues them one by one for aiortc's reader): one queue hop and one coroutine chain per
  read, not per packet.
* local drops (:func:`_report_local_drops`, :func:`_local_drop`): the ICE socket sets
  ``IP_RECVERR``, so a datagram the sender's own egress queue (a qdisc) drops fails its send
  with ``ENOBUFS`` instead of vanishing; its DATA chunks are marked for retransmission at once
  and the congestion control takes it as congestion. Without it a full shaper queue dropped
  whole GSO bursts, retransmissions among them, and only T3 found those.

Each change could go upstream: as bug fixes (respect the peer's rwnd, fast-retransmit once,
lost-retransmission detection, no T3 resend of gap-acknowledged chunks, reassembly without the
rescan, a retransmit-pending flag), as parameters of ``RTCSctpTransport`` (packet size, SACK
policy, minimum RTO, loss response, a pluggable congestion controller), as a buffer size
constant in the DTLS transport, as the DTLS transport's read/write calls (or a record API in
pyOpenSSL that neither allocates nor raises per record), and in aioice as a per-connection
address list, the RFC 7983 demux, the empty-datagram check and a batched send (GSO). ``tests/transport/test_aiortc_patches.py`` fails
loudly when an aiortc upgrade moves what these rely on.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import aiortc
import aiortc.clock
import aiortc.rtp
import google_crc32c
import pylibsrtp
from aiortc import RTCPeerConnection, rtcdtlstransport, rtcsctptransport
from aiortc.rtcsctptransport import RTCSctpTransport
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

from kvpeer.errors import TransportError
from kvpeer.transport.config import MAX_DATA_CHANNEL_MESSAGE, TransportConfig
from kvpeer.transport.congestion import RateControl, RateControlParams
from kvpeer.transport.netinfo import sysctl_int

logger = logging.getLogger(__name__)

AIORTC_VERSION = "1.16.0"
#: Acknowledge every this many DATA packets when nothing is missing... (each SACK costs the
#: receiver a send and the sender a read, its SACK path and a transmit of its own: at MTU 1500
#: 16 measured 15% less CPU per GB at both ends than 8, and 32 another 10-25% less than 16,
#: same share of a shaped link)
SACK_EVERY = 32
#: ... and at most this many payload bytes (see :func:`sack_every`): 32 packets of 8,884 bytes
#: are 284 KB, about the whole window the rate control keeps on a LAN (256 KiB + 4 packets),
#: so only the delay timer acknowledged and 1 Gbit/s at MTU 9000 read 36% (16 packets: 93-96%).
SACK_EVERY_BYTES = 144 * 1024
#: ... or this long after the first unacknowledged one (RFC 9260: at most 200 ms; short here
#: because the sender's window only grows on SACKs).
SACK_DELAY_S = 0.005


def sack_every(userdata: int) -> int:
    """Packets per SACK for DATA chunks of *userdata* bytes: 32 at MTU 1500, 16 at MTU 9000."""
    return max(2, min(SACK_EVERY, SACK_EVERY_BYTES // userdata))


#: Lower bound of the retransmission timeout. aiortc uses RFC 9260's 1 s, made for the
#: Internet; on a LAN each T3 expiry (a lost retransmission, a tail loss) then stalls a
#: transfer for a whole second. Linux TCP's 200 ms is the bound used here.
RTO_MIN_S = 0.2
#: A loss counts as congestion only when the smoothed RTT exceeds FACTOR x the minimum RTT +
#: SLACK: a standing queue. The slack covers the delayed-SACK timer and a busy receiver's
#: scheduling delays, which inflate RTT samples without any queue on the path.
QUEUE_RTT_FACTOR = 2.0
QUEUE_RTT_SLACK_S = 0.010
#: DTLS plaintext is at most 16 KiB; a record adds header, explicit nonce and tag.
DTLS_BUFFER = 16_384 + 256
_STOCK_DTLS_BUFFER = 1500
_DTLS_CONNECTED = rtcdtlstransport.State.CONNECTED
#: SCTP common header + DATA chunk header: the packet size minus these is the payload size.
SCTP_COMMON_HEADER = rtcsctptransport.SCTP_COMMON_HEADER_LENGTH
SCTP_DATA_HEADER = rtcsctptransport.SCTP_DATA_CHUNK_HEADER_LENGTH
SCTP_OVERHEAD = SCTP_COMMON_HEADER + SCTP_DATA_HEADER

_applied = False
#: Miss count of a retransmitted chunk: never reaches the fast-retransmit threshold again.
_STRUCK_ONCE = -(1 << 30)
_buffer_warned = False


def check_version() -> None:
    if aiortc.__version__ != AIORTC_VERSION:
        raise TransportError(
            f"kvpeer's aiortc patches are written for aiortc {AIORTC_VERSION}, "
            f"found {aiortc.__version__}: re-check kvpeer/transport/aiortc_patches.py"
        )


# -- process-wide --------------------------------------------------------------------------


def _with_constant(func: Callable[..., Any], old: int, new: int) -> Callable[..., Any]:
    """A copy of *func* whose literal *old* is *new* (there must be exactly one such literal)."""
    code = func.__code__
    if code.co_consts.count(old) != 1:
        raise TransportError(f"aiortc changed: {func.__qualname__} has no single {old} literal")
    consts = tuple(new if c == old and type(c) is int else c for c in code.co_consts)
    clone = types.FunctionType(
        code.replace(co_consts=consts), func.__globals__, func.__name__, func.__defaults__,
        func.__closure__,
    )  # fmt: skip
    clone.__qualname__ = func.__qualname__
    clone.__kwdefaults__ = func.__kwdefaults__
    clone.__dict__["_kvpeer_patched"] = True
    return clone


def apply() -> None:
    """Install the process-wide patches (idempotent)."""
    global _applied
    check_version()
    if _applied:
        return
    dtls = rtcdtlstransport.RTCDtlsTransport
    for name in ("_recv_next", "_write_ssl"):
        setattr(dtls, name, _with_constant(getattr(dtls, name), _STOCK_DTLS_BUFFER, DTLS_BUFFER))
    _applied = True


# -- ICE candidates and socket buffers ------------------------------------------------------


def _ice_connection(pc: RTCPeerConnection) -> Any:
    sctp = pc.sctp
    if sctp is None:
        raise TransportError("peer connection has no SCTP transport yet")
    return sctp.transport.transport.iceGatherer._connection


async def gather_host_candidates(
    pc: RTCPeerConnection, addresses: list[str], config: TransportConfig
) -> None:
    """Gather host candidates on *addresses* only (before setLocalDescription)."""
    check_version()
    for address in addresses:
        if ipaddress.ip_address(address).is_loopback and not config.allow_loopback:
            raise TransportError(f"{address} is loopback and allow_loopback is off")
    connection = _ice_connection(pc)
    if connection._local_candidates_start:
        return
    # Mark gathering as started so aiortc's own gather() (in setLocalDescription) keeps ours.
    connection._local_candidates_start = True
    candidates = await connection.get_component_candidates(component=1, addresses=addresses)
    if not candidates:
        raise TransportError(f"could not bind an ICE socket on {addresses}")
    connection._local_candidates += candidates
    connection._local_candidates_end = True
    if config.patch_aiortc:
        for protocol in connection._protocols:
            sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
            if sock is not None:
                size_socket_buffers(sock, config.socket_buffer_bytes)
                _receive_coalesced(sock)
                _report_local_drops(sock, protocol)
            _demux_dtls_first(protocol)


def size_socket_buffers(sock: socket.socket, wanted: int) -> tuple[int, int]:
    """Ask for *wanted* bytes of receive and send buffer; warn once if the host caps them."""
    global _buffer_warned
    got = []
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, wanted)
            # Linux reports twice what it grants (the doubling covers its bookkeeping).
            got.append(sock.getsockopt(socket.SOL_SOCKET, option) // 2)
        except OSError:
            got.append(0)
    if min(got) < wanted and not _buffer_warned:
        _buffer_warned = True
        logger.warning(
            "UDP socket buffers capped at %d/%d bytes (asked %d): raise net.core.rmem_max and "
            "net.core.wmem_max (now %s/%s) or expect drops and 1 s stalls at high rates",
            got[0], got[1], wanted, sysctl_int("net.core.rmem_max"),
            sysctl_int("net.core.wmem_max"),
        )  # fmt: skip
    return got[0], got[1]


# -- per association ------------------------------------------------------------------------


def _rebind(sctp: RTCSctpTransport, name: str, globals_: dict[str, Any]) -> Callable[..., Any]:
    """*sctp*'s own copy of method *name*, reading module globals from *globals_*."""
    func = getattr(RTCSctpTransport, name)
    clone = types.FunctionType(
        func.__code__, globals_, func.__name__, func.__defaults__, func.__closure__
    )
    method = types.MethodType(clone, sctp)
    setattr(sctp, name, method)
    return method


def configure_association(
    pc: RTCPeerConnection,
    packet_bytes: int,
    receive_window: int = 4 * 1024 * 1024,
    *,
    loss_tolerant: bool = True,
    congestion_control: str = "rate",
) -> None:
    """Packet size, delayed SACK, the retransmit shortcut and the congestion control
    (``"rate"``: :mod:`kvpeer.transport.congestion`; ``"reno"``: aiortc's, with
    *loss_tolerant*) for *pc*'s association.

    Call before the association starts (before setRemoteDescription on the offerer, before
    setLocalDescription on the answerer). Only this association changes; others in the process
    keep theirs, so peers with different MTUs each get their own packet size.
    """
    check_version()
    if congestion_control not in ("rate", "reno"):
        raise TransportError(f"unknown congestion control {congestion_control!r}")
    sctp = pc.sctp
    if sctp is None:
        raise TransportError("peer connection has no SCTP transport yet")
    if getattr(sctp, "_kvpeer_packet", None) is not None:
        return
    userdata = packet_bytes - SCTP_OVERHEAD
    # The methods that size chunks and the congestion window read this module constant.
    globals_ = dict(vars(rtcsctptransport))
    globals_["USERDATA_MAX_LENGTH"] = userdata
    globals_["SCTP_RTO_MIN"] = RTO_MIN_S
    _rebind(sctp, "_send", globals_)
    update_rto = _rebind(sctp, "_update_rto", globals_)
    min_rtt = [float("inf")]

    def update_rto_tracking_min(rtt: float) -> None:
        min_rtt[0] = min(min_rtt[0], rtt)
        update_rto(rtt)

    sctp._update_rto = update_rto_tracking_min  # type: ignore[method-assign,assignment]
    sack_chunk = _rebind(sctp, "_receive_sack_chunk", globals_)
    t3_expired = _rebind(sctp, "_t3_expired", globals_)
    sctp._cwnd = 3 * userdata  # what __init__ computed, with our payload size
    sctp._kvpeer_packet = packet_bytes  # type: ignore[attr-defined]
    sctp._kvpeer_userdata = userdata  # type: ignore[attr-defined]
    every = sack_every(userdata)
    sctp._kvpeer_sack_every = every  # type: ignore[attr-defined]
    #: Packets the sender may put on the wire beyond the flight size per transmit (stock: 4).
    sctp._kvpeer_burst = 2 * every  # type: ignore[attr-defined]
    sctp._kvpeer_rtx_pending = False  # type: ignore[attr-defined]
    tsn = _TsnUnwrapper(sctp._local_tsn)
    sctp._kvpeer_tsn = tsn  # type: ignore[attr-defined]
    #: (retransmitted chunk, sequence number last sent when it went): see _restrike.
    sctp._kvpeer_rtx_watch = []  # type: ignore[attr-defined]
    sctp._kvpeer_restrikes = 0  # type: ignore[attr-defined]
    sctp._kvpeer_random_losses = 0  # type: ignore[attr-defined]
    sctp._kvpeer_t3_expiries = 0  # type: ignore[attr-defined]
    sctp._kvpeer_t3_causes = dict.fromkeys(T3_CAUSES, 0)  # type: ignore[attr-defined]
    sctp._kvpeer_local_drops = 0  # type: ignore[attr-defined]
    sctp._kvpeer_local_drop_chunks = 0  # type: ignore[attr-defined]
    sctp._kvpeer_local_cut_at = 0.0  # type: ignore[attr-defined]
    # What we advertise (sent in INIT / INIT-ACK and every SACK) and what the peer advertised.
    sctp._advertised_rwnd = receive_window
    sctp._kvpeer_peer_rwnd = receive_window  # type: ignore[attr-defined]

    async def receive_sack_chunk(chunk: Any) -> None:
        # Chunks are only ever struck (marked for retransmission) by a SACK with gap reports.
        if chunk.gaps:
            sctp._kvpeer_rtx_pending = True  # type: ignore[attr-defined]
        recovering = sctp._fast_recovery_exit is not None
        slow_start = not recovering and sctp._cwnd <= sctp._ssthresh
        cwnd_before, ssthresh_before = sctp._cwnd, sctp._ssthresh
        acked = (chunk.cumulative_tsn - sctp._last_sacked_tsn) % rtcsctptransport.SCTP_TSN_MODULO
        await sack_chunk(chunk)
        sctp._kvpeer_peer_rwnd = chunk.advertised_rwnd  # type: ignore[attr-defined]
        _restrike(sctp, chunk)
        if loss_tolerant and not recovering and sctp._fast_recovery_exit is not None:
            # aiortc just halved the window for a loss. Without a standing queue (smoothed RTT
            # near the minimum) the loss was not congestion: undo the halving. The receive
            # window still bounds what is in flight.
            srtt = getattr(sctp, "_srtt", None)
            if srtt is not None and srtt <= QUEUE_RTT_FACTOR * min_rtt[0] + QUEUE_RTT_SLACK_S:
                sctp._cwnd, sctp._ssthresh = cwnd_before, ssthresh_before
                # Nor enter fast recovery, which freezes the window until the window's data
                # is acknowledged: at 1 % loss nearly every window has a loss, so the window
                # would never grow again. The retransmission itself is already on its way.
                sctp._fast_recovery_exit = None
                sctp._kvpeer_random_losses += 1
            return
        # aiortc grows the window by one packet per SACK in slow start; with one SACK per
        # `every` packets that is `every` times slower. Count the packets acknowledged
        # instead (RFC 3465 byte counting, limit `every`).
        if slow_start and sctp._cwnd == cwnd_before + userdata and 1 < acked <= every * 4:
            sctp._cwnd += (min(acked, every) - 1) * userdata

    def t3_expired_marking() -> None:
        sctp._kvpeer_rtx_pending = True  # type: ignore[attr-defined]
        sctp._kvpeer_t3_expiries += 1  # type: ignore[attr-defined]
        _note_t3_cause(sctp)
        t3_expired()
        _keep_gap_acked(sctp)

    sctp._kvpeer_rate = None  # type: ignore[attr-defined]
    if congestion_control == "rate":
        _install_rate_control(sctp, sack_chunk, t3_expired, userdata)
    else:
        sctp._receive_sack_chunk = _resend_restruck(sctp, receive_sack_chunk)  # type: ignore[method-assign,assignment]
        sctp._t3_expired = t3_expired_marking  # type: ignore[method-assign]
    transmit = types.MethodType(_transmit, sctp)
    sctp._transmit = functools.partial(_transmit_in_one_batch, sctp, transmit)  # type: ignore[method-assign]
    sctp._receive_data_chunk = types.MethodType(_receive_data_chunk, sctp)  # type: ignore[method-assign]
    sctp._mark_received = types.MethodType(_mark_received, sctp)  # type: ignore[method-assign]
    sctp._kvpeer_highest_tsn = None  # type: ignore[attr-defined]
    sctp._kvpeer_overrun = False  # type: ignore[attr-defined]
    sctp._kvpeer_sack_now = False  # type: ignore[attr-defined]
    sack = _DelayedSack(sctp)
    sctp._send_sack = sack.on_sack_needed  # type: ignore[method-assign]
    _install_record_path(sctp.transport)
    sctp.transport._kvpeer_reader = _DataReader(sctp, sack)  # type: ignore[attr-defined]


def association_stats(pc: RTCPeerConnection) -> dict[str, Any]:
    """Congestion state of *pc*'s association, for benchmarks and debugging."""
    sctp: Any = pc.sctp
    if sctp is None or not hasattr(sctp, "_cwnd"):
        return {}
    return {
        "cwnd": sctp._cwnd,
        "flight_bytes": sctp._flight_size,
        "peer_rwnd": getattr(sctp, "_kvpeer_peer_rwnd", None),
        "ssthresh": getattr(sctp, "_ssthresh", None),
        "srtt_s": getattr(sctp, "_srtt", None),
        "rto_s": sctp._rto,
        "t3_expiries": getattr(sctp, "_kvpeer_t3_expiries", None),
        "t3_causes": getattr(sctp, "_kvpeer_t3_causes", None),
        "restrikes": getattr(sctp, "_kvpeer_restrikes", None),
        "random_losses": getattr(sctp, "_kvpeer_random_losses", None),
        "local_drops": getattr(sctp, "_kvpeer_local_drops", None),
        "local_drop_chunks": getattr(sctp, "_kvpeer_local_drop_chunks", None),
        **_rate_stats(getattr(sctp, "_kvpeer_rate", None)),
    }


def _rate_stats(rate: RateControl | None) -> dict[str, Any]:
    if rate is None:
        return {"congestion_control": "reno"}
    return {
        "congestion_control": "rate",
        "bandwidth_bps": None if rate.bandwidth is None else rate.bandwidth * 8,
        "min_rtt_s": rate.min_rtt_s,
        "random_losses": rate.random_losses,
        "congestion_events": rate.congestion_events,
        "queue_congestion": rate.queue_congestion,
        "rate_srtt_s": rate.srtt_s,
        "rate_cwnd_target": rate.target_cwnd(),
        "startup": rate.startup,
        "inflight_hi": rate.inflight_hi,
    }


async def _transmit(self: Any) -> None:
    """aiortc's ``RTCSctpTransport._transmit`` with a burst of ``_kvpeer_burst`` packets and the
    retransmit scan skipped when nothing is marked (``_kvpeer_rtx_pending``)."""
    if self._forward_tsn_chunk is not None:
        await self._send_chunk(self._forward_tsn_chunk)
        self._forward_tsn_chunk = None
        if not self._t3_handle:
            self._t3_start()

    userdata = self._kvpeer_userdata
    burst = self._kvpeer_burst
    burst = (burst // 2 if self._fast_recovery_exit is not None else burst) * userdata
    # aiortc ignores the peer's receive window, so the congestion window grows until queues
    # overflow somewhere (socket buffer, switch, tbf) and loss recovery stalls the transfer.
    # Respect it (RFC 9260 6.1 A/B), allowing one packet when nothing is in flight.
    window = max(self._kvpeer_peer_rwnd, userdata if self._flight_size == 0 else 0)
    cwnd = min(self._flight_size + burst, self._cwnd, window)

    if self._kvpeer_rtx_pending:
        earliest = True
        for chunk in self._sent_queue:
            if chunk._retransmit:
                if self._fast_recovery_transmit:
                    self._fast_recovery_transmit = False
                elif self._flight_size >= cwnd:
                    return  # still pending: scan again on the next call
                self._flight_size_increase(chunk)
                # Retransmit a chunk by gap reports once only (RFC 9260 7.2.4); aiortc strikes
                # it again three SACKs later while the retransmission is still under way, so
                # on a long path every loss turned into a stream of spurious retransmissions.
                # A lost retransmission is found by _restrike (or T3).
                chunk._misses = _STRUCK_ONCE
                chunk._retransmit = False
                chunk._sent_count += 1
                last = self._sent_queue[-1].tsn
                self._kvpeer_rtx_watch.append((chunk, self._kvpeer_tsn.unwrap(last)))
                await self._send_chunk(chunk)
                _note_batched(self, chunk)
                if self._kvpeer_rate is not None:
                    self._kvpeer_rate.on_retransmit(1)
                if earliest:
                    self._t3_restart()
            earliest = False
        self._kvpeer_rtx_pending = False

    chunk = None
    outbound = self._outbound_queue
    if outbound and self._flight_size < cwnd:
        path: _RecordPath | None = self.transport._kvpeer_records
        if path is not None and path.batch is not None and self.transport._state == _DTLS_CONNECTED:
            chunk = _send_new_chunks(self, path, cwnd)
        else:
            now = time.time()
            while outbound and self._flight_size < cwnd:
                chunk = outbound.popleft()
                self._sent_queue.append(chunk)
                self._flight_size_increase(chunk)
                chunk._sent_count += 1
                chunk._sent_time = now
                await self._send_chunk(chunk)
                _note_batched(self, chunk)
                if not self._t3_handle:
                    self._t3_start()
    if chunk is not None and self._kvpeer_rate is not None:
        self._kvpeer_rate.on_send(time.monotonic(), self._kvpeer_tsn.unwrap(chunk.tsn))


#: The common header with a zero checksum, then the DATA chunk header (RFC 9260 3, 3.3.1).
_DATA_HEADER_OUT = struct.Struct("!HHL4xBBHLHHL")


def _send_new_chunks(sctp: Any, path: _RecordPath, cwnd: int) -> Any:
    """The new-data loop of aiortc's ``_transmit`` while a burst is batched, as one call:
    each DATA chunk is serialised, its checksum computed over header and payload without
    joining them first, written to OpenSSL and its record kept for :func:`_send_batch`.
    aiortc serialises a packet in three copies of its payload and six calls, then awaits
    two coroutines (``_send_chunk``, ``_send_data``) to encrypt it. Returns the last chunk
    sent (or None)."""
    outbound, sent_queue = sctp._outbound_queue, sctp._sent_queue
    dtls = sctp.transport
    ssl, from_ssl, out, out_view = path.ssl, path.from_ssl, path.out, path.out_view
    batch, batch_chunks = path.batch, path.batch_chunks
    assert batch is not None
    ports = (sctp._local_port, sctp._remote_port, sctp._remote_verification_tag)
    now = time.time()
    flight = sctp._flight_size
    tx_bytes = records = 0
    chunk = None
    while outbound and flight < cwnd:
        chunk = outbound.popleft()
        sent_queue.append(chunk)
        if not chunk._in_flight:  # aiortc's _flight_size_increase
            chunk._in_flight = True
            flight += chunk._book_size
        chunk._sent_count += 1
        chunk._sent_time = now
        packet = _data_packet(ports, chunk)
        written = _lib.SSL_write(ssl, packet, len(packet))
        if written <= 0:
            sctp._flight_size = flight
            dtls._ssl._raise_ssl_error(ssl, written)  # raises what pyOpenSSL's send would
        size = _lib.BIO_read(from_ssl, out, DTLS_BUFFER)
        if size > 0:
            tx_bytes += size
            records += 1
            batch.append(out_view[:size])
            batch_chunks.append((len(batch) - 1, chunk))
        if not sctp._t3_handle:
            sctp._flight_size = flight
            sctp._t3_start()
    sctp._flight_size = flight
    dtls._RTCDtlsTransport__tx_bytes += tx_bytes
    dtls._RTCDtlsTransport__tx_packets += records
    return chunk


def _data_packet(ports: tuple[int, int, int], chunk: Any) -> bytes:
    """aiortc's ``serialize_packet`` for one DATA chunk (*ports*: source and destination
    port, verification tag), in one copy of the payload: the checksum runs over the header
    and then the payload instead of over their join."""
    user_data = chunk.user_data
    length = SCTP_DATA_HEADER + len(user_data)
    if length % 4:
        user_data += bytes(-length % 4)  # padding, not counted in the chunk's length
    header = _DATA_HEADER_OUT.pack(
        *ports, 0, chunk.flags, length, chunk.tsn, chunk.stream_id, chunk.stream_seq,
        chunk.protocol,
    )  # fmt: skip
    checksum = crc32c_extend(crc32c(header), user_data).to_bytes(4, "little")
    return header[:8] + checksum + header[12:] + user_data


class _TsnUnwrapper:
    """32-bit TSNs as ever-growing sequence numbers, 0 at the association's first TSN."""

    def __init__(self, first_tsn: int) -> None:
        self._ref_tsn = first_tsn
        self._ref = 0

    def unwrap(self, tsn: int) -> int:
        half = 1 << 31
        delta = (tsn - self._ref_tsn + half) % rtcsctptransport.SCTP_TSN_MODULO - half
        value = self._ref + delta
        if delta > 0:
            self._ref_tsn, self._ref = tsn, value
        return value


#: Packets sent after a retransmission that must be acknowledged before the retransmission
#: counts as lost too (tolerates that much reordering, like the three strikes of a first loss).
RESTRIKE_AFTER = 3


def _restrike(sctp: Any, chunk: Any) -> int:
    """After a SACK: mark retransmissions lost again when data sent after them arrived.

    Fast retransmit resends a chunk once (see :func:`_transmit`); aiortc would otherwise only
    recover a lost retransmission by T3, a >= 200 ms stall that also resends the whole window.
    Like TCP's RACK: once the peer holds RESTRIKE_AFTER packets sent after the retransmission,
    the retransmission is lost. Returns the highest sequence number the peer holds.
    """
    tsn: _TsnUnwrapper = sctp._kvpeer_tsn
    highest = chunk.cumulative_tsn + (chunk.gaps[-1][1] if chunk.gaps else 0)
    seq = tsn.unwrap(highest % rtcsctptransport.SCTP_TSN_MODULO)
    watch = sctp._kvpeer_rtx_watch
    if not watch:
        return seq
    cumulative = tsn.unwrap(chunk.cumulative_tsn)
    keep = []
    for sent, mark in watch:
        if sent._acked or sent._retransmit or tsn.unwrap(sent.tsn) <= cumulative:
            continue  # arrived, or already marked again (T3): re-watched when resent
        if seq < mark + RESTRIKE_AFTER:
            keep.append((sent, mark))
            continue
        if not sctp._maybe_abandon(sent):
            sent._retransmit = True
        sctp._flight_size_decrease(sent)
        sctp._kvpeer_rtx_pending = True
        sctp._kvpeer_restrikes += 1
    sctp._kvpeer_rtx_watch = keep
    return seq


def _resend_restruck(sctp: Any, receive_sack: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """aiortc's SACK handler ends with its own transmit, which runs before :func:`_restrike`
    marks lost retransmissions: send those now, not at the next SACK or T3 (after the last
    SACK of a transfer there is none but T3). Only when something was struck again (rare), so
    the common SACK does not walk the sent queue twice."""

    async def receive(chunk: Any) -> None:
        before = sctp._kvpeer_restrikes
        await receive_sack(chunk)
        if sctp._kvpeer_restrikes != before:
            await sctp._transmit()

    return receive


#: Why a retransmission timeout fired, judged from the sent queue when it did:
#: ``retransmission`` the earliest outstanding chunk was already resent (a lost retransmission
#: that :func:`_restrike` did not catch); ``few_strikes`` the peer reported chunks after it but
#: fewer than three SACKs struck it (the sender ran out of data to draw SACKs); ``no_report``
#: no chunk after it was reported (a lost tail, or SACKs later than the timeout).
T3_CAUSES = ("retransmission", "few_strikes", "no_report")


def _note_t3_cause(sctp: Any) -> None:
    earliest = next((c for c in sctp._sent_queue if not c._acked), None)
    if earliest is None:
        return
    if earliest._sent_count > 1:
        cause = "retransmission"
    elif any(c._acked for c in sctp._sent_queue):
        cause = "few_strikes"
    else:
        cause = "no_report"
    sctp._kvpeer_t3_causes[cause] += 1
    if logger.isEnabledFor(logging.DEBUG):
        watched = [mark for c, mark in sctp._kvpeer_rtx_watch if c is earliest]
        logger.debug(
            "T3 expired (%s): tsn %d sent %d times %.3f s ago, misses %d, marked %s, watched %s "
            "(highest sent %d), %d chunks queued after it, %d not sent yet, flight %d cwnd %d "
            "peer rwnd %d, rto %.3f srtt %s, last sacked %d", cause, earliest.tsn,
            earliest._sent_count, time.time() - earliest._sent_time, earliest._misses,
            earliest._retransmit, watched, sctp._kvpeer_tsn.unwrap(sctp._sent_queue[-1].tsn),
            len(sctp._sent_queue), len(sctp._outbound_queue), sctp._flight_size, sctp._cwnd,
            sctp._kvpeer_peer_rwnd, sctp._rto, getattr(sctp, "_srtt", None),
            sctp._kvpeer_tsn.unwrap(sctp._last_sacked_tsn),
        )  # fmt: skip


def _keep_gap_acked(sctp: Any) -> None:
    """Right after aiortc's T3 expiry: unmark the chunks the peer acknowledged in gap reports.

    aiortc marks every chunk in the sent queue, so a timeout resends a whole window that has
    mostly arrived; Linux SCTP marks only those not gap-acknowledged. The transmit aiortc
    scheduled has not run yet, and a gap-acknowledged chunk is no longer in flight.
    """
    for queued in sctp._sent_queue:
        if queued._acked:
            queued._retransmit = False


def _install_rate_control(
    sctp: Any,
    sack_chunk: Callable[[Any], Any],
    t3_expired: Callable[[], None],
    userdata: int,
) -> None:
    """Let :class:`RateControl` own *sctp*'s congestion window (``congestion_control="rate"``).

    aiortc still runs its SACK and T3 logic (acknowledgement, strikes, marking); its window
    changes are overwritten afterwards and its fast recovery, which freezes the window for a
    round trip after every loss, is never entered. The retransmission it schedules still goes
    out first (``_fast_recovery_transmit``).
    """
    rate = RateControl(RateControlParams(packet_bytes=userdata))
    sctp._kvpeer_rate = rate
    sctp._cwnd = rate.cwnd

    async def receive_sack_chunk(chunk: Any) -> None:
        if chunk.gaps:
            sctp._kvpeer_rtx_pending = True
        await sack_chunk(chunk)
        sctp._kvpeer_peer_rwnd = chunk.advertised_rwnd
        now = time.monotonic()
        seq = _restrike(sctp, chunk)
        # Delivered bytes from the highest TSN the peer holds: a hole filled later does not
        # count again, so a retransmission never shows up as a burst of delivery.
        rate.on_ack(now, seq, (seq + 1) * userdata)
        if sctp._fast_recovery_exit is not None:
            rate.on_loss(now)
            sctp._fast_recovery_exit = None
        sctp._cwnd = rate.cwnd

    def t3_expired_keeping_window() -> None:
        sctp._kvpeer_rtx_pending = True
        sctp._kvpeer_t3_expiries += 1
        _note_t3_cause(sctp)
        t3_expired()
        _keep_gap_acked(sctp)
        rate.on_timeout(time.monotonic())
        sctp._cwnd = rate.cwnd

    sctp._receive_sack_chunk = _resend_restruck(sctp, receive_sack_chunk)
    sctp._t3_expired = t3_expired_keeping_window


#: Verification tag, then the DATA chunk header (type, flags, length, TSN, stream, sequence
#: number, payload protocol): a packet's first 28 bytes when it carries one DATA chunk.
_DATA_PACKET = struct.Struct("!4xL4xBBHLHHL")
_CHECKSUM = struct.Struct("<L")
_ZERO_CHECKSUM = bytes(4)
_TSN_MASK = rtcsctptransport.SCTP_TSN_MODULO - 1
_TSN_HALF = rtcsctptransport.SCTP_TSN_MODULO // 2
_ESTABLISHED = RTCSctpTransport.State.ESTABLISHED
DataChunk = rtcsctptransport.DataChunk
_new_chunk = DataChunk.__new__
crc32c = rtcsctptransport.crc32c
crc32c_extend = google_crc32c.extend


class _DataReader:
    """What aiortc does with a packet that is exactly one DATA chunk (every bulk packet),
    in one synchronous call per packet: checksum, verification tag, :func:`_mark_received`,
    the stream's reassembly list and the receive window, without aiortc's chunk list, type
    dispatch, debug-log formatting, body copy and the five coroutines it awaits per packet
    (``_handle_data``, ``_receive_chunk``, ``_receive_data_chunk``,
    ``_reset_deferred_streams``, ``_send_sack``). Only what can suspend or deliver is left to
    :meth:`follow`: a completed message, a deferred stream reset, a SACK due now (about one
    packet in 16). Every other packet takes aiortc's path.

    It reads the plaintext where the record path decrypted it (a writable buffer), so the
    checksum is computed over one copy of the packet, not three.
    """

    OTHER = -1  #: not one DATA chunk: hand the packet to aiortc's ``_handle_data``
    MESSAGES = 1  #: a message may be complete, or the chunk arrived out of order
    RESET = 2  #: the peer's stream reset waits for data
    SACK = 4  #: a SACK is due now

    __slots__ = ("sctp", "sack", "stream")

    def __init__(self, sctp: Any, sack: _DelayedSack) -> None:
        self.sctp = sctp
        self.sack = sack
        self.stream: Any = None  # the stream of the last chunk read

    def read(self, buffer: Any, size: int) -> int:
        """The packet in ``buffer[:size]``: 0 when done with it, else what :meth:`follow`
        must do (or :attr:`OTHER`). The buffer's checksum field is zeroed if it is one DATA
        chunk."""
        if size < _DATA_PACKET.size:
            return self.OTHER
        tag, kind, flags, length, tsn, stream_id, seq, protocol = _DATA_PACKET.unpack_from(buffer)
        end = SCTP_COMMON_HEADER + length
        # One chunk: nothing but padding (< 4 bytes) after it, as aiortc's parse loop reads.
        if kind != 0 or length < SCTP_DATA_HEADER or not end <= size < end + 4:
            return self.OTHER
        (checksum,) = _CHECKSUM.unpack_from(buffer, 8)
        buffer[8:12] = _ZERO_CHECKSUM
        packet = buffer[:size]
        sctp = self.sctp
        if checksum != crc32c(packet) or tag != sctp._local_verification_tag:
            return 0  # what aiortc does with a bad checksum or another association's tag
        chunk = _new_chunk(DataChunk)
        chunk.flags, chunk.tsn, chunk.stream_id = flags, tsn, stream_id
        chunk.stream_seq, chunk.protocol = seq, protocol
        chunk.user_data = user_data = packet[_DATA_PACKET.size : end]
        last = sctp._last_received_tsn
        if last is None:
            return 0  # DATA before the handshake told us the peer's first TSN (aiortc raised)
        if sctp._advertised_rwnd < 0 and _over_window(sctp, tsn):
            return 0
        sctp._sack_needed = True
        # In order with nothing held above a hole (the common case): _mark_received's
        # outcome without its calls.
        if tsn == (last + 1) & _TSN_MASK and not sctp._sack_misordered and not sctp._sack_duplicates:
            sctp._last_received_tsn = sctp._kvpeer_highest_tsn = tsn
        elif _mark_received(sctp, tsn):
            return self.SACK if self.sack.due() else 0  # a duplicate: acknowledged at once
        stream = sctp._inbound_streams.get(stream_id)
        if stream is None:
            stream = sctp._get_inbound_stream(stream_id)
        self.stream = stream
        reassembly = stream.reassembly
        # _receive_data_chunk's test, inline: see there for why in-order chunks skip the scan.
        if not reassembly or 0 < (tsn - reassembly[-1].tsn) & _TSN_MASK < _TSN_HALF:
            reassembly.append(chunk)
            status = self.MESSAGES if flags & rtcsctptransport.SCTP_DATA_LAST_FRAG else 0
        else:
            stream.add_chunk(chunk)
            status = self.MESSAGES
        sctp._advertised_rwnd -= len(user_data)
        if sctp._reconfig_deferred is not None:
            status |= self.RESET
        if status:
            return status  # follow() decides on the SACK after delivering, as aiortc does
        return self.SACK if self.sack.due() else 0

    async def follow(self, status: int) -> None:
        """The rest of aiortc's handling of the packet :meth:`read` returned *status* for."""
        sctp = self.sctp
        if status & self.MESSAGES:
            for message in self.stream.pop_messages():
                sctp._advertised_rwnd += len(message[2])
                await sctp._receive(*message)
        if status & self.RESET:
            await sctp._reset_deferred_streams()
        if status & self.SACK or (status & (self.MESSAGES | self.RESET) and self.sack.due()):
            await self.sack.send()


# How far past its advertised window a receiver holds data before it drops new DATA (RFC 9260
# 6.2). Our sender keeps within the window (one packet when nothing is in flight), so only a
# peer that ignores it comes here: without a bound, one message of any size was reassembled in
# memory. The slack lets a partial message on every stream (17 channels) complete.
_RWND_OVERSHOOT = 17 * MAX_DATA_CHANNEL_MESSAGE


def _over_window(sctp: Any, tsn: int) -> bool:
    """Drop this DATA chunk, unacknowledged: the window is overrun and ``tsn`` is new data
    (a chunk filling a hole below the highest TSN is still taken)."""
    if sctp._advertised_rwnd >= -_RWND_OVERSHOOT:
        return False
    last = sctp._last_received_tsn
    highest = sctp._kvpeer_highest_tsn
    if highest is None or rtcsctptransport.uint32_gt(last, highest):
        highest = last
    if not rtcsctptransport.uint32_gt(tsn, highest):
        return False
    if not sctp._kvpeer_overrun:
        sctp._kvpeer_overrun = True
        logger.warning("SCTP peer overruns our receive window by %d bytes: dropping its new data",
                       -sctp._advertised_rwnd)
    return True


def _tsn_after(a: int, b: int) -> bool:
    """Serial-number order of 32-bit TSNs (RFC 1982): is *a* after *b*?"""
    return a != b and (a - b) % rtcsctptransport.SCTP_TSN_MODULO < 2**31


async def _receive_data_chunk(self: Any, chunk: Any) -> None:
    """aiortc's ``RTCSctpTransport._receive_data_chunk``, without the reassembly scan for
    chunks that cannot complete a message.

    aiortc rescans a stream's whole reassembly list on every DATA chunk: quadratic in the
    fragments of a message (47 per 64 KiB message at MTU 1500). A message completes only with
    its last missing fragment; a chunk appended in TSN order is that fragment only if it is
    the message's last, so every other in-order chunk skips the scan.
    """
    if self._advertised_rwnd < 0 and _over_window(self, chunk.tsn):
        return
    self._sack_needed = True
    if self._mark_received(chunk.tsn):
        return
    stream = self._get_inbound_stream(chunk.stream_id)
    reassembly = stream.reassembly
    in_order = not reassembly or _tsn_after(chunk.tsn, reassembly[-1].tsn)
    stream.add_chunk(chunk)
    self._advertised_rwnd -= len(chunk.user_data)
    if not in_order or chunk.flags & rtcsctptransport.SCTP_DATA_LAST_FRAG:
        for message in stream.pop_messages():
            self._advertised_rwnd += len(message[2])
            await self._receive(*message)
    await self._reset_deferred_streams()


def _mark_received(self: Any, tsn: int) -> bool:
    """aiortc's ``RTCSctpTransport._mark_received`` in O(1) per TSN; True for a duplicate.

    aiortc sorts and refilters every TSN held above a hole on each packet: with a few MB
    behind a lost packet that was most of the receiver's CPU on a lossy path (and its plain
    sort misorders TSNs across the 32-bit wrap). Also notes in ``_kvpeer_sack_now`` whether
    this TSN changed the gap report other than by extending it (a new hole, or a hole filled):
    only those SACKs are urgent (see :class:`_DelayedSack`).
    """
    last = self._last_received_tsn
    misordered = self._sack_misordered
    if rtcsctptransport.uint32_gte(last, tsn) or tsn in misordered:
        self._sack_duplicates.append(tsn)
        return True
    highest = self._kvpeer_highest_tsn
    if highest is None or rtcsctptransport.uint32_gt(last, highest):
        highest = last
    if tsn != rtcsctptransport.tsn_plus_one(highest):
        self._kvpeer_sack_now = True
    if rtcsctptransport.uint32_gt(tsn, highest):
        self._kvpeer_highest_tsn = tsn
    if tsn != rtcsctptransport.tsn_plus_one(last):
        misordered.add(tsn)
        return False
    last = tsn
    following = rtcsctptransport.tsn_plus_one(last)
    while following in misordered:
        misordered.discard(following)
        last, following = following, rtcsctptransport.tsn_plus_one(following)
    self._last_received_tsn = last
    if self._sack_duplicates:
        self._sack_duplicates = [
            x for x in self._sack_duplicates if rtcsctptransport.uint32_gt(x, last)
        ]
    return False


#: A SACK's gap blocks are offsets from the cumulative TSN in 16-bit fields: a TSN held more
#: than this far above it cannot be reported (with 30-byte messages the receive window holds
#: ~140k chunks, so one lost packet and a burst of small messages got there, and building the
#: SACK raised struct.error). RFC 9260 3.3.4 lets a receiver report fewer gap blocks; the
#: cumulative ack, which frees the sender's queue, is unaffected.
MAX_GAP_OFFSET = 0xFFFF
#: Gap blocks and duplicate TSNs reported per SACK, so that it fits the smallest packet size
#: (12 + 16 + 4 x (200 + 64) = 1,084 <= 1,189 bytes; aiortc sends it whatever its size, and its
#: 16-bit chunk length overflowed past 16,379 entries). The lowest blocks are the ones kept:
#: they are the holes the sender must fill first.
MAX_SACK_GAP_BLOCKS = 200
MAX_SACK_DUPLICATES = 64


def sack_gaps(
    last_received: int, misordered: set[int], limit: int = MAX_SACK_GAP_BLOCKS
) -> list[tuple[int, int]]:
    """Gap ack blocks (start, end offsets from ``last_received``) of the TSNs held above a hole,
    ascending and merged as RFC 9260 asks. aiortc's ``_send_sack`` sorts the TSNs as plain
    integers, so across the 32-bit wrap its blocks came out of order and unmerged; the sender
    reads its highest TSN seen from the last block and then counts too few strikes.

    Only the first *limit* blocks, and only offsets up to :data:`MAX_GAP_OFFSET` (a block
    crossing it is cut there), are reported: what a SACK can carry."""
    gaps: list[list[int]] = []
    for pos in sorted((tsn - last_received) % rtcsctptransport.SCTP_TSN_MODULO for tsn in misordered):
        if pos > MAX_GAP_OFFSET:
            break
        if gaps and pos == gaps[-1][1] + 1:
            gaps[-1][1] = pos
        elif len(gaps) < limit:
            gaps.append([pos, pos])
        else:
            break
    return [(start, end) for start, end in gaps]


async def _send_sack(self: Any) -> None:
    """aiortc's ``RTCSctpTransport._send_sack`` with :func:`sack_gaps` (wrap-safe order, and
    only what fits the SACK's fields and one packet)."""
    sack = rtcsctptransport.SackChunk()
    sack.cumulative_tsn = self._last_received_tsn
    sack.advertised_rwnd = max(0, self._advertised_rwnd)
    sack.duplicates = self._sack_duplicates[:MAX_SACK_DUPLICATES]
    sack.gaps = sack_gaps(self._last_received_tsn, self._sack_misordered)
    await self._send_chunk(sack)
    self._sack_duplicates.clear()
    self._sack_needed = False


class _DelayedSack:
    """Delayed SACK for one association: acknowledge every :func:`sack_every` packets or after
    ``SACK_DELAY_S``, at once when the gap report changed shape (a new hole: the sender
    counts strikes toward fast retransmit; a filled hole: the cumulative ack jumps) or on
    duplicates. While a hole merely persists, every sack_every packets: aiortc's sender walks
    its whole sent queue per SACK, and a SACK per packet behind a hole cost it most of a core
    on a 1 %-loss path. :meth:`on_sack_needed` replaces aiortc's ``_send_sack``;
    :class:`_DataReader` calls :meth:`due` and :meth:`send` itself."""

    __slots__ = ("sctp", "send_now", "unacked", "timer", "tasks")

    def __init__(self, sctp: Any) -> None:
        self.sctp = sctp
        self.send_now: Callable[[], Any] = types.MethodType(_send_sack, sctp)  # build and send one
        self.unacked = 0
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # owned here; aiortc owns the association

    def due(self) -> bool:
        """A packet to acknowledge arrived: True if the SACK must go now (else the timer
        runs; ``_sack_needed`` stays set, so the next packet counts here too)."""
        sctp = self.sctp
        self.unacked += 1
        if (
            self.unacked >= self.sctp._kvpeer_sack_every
            or sctp._kvpeer_sack_now
            or sctp._sack_duplicates
            or sctp._association_state != _ESTABLISHED
        ):
            return True
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(SACK_DELAY_S, self._fired)
        return False

    async def send(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.unacked = 0
        self.sctp._kvpeer_sack_now = False
        try:
            await self.send_now()
        except struct.error as exc:
            # A SACK its fields cannot hold (see sack_gaps): this one is lost, the next may
            # fit. Raised on here it closed the DTLS transport, the whole session.
            self._failed(exc)

    async def on_sack_needed(self) -> None:
        if self.due():
            await self.send()

    def _fired(self) -> None:
        self.timer = None
        sctp = self.sctp
        if sctp._sack_needed and sctp._association_state == _ESTABLISHED:
            self.unacked = 0
            sctp._kvpeer_sack_now = False
            task = asyncio.get_running_loop().create_task(self._send_quietly())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send_quietly(self) -> None:
        # The association may close while the timer runs; aiortc raises ConnectionError then.
        # Nobody awaits this task: anything else is logged here, not left to asyncio's
        # "Task exception was never retrieved".
        try:
            await self.send_now()
        except ConnectionError:
            pass
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Log a SACK that could not be sent: WARNING once per association, then DEBUG."""
        sctp = self.sctp
        level = logging.DEBUG if getattr(sctp, "_kvpeer_sack_failed", False) else logging.WARNING
        sctp._kvpeer_sack_failed = True
        logger.log(level, "transport: could not send a SACK: %s: %s", type(exc).__name__, exc,
                   exc_info=level == logging.WARNING)


# -- DTLS records and ICE datagrams ---------------------------------------------------------
#
# Per packet, pyOpenSSL's wrappers (a fresh cffi buffer per read, an exception for every read
# of an empty BIO, callback-helper checks per call), aioice parsing every datagram as STUN
# (a ValueError per data packet) and four coroutine layers between the DTLS transport and
# sendto() cost several times the encryption itself.


class _RecordPath:
    """Raw OpenSSL handles and reusable buffers of one connected DTLS transport, and the
    records of a transmit burst waiting to go out together (:func:`_transmit_in_one_batch`)."""

    __slots__ = (
        "ssl", "into_ssl", "from_ssl", "out", "out_view", "plain", "plain_view", "ice",
        "batch", "batch_chunks", "gso", "gso_protocol", "gso_ok",
    )  # fmt: skip

    def __init__(self, dtls: Any) -> None:
        connection = dtls._ssl
        self.ssl = connection._ssl
        self.into_ssl = connection._into_ssl
        self.from_ssl = connection._from_ssl
        self.out = _ffi.new("char[]", DTLS_BUFFER)
        self.out_view = _ffi.buffer(self.out)
        self.plain = _ffi.new("char[]", DTLS_BUFFER)
        self.plain_view = _ffi.buffer(self.plain)
        self.ice = dtls.transport._connection
        self.batch: list[bytes] | None = None
        #: (index in batch, DATA chunk) of the batch's records that carry one.
        self.batch_chunks: list[tuple[int, Any]] = []
        self.gso: socket.socket | None = None  # the send socket (a duplicate of the ICE one)
        self.gso_protocol: Any = None
        self.gso_ok = True  # False once the kernel refused UDP_SEGMENT

    def close(self) -> None:
        if self.gso is not None:
            self.gso.close()
            self.gso = None


def _record_path(dtls: Any) -> _RecordPath:
    path: _RecordPath | None = dtls._kvpeer_records
    if path is None:
        path = dtls._kvpeer_records = _RecordPath(dtls)

        def closed() -> None:
            if dtls._state != _DTLS_CONNECTED:
                path.close()  # the duplicate socket would keep the port bound

        dtls.on("statechange", closed)
    return path


def _flush_records(dtls: Any, path: _RecordPath) -> None:
    """aiortc's ``_write_ssl``: send what OpenSSL queued, straight to the nominated socket
    (or keep it for the burst being transmitted)."""
    size = _lib.BIO_read(path.from_ssl, path.out, DTLS_BUFFER)
    if size <= 0:
        return  # nothing queued: pyOpenSSL raised WantReadError here, aiortc caught it
    record = path.out_view[:size]
    dtls._RTCDtlsTransport__tx_bytes += size
    dtls._RTCDtlsTransport__tx_packets += 1
    if path.batch is not None:
        path.batch.append(record)
        return
    protocol, addr = _destination(path)
    protocol.transport.sendto(record, addr)


def _destination(path: _RecordPath) -> tuple[Any, tuple[str, int]]:
    """The nominated pair's local socket protocol and its remote address."""
    pair = path.ice._nominated.get(1)
    if pair is None:
        raise ConnectionError("Cannot send data, not connected")
    remote = pair.remote_candidate
    return pair.protocol, (remote._network_host, remote.port)


#: Linux UDP segmentation offload (``socket.UDP_SEGMENT`` from Python 3.12 on): one
#: ``sendmsg`` carries up to 64 equal datagrams (the last may be shorter) through the stack.
#: (A test harness note: tbf keeps its queue across ``tc qdisc change``, and a queued GSO
#: packet larger than the new bucket stalls the link for good; kvpeer.testing.netns re-creates
#: the qdisc on every rate change.)
UDP_GSO = True
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65_000  # the super-datagram is one UDP datagram until it is segmented


def _gso_socket(path: _RecordPath, protocol: Any) -> socket.socket | None:
    """A duplicate of *protocol*'s socket for ``sendmsg`` (uvloop's transport has none)."""
    if path.gso_protocol is not protocol:
        path.close()
        path.gso_protocol = protocol
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            gso = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
            gso.setblocking(False)
            path.gso = gso
    return path.gso


#: sendmsg errors that mean the kernel cannot segment (old kernel, device without checksum
#: offload): GSO is switched off for the path. Any other error lost the datagrams.
_NO_OFFLOAD = frozenset((errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT))


def _send_batch(path: _RecordPath, records: list[bytes]) -> tuple[list[int], bool]:
    """Send a burst of records: runs of equal size in one ``sendmsg`` each (UDP GSO).

    Returns the indices of the records the kernel refused (a local drop, see
    :func:`_report_local_drops`) and whether a refusal was ``ENOBUFS`` (the egress queue full).
    """
    protocol, addr = _destination(path)
    transport = protocol.transport
    sock = _gso_socket(path, protocol)
    dropped: list[int] = []
    congested = False
    start, count = 0, len(records)
    while start < count:
        size = len(records[start])
        limit = min(count, start + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        end = start + 1
        while end < limit and len(records[end]) == size:
            end += 1
        if end < limit and len(records[end]) < size:
            end += 1  # a shorter segment may end the run
        gso = UDP_GSO and path.gso_ok and end - start > 1
        if not gso:
            end = start + 1
        # Only while uvloop holds nothing queued: its queue would go out after ours.
        if sock is not None and not transport.get_write_buffer_size():
            try:
                if gso:
                    sock.sendmsg(
                        [b"".join(records[start:end])],
                        [(socket.SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))],
                        0,
                        addr,
                    )
                else:
                    sock.sendto(records[start], addr)
                start = end
                continue
            except BlockingIOError:
                pass  # socket buffer full: uvloop queues them below
            except OSError as exc:
                if gso and exc.errno in _NO_OFFLOAD:
                    logger.info("no UDP segmentation offload (%s): one send per packet", exc)
                    path.gso_ok = False
                else:
                    dropped.extend(range(start, end))
                    congested = congested or exc.errno == errno.ENOBUFS
                    if exc.errno != errno.ENOBUFS:
                        _drain_error_queue(sock)
                    start = end
                    continue
        for record in records[start:end]:
            transport.sendto(record, addr)
        start = end
    return dropped, congested


async def _transmit_in_one_batch(sctp: Any, transmit: Callable[[], Any]) -> None:
    """Run aiortc's transmit with the records it makes sent together at the end."""
    path: _RecordPath | None = sctp.transport._kvpeer_records
    if path is None or path.batch is not None:
        await transmit()
        return
    path.batch = []
    try:
        await transmit()
    finally:
        records, path.batch = path.batch, None
        chunks, path.batch_chunks = path.batch_chunks, []
        if records:
            dropped, congested = _send_batch(path, records)
            if dropped:
                _local_drop(sctp, dropped, chunks, congested)


def _note_batched(sctp: Any, chunk: Any) -> None:
    """After ``_send_chunk``: remember which record of the batch carries *chunk*."""
    path: _RecordPath | None = sctp.transport._kvpeer_records
    if path is not None and path.batch:
        path.batch_chunks.append((len(path.batch) - 1, chunk))


#: After a local drop that left nothing in flight (so no SACK will come), resend this soon.
LOCAL_DROP_RETRY_S = 0.005


def _local_drop(
    sctp: Any, dropped: list[int], chunks: list[tuple[int, Any]], congested: bool
) -> None:
    """Records *dropped* never left this host (the egress queue, e.g. a qdisc, was full).

    Their DATA chunks are lost for certain: mark them for retransmission now, as a fast
    retransmit would, rather than waiting for three SACKs or T3 (a burst of drops also took
    the retransmissions of earlier losses, which only T3 found). A full queue is congestion
    (TCP's local congestion, ``tcp_enter_cwr``): the window shrinks, once per round trip.
    """
    sctp._kvpeer_local_drops += len(dropped)
    inflight = sctp._flight_size  # the dropped ones included: what the queue could not hold
    lost = set(dropped)
    marked = 0
    for index, chunk in chunks:
        if index in lost and not chunk._acked and not chunk._retransmit:
            if not sctp._maybe_abandon(chunk):
                chunk._retransmit = True
            sctp._flight_size_decrease(chunk)
            marked += 1
    if marked:
        sctp._kvpeer_local_drop_chunks += marked
        sctp._kvpeer_rtx_pending = True
    if congested:
        now = time.monotonic()
        rate: RateControl | None = sctp._kvpeer_rate
        if rate is not None:
            rate.on_local_drop(now, len(dropped), inflight)
            sctp._cwnd = rate.cwnd
        elif now - sctp._kvpeer_local_cut_at > (getattr(sctp, "_srtt", None) or RTO_MIN_S):
            sctp._kvpeer_local_cut_at = now
            sctp._ssthresh = max(sctp._cwnd // 2, 4 * sctp._kvpeer_userdata)
            sctp._cwnd = sctp._ssthresh
    if marked and sctp._flight_size == 0:
        asyncio.get_running_loop().call_later(LOCAL_DROP_RETRY_S, _retransmit_soon, sctp)


def _retransmit_soon(sctp: Any) -> None:
    if sctp._association_state == RTCSctpTransport.State.ESTABLISHED:
        asyncio.ensure_future(sctp._transmit())


async def _send_data(self: Any, data: bytes) -> None:
    """aiortc's ``RTCDtlsTransport._send_data`` through :class:`_RecordPath`."""
    if self._state != rtcdtlstransport.State.CONNECTED:
        raise ConnectionError("Cannot send encrypted data, not connected")
    path = _record_path(self)
    written = _lib.SSL_write(path.ssl, data, len(data))
    if written <= 0:
        self._ssl._raise_ssl_error(path.ssl, written)  # raises what pyOpenSSL's send would
    _flush_records(self, path)


def _read_failed(connection: Any, ssl: Any, result: int) -> bytes | None:
    """What aiortc makes of a failed ``SSL_read``: None once the peer shut down, else b""."""
    try:
        connection._raise_ssl_error(ssl, result)
    except SSL.ZeroReturnError:
        return None
    except SSL.Error:
        pass
    return b""


def _install_record_path(dtls: Any) -> None:
    stock_recv_next = type(dtls)._recv_next  # already with apply()'s buffer size
    connection = dtls.transport._connection

    async def recv_next() -> None:
        # The handshake (and DTLS 1.3's last-flight timer) stays aiortc's.
        if not dtls._RTCDtlsTransport__handshake_done or dtls._ssl is None:
            await stock_recv_next(dtls)
            return
        # From now on the demux queues a coalesced read whole (see _demux_dtls_first).
        connection._kvpeer_whole_reads = True
        data = await dtls.transport._recv()
        dtls._RTCDtlsTransport__rx_bytes += len(data)
        if not 19 < data[0] < 64:
            dtls._RTCDtlsTransport__rx_packets += 1
            await _receive_srtp(dtls, data)
            return
        path = _record_path(dtls)
        receiver = dtls._data_receiver
        # The fast reader serves only the SCTP transport still registered: once it stopped
        # (unregistered), aiortc drops what arrives, and so do we.
        reader: _DataReader | None = dtls._kvpeer_reader
        if reader is not None and reader.sctp is not receiver:
            reader = None
        into_ssl, ssl, plain, plain_view = path.into_ssl, path.ssl, path.plain, path.plain_view
        # Several DTLS records when UDP GRO coalesced a burst, one per datagram as sent: each
        # goes to OpenSSL as its own datagram, and a truncated tail is dropped, as DTLS drops
        # a record longer than its datagram. Other content types go whole, as aiortc has it,
        # and are read until OpenSSL has no more plaintext (a datagram may hold several records
        # of a kind we do not split, e.g. DTLS 1.3's).
        total = len(data)
        split = data[0] == _DTLS_APPLICATION_DATA
        start = 0
        records = 0
        closed = False
        while start < total:
            if split:
                if start + _DTLS_HEADER > total:
                    break
                end = start + _DTLS_HEADER + (data[start + 11] << 8 | data[start + 12])
                if end > total:
                    break
                record = data if end == total and not start else data[start:end]
            else:
                end, record = total, data
            start = end
            records += 1
            _lib.BIO_write(into_ssl, record, len(record))
            while True:
                size = _lib.SSL_read(ssl, plain, DTLS_BUFFER)
                if size <= 0:
                    # A handshake retransmission or an alert may have queued a reply: out now,
                    # before the next DATA record's write could pick it up.
                    _flush_records(dtls, path)
                    closed = _read_failed(dtls._ssl, ssl, size) is None
                    break
                if reader is not None:
                    status = reader.read(plain_view, size)
                    if status >= 0:
                        if status:
                            await reader.follow(status)
                        if split:
                            break
                        continue
                if receiver:
                    await _handle_sctp_packet(dtls, receiver, plain_view[:size])
                if split:
                    break
            if closed:
                break
        dtls._RTCDtlsTransport__rx_packets += records
        # What reading made OpenSSL send (an alert, a handshake retransmission): once a read.
        _flush_records(dtls, path)
        if closed:
            raise ConnectionError("DTLS shutdown by remote party")

    dtls._kvpeer_records = None
    dtls._kvpeer_reader = None
    dtls._recv_next = recv_next
    dtls._send_data = types.MethodType(_send_data, dtls)


# What aiortc's SCTP parser and handlers raise on a malformed packet besides the ValueError
# it catches itself (a short chunk or parameter: struct.error; an INIT bundled with other
# chunks: AssertionError; ...). Uncaught, any of them closed the DTLS transport.
_MALFORMED_SCTP = (struct.error, AssertionError, IndexError, KeyError, TypeError, ValueError)


async def _handle_sctp_packet(dtls: Any, receiver: Any, packet: bytes) -> None:
    """aiortc's ``_handle_data`` for a packet the fast reader left to it; a malformed packet
    from the (authenticated) peer is dropped and logged, never closes the association."""
    try:
        await receiver._handle_data(packet)
    except _MALFORMED_SCTP as exc:
        level = logging.DEBUG if getattr(dtls, "_kvpeer_malformed_seen", False) else logging.WARNING
        dtls._kvpeer_malformed_seen = True
        logger.log(level, "transport: dropped a malformed SCTP packet from the peer (%d bytes): %s: %s",
                len(packet), type(exc).__name__, exc)


async def _receive_srtp(dtls: Any, data: bytes) -> None:
    """aiortc's SRTP / SRTCP branch of ``_recv_next``, unchanged (kvpeer sends no media)."""
    if not (127 < data[0] < 192 and dtls._rx_srtp):
        return
    arrival_time_ms = aiortc.clock.current_ms()
    try:
        if aiortc.rtp.is_rtcp(data):
            await dtls._handle_rtcp_data(dtls._rx_srtp.unprotect_rtcp(data))
        else:
            packet = dtls._rx_srtp.unprotect(data)
            await dtls._handle_rtp_data(packet, arrival_time_ms=arrival_time_ms)
    except pylibsrtp.Error as exc:
        logger.debug("SRTP unprotect failed: %s", exc)


def _demux_dtls_first(protocol: Any) -> None:
    """Hand DTLS datagrams to the connection without trying to parse them as STUN.

    aioice parses every datagram as STUN and takes the ValueError as "data": an exception
    per packet. RFC 7983: a first byte of 20-63 is DTLS and never STUN. An empty datagram
    is dropped (aioice queued it, and aiortc's DTLS reader died on ``data[0]``).
    """
    stock = protocol.datagram_received
    receiver = protocol.receiver
    if not hasattr(receiver, "_kvpeer_whole_reads"):
        receiver._kvpeer_whole_reads = False  # set by the record path once it reads

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        if not data:
            return
        if not 19 < data[0] < 64:
            stock(data, addr)
            return
        if data[0] == _DTLS_APPLICATION_DATA and len(data) > _record_end(data, 0):
            # Several datagrams the kernel coalesced (UDP GRO). The last may be a smaller one
            # of another kind (a STUN consent check of the same flow): that one is aioice's,
            # or six missed checks in a long transfer would close the connection.
            cut = _dtls_records_end(data)
            if cut < len(data):
                stock(data[cut:], addr)
                data = data[:cut]
            if not receiver._kvpeer_whole_reads:
                # Before the record path reads them whole: one record each, as aiortc's DTLS
                # reader expects.
                component = protocol.local_candidate.component
                for record in _split_records(data):
                    receiver.data_received(record, component)
                return
        receiver.data_received(data, protocol.local_candidate.component)

    protocol.datagram_received = datagram_received


#: Linux: deliver a burst of equal datagrams of one flow as one buffer (``socket.UDP_GRO``
#: from Python 3.12 on). With the sender's UDP_SEGMENT, the kernel hands over the burst as sent.
UDP_GRO = 104
_DTLS_APPLICATION_DATA = 23
_DTLS_HEADER = 13  # content type, version, epoch, sequence number (6 bytes), length


def _record_end(data: bytes, start: int) -> int:
    return start + _DTLS_HEADER + int.from_bytes(data[start + 11 : start + 13], "big")


def _dtls_records_end(data: bytes) -> int:
    """Where a coalesced read's whole DTLS records end, if a datagram of another kind (first
    byte outside 20-63, RFC 7983) follows them; else its length."""
    start, size = 0, len(data)
    while start + _DTLS_HEADER <= size and 19 < data[start] < 64:
        end = _record_end(data, start)
        if end > size:
            return size
        start = end
    return start if start < size and not 19 < data[start] < 64 else size


def _split_records(data: bytes) -> list[bytes]:
    """The DTLS records of coalesced datagrams (each held one); a truncated tail is dropped,
    as DTLS drops a record longer than its datagram."""
    records = []
    start, size = 0, len(data)
    while start + _DTLS_HEADER <= size:
        end = _record_end(data, start)
        if end > size:
            break
        records.append(data[start:end])
        start = end
    return records


def _receive_coalesced(sock: Any) -> None:
    """Ask for UDP GRO on an ICE socket: data bursts then arrive as one read each."""
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        pass  # older kernel: one read per datagram, as before


#: Linux ``IP_RECVERR`` / ``IPV6_RECVERR`` (not in Python's socket module).
IP_RECVERR = 11
IPV6_RECVERR = 25


def _report_local_drops(sock: Any, protocol: Any) -> None:
    """Have the kernel tell the sender when its own egress queue drops a datagram.

    Linux's UDP ``sendmsg`` succeeds silently when the qdisc drops the datagram (only counted
    as ``SndbufErrors``) unless the socket has ``IP_RECVERR``; then it fails with
    ``ENOBUFS`` and :func:`_send_batch` takes the datagram as lost (:func:`_local_drop`).
    The option also queues ICMP errors on the socket's error queue, which holds receive-buffer
    memory and keeps the socket polling as in error until read: it is drained whenever the
    event loop reports an error on the socket (an ``error_received`` that is not ENOBUFS).
    """
    level, option = (
        (socket.IPPROTO_IPV6, IPV6_RECVERR)
        if sock.family == socket.AF_INET6
        else (socket.IPPROTO_IP, IP_RECVERR)
    )
    try:
        sock.setsockopt(level, option, 1)
    except OSError:
        return  # not Linux: drops stay silent, as before
    stock = protocol.error_received

    def error_received(exc: Exception) -> None:
        if not (isinstance(exc, OSError) and exc.errno == errno.ENOBUFS):
            try:
                with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                    _drain_error_queue(dup)
            except OSError:
                pass  # closed meanwhile
        stock(exc)

    protocol.error_received = error_received


def _drain_error_queue(sock: socket.socket) -> None:
    """Read and discard what ``IP_RECVERR`` queued (ICMP errors, local errors)."""
    for _ in range(1024):
        try:
            sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
        except OSError:
            return  # empty (EAGAIN)
