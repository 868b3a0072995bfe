"""The engine's side of the local API: :class:`KVPeerClient` (blocking) and
:class:`AsyncKVPeerClient` (asyncio).

Owns the client connection (hello, request ids, timeouts), moving KV through shared-memory
segments the daemon hands out, and the fetch handle an engine reads restored KV from. KV
tensors are ``[layers, kv_heads, tokens, head_dim]``. A daemon's error answer is raised as
:class:`~kvpeer.errors.ApiError` carrying its :class:`~kvpeer.errors.ErrorCode`.

    with KVPeerClient(namespace="team-a") as client:
        client.put(tokens, k, v, fingerprint)
        with client.fetch(tokens, fingerprint) as result:
            k, v = result.k, result.v      # zero-copy views of the segment, valid inside `with`
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from kvpeer import aio, shm
from kvpeer.api import messages as m
from kvpeer.api import unix
from kvpeer.errors import ApiError, ErrorCode, ProtocolError
from kvpeer.hashing import ModelFingerprint

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/kvpeer/kvpeer.sock"
DEFAULT_TIMEOUT_S = 60.0
#: How long releasing a cancelled fetch reads for its final answer (a daemon answers a cancel in
#: milliseconds); past it the connection is dropped, which frees the fetch at the daemon too.
RELEASE_WAIT_S = 1.0
#: How long a send that found the connection closed waits for the asyncio client's reader to
#: read what the daemon said before closing it (it is there already: the reader takes it at once).
LAST_WORDS_WAIT_S = 1.0
_T = TypeVar("_T", bound=m.Message)


def default_socket_path() -> str:
    """``$KVPEER_SOCKET``, else (unset or empty, as shells treat an empty variable) the system
    daemon's socket."""
    return os.environ.get("KVPEER_SOCKET") or DEFAULT_SOCKET


def _expect(message: m.Message, kind: type[_T]) -> _T:
    if isinstance(message, m.ErrorResponse):
        raise ApiError(message.error_code, message.reason)
    if not isinstance(message, kind):
        raise ApiError(ErrorCode.MALFORMED, f"expected {kind.TYPE}, got {message.TYPE}")
    return message


def _put_request(
    rid: int, tokens: Any, k: torch.Tensor, v: torch.Tensor, fp: ModelFingerprint, level: str | None,
    prefill_s: float | None = None, kv_from: int = 0,
) -> tuple[m.PutRequest, torch.Tensor, torch.Tensor]:
    """Validate a put locally (cheap errors before any shared memory is made)."""
    try:
        request = m.PutRequest(
            id=rid, tokens=tokens, fingerprint=fp, level=level, dtype=shm.dtype_name(k.dtype),
            prefill_s=prefill_s, kv_from=kv_from,
        )
    except ProtocolError as exc:
        raise ApiError(exc.code, exc.reason) from None
    n = request.kv_tokens
    want = (fp.layers, fp.kv_heads, n, fp.head_dim)
    if k.dim() != 4 or v.dim() != 4 or k.dtype != v.dtype:
        raise ApiError(ErrorCode.INVALID, "k and v must be 4-D tensors of one dtype")
    if kv_from and (k.shape[2] != n or v.shape[2] != n):
        # Exactly: a whole prompt's KV given with kv_from would store its first rows as the KV
        # of the tokens from kv_from on.
        raise ApiError(
            ErrorCode.INVALID,
            f"with kv_from={kv_from}, k/v must hold the KV of tokens {kv_from}..{kv_from + n} only "
            f"({n} tokens, k[:, :, {kv_from}:{kv_from + n}]); they hold {k.shape[2]} / {v.shape[2]}",
        )
    if k.shape[2] < n or v.shape[2] < n:
        raise ApiError(ErrorCode.INVALID, f"k/v hold fewer than the {n} tokens given")
    k, v = k[:, :, :n, :], v[:, :, :n, :]
    if tuple(k.shape) != want or tuple(v.shape) != want:
        raise ApiError(
            ErrorCode.INVALID,
            f"k/v shape {tuple(k.shape)} does not match [layers, kv_heads, tokens, head_dim] = {want}",
        )
    return request, k, v


def _encode(request: m.Message) -> bytes:
    try:
        return m.encode(request)
    except ProtocolError as exc:  # TOO_LARGE: the caller's to hear, as the daemon would say it
        raise ApiError(exc.code, exc.reason) from None


def _map_descriptor(name: str, fd: int) -> shm.Segment:
    """Map segment ``name`` from its descriptor, which this closes (the mapping holds the file)."""
    try:
        return shm.Segment.from_descriptor(name, fd)
    finally:
        os.close(fd)


def _take_descriptor(descriptors: unix.SegmentDescriptors, name: str) -> int:
    try:
        return descriptors.take(name)
    except ProtocolError as exc:
        raise ApiError(exc.code, exc.reason) from None


def _fill_segment_blocking(name: str, fd: int, k: torch.Tensor, v: torch.Tensor) -> None:
    try:
        segment = _map_descriptor(name, fd)
    except OSError as exc:
        raise ApiError(ErrorCode.INTERNAL, f"cannot map put segment {name}: {exc}") from None
    except ProtocolError as exc:
        raise ApiError(exc.code, f"put segment {name}: {exc.reason}") from None
    try:
        segment.k.copy_(k)
        segment.v.copy_(v)
    finally:
        segment.close()


#: The daemon closed the connection and said nothing of why. Its code stays SHUTTING_DOWN: a
#: daemon that stops or restarts closes its connections just so (it says nothing first), this
#: is what README promises for a restart, and the engine integrations back off from the daemon
#: on it (:func:`kvpeer.integrations._daemon.daemon_away`). The text says no more than is known.
CLOSED_BY_DAEMON = "the daemon closed the connection (it stopped, or it dropped this client: its log says which)"


def _closed_by_daemon(detail: str = "") -> ApiError:
    return ApiError(ErrorCode.SHUTTING_DOWN, f"{CLOSED_BY_DAEMON}{': ' + detail if detail else ''}")


def _connection_lost(exc: OSError) -> ApiError:
    if isinstance(exc, TimeoutError):
        return ApiError(ErrorCode.TIMEOUT, f"daemon connection lost: {exc or 'timed out'}")
    if isinstance(exc, ConnectionError):  # EPIPE, ECONNRESET: the daemon's end is closed
        return _closed_by_daemon(str(exc) or type(exc).__name__)
    return ApiError(ErrorCode.SHUTTING_DOWN, f"daemon connection lost: {exc or type(exc).__name__}")


