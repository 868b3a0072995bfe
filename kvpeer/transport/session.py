"""One open, authenticated peer session: control-channel RPC, blob streaming, heartbeats.

Owns the aiortc objects of one peer connection (camelCase and pyee events stay in here and in
:mod:`kvpeer.transport.peer`) and the tasks serving the peer. Protocol decisions come from the
sans-IO modules (messages, blobs, liveness, estimator); this module is the asyncio glue.
A session is symmetric: either side requests and serves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.exceptions import InvalidStateError

from kvpeer import aio
from kvpeer.errors import ErrorCode, KVPeerError, ProtocolError, TransportError
from kvpeer.transport import messages as m
from kvpeer.transport.aiortc_patches import association_stats
from kvpeer.transport.blobs import BlobAssembler, blob_start, iter_frames
from kvpeer.transport.config import TransportConfig
from kvpeer.transport.estimator import BandwidthEstimator
from kvpeer.transport.liveness import Liveness

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Control-channel requests one peer may have in the handler at once; more are answered BUSY.
MAX_REQUESTS_IN_FLIGHT = 64

#: send_now skips flow control; past this many buffer_high_bytes (plus one message) queued on a
#: channel the peer is not reading what we send, and the session ends rather than grow.
SEND_NOW_CAP_BUFFERS = 4


class PeerStoppedReading(TransportError):
    """The peer takes nothing we send (its pings may still arrive): its fault, the session ends."""


class RequestHandler(Protocol):
    """What the daemon serves to peers (called for sessions opened by either side)."""

    async def handle_request(
        self, peer_id: str, method: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Answer a control-channel RPC; raise ProtocolError(code, reason) to answer an error."""
        ...

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        """Bytes of one encoded chunk to stream to the peer; None answers NOT_FOUND.

        A handler may also define ``blob_sent(peer_id, blob)``: called once the peer confirmed
        that a blob arrived whole (what to count as sent; an opened blob may still be refused
        or cancelled)."""
        ...


