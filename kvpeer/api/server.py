"""The daemon's side of the local API: a Unix-socket server in front of an :class:`ApiBackend`.

Owns connections (peer credentials, the tenant namespace of each and who may use it, limits on
in-flight requests), turning frames into messages and errors into error responses, and the shared-memory
segments handed to clients (through :class:`~kvpeer.shm.SegmentRegistry`). What a request
*means* (keys, store, peers) is the backend's job: the daemon implements it.

Nothing a client sends can stop the server: a malformed, oversized or unknown message gets an
error response and the connection keeps being served; a backend failure becomes an error
response for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import grp
import inspect
import itertools
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from kvpeer import aio, shm
from kvpeer.api import messages as m
from kvpeer.api import unix
from kvpeer.config import SPARE_BYTES_DEFAULT
from kvpeer.errors import (
    CodecError,
    ConfigError,
    ErrorCode,
    KVPeerError,
    ProtocolError,
    StoreError,
    TransportError,
)

log = logging.getLogger(__name__)

SERVER_NAME = "kvpeerd"
READ_BYTES = 1 << 16
FRAME_TIMEOUT_S = 30.0  # a frame that started arriving must finish within this, all of it
#: A connection that sends no request this long after connecting is closed: until then it is
#: a file descriptor held for nothing (a flood of them ran the daemon out of descriptors).
FIRST_FRAME_TIMEOUT_S = 10.0
#: Connections served at once, in all and per user: one more is refused with BUSY. An engine
#: uses a few (one per worker process); without a cap, idle connections exhausted the daemon's
#: descriptors and well-behaved engines then timed out.
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_UID = 128
OPERATOR_RESERVE = 8  # connections root and the daemon's user get past max_connections
MAX_REFUSALS_REMEMBERED = 1024  # (uid, namespace) refusals said at WARNING, then DEBUG
# How long a put committed by a client that then left may still take to be stored.
COMMITTED_PUT_FINISH_S = 120.0
SEND_TIMEOUT_S = 30.0  # a client that stops reading its answers is dropped
DEADLINE_BACKSTOP_S = 1.0  # grace past a fetch's deadline before the API layer cuts it
#: After a fetch, the next fetch's segment is reserved once no fetch ran for this long
#: (reserving takes CPU a fetch or its client needs on a small machine), if it is at most
#: ``spare_bytes`` (``api.spare_bytes``: a spare is memory held while idle).
SPARE_IDLE_S = 0.5
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientContext:
    """Who is asking: the namespace from ``hello`` and the kernel's word on the process."""

    namespace: str
    uid: int
    gid: int
    pid: int
    connection_id: int
    client: str = ""


@runtime_checkable
class ApiBackend(Protocol):
    """What the daemon implements for the API layer.

    ``fetch`` restores chunks into ``sink`` (allocate once, then per chunk: ``chunk_view``,
    write, ``await chunk_done``) and returns; the API layer sends the final result. Raising a
    KVPeerError there becomes an error response (or, after some chunks, a shorter result).
    An ``evict(ctx, all=True) -> dict`` method is optional, and so is ``check_put(req)``, which
    raises for a put it would refuse at commit (before the client is given a segment to fill).
    """

    async def put(self, ctx: ClientContext, req: m.PutRequest, kv: PutKV) -> m.PutResult: ...

    async def lookup(self, ctx: ClientContext, req: m.LookupRequest) -> m.LookupResult: ...

    async def fetch(self, ctx: ClientContext, req: m.FetchRequest, sink: FetchSink) -> None: ...

    async def stats(self) -> dict[str, Any]: ...

    async def peers(self) -> list[dict[str, Any]]: ...