def _said_before_closing(messages: list[m.Message]) -> ApiError | None:
    """The daemon's reason for closing the connection, if the last of ``messages`` (what it
    sent) gives one: an error tied to no request, as a refusal at connect is (BUSY past the
    connection caps, FORBIDDEN) or a connection's timeout."""
    last = messages[-1] if messages else None
    if isinstance(last, m.ErrorResponse) and last.id == 0:
        return ApiError(last.error_code, last.reason)
    return None


#: Requests that stand on their own: sent again on a new connection if the old one was found
#: closed before they reached the daemon. Not a hello (its connection is new), a put's commit or
#: a release (they name a segment of the old connection).
_RESENDABLE = (m.LookupRequest, m.StatsRequest, m.PeersRequest, m.EvictRequest, m.PutRequest)


def _late_segment(message: m.Message) -> str:
    """The segment a late answer hands us ("" if none): a put's, or a finished fetch's (a
    FetchStarted's segment is named again by the final answer, or dropped by the daemon)."""
    if isinstance(message, m.SegmentReady | m.FetchResult):
        return message.segment
    return ""


def _announced_segment(message: m.Message) -> str:
    """The segment whose descriptor came with ``message`` ("" if none)."""
    return message.segment if isinstance(message, m.SegmentReady | m.FetchStarted) else ""


def _drain(queue: asyncio.Queue[m.Message]) -> list[m.Message]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out



async def _stop_reader(task: asyncio.Task[None] | None) -> None:
    """Cancel a connection's reader and wait for it; a cancel of our own caller still raises."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def _released_already(exc: ApiError) -> None:
    # The daemon dropped the segment first (lease ran out, or the fetch failed after
    # announcing it): our mapping stays valid and there is nothing left to release.
    if exc.code != ErrorCode.NOT_FOUND:
        raise exc
    log.debug("segment already released by the daemon: %s", exc.reason)


# --------------------------------------------------------------------------- fetch results


class _FetchState:
    """Events of one fetch, folded into what an engine needs to know (no I/O)."""

    def __init__(self, request: m.FetchRequest, descriptors: unix.SegmentDescriptors) -> None:
        self.request = request
        self._descriptors = descriptors  # the connection's: a segment maps from the one sent with it
        self.segment: shm.Segment | None = None
        self.done: dict[int, str] = {}
        self.final: m.FetchResult | None = None
        self.error: ApiError | None = None
        self.answered = False  # the daemon's final answer (a result or an error) came
        self._closed = False  # close_segment() ran
        self.cancel_id: int | None = None  # the Cancel sent for it, if one was
        self.started_at: int | None = None  # FetchStarted's first_token, once it came

    @property
    def finished(self) -> bool:
        return self.final is not None or self.error is not None

    @property
    def started(self) -> bool:
        """The daemon said where the segment starts (or the fetch is over)."""
        return self.started_at is not None or self.finished

    def on_message(self, message: m.Message) -> None:
        try:
            if isinstance(message, m.FetchStarted):
                # Its descriptor came with it: mapped now, while chunks decode. A failure here
                # fails the fetch (its final answer is then dropped, its segment released).
                self._open(message.segment)
                assert self.segment is not None
                chunk_tokens = self.segment.layout.chunk_tokens
                # Said only for a split; else the segment starts at kv_from's chunk.
                start = message.first_token if self.request.split else self.request.kv_from // chunk_tokens * chunk_tokens
                self.started_at = start
                self._check_start(start, chunk_tokens)
            elif isinstance(message, m.FetchProgress):
                if self.segment is not None and message.index < self._first_chunk(self.segment.layout.chunk_tokens):
                    self.error = ApiError(ErrorCode.MALFORMED, f"the daemon restored chunk {message.index}, "
                                          f"before its segment's first token {self._first_token(self.segment.layout.chunk_tokens)}")
                else:
                    self.done[message.index] = message.level
            elif isinstance(message, m.FetchResult):
                self.answered = True
                self.final = message  # first: a segment that fails to map is still released
                if message.segment:
                    self._open(message.segment)
                else:
                    self._forget_segment()
                if message.levels:
                    self._check_start(message.first_token, message.chunk_tokens)
            elif isinstance(message, m.ErrorResponse):
                self.answered = True
                self._forget_segment()
                self.error = ApiError(message.error_code, message.reason)
            else:
                self.error = ApiError(ErrorCode.MALFORMED, f"unexpected {message.TYPE} in a fetch")
        except (OSError, ProtocolError) as exc:
            self.error = ApiError(ErrorCode.INTERNAL, f"cannot map the fetch segment: {exc}")

    def _check_start(self, first_token: int, chunk_tokens: int) -> None:
        """Where the daemon says the segment starts: at kv_from's chunk, or for a split fetch at
        a later chunk (FetchStarted's, if it came). Else its rows would be read as other tokens' KV."""
        at_kv_from = self.request.kv_from // chunk_tokens * chunk_tokens
        if self.request.split:
            ok = first_token >= at_kv_from and first_token % chunk_tokens == 0 and first_token < self.request.tokens.size
            ok = ok and self.started_at in (None, first_token)
        else:
            ok = first_token == at_kv_from
        if not ok and self.error is None:
            self.error = ApiError(ErrorCode.MALFORMED, f"the daemon restored from token {first_token}, "
                                  f"not where kv_from={self.request.kv_from} allows")

    def _first_token(self, chunk_tokens: int) -> int:
        """The token the segment starts at: FetchStarted's, else the start of kv_from's chunk."""
        if self.started_at is not None:
            return self.started_at
        return self.request.kv_from // chunk_tokens * chunk_tokens

    def _first_chunk(self, chunk_tokens: int) -> int:
        """The chunk the segment starts at."""
        return self._first_token(chunk_tokens) // chunk_tokens

    def first_token_or_end(self) -> int:
        """Once :attr:`started`: the token the restored KV starts at, or the prompt's length if
        nothing will be restored (the client prefills everything)."""
        if self.error is not None:
            raise self.error
        if self.final is not None:
            return self.final.first_token if self.final.levels else int(self.request.tokens.size)
        assert self.started_at is not None, "wait until started"
        return self.started_at

    def _forget_segment(self) -> None:
        """Unmap an announced segment the daemon dropped (there is nothing to release)."""
        if self.segment is not None:
            self.segment.close()
            self.segment = None

    def _open(self, name: str) -> None:
        if self.segment is None:
            self.segment = _map_descriptor(name, self._descriptors.take(name))
        elif self.segment.name != name:
            raise ProtocolError(ErrorCode.MALFORMED, "a fetch named two segments")

    def result(self) -> m.FetchResult:
        if self.error is not None:
            raise self.error
        if self.final is None:
            raise ApiError(ErrorCode.INTERNAL, "the fetch has not finished")
        return self.final

    def _check_open(self) -> None:
        # Else k/v read as empty tensors: nothing restored, as far as the caller could tell.
        if self._closed:
            raise ApiError(ErrorCode.INVALID, "the fetch handle was released")

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        final = self.result()
        self._check_open()
        if self.segment is None or final.matched_tokens == 0:
            fp = self.request.fingerprint
            dtype = shm.DTYPES.get(fp.dtype, torch.float16)
            empty = torch.empty((fp.layers, fp.kv_heads, 0, fp.head_dim), dtype=dtype)
            return empty, empty.clone()
        n = final.matched_tokens - final.first_token
        return self.segment.k[:, :, :n, :], self.segment.v[:, :, :n, :]

    def chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk ``index`` of the prompt (counted from token 0, whatever the request's kv_from)."""
        self._check_open()
        if index not in self.done or self.segment is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"chunk {index} was not restored")
        layout = self.segment.layout
        # The segment starts at the chunk holding the request's kv_from (FetchResult.first_token).
        start = (index - self._first_chunk(layout.chunk_tokens)) * layout.chunk_tokens
        stop = start + layout.chunk_tokens
        return self.segment.k[:, :, start:stop, :], self.segment.v[:, :, start:stop, :]

    def close_segment(self) -> str | None:
        """Unmap our side; returns the name to release at the daemon (None if none, or if it
        was returned before)."""
        if self._closed:
            return None
        self._closed = True
        if self.segment is None:  # never mapped (it failed to): the final answer's is released
            return self.final.segment if self.final is not None and self.final.segment else None
        segment, self.segment = self.segment, None
        if not segment.close():
            log.debug("segment %s still used by tensors; unmapped when they are freed", segment.name)
        return segment.name