class _Channel:
    """A data channel with flow control on bufferedAmount (event driven, never polled).

    Senders that find the buffer over ``buffer_high_bytes`` (or others already waiting) queue
    their message, first come first served; queued messages are sent, in order, whenever the
    buffer is under the mark: it stays within the mark plus one message, every transfer moves,
    and a sender wakes only once its message is sent.

    Sends raise only KVPeerError: ProtocolError TOO_LARGE for a message over the peer's
    max-message-size, TransportError once the channel or the session is closed.
    """

    def __init__(self, channel: RTCDataChannel, config: TransportConfig) -> None:
        self.channel = channel
        self._high = config.buffer_high_bytes
        self._cap = SEND_NOW_CAP_BUFFERS * config.buffer_high_bytes + config.max_message_bytes
        self._full_since: float | None = None  # monotonic; None: under buffer_high_bytes since
        self._waiting: collections.deque[tuple[asyncio.Future[None], bytes]] = collections.deque()
        self._opened = asyncio.Event()
        self._closed_reason: str | None = None
        channel.bufferedAmountLowThreshold = config.buffer_low_bytes
        channel.on("bufferedamountlow", self._on_low)
        channel.on("open", self._opened.set)
        if channel.readyState == "open":
            self._opened.set()

    async def wait_open(self, limit_s: float) -> None:
        try:
            await aio.wait_for(self._opened.wait(), limit_s)
        except TimeoutError:
            raise TransportError(f"data channel {self.channel.label} did not open") from None

    def stalled_for(self, now: float) -> float:
        """Seconds the send buffer has stayed over buffer_high_bytes without draining."""
        if self._full_since is None or self.channel.bufferedAmount <= self._high:
            return 0.0
        return now - self._full_since

    def _on_low(self) -> None:
        self._full_since = None
        self._send_waiting()

    def _send_waiting(self) -> None:
        """Queued messages go out, in order, while the buffer is under the mark."""
        while self._waiting and self.channel.bufferedAmount <= self._high:
            sent, data = self._waiting.popleft()
            if sent.done():  # its sender gave up
                continue
            try:
                self._check_open()
                self._queue(data)
            except KVPeerError as exc:
                sent.set_exception(exc)
            else:
                sent.set_result(None)

    def _note_level(self) -> None:
        if self.channel.bufferedAmount <= self._high:
            self._full_since = None  # it drained: the peer is reading
        elif self._full_since is None:
            self._full_since = time.monotonic()

    async def send(self, data: bytes, limit_s: float) -> None:
        self._check_open()
        self._note_level()
        if not self._waiting and self.channel.bufferedAmount <= self._high:
            self._queue(data)
            return
        entry = (asyncio.get_running_loop().create_future(), data)
        self._waiting.append(entry)
        self._send_waiting()  # room already (it drained without a low event): no wait
        sent = entry[0]
        try:
            await asyncio.wait({sent}, timeout=max(0.0, limit_s))
        finally:
            if not sent.done():  # timed out or cancelled while still queued: never sent
                sent.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
            elif not sent.cancelled():
                # Seen, even by a sender cancelled as close() failed its message (the session
                # ending cancels its tasks): else asyncio logs it as never retrieved.
                sent.exception()
        if sent.cancelled():
            raise TransportError("peer stopped reading (send buffer stayed full)")
        sent.result()  # the send's own error (TOO_LARGE, closed)

    def close(self, reason: str) -> None:
        """Fail every send from now on with *reason*, waiting ones too: a closed aiortc channel
        never emits bufferedamountlow, so they would wait out their whole limit."""
        self._closed_reason = reason
        while self._waiting:
            sent, _data = self._waiting.popleft()
            if not sent.done():
                sent.set_exception(TransportError(reason))

    def send_now(self, data: bytes) -> None:
        """Queue *data* past flow control (small control messages, pings); PeerStoppedReading
        once the buffer holds more than a peer that reads would ever leave in it."""
        self._check_open()
        self._note_level()
        if self.channel.bufferedAmount + len(data) > self._cap:
            raise PeerStoppedReading(
                f"over {self._cap} bytes wait to be sent on {self.channel.label}: "
                "the peer stopped reading"
            )
        self._queue(data)

    def _queue(self, data: bytes) -> None:
        try:
            self.channel.send(data)
        except ValueError as exc:  # aiortc: over the peer's SDP max-message-size
            raise ProtocolError(ErrorCode.TOO_LARGE, str(exc)) from None
        except InvalidStateError:
            raise TransportError(f"data channel {self.channel.label} closed") from None
        self._note_level()

    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise TransportError(self._closed_reason)
        if self.channel.readyState != "open":
            raise TransportError(f"data channel {self.channel.label} is {self.channel.readyState}")