class PutKV:
    """A put's K and V as the backend reads them: tokens [start, stop) at a time, copied out of
    the client's segment (never mapped: a client that shrinks it fails its own put, nobody
    gets a SIGBUS). Read only the chunks that are encoded, in an executor."""

    def __init__(self, segment: shm.DaemonSegment, kv_from: int = 0) -> None:
        self._segment = segment
        self.kv_from = kv_from  # the segment's first row is this token's

    def read_blocking(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[layers, kv_heads, stop - start, head_dim]`` K and V of tokens ``[start, stop)``
        (``start`` >= ``kv_from``), contiguous, the daemon's own."""
        if start < self.kv_from:
            raise ProtocolError(ErrorCode.INTERNAL, f"the put's KV starts at token {self.kv_from}, not {start}")
        try:
            return self._segment.read_rows_blocking(start - self.kv_from, stop - self.kv_from)
        except OSError as exc:
            raise ProtocolError(ErrorCode.INTERNAL, f"cannot read the put's segment: {exc}") from None


class _Connection:
    """One client connection: its identity, its writer, its in-flight work."""

    def __init__(self, conn_id: int, writer: asyncio.StreamWriter, uid: int, gid: int, pid: int) -> None:
        self.id = conn_id
        self.writer = writer
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.namespace = "default"
        self.namespace_allowed = True  # api.namespaces lets this uid use self.namespace
        self.client = ""
        self.greeted = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.commits: set[asyncio.Task[None]] = set()  # put commits among the tasks
        self.fetches: dict[int, asyncio.Task[None]] = {}  # request id -> its task, until it answers
        self.cancelled: set[asyncio.Task[None]] = set()  # fetches a client's cancel stopped
        self.pending_puts: dict[str, m.PutRequest] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False

    @property
    def ctx(self) -> ClientContext:
        return ClientContext(
            namespace=self.namespace, uid=self.uid, gid=self.gid, pid=self.pid,
            connection_id=self.id, client=self.client,
        )

    async def send(self, message: m.Message, segment: shm.DaemonSegment | None = None) -> None:
        """Send ``message``; ``segment``: the segment it announces, whose descriptor goes with
        it (NOT_FOUND if the segment was released meanwhile)."""
        data = m.encode(message)
        async with self._send_lock:
            if self.closed:  # checked holding the lock: sends queued behind a failed one end here
                return
            try:
                if segment is None:
                    self.writer.write(data)
                else:
                    await _send_with_descriptor_of(self.writer, data, segment)
                await aio.wait_for(self.writer.drain(), SEND_TIMEOUT_S)
            except TimeoutError:
                self.drop(f"it read none of its answers for {SEND_TIMEOUT_S:.0f} s")
            except (OSError, RuntimeError) as exc:  # ConnectionError and the like
                self.drop(str(exc) or type(exc).__name__)

    def drop(self, why: str) -> None:
        """End the connection now. Not ``writer.close()``: that waits to flush what the client
        does not read, so a client that stopped reading kept its descriptor open (past the
        connection caps, which no longer counted it) for as long as it kept the socket."""
        if self.closed:
            return
        log.info("api: client %d unreachable (%s); dropping it", self.id, why)
        self.closed = True
        self.writer.transport.abort()


async def _send_with_descriptor_of(writer: asyncio.StreamWriter, data: bytes, segment: shm.DaemonSegment) -> None:
    try:
        fd = segment.duplicate_descriptor()
    except OSError as exc:  # the daemon is out of descriptors: this request fails, not the client
        raise ProtocolError(ErrorCode.BUSY, f"cannot hand over the segment now: {exc}") from None
    try:
        await unix.send_with_descriptor(writer, data, fd, timeout_s=SEND_TIMEOUT_S)
    finally:
        os.close(fd)


class FetchSink:
    """Where one fetch lands: a shared-memory segment, and progress events to the client.

    Created by the API layer for one fetch request; the backend calls :meth:`allocate` once
    (with the most tokens it may restore), then for each chunk fills :meth:`chunk_view` and
    awaits :meth:`chunk_done`.

    The views are the daemon's own memory, not the segment: the client may shrink the segment
    at any time, and a decoder writing through a mapping would then die of SIGBUS.
    chunk_decoded_blocking (the decoding thread, right after the decode) copies the chunk into
    the segment with pwrite (an error for this fetch if it shrank), and its buffer serves the
    next chunk; chunk_done marks it in the header and tells the client.
    """

    def __init__(self, server: ApiServer, conn: _Connection, request: m.FetchRequest) -> None:
        self._server = server
        self._conn = conn
        self.request = request
        self.segment: shm.DaemonSegment | None = None
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # chunk -> its buffers
        self._spare_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.failed: ProtocolError | None = None  # the segment broke: the fetch fails with this
        self._announce: asyncio.Task[None] | None = None
        self._levels: dict[int, str] = {}
        self._allocating = False
        self.closed = False  # set when the fetch is over: late chunk_done calls are ignored
        # The segment's chunk 0 is this chunk of the prompt (the one holding the request's
        # kv_from, or a split fetch's later one): the backend numbers chunks from the segment's
        # start, the client from the prompt's.
        self.first_chunk = 0
        self.head_chunks = 0  # a split fetch: chunks after kv_from's the client prefills itself

    async def allocate(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        dtype: str | torch.dtype,
        chunk_tokens: int,
    ) -> None:
        if self.segment is not None or self._allocating:
            raise ProtocolError(ErrorCode.INTERNAL, "fetch sink allocated twice")
        if -(-tokens // chunk_tokens) > m.MAX_CHUNKS:  # its progress and result could not be sent
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"{tokens} tokens are more than the {m.MAX_CHUNKS} chunks of {chunk_tokens} tokens "
                "a fetch may restore: raise codec.chunk_tokens, or fetch a shorter prefix",
            )
        fp = self.request.fingerprint
        if (layers, kv_heads, head_dim) != (fp.layers, fp.kv_heads, fp.head_dim):
            raise ProtocolError(ErrorCode.INTERNAL, "fetch sink shape differs from the fingerprint")
        name = dtype if isinstance(dtype, str) else shm.dtype_name(dtype)
        layout = shm.SegmentLayout(
            dtype=name, layers=layers, kv_heads=kv_heads, tokens=tokens, head_dim=head_dim,
            chunk_tokens=chunk_tokens,
        )
        self._allocating = True
        self.first_chunk = self.request.kv_from // chunk_tokens + self.head_chunks
        self.segment = await self._server._create_segment_off_loop(layout, self._conn, leased=False)
        # Announce the segment now, not with the first chunk: the client maps (and faults in)
        # the pages while chunks are still being decoded, off the critical path.
        started = m.FetchStarted(
            id=self.request.id, segment=self.segment.name, size=layout.size,
            # Only for a client that asked for a split (one from before the field refuses it;
            # without a split the start is kv_from's chunk, which the client knows).
            first_token=self.first_chunk * chunk_tokens if self.request.split else 0,
        )
        self._announce = asyncio.get_running_loop().create_task(
            self._conn.send(started, self.segment),
            name="kvpeer-api-fetch-started",
        )
        self._announce.add_done_callback(aio.ignore_outcome)  # flush() raises it, if anyone waits

    def leave_head(self, chunks: int) -> None:
        """A split fetch: the client prefills the first ``chunks`` chunks (after kv_from's)
        itself; the segment starts after them. Only before :meth:`allocate`."""
        if not self.request.split or self.segment is not None or self._allocating or chunks < 0:
            raise ProtocolError(ErrorCode.INTERNAL, "a split fetch's head set out of turn")
        self.head_chunks = chunks

    async def flush(self) -> None:
        """Wait until the segment announcement is sent (progress must come after it)."""
        if self._announce is not None:
            await self._announce

    def cancel(self) -> None:
        self.closed = True
        if self._announce is not None:
            self._announce.cancel()

    def _need_segment(self) -> shm.DaemonSegment:
        if self.failed is not None:
            raise self.failed
        if self.segment is None:
            raise ProtocolError(ErrorCode.INTERNAL, "fetch sink used before allocate()")
        if self.segment.closed:
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                "the fetch's segment was released (by its client or a disconnect) before the fetch ended",
            )
        return self.segment

    def chunk_view(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[layers, kv_heads, chunk_tokens, head_dim]`` to write chunk ``index`` into
        (a buffer of the daemon's: see the class docstring)."""
        segment = self._need_segment()
        start, stop = segment.chunk_span(index)
        if index not in self._staged:
            self._staged[index] = self._spare_buffers.pop() if self._spare_buffers else _chunk_buffers(segment.layout)
        k, v = self._staged[index]
        return k[:, :, : stop - start, :], v[:, :, : stop - start, :]

    @property
    def matched_tokens(self) -> int:
        """Tokens of the contiguous run of restored chunks from the segment's start."""
        if self.segment is None:
            return 0
        count = 0
        while count in self._levels:
            count += 1
        return min(count * self.segment.layout.chunk_tokens, self.segment.layout.tokens)

    def chunk_decoded_blocking(self, index: int) -> None:
        """Chunk ``index``'s views are filled (called in the decoding thread, right after the
        decode): copy it into the client's segment now, so a chunk decoded ahead of an earlier
        one does not wait in daemon memory, and the hand-off after the last decode is short."""
        staged = self._staged.pop(index, None)
        if staged is None:
            raise ProtocolError(ErrorCode.INTERNAL, f"chunk {index} decoded but never viewed")
        self._write(self._need_segment(), index, staged)
        self._spare_buffers.append(staged)

    def _write(
        self, segment: shm.DaemonSegment, index: int, staged: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        try:
            segment.write_chunk_blocking(index, *staged)
        except ProtocolError as exc:
            self.failed = exc
            raise
        except OSError as exc:  # /dev/shm full, or the like: this fetch fails, not the daemon
            self.failed = ProtocolError(ErrorCode.INTERNAL, f"cannot write the fetch's segment: {exc}")
            raise self.failed from None

    async def chunk_done(self, index: int, level: str) -> None:
        """Chunk ``index`` is fully written at ``level``: tell the client it may use it."""
        if self.closed:
            return
        segment = self._need_segment()
        staged = self._staged.pop(index, None)
        if staged is not None:  # a caller that filled the views without chunk_decoded_blocking
            await aio.in_thread_once_started(None, self._write, segment, index, staged)
            self._spare_buffers.append(staged)
        segment.set_level(index, level)
        self._levels[index] = level
        segment.set_matched_tokens(self.matched_tokens)
        await self.flush()
        await self._conn.send(
            m.FetchProgress(id=self.request.id, index=self.first_chunk + index, level=level)
        )

    def result(self) -> m.FetchResult:
        self.closed = True
        matched = self.matched_tokens
        if self.segment is None or matched == 0:
            return m.FetchResult(id=self.request.id, chunk_tokens=self._chunk_tokens())
        chunk_tokens = self.segment.layout.chunk_tokens
        first_token = self.first_chunk * chunk_tokens
        return m.FetchResult(
            id=self.request.id,
            segment=self.segment.name,
            matched_tokens=first_token + matched,
            chunk_tokens=chunk_tokens,
            levels=[self._levels[i] for i in range(matched // chunk_tokens)],
            recompute_from=first_token + matched,
            first_token=first_token,
        )

    def _chunk_tokens(self) -> int:
        return self.segment.layout.chunk_tokens if self.segment is not None else 1


def _chunk_buffers(layout: shm.SegmentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (layout.layers, layout.kv_heads, layout.chunk_tokens, layout.head_dim)
    dtype = shm.DTYPES[layout.dtype]
    return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)


def _discard(segment: shm.DaemonSegment) -> None:
    segment.unlink()
    segment.close()


def _discard_made_segment(job: asyncio.Future[shm.DaemonSegment]) -> None:
    if not job.cancelled() and job.exception() is None:
        _discard(job.result())


#: Requests answered on the read loop, in order and outside max_inflight: a hello sets the
#: namespace for what follows; a release and a cancel free memory and slots, so a connection
#: whose slots are all taken (by fetches waiting on peers) must still get them done, not BUSY.
#: They are quick and the loop awaits each answer, so a client cannot pile them up.
_INLINE_REQUESTS = (m.Hello, m.Release, m.Cancel)


def _cancelled_fetch_answer(fetch_id: int) -> m.ErrorResponse:
    """The final answer of a fetch its client cancelled: the client dropped the fetch, and this
    only tells it that no more will come. (ErrorCode has no CANCELLED; TIMEOUT is the nearest:
    the client stopped waiting.)"""
    return m.ErrorResponse(id=fetch_id, code=int(ErrorCode.TIMEOUT), reason="cancelled by the client")


def _error_code(exc: BaseException) -> ErrorCode:
    if isinstance(exc, ProtocolError):
        return exc.code
    if isinstance(exc, TransportError | TimeoutError):
        return ErrorCode.TIMEOUT
    if isinstance(exc, CodecError):
        return ErrorCode.INTEGRITY
    if isinstance(exc, StoreError):
        return ErrorCode.INTERNAL
    return ErrorCode.INTERNAL


class ApiServer:
    """Unix-socket server of the local API.

    ``mode``/``group``: permissions of the socket file (who may connect at all);
    ``allowed_uids``: if non-empty, only these users (and our own) are served;
    ``namespaces``: ``api.namespaces``, who may use which namespace (None or empty: anyone any);
    ``lease_s``: how long a client may hold a segment without releasing it;
    ``spare_bytes``: the largest segment reserved ahead for the next fetch while idle (0: none);
    ``max_connections``/``max_connections_per_uid``: connections served at once, in all and per
    user (one more gets BUSY and is closed).
    """

    def __init__(
        self,
        socket_path: str | Path,
        backend: ApiBackend,
        *,
        mode: int = 0o660,
        group: str | int | None = None,
        allowed_uids: list[int] | tuple[int, ...] | frozenset[int] | None = None,
        namespaces: NamespaceTable | None = None,
        lease_s: float = 600.0,
        max_inflight: int = 16,
        max_shm_bytes_per_uid: int = 64 << 30,
        spare_bytes: int = SPARE_BYTES_DEFAULT,
        shm_dir: Path = shm.SHM_DIR,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.backend = backend
        self.mode = mode
        self.group = group
        # None or empty: the socket file's mode and group alone decide who may connect.
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids else None
        self.namespaces = namespaces
        self._namespace_policy: NamespacePolicy | None = None
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.max_connections_per_uid = max_connections_per_uid
        # root and the daemon's own user: see _over_capacity (cap tests, run as root, clear it)
        self.operator_uids = frozenset({0, os.geteuid()})
        self._refusing = False  # connections are being refused: warned once until one is served
        self.spare_bytes = spare_bytes
        self.registry = shm.SegmentRegistry(
            directory=shm_dir, lease_s=lease_s, max_bytes_per_owner=max_shm_bytes_per_uid
        )
        self._gid: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False  # close() has cancelled the handlers (each then ends quietly)
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None
        self._segments_changed = asyncio.Event()
        self._fetching = 0
        self._last_fetch = 0.0  # when the last fetch ended (monotonic)
        self._spare_task: asyncio.Task[None] | None = None
        self._namespace_refusals_said: set[tuple[int, str]] = set()
        self.counters = {
            "connections": 0, "requests": 0, "errors": 0, "segments": 0, "connections_refused": 0,
            "fetches_cancelled": 0,
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._gid = resolve_group(self.group)
        self._namespace_policy = resolve_namespaces(self.namespaces)
        if self._namespace_policy is None:
            log.info("api: namespaces are cooperative (api.namespaces is not set)")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        await _remove_stale_socket(self.socket_path)
        self.registry.sweep_stale()
        # asyncio's default backlog (100) refused a burst of engine workers connecting at once
        # (EAGAIN on their side); the kernel caps this at net.core.somaxconn.
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.socket_path), backlog=socket.SOMAXCONN
        )
        st = os.stat(self.socket_path)
        self._bound = (st.st_dev, st.st_ino)
        os.chmod(self.socket_path, self.mode)
        if self._gid is not None:
            os.chown(self.socket_path, -1, self._gid)
        self._reaper = asyncio.create_task(self._reap_leases(), name="kvpeer-api-leases")
        log.info("api: listening on %s (mode %o)", self.socket_path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._spare_task is not None:
            self._spare_task.cancel()
            with contextlib.suppress(BaseException):
                await self._spare_task
        self._closing = True
        stopping = m.encode(m.ErrorResponse(code=ErrorCode.SHUTTING_DOWN, reason="the daemon is stopping"))
        for conn in list(self._connections.values()):
            closing = conn.closed or conn.writer.transport.is_closing()  # a reset client's
            if not closing and not conn._send_lock.locked():  # never inside another frame
                # Tied to no request: every waiting call hears it, and a client can tell a
                # stop from a dropped connection (both were a bare close).
                with contextlib.suppress(OSError, RuntimeError):  # uvloop: a handle gone
                    conn.writer.write(stopping)
            conn.closed = True
            conn.writer.close()  # answers written already still go out
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        try:
            if handlers:
                await asyncio.wait(handlers, timeout=10.0)
        finally:  # also when the caller's stop budget cuts the wait: no segment outlives us
            self.registry.close()
            self._unlink_own_socket()
            self._server = None
        log.info("api: closed")

    def _unlink_own_socket(self) -> None:
        """Unlink the socket file if it is still the one this server bound: a daemon started
        meanwhile (after taking ours for stale) may have put its own at the same path."""
        if self._bound is None:
            return
        bound, self._bound = self._bound, None
        try:
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == bound:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ segments
    def _adopt(self, segment: shm.DaemonSegment, conn: _Connection, *, leased: bool) -> shm.DaemonSegment:
        self.registry.adopt(segment, owner=conn.id, now=time.monotonic() if leased else None)
        self.counters["segments"] += 1
        self._segments_changed.set()
        return segment

    async def _create_segment_off_loop(
        self, layout: shm.SegmentLayout, conn: _Connection, *, leased: bool
    ) -> shm.DaemonSegment:
        """A segment for ``conn``, its pages reserved in a thread: tens of ms per GiB, which
        the event loop spends receiving meanwhile. ``leased``: its lease starts now (else at
        :meth:`SegmentRegistry.lease`)."""
        self.registry.admit(layout, conn.id)
        try:
            job = asyncio.get_running_loop().run_in_executor(None, self.registry.make, layout)
            try:
                segment = await asyncio.shield(job)
            except asyncio.CancelledError:
                # The thread goes on making it: unlink it once it exists, or it outlives the fetch.
                job.add_done_callback(_discard_made_segment)
                raise
            if conn.closed:  # its segments were released while this one was being made
                _discard(segment)
                raise ProtocolError(ErrorCode.INTERNAL, "client gone")
        except BaseException:
            self.registry.withdraw(layout, conn.id)
            raise
        return self._adopt(segment, conn, leased=leased)

    def _want_spare(self, size: int) -> None:
        """Have a segment of ``size`` bytes reserved for the next fetch, once idle."""
        if size > self.spare_bytes:  # the fetch makes its own (spare_bytes = 0: never reserve)
            return
        if self._spare_task is None or self._spare_task.done():
            self._spare_task = asyncio.get_running_loop().create_task(
                self._reserve_spare_when_idle(size), name="kvpeer-api-spare"
            )

    async def _reserve_spare_when_idle(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            quiet_for = time.monotonic() - self._last_fetch
            if self._fetching == 0 and quiet_for >= SPARE_IDLE_S:
                break
            await asyncio.sleep(SPARE_IDLE_S - quiet_for if self._fetching == 0 else SPARE_IDLE_S)
        try:
            await loop.run_in_executor(
                None, functools.partial(self.registry.reserve_spare, size, max_bytes=self.spare_bytes)
            )
        except OSError as exc:  # /dev/shm full: fetches make their own segment, as before
            log.info("api: could not reserve a spare segment of %d bytes: %s", size, exc)

    async def _reap_leases(self) -> None:
        while True:
            nearest = self.registry.next_expiry()
            timeout = None if nearest is None else max(0.0, nearest - time.monotonic())
            self._segments_changed.clear()
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._segments_changed.wait(), timeout)
            for name in self.registry.expire(time.monotonic()):
                for conn in self._connections.values():  # a put never committed: forget it
                    conn.pending_puts.pop(name, None)

    # ------------------------------------------------------------------ connections
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn_id = next(self._ids)
        pid, uid, gid = _peer_credentials(writer)
        conn = _Connection(conn_id, writer, uid, gid, pid)
        self._connections[conn_id] = conn
        self.registry.set_account(conn_id, ("uid", uid))  # a user's connections share one cap
        self.counters["connections"] += 1
        log.debug("api: client %d connected: pid=%d uid=%d gid=%d", conn_id, pid, uid, gid)
        try:
            if not self._allowed(uid):
                log.warning("api: client %d (uid %d) not allowed; closing", conn_id, uid)
                await conn.send(m.ErrorResponse(code=ErrorCode.FORBIDDEN, reason="uid not allowed"))
                return
            refusal = self._over_capacity(conn)
            if refusal:
                await conn.send(m.ErrorResponse(code=ErrorCode.BUSY, reason=refusal))
                return
            conn.namespace_allowed = self._may_use(conn, conn.namespace)
            await self._read_loop(reader, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            if not self._closing or task is None:
                raise
            # close() cancelled us and waits for us: end normally, or asyncio's stream callback
            # (Python 3.11/3.12) logs the cancel at ERROR with a traceback on every stop.
            task.uncancel()
        finally:
            # A committed put is the client's KV handed over: it is stored though the client
            # left (a script that exits once it committed); anything else it asked is dropped.
            finishing = set() if self._closing else conn.commits & conn.tasks
            for pending in conn.tasks - finishing:
                pending.cancel()
            cancelled: asyncio.CancelledError | None = None  # raised again after the clean-up
            if conn.tasks:
                try:
                    if finishing:
                        await asyncio.wait(finishing, timeout=COMMITTED_PUT_FINISH_S)
                    for pending in conn.tasks:  # past that, or the daemon stopping: cut
                        pending.cancel()
                    if conn.tasks:  # done ones left it (asyncio.wait refuses an empty set)
                        await asyncio.wait(list(conn.tasks), timeout=10.0)
                except asyncio.CancelledError as exc:
                    for pending in conn.tasks:
                        pending.cancel()
                    if not self._closing or task is None:
                        cancelled = exc
                    else:
                        task.uncancel()  # close() cancelled us here: clean up and end, as above
            self._forget(conn, writer, task)
            if cancelled is not None:
                raise cancelled

    def _forget(
        self, conn: _Connection, writer: asyncio.StreamWriter, task: asyncio.Task[Any] | None
    ) -> None:
        """The end of a connection: its segments released, its writer closed, its slot free."""
        conn_id = conn.id
        released = self.registry.release_owner(conn_id)
        conn.closed = True
        writer.close()  # flushes a last answer (a refusal, an error) ...
        if writer.transport.get_write_buffer_size():  # ... which an unread client never takes
            asyncio.get_running_loop().call_later(SEND_TIMEOUT_S, writer.transport.abort)
        self._connections.pop(conn_id, None)
        if task is not None:
            self._handlers.discard(task)
        # Routine for a script's short connection; a client gone with segments held is news.
        log.log(
            logging.INFO if released else logging.DEBUG,
            "api: client %d gone; %d segments released", conn_id, released,
        )

    def _over_capacity(self, conn: _Connection) -> str:
        """Why ``conn`` (already counted) may not be served now; "" if it may."""
        same_user = sum(1 for c in self._connections.values() if c.uid == conn.uid)
        # The operator (root) and the daemon's own user have no per-user cap and a few slots
        # past the total, so tenants at their caps cannot lock out `kvpeer status`.
        operator = conn.uid in self.operator_uids
        limit = self.max_connections + (OPERATOR_RESERVE if operator else 0)
        if len(self._connections) > limit:
            refusal = f"the daemon serves {self.max_connections} connections at most: try again later"
        elif same_user > self.max_connections_per_uid and not operator:
            refusal = (
                f"uid {conn.uid} holds {self.max_connections_per_uid} connections, the most one "
                "user may: close some (a leaked client?)"
            )
        else:
            self._refusing = False
            return ""
        self.counters["connections_refused"] += 1
        # A flood would log a line per connection: once, then at DEBUG until one is served.
        log.log(logging.DEBUG if self._refusing else logging.WARNING,
                "api: client %d (uid %d pid %d) refused: %s", conn.id, conn.uid, conn.pid, refusal)
        self._refusing = True
        return refusal

    def _allowed(self, uid: int) -> bool:
        if self.allowed_uids is None:
            return True
        return uid in self.allowed_uids or uid == os.geteuid()

    def _may_use(self, conn: _Connection, namespace: str) -> bool:
        policy = self._namespace_policy
        return policy is None or policy.allows(namespace, conn.uid, conn.gid)

    def _check_admin(self, conn: _Connection) -> None:
        """Evicting drops every tenant's chunks: with api.namespaces set, only root and the
        daemon's own user may (without it, namespaces are cooperative and so is this)."""
        if self._namespace_policy is not None and conn.uid not in (0, os.geteuid()):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"evict drops every namespace's chunks: only root or the daemon's user may, not "
                f"uid {conn.uid} (api.namespaces is set)",
            )

    @staticmethod
    def _check_namespace(conn: _Connection) -> None:
        if not conn.namespace_allowed:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"namespace {conn.namespace!r} is not allowed for uid {conn.uid} (api.namespaces); "
                "say hello with a namespace that is",
            )

    async def _read_loop(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        decoder = m.FrameDecoder()
        loop = asyncio.get_running_loop()
        # Deadlines bound whole frames, not single reads: a client trickling a byte at a time
        # would otherwise hold a frame buffer (up to 16 MiB) for ever.
        deadline: float | None = loop.time() + FIRST_FRAME_TIMEOUT_S
        first = True
        while not conn.closed:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(READ_BYTES)
            except TimeoutError:
                reason = "no request in time after connecting" if first else "frame not finished in time"
                await conn.send(m.ErrorResponse(code=ErrorCode.TIMEOUT, reason=reason))
                return
            if not data:
                return
            decoder.feed(data)
            framed = False
            for frame in decoder.frames():
                framed, first = True, False
                await self._on_frame(conn, frame)
            if not decoder.pending:
                deadline = None
            elif framed or deadline is None:  # the frame now pending began with this read
                deadline = loop.time() + FRAME_TIMEOUT_S

    async def _on_frame(self, conn: _Connection, frame: bytes | ProtocolError) -> None:
        self.counters["requests"] += 1
        if isinstance(frame, ProtocolError):
            await self._send_error(conn, 0, frame)
            return
        try:
            message = m.decode_body(frame)
            if message.TYPE not in m.REQUEST_TYPES:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{message.TYPE} is not a request")
            inline = isinstance(message, _INLINE_REQUESTS)
            if not inline and len(conn.tasks) >= self.max_inflight:
                raise ProtocolError(ErrorCode.BUSY, f"more than {self.max_inflight} requests in flight")
            if isinstance(message, m.FetchRequest) and message.id in conn.fetches:
                # A cancel names a fetch by its id: two would make it ambiguous, and the client
                # got an error and a result under the one id.
                raise ProtocolError(ErrorCode.INVALID, f"a fetch with id {message.id} is in flight")
        except ProtocolError as exc:
            await self._send_error(conn, m.request_id_of(frame), exc)
            return
        if inline:
            await self._handle(conn, message)
            return
        task = asyncio.create_task(self._handle(conn, message), name=f"kvpeer-api-{message.TYPE}")
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)
        if isinstance(message, m.PutCommit):
            conn.commits.add(task)
            task.add_done_callback(conn.commits.discard)
        if isinstance(message, m.FetchRequest):
            conn.fetches[message.id] = task

    async def _send_error(self, conn: _Connection, request_id: int, exc: BaseException) -> None:
        self.counters["errors"] += 1
        code = _error_code(exc)
        reason = exc.reason if isinstance(exc, ProtocolError) else str(exc) or type(exc).__name__
        # Per request, so DEBUG (counters["errors"] counts them): a client retrying a refused
        # request in a loop would flood the journal at INFO. Bugs are logged where they happen.
        log.debug("api: client %d request %d failed: %s %s", conn.id, request_id, code.name, reason)
        await conn.send(m.ErrorResponse(id=request_id, code=int(code), reason=reason))

    async def _handle(self, conn: _Connection, message: m.Message) -> None:
        try:
            try:
                reply = await self._dispatch(conn, message)
            except asyncio.CancelledError:
                if not self._cancelled_by_client(conn):
                    raise
                reply = _cancelled_fetch_answer(message.id)
            finally:
                # Answering now: a cancel arriving meanwhile finds nothing to stop (cancelling
                # the send would leave a second, contradicting answer to follow it).
                current = asyncio.current_task()
                if current is not None:
                    if conn.fetches.get(message.id) is current:
                        del conn.fetches[message.id]
                    conn.cancelled.discard(current)
            if reply is not None:
                await conn.send(reply)
        except asyncio.CancelledError:
            raise
        except KVPeerError as exc:
            await self._send_error(conn, message.id, exc)
        except Exception as exc:  # a backend bug must not take the server down
            log.exception("api: %s request failed", message.TYPE)
            await self._send_error(conn, message.id, exc)

    @staticmethod
    def _cancelled_by_client(conn: _Connection) -> bool:
        """Whether the cancel the current task got is a client's cancel request alone (one of
        the connection closing, too, is not: then the task ends)."""
        task = asyncio.current_task()
        if task is None or task not in conn.cancelled:
            return False
        conn.cancelled.discard(task)
        return task.uncancel() == 0

    async def _cancel_fetch(self, conn: _Connection, fetch_id: int) -> None:
        task = conn.fetches.pop(fetch_id, None)
        if task is None or task.done():
            return  # over (its answer went or is going out) or never was: nothing to stop
        self.counters["fetches_cancelled"] += 1
        coro = task.get_coro()
        if inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            # It never ran (the cancel came in the same read): it sent and holds nothing, and
            # as it never enters its body, it cannot answer for itself.
            task.cancel()
            await conn.send(_cancelled_fetch_answer(fetch_id))
            return
        # It answers for itself once its cleanup (segment dropped, announcement cancelled) is
        # done: nothing of it can come after that answer.
        conn.cancelled.add(task)
        task.cancel()

    async def _dispatch(self, conn: _Connection, message: m.Message) -> m.Message | None:
        ctx = conn.ctx
        rid = message.id
        if isinstance(message, m.Hello):
            if conn.greeted:
                raise ProtocolError(ErrorCode.INVALID, "hello was already sent on this connection")
            if not self._may_use(conn, message.namespace):
                # The namespace salts the chunk keys: a user let into another tenant's could
                # read its prefixes and put KV that its engines would then take (poisoning).
                # Once per user and namespace (a client retrying in a loop logged a line each).
                said = (conn.uid, message.namespace) in self._namespace_refusals_said
                if not said and len(self._namespace_refusals_said) < MAX_REFUSALS_REMEMBERED:
                    self._namespace_refusals_said.add((conn.uid, message.namespace))
                log.log(
                    logging.DEBUG if said else logging.WARNING,
                    "api: client %d (uid %d gid %d) refused namespace %r (api.namespaces)",
                    conn.id, conn.uid, conn.gid, message.namespace,
                )  # fmt: skip
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"namespace {message.namespace!r} is not allowed for uid {conn.uid} (api.namespaces)",
                )
            conn.greeted = True
            conn.namespace = message.namespace
            conn.namespace_allowed = True
            conn.client = message.client
            log.debug("api: client %d is %r in namespace %r", conn.id, message.client, message.namespace)
            return m.HelloOk(id=rid, server=SERVER_NAME, namespace=message.namespace)
        if isinstance(message, m.PutRequest | m.PutCommit | m.LookupRequest | m.FetchRequest):
            self._check_namespace(conn)
        if isinstance(message, m.PutRequest):
            await self._begin_put(conn, message)  # answers itself: its descriptor goes along
            return None
        if isinstance(message, m.PutCommit):
            return await self._commit_put(conn, message)
        if isinstance(message, m.LookupRequest):
            result = await self.backend.lookup(ctx, message)
            return dataclasses.replace(result, id=rid)
        if isinstance(message, m.FetchRequest):
            return await self._fetch(conn, message)
        if isinstance(message, m.Release):
            conn.pending_puts.pop(message.segment, None)
            self.registry.release(message.segment, conn.id)
            return m.Released(id=rid)
        if isinstance(message, m.Cancel):
            await self._cancel_fetch(conn, message.fetch)
            return m.Cancelled(id=rid)
        if isinstance(message, m.StatsRequest):
            stats = dict(await self.backend.stats())
            stats["api"] = self.stats()
            return m.StatsResult(id=rid, stats=stats)
        if isinstance(message, m.PeersRequest):
            return m.PeersResult(id=rid, peers=list(await self.backend.peers()))
        if isinstance(message, m.EvictRequest):
            self._check_admin(conn)
            evict = getattr(self.backend, "evict", None)
            if evict is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "this daemon does not support evict")
            return m.EvictResult(id=rid, result=dict(await evict(ctx, all=message.all)))
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{message.TYPE} is not a request")

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "connected": len(self._connections),
            "live_segments": len(self.registry),
            # Pages reserved for the next fetch's segment (api.spare_bytes at most), in /dev/shm.
            "spare_segment_bytes": self.registry.spare_bytes,
        }

    # ------------------------------------------------------------------ put
    async def _begin_put(self, conn: _Connection, req: m.PutRequest) -> None:
        fp = req.fingerprint
        if req.dtype != fp.dtype:
            # Fetches hand KV back in the model's dtype: float32 values past float16's range
            # came back as inf, past the codec's refusal of non-finite KV.
            raise ProtocolError(
                ErrorCode.INVALID, f"the KV is {req.dtype} and the model's is {fp.dtype}: "
                f"put it as {fp.dtype}",
            )
        check = getattr(self.backend, "check_put", None)
        if check is not None:  # what the backend would refuse at commit, before a segment is made
            check(req)
        tokens = req.kv_tokens
        layout = shm.SegmentLayout(
            dtype=req.dtype, layers=fp.layers, kv_heads=fp.kv_heads, tokens=tokens,
            head_dim=fp.head_dim, chunk_tokens=tokens,
        )
        segment = await self._create_segment_off_loop(layout, conn, leased=True)  # the client's now
        conn.pending_puts[segment.name] = req
        try:
            await conn.send(m.SegmentReady(id=req.id, segment=segment.name, size=layout.size), segment)
        except BaseException:
            conn.pending_puts.pop(segment.name, None)
            with contextlib.suppress(ProtocolError):
                self.registry.release(segment.name, conn.id)
            raise

    async def _commit_put(self, conn: _Connection, commit: m.PutCommit) -> m.PutResult:
        req = conn.pending_puts.pop(commit.segment, None)
        if req is None:
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"no put is waiting for this segment (a put's segment is held for api.lease_s, "
                f"{self.registry.lease_s:.0f} s, then released: commit within it)",
            )
        # Read a chunk at a time while it is encoded: no lease may end under that.
        segment = self.registry.hold(commit.segment, conn.id)
        try:
            result = await self.backend.put(conn.ctx, req, PutKV(segment, req.kv_from))
        finally:
            with contextlib.suppress(ProtocolError):
                self.registry.release(commit.segment, conn.id)
        return dataclasses.replace(result, id=commit.id)

    # ------------------------------------------------------------------ fetch
    async def _fetch(self, conn: _Connection, req: m.FetchRequest) -> m.FetchResult:
        self._fetching += 1
        try:
            return await self._fetch_into_sink(conn, req)
        finally:
            self._fetching -= 1
            self._last_fetch = time.monotonic()

    async def _fetch_into_sink(self, conn: _Connection, req: m.FetchRequest) -> m.FetchResult:
        sink = FetchSink(self, conn, req)
        # The backend honors deadline_s itself (it stops cleanly, with no decode still writing
        # into the segment); this cut is only a backstop for one that does not.
        backstop = None if req.deadline_s is None else req.deadline_s + DEADLINE_BACKSTOP_S
        try:
            async with asyncio.timeout(backstop):
                await self.backend.fetch(conn.ctx, req, sink)
        except TimeoutError:
            log.debug("api: fetch %d hit its %.3fs deadline after %d tokens",
                     req.id, req.deadline_s or 0.0, sink.matched_tokens)
        except KVPeerError as exc:
            if sink.matched_tokens == 0 and sink.failed is None:
                self._drop_sink(conn, sink)
                raise
            if sink.failed is None:
                # The daemon counts it (outcome "error") and the fetcher said why, once per peer.
                log.debug("api: fetch %d stopped after %d tokens: %s", req.id, sink.matched_tokens, exc)
        except BaseException:
            self._drop_sink(conn, sink)
            raise
        if sink.failed is not None:  # the segment itself broke: nothing in it can be trusted
            self._drop_sink(conn, sink)
            raise sink.failed
        try:
            await sink.flush()
            result = sink.result()
            if not result.segment:
                self._drop_sink(conn, sink)
            else:  # handed over now: the lease counts from here, not from the allocation
                self.registry.lease(result.segment, conn.id, time.monotonic())
                self._segments_changed.set()
        except BaseException:  # unleased, the segment would stay until the client disconnects
            self._drop_sink(conn, sink)
            raise
        if sink.segment is not None:
            self._want_spare(sink.segment.layout.size)
        return result

    def _drop_sink(self, conn: _Connection, sink: FetchSink) -> None:
        sink.cancel()
        if sink.segment is not None:
            with contextlib.suppress(ProtocolError):
                self.registry.release(sink.segment.name, conn.id)


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
    except (OSError, AttributeError):
        return -1, -1, -1
    return int(pid), int(uid), int(gid)


def resolve_group(group: str | int | None) -> int | None:
    """The gid of ``api.socket_group`` (a name or a gid; None or "" for none); ConfigError if
    no such group (kvpeerd --check-config asks this too)."""
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"api.socket_group: no group named {group!r}") from None