class _FetchHandleBase:
    def __init__(self, state: _FetchState) -> None:
        self._state = state
        self._released = False

    @property
    def segment(self) -> shm.Segment | None:
        """The mapped segment (None if nothing was restored)."""
        return self._state.segment

    def zero_copy(self) -> bool:
        """True if ``k`` and ``v`` lie inside the mapped segment (no copy was made)."""
        k, v = self._state.kv()
        segment = self._state.segment
        return segment is not None and segment.holds(k) and segment.holds(v)


class FetchHandle(_FetchHandleBase):
    """A fetch in progress or done (blocking client). Use as a context manager: leaving it
    releases the segment; tensors taken from it must be cloned to outlive it."""

    def __init__(self, client: KVPeerClient, state: _FetchState) -> None:
        super().__init__(state)
        self._client = client

    def wait(self) -> m.FetchResult:
        """Block until the daemon's final answer; ApiError if the fetch failed."""
        while not self._state.finished:
            self._client._pump()
        return self._state.result()

    def wait_first_token(self) -> int:
        """Block until the daemon says which token the restored KV will start at, and return it
        (a split fetch: prefill the tokens before it meanwhile; the prompt's length if nothing
        will be restored). ApiError if the fetch failed."""
        while not self._state.started:
            self._client._pump()
        return self._state.first_token_or_end()

    def wait_for_chunk(self, index: int) -> bool:
        """Block until chunk ``index`` is usable (True) or the fetch ended without it (False)."""
        while index not in self._state.done and not self._state.finished:
            self._client._pump()
        if self._state.error is not None:
            raise self._state.error
        return index in self._state.done

    def chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of chunk ``index`` (waits for it); ApiError(NOT_FOUND) if it never came."""
        self.wait_for_chunk(index)
        return self._state.chunk(index)

    @property
    def segment(self) -> shm.Segment | None:
        """The mapped segment once the fetch is over (None if nothing was restored)."""
        self.wait()
        return self._state.segment

    def zero_copy(self) -> bool:
        self.wait()
        return super().zero_copy()

    @property
    def matched_tokens(self) -> int:
        return self.wait().matched_tokens

    @property
    def levels(self) -> list[str]:
        return self.wait().levels

    @property
    def recompute_from(self) -> int:
        return self.wait().recompute_from

    @property
    def first_token(self) -> int:
        """``k`` and ``v`` hold the KV of tokens ``[first_token, matched_tokens)`` (0 unless
        the fetch asked for the chunks from ``kv_from`` on)."""
        return self.wait().first_token

    @property
    def k(self) -> torch.Tensor:
        self.wait()
        return self._state.kv()[0]

    @property
    def v(self) -> torch.Tensor:
        self.wait()
        return self._state.kv()[1]

    def release(self, *, wait: bool = True) -> None:
        """Release the segment. A fetch still running is cancelled, not run to its end; the
        daemon's final answer (prompt once it cancelled) is read for at most RELEASE_WAIT_S for
        the segment it names. ``wait`` False (or a daemon that did not answer the last wait):
        nothing is waited for; what is still to come is released when it comes."""
        if self._released:
            return
        self._released = True
        client = self._client
        wait = wait and not client._silent
        if not self._state.answered:  # running, or failed here: a final answer still to come
            self._state.close_segment()
            client._cancel_fetch(self._state, wait=wait)  # releases what it names
            return
        name = self._state.close_segment()
        if name is None or not client.connected:
            return
        if not wait:
            with contextlib.suppress(ApiError):  # the connection is lost: so is the segment
                client._release_later(name)
            return
        try:
            client._call(m.Release(id=client._new_id(), segment=name), m.Released)
        except ApiError as exc:
            _released_already(exc)

    def __enter__(self) -> FetchHandle:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Left by an exception (a timeout, Ctrl-C): no second wait for the daemon.
        self.release(wait=exc_type is None)


# --------------------------------------------------------------------------- blocking client


class KVPeerClient:
    """Blocking client of the local daemon. One thread at a time; requests run in order.

    A lost connection (the daemon restarted or died) fails the call that finds it with an
    ApiError; the next call connects again. Only :meth:`close` ends the client for good.
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        namespace: str | None = "default",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        client_name: str = "",
    ) -> None:
        self.socket_path = str(socket_path or default_socket_path())
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.client_name = client_name or f"pid {os.getpid()}"
        self._ids = 0
        self._decoder = m.FrameDecoder()
        self._inbox: list[m.Message] = []
        self._fetch: _FetchState | None = None
        # Requests given up on (a timeout, an interrupt) whose answers may still come: a
        # segment such an answer hands us is released at once.
        self._abandoned: set[int] = set()
        self._sock: socket.socket | None = None
        self._descriptors = unix.SegmentDescriptors()
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        self._silent = False  # the last wait for the daemon timed out (it may be hung)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    # ------------------------------------------------------------------ wire
    def _connect(self) -> socket.socket:
        """Connect and say hello (raises OSError if the daemon cannot be reached, ApiError(BUSY)
        if its listen backlog stays full for ``timeout_s``); with no namespace, no hello
        (status, stats, peers and evict need none)."""
        self._silent = False
        sock = self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            try:
                unix.connect_blocking(sock, self.socket_path, self.timeout_s)
            except ProtocolError as exc:  # BUSY: its listen backlog stayed full
                raise ApiError(exc.code, exc.reason) from None
            self._unless_aborted()
            if self.namespace is not None:
                self._call(
                    m.Hello(id=self._new_id(), namespace=self.namespace, client=self.client_name),
                    m.HelloOk,
                )
            self._unless_aborted()
        except BaseException:
            self._drop_connection(ApiError(ErrorCode.SHUTTING_DOWN, "not connected to the daemon"))
            raise
        return sock

    def _unless_aborted(self) -> None:
        # abort() from another thread may land while this one connects: it found no socket to
        # shut, so the connection just made must not be used.
        if self._closed:
            raise ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")

    def _drop_connection(self, reason: ApiError) -> None:
        """Forget the connection and everything in flight on it (a running fetch fails)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._decoder = m.FrameDecoder()
        self._descriptors.close()
        self._inbox.clear()
        self._abandoned.clear()
        fetch, self._fetch = self._fetch, None
        if fetch is not None and not fetch.finished:
            fetch.error = reason

    def _lost(self, exc: OSError) -> ApiError:
        # Whatever was sent or half-received cannot be matched up any more (a sendall that
        # timed out may have left half a frame): only a new connection is in a known state.
        if self._closed:  # abort() shut the socket under this call
            reason = ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")
        elif isinstance(exc, ConnectionError):
            reason = self._daemon_said() or _connection_lost(exc)
        else:
            reason = _connection_lost(exc)
        self._drop_connection(reason)
        return reason

    def _daemon_said(self) -> ApiError | None:
        """Why the daemon closed the connection, if it said so and that is still unread: a send
        that met the closed connection (EPIPE) hid a refusal waiting to be read."""
        if self._sock is None:
            return None
        self._decoder.feed(unix.unread(self._sock))
        messages = list(self._inbox)
        for frame in self._decoder.frames():
            if isinstance(frame, bytes):
                with contextlib.suppress(ProtocolError):
                    messages.append(m.decode_body(frame))
        return _said_before_closing(messages)

    def _send(self, message: m.Message, *, resend: bool = False) -> None:
        """Send ``message``, connecting first if the connection was lost. ``resend``: a request
        that stands on its own (no state on the connection: see :data:`_RESENDABLE`) goes
        once more on a new connection when the daemon had closed the old one before it got
        there (a restart; or it closes one that says nothing for 10 s after connecting)."""
        data = _encode(message)
        sock = self._sock
        if self._closed:  # closed, or aborted from another thread: nothing more goes out
            reason = ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")
            self._drop_connection(reason)
            raise reason
        if sock is not None:
            try:
                sock.sendall(data)
                return
            except (BrokenPipeError, ConnectionResetError) as exc:
                lost = self._lost(exc)  # nothing of the request was taken: the daemon acts on
                if not resend or self._closed:  # whole frames only
                    raise lost from None
            except OSError as exc:
                raise self._lost(exc) from None
        if self._closed:
            raise ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")
        try:
            sock = self._connect()  # the daemon went away since the last call: try again now
        except OSError as exc:
            raise ApiError(ErrorCode.SHUTTING_DOWN, f"cannot reach the daemon at {self.socket_path}: {exc}") from None
        try:
            sock.sendall(data)
        except OSError as exc:
            raise self._lost(exc) from None

    def _receive(self) -> m.Message:
        if self._sock is None:
            raise ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed" if self._closed else "daemon connection lost")
        while True:
            for frame in self._decoder.frames():
                if isinstance(frame, ProtocolError):
                    raise ApiError(frame.code, frame.reason)
                try:
                    message = m.decode_body(frame)
                    self._descriptors.on_message(message)
                except ProtocolError as exc:  # an answer we cannot read (a daemon of another API
                    reason = ApiError(exc.code, exc.reason)  # version?), or descriptors and
                    self._drop_connection(reason)  # frames that no longer pair up
                    raise reason from None
                return message
            try:
                data, fds = unix.receive(self._sock, 1 << 16)
            except TimeoutError:
                # Nothing half-done on our side: the answer may still come, the stream is intact.
                self._silent = True
                raise ApiError(ErrorCode.TIMEOUT, f"no answer from the daemon in {self.timeout_s}s") from None
            except OSError as exc:
                raise self._lost(exc) from None
            except ProtocolError as exc:
                reason = ApiError(exc.code, exc.reason)
                self._drop_connection(reason)
                raise reason from None
            self._silent = False
            self._descriptors.arrived(fds)
            if not data:
                closed = ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")
                reason = closed if self._closed else _closed_by_daemon()  # closed: by abort()
                self._drop_connection(reason)
                raise reason
            self._decoder.feed(data)

    def _pump(self) -> None:
        """Receive one message and route it (fetch events to the fetch, the rest to the inbox)."""
        self._route(self._receive())

    def _route(self, message: m.Message) -> None:
        if self._fetch is not None and message.id == self._fetch.request.id:
            self._fetch.on_message(message)
            if self._fetch.finished:
                if not self._fetch.answered:  # failed here: the daemon's part goes on
                    self._cancel_fetch(self._fetch)
                self._fetch = None
        elif message.id in self._abandoned:
            self._drop_late(message)
        else:
            self._inbox.append(message)

    def _drop_late(self, message: m.Message) -> None:
        """Drop an answer to a request given up on, releasing the segment it hands us."""
        if not isinstance(message, m.FetchStarted | m.FetchProgress):
            self._abandoned.discard(message.id)
        self._descriptors.discard(_announced_segment(message))
        segment = _late_segment(message)
        if segment:
            self._release_later(segment)

    def _cancel_fetch(self, state: _FetchState, *, wait: bool = False) -> None:
        """Give up on the running fetch: the daemon is asked to stop it (one that predates
        cancel answers UNKNOWN_TYPE and finishes it), and its answers still to come are dropped,
        a segment they name released. ``wait``: read until the fetch's final answer (prompt once
        cancelled): this client reads only while a call waits, so a segment named by an answer
        already on its way was held by the daemon until the next call, or its lease's end."""
        try:
            if self._fetch is state:  # else cancelled already (it failed here), or over
                self._fetch = None
                self._abandoned.add(state.request.id)
                cancel = m.Cancel(id=self._new_id(), fetch=state.request.id)
                self._abandoned.add(cancel.id)  # its answer is dropped too
                state.cancel_id = cancel.id
                self._send(cancel)
            if not wait or state.cancel_id is None:
                return
            self._read_final_answer(state)
        except ApiError:  # the connection is lost: the daemon dropped the fetch with it
            pass

    def _read_final_answer(self, state: _FetchState) -> None:
        """Read until the cancelled fetch's final answer (routing the rest as usual), for at
        most RELEASE_WAIT_S in all; past it, drop the connection: the daemon frees the fetch."""
        deadline = time.monotonic() + min(RELEASE_WAIT_S, self.timeout_s)
        try:
            while state.request.id in self._abandoned and self._sock is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)
                message = self._receive()
                if message.id == state.cancel_id and isinstance(message, m.ErrorResponse):
                    self._abandoned.discard(message.id)
                    return  # a daemon that predates cancel: its fetch runs on, released when it ends
                self._route(message)
        except (TimeoutError, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.code != ErrorCode.TIMEOUT:
                raise
            self._drop_connection(ApiError(ErrorCode.TIMEOUT, "a cancelled fetch's answer did not come"))
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout_s)

    def _release_later(self, name: str) -> None:
        """Send a Release without waiting for its answer (dropped when it comes)."""
        rid = self._new_id()
        self._abandoned.add(rid)
        self._send(m.Release(id=rid, segment=name))

    def _finish_fetch(self) -> None:
        # Answers arrive in order on one connection: a running fetch's events come first.
        while self._fetch is not None:
            self._pump()

    def _call(self, request: m.Message, kind: type[_T]) -> _T:
        self._finish_fetch()
        self._send(request, resend=isinstance(request, _RESENDABLE))
        try:
            answer = self._answer(request.id)
        except BaseException:
            if self._sock is not None:  # the answer may still come
                self._abandoned.add(request.id)
            raise
        if answer.id != request.id:  # an error the daemon could not tie to a request: ours may come
            self._abandoned.add(request.id)
        return _expect(answer, kind)

    def _answer(self, rid: int) -> m.Message:
        while True:
            for i, message in enumerate(self._inbox):
                if message.id in (rid, 0):
                    del self._inbox[i]
                    return message
            self._pump()

    # ------------------------------------------------------------------ API
    def put(
        self, tokens: Any, k: torch.Tensor, v: torch.Tensor, fingerprint: ModelFingerprint,
        level: str | None = None, prefill_s: float | None = None, *, kv_from: int = 0,
    ) -> m.PutResult:
        """Store the KV of ``tokens`` (k, v ``[layers, kv_heads, >= len(tokens), head_dim]``).

        ``prefill_s``: how long computing this KV took, if known; the daemon learns from it how
        fast this client recomputes, and stops later fetches that would be slower than that.
        ``kv_from``: k and v hold the KV of tokens ``kv_from..len(tokens)`` only (exactly that
        many), because the daemon holds the chunks before it (a lookup's leading "local" sources
        say so): only the chunks from there on are stored, and less KV crosses shared memory.
        """
        request, k, v = _put_request(self._new_id(), tokens, k, v, fingerprint, level, prefill_s, kv_from)
        ready = self._call(request, m.SegmentReady)
        try:
            _fill_segment_blocking(ready.segment, _take_descriptor(self._descriptors, ready.segment), k, v)
        except BaseException:
            with contextlib.suppress(ApiError, OSError):
                self._call(m.Release(id=self._new_id(), segment=ready.segment), m.Released)
            raise
        return self._call(m.PutCommit(id=self._new_id(), segment=ready.segment), m.PutResult)

    def lookup(self, tokens: Any, fingerprint: ModelFingerprint, *, local_only: bool = False) -> m.LookupResult:
        """How many leading tokens are available, and from where (per chunk); ``local_only``:
        only those the daemon holds itself (no peer is asked)."""
        try:
            request = m.LookupRequest(id=self._new_id(), tokens=tokens, fingerprint=fingerprint,
                                      local_only=local_only)
        except ProtocolError as exc:
            raise ApiError(exc.code, exc.reason) from None
        return self._call(request, m.LookupResult)

    def fetch(
        self, tokens: Any, fingerprint: ModelFingerprint, deadline_s: float | None = None,
        min_level: str | None = None, recompute_tokens_per_s: float | None = None, *,
        kv_from: int = 0, split: bool = False,
    ) -> FetchHandle:
        """Start restoring the longest available prefix; returns a handle (a context manager).

        ``recompute_tokens_per_s``: how fast this client would prefill the tokens itself (the
        daemon stops fetching where recomputing is quicker); unset, the daemon's setting or what
        it learned from puts stating ``prefill_s`` applies.
        ``kv_from``: this client holds the KV of the tokens before it already: only the chunks
        from the one holding it are restored (the handle's ``first_token`` is that chunk's start;
        ``chunk(i)`` still counts chunks from token 0).
        ``split``: prefill the prompt's first chunks yourself while the daemon fetches the rest,
        where that is quicker (a slow link; needs a recompute rate, stated or learned):
        ``wait_first_token()`` says soon where the restored KV will start; prefill the tokens
        before it, then ``wait()``.
        """
        try:
            request = m.FetchRequest(
                id=self._new_id(), tokens=tokens, fingerprint=fingerprint, deadline_s=deadline_s,
                min_level=min_level, recompute_tokens_per_s=recompute_tokens_per_s, kv_from=kv_from,
                split=split,
            )
        except ProtocolError as exc:
            raise ApiError(exc.code, exc.reason) from None
        self._finish_fetch()
        state = _FetchState(request, self._descriptors)
        self._send(request, resend=True)
        self._fetch = state
        return FetchHandle(self, state)

    def stats(self) -> dict[str, Any]:
        return self._call(m.StatsRequest(id=self._new_id()), m.StatsResult).stats

    def peers(self) -> list[dict[str, Any]]:
        return self._call(m.PeersRequest(id=self._new_id()), m.PeersResult).peers

    def evict_all(self) -> dict[str, Any]:
        return self._call(m.EvictRequest(id=self._new_id(), all=True), m.EvictResult).result

    @property
    def closed(self) -> bool:
        return self._closed

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from the closing thread) when the client is closed or
        aborted: connections of its own that helpers opened beside it end with it."""
        self._on_close.append(callback)

    def _run_on_close(self) -> None:
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a helper's bug must not stop the close
                log.exception("kvpeer client: a close callback failed")

    def close(self) -> None:
        self._closed = True
        self._run_on_close()
        self._drop_connection(ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed"))

    def abort(self) -> None:
        """The one call another thread may make: close the client for good, and shut its
        connection down so that a call blocked on it (for up to ``timeout_s``) fails now and
        is not sent again on a new one. The calling thread then drops the connection."""
        self._closed = True
        self._run_on_close()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> KVPeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- asyncio client


class AsyncFetchHandle(_FetchHandleBase):
    """A fetch in progress or done (asyncio client). ``async with`` releases the segment."""

    def __init__(self, client: AsyncKVPeerClient, state: _FetchState, wait: bool) -> None:
        super().__init__(state)
        self._client = client
        self._connection = client._generation  # the fetch runs on this connection only
        self._queue: asyncio.Queue[m.Message] = asyncio.Queue()
        self._wait_on_enter = wait
        # The message being applied and the mapping of its segment, kept until both are done:
        # a caller cancelled while the segment maps must not lose the daemon's answer (the
        # next wait, release()'s included, takes them up again).
        self._pending: m.Message | None = None
        self._mapping: asyncio.Future[shm.Segment] | None = None

    async def _next(self) -> None:
        if self._pending is None:
            self._pending = await self._client._get(self._queue)
        message = self._pending
        if isinstance(message, m.FetchStarted | m.FetchResult) and message.segment and self._state.segment is None:
            try:
                if self._mapping is None:
                    # Mapping populates the page tables (milliseconds for large KV): keep it off the loop.
                    fd = self._client._descriptors.take(message.segment)
                    loop = asyncio.get_running_loop()
                    self._mapping = loop.run_in_executor(None, _map_descriptor, message.segment, fd)
                self._state.segment = await asyncio.shield(self._mapping)
            except (OSError, ProtocolError) as exc:
                self._pending = self._mapping = None
                self._state.error = ApiError(ErrorCode.INTERNAL, f"cannot map the fetch segment: {exc}")
                if isinstance(message, m.FetchResult):
                    self._state.answered = True  # the daemon's part is over: release what it named
                    self._state.final = message
                return
        self._pending = self._mapping = None
        self._state.on_message(message)

    async def wait(self) -> m.FetchResult:
        while not self._state.finished:
            await self._next()
        return self._state.result()

    async def wait_first_token(self) -> int:
        """As :meth:`FetchHandle.wait_first_token`."""
        while not self._state.started:
            await self._next()
        return self._state.first_token_or_end()

    async def wait_for_chunk(self, index: int) -> bool:
        while index not in self._state.done and not self._state.finished:
            await self._next()
        if self._state.error is not None:
            raise self._state.error
        return index in self._state.done

    async def chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        await self.wait_for_chunk(index)
        return self._state.chunk(index)

    # After ``await wait()`` (or entering without stream=True) these read the final answer.
    @property
    def matched_tokens(self) -> int:
        return self._state.result().matched_tokens

    @property
    def levels(self) -> list[str]:
        return self._state.result().levels

    @property
    def recompute_from(self) -> int:
        return self._state.result().recompute_from

    @property
    def first_token(self) -> int:
        return self._state.result().first_token

    @property
    def k(self) -> torch.Tensor:
        return self._state.kv()[0]

    @property
    def v(self) -> torch.Tensor:
        return self._state.kv()[1]

    async def release(self) -> None:
        """Release the segment; a fetch still running is cancelled, not waited for."""
        if self._released:
            return
        self._released = True
        self._client._unroute(self._state.request.id)
        if not self._state.answered:  # running, or failed here: a final answer still to come
            self._give_up()
            return
        name = self._state.close_segment()
        if name is not None and self._client.connected:
            try:
                await self._client._call(m.Release(id=self._client._new_id(), segment=name), m.Released)
            except ApiError as exc:
                _released_already(exc)

    def _give_up(self) -> None:
        """Stop the fetch without waiting (this may run in a cancelled task): the daemon is
        asked to stop it, and its answers still to come name what to release."""
        taken = [self._pending] if self._pending is not None else []
        self._client._abandon_fetch(self._state.request.id, self._connection, taken + _drain(self._queue))
        self._state.close_segment()
        if self._mapping is not None:  # its segment, if it maps, is unmapped when freed
            self._mapping.add_done_callback(aio.ignore_outcome)

    async def __aenter__(self) -> AsyncFetchHandle:
        if self._wait_on_enter:
            await self.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class AsyncKVPeerClient:
    """asyncio client of the local daemon; requests may run concurrently on one connection.

    A lost connection (the daemon restarted or died) fails the requests in flight on it with an
    ApiError; the next request connects again. Only :meth:`close` ends the client for good.

        async with AsyncKVPeerClient(namespace="team-a") as client:
            await client.put(tokens, k, v, fingerprint)
            async with client.fetch(tokens, fingerprint, stream=True) as result:
                await result.wait_for_chunk(0)   # use chunk 0 while the rest arrives
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        namespace: str | None = "default",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        client_name: str = "",
    ) -> None:
        self.socket_path = str(socket_path or default_socket_path())
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.client_name = client_name or f"pid {os.getpid()}"
        self._ids = 0
        self._routes: dict[int, asyncio.Queue[m.Message]] = {}
        self._conn: unix.AsyncUnixConnection | None = None
        self._descriptors = unix.SegmentDescriptors()
        self._reader_task: asyncio.Task[None] | None = None
        self._closed_reason: ApiError | None = None
        self._closed = False  # by close(): no reconnecting after that
        self._connecting = asyncio.Lock()
        self._ready = False  # the hello of the current connection was answered
        self._generation = 0  # connections made: a put must commit on the one it began on
        # Requests given up on (a timeout, a cancel) whose answers may still come: a segment
        # such an answer hands us is released at once.
        self._abandoned: set[int] = set()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._closed_reason is None and self._ready

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    async def connect(self) -> AsyncKVPeerClient:
        """Connect now (requests connect by themselves otherwise); ApiError if the daemon cannot
        be reached: the client stays usable, and a later call tries again (a daemon starting)."""
        await self._ensure_connected()  # connected already: e.g. connect() then `async with`
        return self

    async def _open(self) -> None:
        """Connect and say hello (raises OSError if the daemon cannot be reached, ApiError(BUSY)
        if its listen backlog stays full for ``timeout_s``)."""
        self._ready = False  # until the hello is answered, requests wait in _ensure_connected
        try:  # no wait_for: a Unix socket's connect never waits, and open bounds its retries
            conn = self._conn = await unix.AsyncUnixConnection.open(self.socket_path, timeout_s=self.timeout_s)
        except ProtocolError as exc:  # BUSY: its listen backlog stayed full
            raise ApiError(exc.code, exc.reason) from None
        self._generation += 1
        self._closed_reason = None
        self._reader_task = asyncio.create_task(self._read_loop(conn), name="kvpeer-client-reader")
        if self.namespace is not None:
            await self._request(
                m.Hello(id=self._new_id(), namespace=self.namespace, client=self.client_name), m.HelloOk
            )
        self._ready = True

    async def _ensure_connected(self) -> None:
        """Connect again if the daemon went away since the last request (not after close())."""
        if self.connected:
            return
        if self._closed:
            raise self._closed_reason or ApiError(ErrorCode.SHUTTING_DOWN, "the client was closed")
        async with self._connecting:
            if self.connected:
                return  # another request connected while this one waited
            if self._closed:
                raise ApiError(ErrorCode.SHUTTING_DOWN, "the client was closed")
            # The old reader tells the requests still routed (all of the old connection: new ones
            # wait on this lock before they route) why their connection ended.
            await self._retire_connection()
            try:
                await self._open()
            except OSError as exc:
                await self._retire_connection()
                raise ApiError(ErrorCode.SHUTTING_DOWN, f"cannot reach the daemon at {self.socket_path}: {exc}") from None
            except BaseException:
                await self._retire_connection()
                raise
            if self._closed:  # close() ran while this connected
                await self._retire_connection()
                raise ApiError(ErrorCode.SHUTTING_DOWN, "the client was closed")

    async def _retire_connection(self) -> None:
        """Close the connection and its reader; what it held, the daemon releases with it."""
        if self._closed_reason is None:
            self._closed_reason = ApiError(ErrorCode.SHUTTING_DOWN, "daemon connection lost")
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        task, self._reader_task = self._reader_task, None
        await _stop_reader(task)
        self._descriptors.close()
        self._abandoned.clear()

    async def _read_loop(self, conn: unix.AsyncUnixConnection) -> None:
        decoder = m.FrameDecoder()
        reason = _closed_by_daemon()
        said: list[m.Message] = []  # the last message: an error tied to no request says why it closed
        try:
            while True:
                data, fds = await conn.read(1 << 16)
                self._descriptors.arrived(fds)
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    if isinstance(frame, ProtocolError):
                        raise ApiError(frame.code, frame.reason)
                    message = m.decode_body(frame)
                    self._descriptors.on_message(message)
                    queue = self._routes.get(message.id)
                    if queue is not None:
                        queue.put_nowait(message)
                    elif message.id in self._abandoned:
                        self._drop_late(message)
                    elif message.id == 0:  # not tied to a request: everyone waiting hears it
                        for waiting in self._routes.values():
                            waiting.put_nowait(message)
                    said[:] = [message]
            reason = _said_before_closing(said) or reason
        except (ProtocolError, ApiError) as exc:
            reason = exc if isinstance(exc, ApiError) else ApiError(ErrorCode.MALFORMED, str(exc))
        except OSError as exc:  # a reset after the daemon's last words
            reason = _said_before_closing(said) or _connection_lost(exc)
        finally:
            # A reason set first (the send that lost the connection) says more than the EOF.
            if self._closed_reason is None:
                self._closed_reason = reason
            reason = self._closed_reason
            closing = m.ErrorResponse(code=int(reason.code), reason=reason.reason)
            for waiting in self._routes.values():
                waiting.put_nowait(closing)

    def _route(self, rid: int, queue: asyncio.Queue[m.Message]) -> None:
        self._routes[rid] = queue

    def _unroute(self, rid: int) -> None:
        self._routes.pop(rid, None)

    def _abandon(self, rid: int, taken: list[m.Message]) -> None:
        """Give up on request ``rid``; ``taken``: its answers already received, unread."""
        if not self.connected:
            return  # the daemon released what the connection held
        self._abandoned.add(rid)
        for message in taken:
            if message.id == rid:
                self._drop_late(message)

    def _abandon_fetch(self, rid: int, connection: int, taken: list[m.Message]) -> None:
        """Give up on fetch ``rid`` (sent on connection number ``connection``); ``taken``: its
        answers already received, unread. The daemon is asked to stop it (one that predates
        cancel answers UNKNOWN_TYPE and finishes it); answers still to come are dropped, a
        segment they name released."""
        if connection != self._generation or not self.connected:
            return  # the daemon dropped it with its connection
        over = any(message.id == rid and isinstance(message, m.FetchResult | m.ErrorResponse) for message in taken)
        self._abandon(rid, taken)
        if not over:
            cancel = m.Cancel(id=self._new_id(), fetch=rid)
            self._abandoned.add(cancel.id)  # its answer is dropped too
            self._write_soon(cancel)

    def _drop_late(self, message: m.Message) -> None:
        """Drop an answer to a request given up on, releasing the segment it hands us."""
        if not isinstance(message, m.FetchStarted | m.FetchProgress):
            self._abandoned.discard(message.id)
        self._descriptors.discard(_announced_segment(message))
        segment = _late_segment(message)
        if segment and self._conn is not None and self._closed_reason is None:
            rid = self._new_id()
            self._abandoned.add(rid)  # its answer is dropped too
            self._write_soon(m.Release(id=rid, segment=segment))

    def _write_soon(self, message: m.Message) -> None:
        # Not awaited: this runs in the read loop or for a cancelled caller, where no answer
        # can be waited for.
        if self._conn is not None and self._closed_reason is None:
            self._conn.write_soon(m.encode(message))

    async def _send(self, message: m.Message) -> None:
        if self._conn is None or self._closed_reason is not None:
            raise self._closed_reason or ApiError(ErrorCode.SHUTTING_DOWN, "the client is closed")
        conn, reader = self._conn, self._reader_task
        try:
            await aio.wait_for(conn.write(_encode(message)), self.timeout_s)
        except OSError as exc:
            if isinstance(exc, ConnectionError) and reader is not None:
                # The daemon's end is closed: its reader reads what it said first (a refusal)
                # to the end, at once, and takes that for the reason.
                await asyncio.wait([reader], timeout=min(LAST_WORDS_WAIT_S, self.timeout_s))
            # A frame may be half out: nothing more can go on this connection.
            if self._closed_reason is None:
                self._closed_reason = _connection_lost(exc)
            reason = self._closed_reason
            conn.close()
            raise reason from None

    async def _get(self, queue: asyncio.Queue[m.Message]) -> m.Message:
        try:
            return await aio.wait_for(queue.get(), self.timeout_s)
        except TimeoutError:
            raise ApiError(ErrorCode.TIMEOUT, f"no answer from the daemon in {self.timeout_s}s") from None

    async def _call(self, request: m.Message, kind: type[_T]) -> _T:
        await self._ensure_connected()
        return await self._request(request, kind)

    async def _request(self, request: m.Message, kind: type[_T]) -> _T:
        queue: asyncio.Queue[m.Message] = asyncio.Queue()
        self._route(request.id, queue)
        given_up = True  # its answer may still come
        try:
            try:
                await self._send(request)
            except ApiError:
                given_up = False  # it never went out whole on a live connection: no answer comes
                raise
            answer = await self._get(queue)
            given_up = False
        finally:
            self._unroute(request.id)
            if given_up:
                self._abandon(request.id, _drain(queue))
        return _expect(answer, kind)

    # ------------------------------------------------------------------ API
    async def put(
        self, tokens: Any, k: torch.Tensor, v: torch.Tensor, fingerprint: ModelFingerprint,
        level: str | None = None, prefill_s: float | None = None, *, kv_from: int = 0,
    ) -> m.PutResult:
        """As :meth:`KVPeerClient.put`."""
        request, k, v = _put_request(self._new_id(), tokens, k, v, fingerprint, level, prefill_s, kv_from)
        ready = await self._call(request, m.SegmentReady)
        connection = self._generation
        try:
            fd = _take_descriptor(self._descriptors, ready.segment)
            # To the end even when cancelled: the fill owns (and closes) the descriptor, and a
            # release sent below must not race its writes.
            await aio.in_thread_to_the_end(None, _fill_segment_blocking, ready.segment, fd, k, v)
        except BaseException:
            with contextlib.suppress(ApiError, OSError):
                await self._call(m.Release(id=self._new_id(), segment=ready.segment), m.Released)
            raise
        if self._generation != connection or not self.connected:
            # The daemon went away while the segment filled: it dropped the put with the old
            # connection (a commit on a new one would only find nothing waiting).
            raise ApiError(ErrorCode.SHUTTING_DOWN, "the daemon connection was lost during the put")
        return await self._call(m.PutCommit(id=self._new_id(), segment=ready.segment), m.PutResult)

    async def lookup(self, tokens: Any, fingerprint: ModelFingerprint, *, local_only: bool = False) -> m.LookupResult:
        """As :meth:`KVPeerClient.lookup`."""
        try:
            request = m.LookupRequest(id=self._new_id(), tokens=tokens, fingerprint=fingerprint,
                                      local_only=local_only)
        except ProtocolError as exc:
            raise ApiError(exc.code, exc.reason) from None
        return await self._call(request, m.LookupResult)

    def fetch(
        self, tokens: Any, fingerprint: ModelFingerprint, deadline_s: float | None = None,
        min_level: str | None = None, *, stream: bool = False,
        recompute_tokens_per_s: float | None = None, kv_from: int = 0, split: bool = False,
    ) -> _AsyncFetchStart:
        """``async with client.fetch(...) as result``: entering sends the request and, unless
        ``stream``, waits for the final answer; leaving releases the segment. The other
        arguments as :meth:`KVPeerClient.fetch`'s (``split`` needs ``stream``: the client
        prefills the head while the fetch runs)."""
        if split and not stream:
            raise ApiError(ErrorCode.INVALID, "split=True needs stream=True: the head is prefilled "
                           "while the fetch runs, not after its final answer")
        try:
            request = m.FetchRequest(
                id=self._new_id(), tokens=tokens, fingerprint=fingerprint, deadline_s=deadline_s,
                min_level=min_level, recompute_tokens_per_s=recompute_tokens_per_s, kv_from=kv_from,
                split=split,
            )
        except ProtocolError as exc:
            raise ApiError(exc.code, exc.reason) from None
        return _AsyncFetchStart(self, request, stream)

    async def stats(self) -> dict[str, Any]:
        return (await self._call(m.StatsRequest(id=self._new_id()), m.StatsResult)).stats

    async def peers(self) -> list[dict[str, Any]]:
        return (await self._call(m.PeersRequest(id=self._new_id()), m.PeersResult)).peers

    async def evict_all(self) -> dict[str, Any]:
        return (await self._call(m.EvictRequest(id=self._new_id(), all=True), m.EvictResult)).result

    async def close(self) -> None:
        self._closed = True
        if self._closed_reason is None:  # waiters hear why (the read loop only sees an EOF)
            self._closed_reason = ApiError(ErrorCode.SHUTTING_DOWN, "the client was closed")
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError, TimeoutError):  # releases queued by late answers
                await aio.wait_for(conn.flush(), 5.0)
            conn.close()
        task, self._reader_task = self._reader_task, None
        await _stop_reader(task)
        self._descriptors.close()

    async def __aenter__(self) -> AsyncKVPeerClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _AsyncFetchStart:
    """What ``AsyncKVPeerClient.fetch`` returns: ``async with`` it, or ``await`` it for a handle."""

    def __init__(self, client: AsyncKVPeerClient, request: m.FetchRequest, stream: bool) -> None:
        self._client = client
        self._request = request
        self._stream = stream
        self._handle: AsyncFetchHandle | None = None

    async def start(self) -> AsyncFetchHandle:
        await self._client._ensure_connected()
        state = _FetchState(self._request, self._client._descriptors)
        handle = AsyncFetchHandle(self._client, state, wait=not self._stream)
        self._client._route(self._request.id, handle._queue)
        try:
            await self._client._send(self._request)
        except BaseException as exc:
            self._client._unroute(self._request.id)
            # An ApiError: it never went out whole on a live connection. Else cancelled while
            # the written request drained: the daemon may have it, and its answer name a
            # segment to release, as for any fetch given up on.
            if not isinstance(exc, ApiError):
                handle._give_up()
            raise
        self._handle = handle
        return handle

    def __await__(self) -> Any:
        return self.start().__await__()

    async def __aenter__(self) -> AsyncFetchHandle:
        handle = await self.start()
        try:
            return await handle.__aenter__()
        except BaseException:
            await handle.release()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if self._handle is not None:
            await self._handle.release()


__all__ = [
    "AsyncFetchHandle",
    "AsyncKVPeerClient",
    "FetchHandle",
    "KVPeerClient",
    "default_socket_path",
]