class PeerSession:
    """An authenticated session with one peer; create through :class:`PeerTransport`."""

    def __init__(
        self,
        *,
        peer_id: str,
        pc: RTCPeerConnection,
        control: RTCDataChannel,
        bulk: list[RTCDataChannel],
        config: TransportConfig,
        handler: RequestHandler,
        on_end: Callable[[PeerSession, bool], None],
        packet_bytes: int,
        message_limit: int,
    ) -> None:
        self.peer_id = peer_id
        self.packet_bytes = packet_bytes
        #: Largest control message we send: max_message_bytes, or less if the peer takes less.
        self.message_limit = message_limit
        self.estimator = BandwidthEstimator()
        self.delivered_bytes = 0  # blob bytes received from the peer, digest-verified
        self.sent_bytes = 0  # blob bytes the peer confirmed
        self.protocol_errors = 0
        self._pc = pc
        self._config = config
        self._handler = handler
        self._on_end = on_end
        self._control = _Channel(control, config)
        self._bulk = [_Channel(c, config) for c in bulk]
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._incoming: dict[int, tuple[BlobAssembler, asyncio.Future[bytes]]] = {}
        self._incoming_bytes = 0  # reserved_bytes of the blobs in _incoming, summed
        self._serving: dict[int, tuple[asyncio.Task[None], asyncio.Future[None]]] = {}
        self._sent_whole: set[asyncio.Task[Any] | None] = set()  # serving tasks past their last frame
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bye_ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._liveness = Liveness(
            interval_s=config.heartbeat_interval_s,
            dead_after_s=config.peer_dead_after_s,
            now=time.monotonic(),
        )
        self._closed = False
        self._closing = False
        self._failed = False  # _peer_failed ended it
        self._ending: asyncio.Task[Any] | None = None  # the end after the peer's Bye
        self._next_bulk = 0
        self._requests_in_flight = 0
        # Never ask more of the peer at once than it serves (same limit cluster-wide).
        self._fetch_slots = asyncio.Semaphore(config.max_transfers_per_peer)
        control.on("message", self._on_control)
        for channel in bulk:
            channel.on("message", self._on_bulk)
        pc.on("connectionstatechange", self._on_state)

    # -- public ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def closing(self) -> bool:
        """close() began, or the peer said Bye: the session takes no new work."""
        return self._closing

    @property
    def rtt_s(self) -> float | None:
        """Round-trip time: SCTP's smoothed RTT when known, else the heartbeat's.

        Heartbeat pongs queue behind bulk data the peer is sending us, so under load they
        measure that queue; SCTP's samples do not (they include up to one delayed-SACK wait).
        """
        srtt = association_stats(self._pc).get("srtt_s")
        return float(srtt) if srtt is not None else self._liveness.rtt_s

    async def request(
        self,
        method: str,
        body: dict[str, Any],
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed contract; None: config
    ) -> dict[str, Any]:
        """Call *method* on the peer; ProtocolError for a remote error, TransportError else."""
        self._check_usable()
        limit = self._limit(timeout)
        req_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        started = time.monotonic()
        what = f"request {method}"
        try:
            await self._send_control_within(m.Request(id=req_id, method=method, body=body), what, limit, started)
            return await self._wait(future, what, limit, started=started)
        finally:
            self._pending.pop(req_id, None)

    async def fetch_blob(
        self,
        key: bytes,
        level: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed contract; None: config
    ) -> bytes:
        """The whole blob stored under *key*; every frame CRC-checked, the whole digest-checked.

        *timeout* covers the whole call, the wait for one of our transfer slots included: the
        fetcher times a chunk from this call to its last byte, so queueing must not hide here.
        """
        self._check_usable()
        limit = self._limit(timeout)
        started = time.monotonic()
        try:
            await aio.wait_for(self._fetch_slots.acquire(), limit)
        except TimeoutError:
            raise self._timed_out("blob fetch (waiting for a transfer slot)", limit) from None
        try:
            self._check_usable()  # it may have ended while we queued
            return await self._fetch_blob(key, level, limit, started)
        finally:
            self._fetch_slots.release()

    async def _fetch_blob(self, key: bytes, level: str, limit_s: float, started: float) -> bytes:
        blob_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        assembler = BlobAssembler(blob_id, self._config.max_blob_bytes, key=key, level=level)
        self._incoming[blob_id] = (assembler, future)
        self.estimator.transfer_started(time.monotonic())
        answered = False  # the peer was told BlobDone or BlobCancel (it frees its slot then)
        try:
            request = m.BlobRequest(id=blob_id, key=key, level=level)
            await self._send_control_within(request, "blob fetch", limit_s, started)
            await self._wait(future, "blob fetch", limit_s, started=started)
            try:
                blob = await _off_loop(assembler.result, assembler.received_bytes)
            except ProtocolError as exc:  # the digest did not match
                self._peer_error(exc)
                answered = True
                self._send_control_now(m.BlobCancel(id=blob_id))
                raise
            # Confirm before the caller can ask for the next blob, so the peer's count of
            # transfers in flight never sees both (it answers BUSY above its limit).
            answered = True
            self._send_control_now(m.BlobDone(id=blob_id))
        except BaseException:
            if not self._closed and not answered:
                # The peer holds a transfer slot until told. No await: a cancelled or timed-out
                # fetch must not wait for flow control again (send_now is capped).
                self._send_control_now(m.BlobCancel(id=blob_id))
            raise
        finally:
            self._forget_incoming(blob_id)
            self.estimator.transfer_finished(time.monotonic())
        self.delivered_bytes += len(blob)
        return blob

    async def close(self) -> None:
        """Graceful: wait (bounded) until the peer confirmed what we serve, say bye, close."""
        if self._ending is not None and not self._closed:
            # The peer said Bye: its end is under way (waited for, never raised from here: it
            # may be cancelled by another path ending the session first).
            await asyncio.wait({self._ending})
            return
        if self._closed or self._closing:
            return
        self._closing = True
        timeout = self._config.close_timeout_s
        confirmations = [done for _, done in self._serving.values()]
        if confirmations:
            await asyncio.wait(confirmations, timeout=timeout)
        with contextlib.suppress(KVPeerError):
            await self._send_control_within(m.Bye(), "bye", timeout, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(asyncio.shield(self._bye_ack), timeout)
        await self._end(by_peer=False)

    # -- internals -------------------------------------------------------------------------

    def start(self) -> None:
        """Begin heartbeats (after the channels opened)."""
        self._spawn(self._heartbeat())

    async def wait_open(self, limit_s: float) -> None:
        await self._control.wait_open(limit_s)
        for channel in self._bulk:
            await channel.wait_open(limit_s)

    def _check_usable(self) -> None:
        if self._closed or self._closing:
            raise TransportError(f"session to {self.peer_id} is closed")

    def _limit(self, timeout: float | None) -> float:
        return self._config.request_timeout_s if timeout is None else timeout

    async def _wait(
        self, future: asyncio.Future[_T], what: str, limit_s: float, *, started: float | None = None
    ) -> _T:
        """*future*'s result, at most *limit_s* after *started* (monotonic; now if None)."""
        elapsed = 0.0 if started is None else time.monotonic() - started
        try:
            return await aio.wait_for(asyncio.shield(future), max(0.0, limit_s - elapsed))
        except TimeoutError:
            raise self._timed_out(what, limit_s) from None

    def _timed_out(self, what: str, limit_s: float) -> TransportError:
        return TransportError(f"{what} to {self.peer_id} timed out after {limit_s:g} s")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug of ours, not the peer's: said here, not as asyncio's "never retrieved".
            logger.error("peer %s: session task failed", self.peer_id, exc_info=task.exception())

    async def _send_control(self, message: m.Message) -> None:
        data = m.encode(message, self.message_limit)
        await self._control.send(data, self._config.request_timeout_s)

    async def _send_control_within(
        self, message: m.Message, what: str, limit_s: float, started: float
    ) -> None:
        """Send *message* within the caller's *limit_s* from *started*, flow control included."""
        data = m.encode(message, self.message_limit)
        left = max(0.0, limit_s - (time.monotonic() - started))
        try:
            await self._control.send(data, min(left, self._config.request_timeout_s))
        except TransportError:
            if not self._closed and time.monotonic() - started >= limit_s:
                raise self._timed_out(what, limit_s) from None
            raise

    def _send_control_now(self, message: m.Message) -> None:
        """Queue a small control message at once, past flow control (acks, pongs, refusals).
        Never raises: it runs inside aiortc's receive callbacks; a closed channel drops it, a
        peer that stopped reading ends the session."""
        try:
            self._control.send_now(m.encode(message, self.message_limit))
        except PeerStoppedReading as exc:
            self._peer_failed(exc)
        except KVPeerError:
            pass

    async def _send_quietly(self, message: m.Message) -> None:
        with contextlib.suppress(KVPeerError):
            await self._send_control(message)

    # -- receiving -------------------------------------------------------------------------

    def _on_control(self, data: bytes | str) -> None:
        self._liveness.heard(time.monotonic())
        if not isinstance(data, bytes):
            self._peer_error(ProtocolError(ErrorCode.MALFORMED, "text on the control channel"))
            return
        try:
            message = m.decode(data, m.CONTROL_TYPES, self._config.max_message_bytes)
        except ProtocolError as exc:
            self._peer_error(exc)
            self._settle_refused(data, exc)
            return
        try:
            self._dispatch(message)
        except ProtocolError as exc:
            self._peer_error(exc)

    def _settle_refused(self, data: bytes, exc: ProtocolError) -> None:
        """A message we refused may answer one of our requests, or ask one: fail or answer that
        at once, else a request on one side waits out its whole timeout."""
        peeked = m.peek_type_and_id(data)
        if peeked is None:
            return
        kind, ident = peeked
        if kind in ("req", "blob_req"):
            with contextlib.suppress(ProtocolError):  # an id out of range: nothing to answer
                self._send_control_now(m.Error.of(ident, exc))
            return
        target: asyncio.Future[Any] | None = None
        if kind in ("resp", "err"):
            target = self._pending.get(ident)
        if target is None and kind in ("err", "blob_start") and ident in self._incoming:
            target = self._incoming[ident][1]
        if target is not None and not target.done():
            target.set_exception(
                ProtocolError(exc.code, f"peer {self.peer_id} sent a {kind} we refused: {exc.reason}")
            )

    def _dispatch(self, message: m.Message) -> None:
        match message:
            case m.Ping(seq=seq, sent=sent):
                self._send_control_now(m.Pong(seq=seq, sent=sent))
            case m.Pong(sent=sent):
                self._liveness.pong(sent, time.monotonic())
                rtt = self.rtt_s
                if rtt is not None:
                    self.estimator.on_rtt(rtt)
            case m.Request(id=req_id):
                if self._requests_in_flight >= MAX_REQUESTS_IN_FLIGHT:
                    self._send_control_now(
                        m.Error(id=req_id, code=ErrorCode.BUSY, reason="too many requests")
                    )
                else:
                    # Counted now, not when the task starts: one read may carry many requests.
                    self._requests_in_flight += 1
                    self._spawn(self._serve_request(message))
            case m.Response(id=req_id, body=body):
                future = self._pending.get(req_id)
                if future is not None and not future.done():
                    future.set_result(body)
            case m.Error(id=req_id):
                error = message.as_exception(f"peer {self.peer_id}")
                target: asyncio.Future[Any] | None = self._pending.get(req_id)
                if target is None and req_id in self._incoming:
                    target = self._incoming[req_id][1]
                if target is not None and not target.done():
                    target.set_exception(error)
            case m.BlobRequest():
                self._start_serving(message)
            case m.BlobStart(id=blob_id):
                entry = self._incoming.get(blob_id)
                if entry is not None:
                    self._feed(entry, lambda a: a.start(message))
            case m.BlobDone(id=blob_id) | m.BlobCancel(id=blob_id):
                # Free the slot now: the peer may already have sent its next request.
                serving = self._serving.pop(blob_id, None)
                if serving is not None:
                    task, done = serving
                    early = isinstance(message, m.BlobDone) and task not in self._sent_whole
                    if early:  # "received" before we sent it all: a cancel, not a slot to reuse
                        self._peer_error(
                            ProtocolError(ErrorCode.INVALID, f"blob {blob_id} done before it was sent")
                        )
                    if early or isinstance(message, m.BlobCancel):
                        task.cancel()
                    if not done.done():
                        done.set_result(None)
            case m.Bye():
                self._send_control_now(m.ByeAck())
                if self._closing:  # both sides closing at once: its Bye answers ours
                    self._bye_acked()
                # The peer is leaving: no new work from now on, so that callers stop being
                # handed this session for the close_timeout_s its ByeAck may take to drain.
                self._closing = True
                if self._ending is None:
                    self._ending = self._spawn(self._end_after_bye())
            case m.ByeAck():
                self._bye_acked()

    def _bye_acked(self) -> None:
        if not self._bye_ack.done():
            self._bye_ack.set_result(None)

    def _on_bulk(self, data: bytes | str) -> None:
        now = time.monotonic()
        self._liveness.heard(now)
        if not isinstance(data, bytes):
            self._peer_error(ProtocolError(ErrorCode.MALFORMED, "text on a bulk channel"))
            return
        try:
            blob_id, _ = m.decode_frame_header(data)
        except ProtocolError as exc:
            self._peer_error(exc)
            return
        entry = self._incoming.get(blob_id)
        if entry is None:
            return  # a blob we gave up on: its last frames are still in flight
        self.estimator.on_bytes(len(data), now)
        self._feed(entry, lambda a: a.add(data))

    def _feed(
        self,
        entry: tuple[BlobAssembler, asyncio.Future[bytes]],
        step: Callable[[BlobAssembler], None],
    ) -> None:
        assembler, future = entry
        if future.done():
            return
        before = assembler.reserved_bytes
        try:
            step(assembler)
        except ProtocolError as exc:
            self._peer_error(exc)
            self._incoming_bytes += assembler.reserved_bytes - before
            self._fail_incoming(assembler, future, exc)
            return
        self._incoming_bytes += assembler.reserved_bytes - before
        budget = self._config.incoming_blob_budget
        if self._incoming_bytes > budget:  # our limit, not the peer's fault: no protocol error
            reason = f"blobs arriving from {self.peer_id} would hold over {budget} bytes"
            self._fail_incoming(assembler, future, ProtocolError(ErrorCode.BUSY, reason))
        elif assembler.complete:
            # Every frame is in: _fetch_blob joins and digest-checks them off the event
            # loop. Frames that still arrive for this blob are ignored (future done).
            future.set_result(b"")

    def _fail_incoming(
        self, assembler: BlobAssembler, future: asyncio.Future[bytes], exc: ProtocolError
    ) -> None:
        future.set_exception(exc)
        self._forget_incoming(assembler.blob_id)
        self._send_control_now(m.BlobCancel(id=assembler.blob_id))

    def _forget_incoming(self, blob_id: int) -> None:
        entry = self._incoming.pop(blob_id, None)
        if entry is not None:
            self._incoming_bytes -= entry[0].reserved_bytes

    def _peer_failed(self, exc: TransportError) -> None:
        """End the session for the peer's fault (said once; it is reported down)."""
        if self._closed or self._failed:
            return
        self._failed = True
        logger.warning("peer %s: %s: ending the session", self.peer_id, exc)
        self._spawn(self._end(by_peer=True))

    def _peer_error(self, exc: ProtocolError) -> None:
        self.protocol_errors += 1
        # The peer controls this text: log the first few loudly, the rest quietly.
        level = logging.WARNING if self.protocol_errors <= 5 else logging.DEBUG
        logger.log(level, "peer %s: protocol error: %s", self.peer_id, exc)

    # -- serving ---------------------------------------------------------------------------

    async def _serve_request(self, request: m.Request) -> None:
        try:
            await self._answer_request(request)
        finally:
            self._requests_in_flight -= 1

    async def _answer_request(self, request: m.Request) -> None:
        data = await self._reply_to(request)
        try:
            await self._control.send(data, self._config.request_timeout_s)
        except ProtocolError as exc:  # over the peer's message size: only aiortc's send knows
            await self._send_quietly(m.Error.of(request.id, exc))
        except KVPeerError:
            pass  # the session is ending: nobody is left to answer

    async def _reply_to(self, request: m.Request) -> bytes:
        """The encoded Response to *request*, or the Error that answers it instead."""
        try:
            body = await self._handler.handle_request(self.peer_id, request.method, request.body)
        except ProtocolError as exc:
            reply: m.Message = m.Error.of(request.id, exc)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelling():
                raise  # the session is ending
            logger.error("handler failed on %s from %s", request.method, self.peer_id, exc_info=exc)
            reply = m.Error(id=request.id, code=ErrorCode.INTERNAL, reason="internal error")
        else:
            try:
                return m.encode(m.Response(id=request.id, body=body), self.message_limit)
            except ProtocolError as exc:  # too large for the peer, or a body it cannot decode
                if exc.code != ErrorCode.TOO_LARGE:
                    logger.warning("answer to %s from %s not sent: %s", request.method, self.peer_id, exc)
                reply = m.Error.of(request.id, exc)
        return m.encode(reply, self.message_limit)

    def _start_serving(self, request: m.BlobRequest) -> None:
        # Refusals go out at once, not from a task each: a peer asking faster than it reads
        # would otherwise hold one task per request.
        if self._closing or self._closed:
            self._send_control_now(
                m.Error(id=request.id, code=ErrorCode.SHUTTING_DOWN, reason="closing")
            )
            return
        if request.id in self._serving:
            self._peer_error(ProtocolError(ErrorCode.INVALID, f"blob id {request.id} reused"))
            return
        if len(self._serving) >= self._config.max_transfers_per_peer:
            self._send_control_now(
                m.Error(id=request.id, code=ErrorCode.BUSY, reason="too many transfers")
            )
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._serve_blob(request, done))
        self._serving[request.id] = (task, done)
        self._tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._task_done(t)
            self._sent_whole.discard(t)
            if self._serving.get(request.id, (None,))[0] is t:
                del self._serving[request.id]
            if not done.done():
                done.set_result(None)

        task.add_done_callback(finished)

    async def _serve_blob(self, request: m.BlobRequest, done: asyncio.Future[None]) -> None:
        # Every failure before the first byte is sent is answered, else the peer waits out its
        # whole timeout; once sending, the peer learns from the frames that stop (or BlobDone).
        try:
            blob, start = await self._open_blob(request)
        except ProtocolError as exc:
            await self._send_quietly(m.Error.of(request.id, exc))
            return
        except asyncio.CancelledError:
            if _cancelling():
                raise  # the peer cancelled, or the session is ending
            # Work this request shared was cancelled under it: the daemon is stopping.
            logger.info("opening blob %d for %s was cancelled", request.id, self.peer_id)
            await self._send_quietly(
                m.Error(id=request.id, code=ErrorCode.SHUTTING_DOWN, reason="cancelled here")
            )
            return
        except Exception as exc:
            logger.error("opening blob %d for %s failed", request.id, self.peer_id, exc_info=exc)
            await self._send_quietly(
                m.Error(id=request.id, code=ErrorCode.INTERNAL, reason="internal error")
            )
            return
        try:
            await self._send_blob(request, blob, start, done)
        except ProtocolError as exc:  # a frame over the peer's message size
            await self._send_quietly(m.Error.of(request.id, exc))
        except TimeoutError:
            logger.info("peer %s did not confirm blob %d", self.peer_id, request.id)
        except TransportError as exc:
            logger.info("serving blob to %s failed: %s", self.peer_id, exc)
            # Frames stopped before the last: tell the peer, or it waits out its whole timeout
            # (sent past flow control: the control channel may be the full one).
            with contextlib.suppress(KVPeerError):
                self._send_control_now(
                    m.Error(id=request.id, code=ErrorCode.TIMEOUT, reason=f"sending stopped: {exc}")
                )
        except Exception:
            logger.exception("serving blob %d to %s failed", request.id, self.peer_id)
            await self._send_quietly(
                m.Error(id=request.id, code=ErrorCode.INTERNAL, reason="internal error")
            )

    async def _open_blob(self, request: m.BlobRequest) -> tuple[bytes, m.BlobStart]:
        """The handler's blob for *request* and the BlobStart announcing it."""
        blob = await self._handler.open_blob(self.peer_id, request.key, request.level)
        if blob is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such chunk")
        if len(blob) > self._config.max_blob_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, "chunk larger than max_blob_bytes")
        start = await _off_loop(
            functools.partial(
                blob_start,
                request.id,
                blob,
                self._config.frame_bytes,
                key=request.key,
                level=request.level,
            ),
            len(blob),
        )
        return blob, start

    async def _send_blob(
        self, request: m.BlobRequest, blob: bytes, start: m.BlobStart, done: asyncio.Future[None]
    ) -> None:
        timeout = self._config.request_timeout_s
        await self._send_control(start)
        channel = self._bulk[self._next_bulk % len(self._bulk)]
        self._next_bulk += 1
        for frame in iter_frames(request.id, blob, self._config.frame_bytes):
            await channel.send(frame, timeout)
        self._sent_whole.add(asyncio.current_task())
        # Delivery is confirmed by the peer (BlobDone), not by our send buffer emptying.
        await aio.wait_for(asyncio.shield(done), timeout)
        self.sent_bytes += len(blob)
        blob_sent = getattr(self._handler, "blob_sent", None)
        if blob_sent is not None:
            blob_sent(self.peer_id, blob)

    # -- liveness and teardown -------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while not self._closed:
            now = time.monotonic()
            if self._liveness.dead(now):
                logger.warning(
                    "peer %s silent for %.1f s: down", self.peer_id, self._config.peer_dead_after_s
                )
                self._spawn(self._end(by_peer=True))
                return
            self._check_reading(now)
            if self._liveness.ping_due(now):
                seq = self._liveness.next_ping(now)
                # Never wait on a full buffer here: a stuck peer must still be declared dead.
                self._send_control_now(m.Ping(seq=seq, sent=now))
            await asyncio.sleep(
                max(0.01, self._liveness.next_deadline(time.monotonic()) - time.monotonic())
            )

    def _check_reading(self, now: float) -> None:
        """A peer whose pings still arrive but which takes nothing we send is down too: its
        pongs, acks and refusals would queue here without end."""
        limit = self._config.request_timeout_s
        for channel in (self._control, *self._bulk):
            if channel.stalled_for(now) > limit:
                self._peer_failed(
                    PeerStoppedReading(
                        f"the send buffer of {channel.channel.label} stayed full for {limit:g} s: "
                        "the peer stopped reading"
                    )
                )
                return

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed") and not self._closed:
            self._spawn(self._end(by_peer=True))

    async def _end_after_bye(self) -> None:
        # Let the ByeAck go out before closing: aiortc's close aborts the association.
        with contextlib.suppress(TimeoutError):
            await aio.wait_for(self._drain_control(), self._config.close_timeout_s)
        await self._end(by_peer=True)

    async def _drain_control(self) -> None:
        channel = self._control.channel
        while channel.readyState == "open" and channel.bufferedAmount > 0:
            event = asyncio.Event()
            channel.bufferedAmountLowThreshold = 0
            channel.once("bufferedamountlow", event.set)
            await event.wait()

    async def _end(self, *, by_peer: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._bye_acked()  # close() waits for no ByeAck once the association is gone
        reason = f"session to {self.peer_id} closed"
        for channel in (self._control, *self._bulk):
            channel.close(reason)
        error = TransportError(reason)
        futures: list[asyncio.Future[Any]] = [
            *self._pending.values(),
            *(f for _, f in self._incoming.values()),
        ]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._on_end(self, by_peer)
        with contextlib.suppress(Exception):
            await aio.wait_for(self._pc.close(), self._config.close_timeout_s)
        # Exceptions nobody waits for would be logged as "never retrieved": mark them seen.
        for future in futures:
            if future.done() and not future.cancelled():
                future.exception()


#: Blobs at least this large are hashed off the event loop: hashlib releases the GIL, so the
#: digest (a fifth of the loop's time at 100 MB/s) runs on another core.
OFF_LOOP_BYTES = 256 * 1024


def _cancelling() -> bool:
    """Whether the running task was asked to stop (a CancelledError may come from elsewhere:
    a future someone else cancelled)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _off_loop(work: Callable[[], _T], size: int) -> _T:
    if size < OFF_LOOP_BYTES:
        return work()
    return await asyncio.to_thread(work)