#: ``api.namespaces``: namespace -> members, as a mapping or as the config's sorted pairs.
NamespaceTable = Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]]


@dataclass(frozen=True, slots=True)
class _Members:
    uids: frozenset[int]
    gids: frozenset[int]
    anyone: bool


class NamespacePolicy:
    """Who may use which namespace, names resolved to ids (:func:`resolve_namespaces`): a
    namespace not listed is refused to everyone but the daemon's own user."""

    def __init__(self, members: Mapping[str, _Members]) -> None:
        self._members = dict(members)

    def allows(self, namespace: str, uid: int, gid: int) -> bool:
        """Whether a client of ``uid``/``gid`` (SO_PEERCRED) may use ``namespace``."""
        if uid == os.geteuid():
            return True
        members = self._members.get(namespace)
        return members is not None and (members.anyone or uid in members.uids or gid in members.gids)


def resolve_namespaces(table: NamespaceTable | None) -> NamespacePolicy | None:
    """``api.namespaces`` with its user and group names resolved to ids, at start (a lookup may
    go to NSS); None when it is not set: namespaces are cooperative. ConfigError naming the
    entry for an unknown user or group (kvpeerd --check-config asks this too)."""
    entries = dict(table.items() if isinstance(table, Mapping) else table or ())
    if not entries:
        return None
    return NamespacePolicy({
        namespace: _resolve_members(f"api.namespaces.{namespace}", members)
        for namespace, members in entries.items()
    })  # fmt: skip


def _resolve_members(key: str, members: Sequence[str]) -> _Members:
    uids: set[int] = set()
    gids: set[int] = set()
    anyone = False
    for member in members:
        if member == "*":
            anyone = True
        elif member.startswith("@"):
            name = member[1:]
            try:
                group = grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
            except KeyError:
                if not name.isdigit():
                    raise ConfigError(f"{key}: no group named {name!r}") from None
                gids.add(int(name))  # a gid without a name: its primary members still match
                continue
            gids.add(group.gr_gid)
            for user in group.gr_mem:  # supplementary members: SO_PEERCRED gives only the gid
                with contextlib.suppress(KeyError):
                    uids.add(pwd.getpwnam(user).pw_uid)
        elif member.isdigit():
            uids.add(int(member))  # a uid, as in api.allowed_uids
        else:
            try:
                uids.add(pwd.getpwnam(member).pw_uid)
            except KeyError:
                raise ConfigError(f"{key}: no user named {member!r}") from None
    return _Members(uids=frozenset(uids), gids=frozenset(gids), anyone=anyone)


async def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file left by a dead daemon; refuse to steal a live daemon's socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"api.socket_path: {path} exists and is not a socket")
    try:
        _, writer = await aio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except OSError as exc:  # TimeoutError included
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            # EACCES: a socket of another user's daemon, maybe live; a timeout or EAGAIN: a
            # daemon too busy to accept. Only a refused connect says nobody listens.
            reason = exc.strerror or str(exc) or "no answer within 2 s"
            if exc.errno == errno.EACCES:
                reason = "permission denied"
            raise ConfigError(
                f"api.socket_path: {path} exists (owned by {_user_name(st.st_uid)}) and this user "
                f"cannot tell whether a daemon serves it: {reason}. Check whether a daemon "
                f"listens on it (`ss -xlp | grep {path}`); if none does, remove {path}"
            ) from None
        try:
            os.unlink(path)
        except FileNotFoundError:  # removed meanwhile: as good
            pass
        except OSError as unlink_error:  # EPERM: another user's file in a sticky directory
            raise ConfigError(
                f"api.socket_path: {path} is a stale socket (no daemon listens on it) that this "
                f"user cannot remove: {unlink_error.strerror or unlink_error}; it belongs to "
                f"{_user_name(st.st_uid)}: remove it as that user (or root), or choose another "
                "api.socket_path"
            ) from None
        else:
            log.info("api: removed the stale socket %s (no daemon listened on it)", path)
        return
    writer.close()
    raise ConfigError(f"api.socket_path: another daemon is serving {path}")


def _user_name(uid: int) -> str:
    """``uid``'s name, or the number when no user has it (a deleted account's files)."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"
