"""The local API's Unix socket, with segment descriptors sent along (``SCM_RIGHTS``).

Owns how a segment reaches its client: the daemon sends an open descriptor of the segment's
file with the message that names it (:class:`~kvpeer.api.messages.SegmentReady`,
:class:`~kvpeer.api.messages.FetchStarted`), so segment files stay the daemon's own (mode 0600)
and no other local user can open them, whatever groups they share.

Wire rule: a frame that announces a segment is written in one ``sendmsg`` carrying exactly one
descriptor, once nothing written before it is still queued, so the descriptor rides on the
frame's first bytes and reaches the receiver no later than they do (Linux ends a read at the
end of bytes that carried descriptors, so one read brings at most one frame's; a read with too
little room for descriptors loses them, ``MSG_CTRUNC``). The receiver reads with ``recvmsg``,
keeps what arrives in order (:class:`SegmentDescriptors`), and each announcing frame, decoded
in stream order, takes the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from kvpeer import aio
from kvpeer.api import messages as m
from kvpeer.errors import ErrorCode, ProtocolError

#: Descriptors one read may bring: one (a read ends with the bytes that carried them). Room
#: for a few more costs nothing and tells a misbehaving sender from a short buffer.
MAX_DESCRIPTORS_PER_READ = 8
# How often a descriptor's frame checks that the client read everything before it: from 1 ms,
# doubling to 50 ms (a client that reads answers is there at once; one that does not costs
# few wake-ups until the send times out).
_POLL_FIRST_S, _POLL_MAX_S = 0.001, 0.05


# A Unix socket's connect does not queue for room in a full listen backlog when the socket is
# non-blocking (as Python makes one with a timeout, and asyncio every one): Linux answers EAGAIN
# at once. A burst of clients (an engine's workers starting together) meets that while the
# daemon accepts the earlier ones; each tries again, from 1 ms doubling to 50 ms, within its
# timeout: a daemon that accepts nothing for that long is answered BUSY.
def _backlog_full(exc: BlockingIOError) -> bool:
    return exc.errno == errno.EAGAIN


def _busy(path: str, timeout_s: float) -> ProtocolError:
    return ProtocolError(
        ErrorCode.BUSY,
        f"the daemon at {path} is busy: its listen backlog stayed full for {timeout_s:g}s "
        "(more clients connecting at once than it accepts)",
    )


def _connect_tries(sock: socket.socket, path: str, timeout_s: float) -> Iterator[float]:
    """Connect ``sock`` to ``path``, yielding how long to wait before each new try while the
    listen backlog is full; ProtocolError(BUSY) past ``timeout_s``. Other failures raise what
    ``connect`` raises (the daemon is not there: FileNotFoundError, ConnectionRefusedError).
    A Unix socket's connect never waits: it is done, refused or EAGAIN at once."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_FIRST_S
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError as exc:
            if not _backlog_full(exc):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise _busy(path, timeout_s)
        yield min(pause, left)
        pause = min(2 * pause, _POLL_MAX_S)


def connect_blocking(sock: socket.socket, path: str, timeout_s: float) -> None:
    """Connect ``sock`` to the daemon's socket ``path`` (see :func:`_connect_tries`)."""
    for pause in _connect_tries(sock, path, timeout_s):
        time.sleep(pause)


async def _connect(sock: socket.socket, path: str, timeout_s: float) -> None:
    """As :func:`connect_blocking`, for a non-blocking socket (asyncio's ``sock_connect`` takes
    EAGAIN for a connect in progress and waits for writable: a Unix socket left unconnected is
    writable at once, so it reported a connection that was never made)."""
    for pause in _connect_tries(sock, path, timeout_s):
        await asyncio.sleep(pause)


def receive(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """Up to ``size`` bytes and the descriptors sent with them (close-on-exec). Raises what
    ``recvmsg`` raises (``BlockingIOError`` on a non-blocking socket with nothing to read)."""
    data, fds, flags, _ = socket.recv_fds(sock, size, MAX_DESCRIPTORS_PER_READ, socket.MSG_CMSG_CLOEXEC)
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        if not fds:  # the kernel could not install the one that came
            raise ProtocolError(
                ErrorCode.INTERNAL,
                "a segment descriptor from the daemon was lost: this process is out of file "
                "descriptors (raise its RLIMIT_NOFILE, ulimit -n)",
            )
        raise ProtocolError(ErrorCode.MALFORMED, "more segment descriptors in one read than any answer sends")
    return data, fds


def unread(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """What came on ``sock`` and was not read yet, up to ``limit`` bytes, without waiting: the
    last words of a daemon that closed the connection (a refusal sent before it did). The
    descriptors that came with them are closed."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout, Python would wait for readable first
    out = bytearray()
    try:
        while len(out) < limit:
            try:
                data, fds = receive(sock, limit - len(out))
            except (OSError, ProtocolError):  # nothing more now, or the reset after the last bytes
                break
            close_all(fds)
            if not data:
                break
            out += data
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)
    return bytes(out)


def close_all(fds: Any) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def send_with_descriptor(writer: asyncio.StreamWriter, data: bytes, fd: int, *, timeout_s: float) -> None:
    """Write the frame ``data`` with ``fd`` on its first bytes, once the client has read every
    byte sent before it (the server's side; the caller serialises writes on this connection).

    Waiting for the client to read, not only for our queue to drain, keeps at most one unread
    descriptor per connection: descriptors in flight count against the daemon's RLIMIT_NOFILE,
    and past it every send of one fails (ETOOMANYREFS), for every client. TimeoutError if the
    client reads nothing for ``timeout_s``; BUSY if the kernel refuses the descriptor anyway."""
    transport = writer.transport
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    raw = writer.get_extra_info("socket")
    if raw is None or transport.is_closing():
        raise ConnectionResetError("the connection is closed")
    pause = _POLL_FIRST_S
    # The transport has no sendmsg with ancillary data: write through our own handle of the
    # same socket, only while the transport has nothing queued (else this would overtake it).
    with socket.socket(fileno=os.dup(raw.fileno())) as sock:
        while True:
            if transport.is_closing():
                raise ConnectionResetError("the connection is closed")
            if transport.get_write_buffer_size() == 0 and _unread_bytes(sock) == 0:
                try:
                    sent = socket.send_fds(sock, [data], [fd])
                    break
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    if exc.errno != errno.ETOOMANYREFS:
                        raise
                    raise ProtocolError(
                        ErrorCode.BUSY, "too many segment descriptors in flight to clients: try again"
                    ) from None
            if loop.time() >= deadline:
                raise TimeoutError(f"the client read nothing for {timeout_s}s")
            await asyncio.sleep(pause)
            pause = min(2 * pause, _POLL_MAX_S)
    if sent < len(data):  # the descriptor went with the first bytes: the rest queues as usual
        writer.write(data[sent:])


def _unread_bytes(sock: socket.socket) -> int:
    """What was sent on ``sock`` and its peer has not read yet, 0 when it read all (SIOCOUTQ,
    which is TIOCOUTQ; Linux: in memory used, not bytes)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int(struct.unpack("i", raw)[0])


class SegmentDescriptors:
    """The client's descriptors: arrived, then paired with the message that announces each
    segment; each is closed when taken and mapped, dropped, or with the connection."""

    def __init__(self) -> None:
        self._arrived: deque[int] = deque()
        self._by_segment: dict[str, int] = {}

    def arrived(self, fds: list[int]) -> None:
        self._arrived.extend(fds)

    def on_message(self, message: m.Message) -> None:
        """Pair ``message`` (decoded in arrival order) with its descriptor, if it announces a
        segment; MALFORMED if none came (a daemon older than this client)."""
        if not isinstance(message, m.SegmentReady | m.FetchStarted):
            return
        if not self._arrived:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"segment {message.segment} came without its descriptor: is the daemon older "
                "than this client? (upgrade both together)",
            )
        self.discard(message.segment)  # a name announced twice: keep the newest
        self._by_segment[message.segment] = self._arrived.popleft()

    def take(self, segment: str) -> int:
        """The descriptor of ``segment``, now the caller's to close; MALFORMED if none came."""
        fd = self._by_segment.pop(segment, None)
        if fd is None:
            raise ProtocolError(ErrorCode.MALFORMED, f"no descriptor came for segment {segment}")
        return fd

    def discard(self, segment: str) -> None:
        """Close ``segment``'s descriptor, if it is still here (an answer given up on)."""
        fd = self._by_segment.pop(segment, None)
        if fd is not None:
            close_all([fd])

    def close(self) -> None:
        close_all(self._arrived)
        close_all(self._by_segment.values())
        self._arrived.clear()
        self._by_segment.clear()

    def __len__(self) -> int:
        return len(self._arrived) + len(self._by_segment)


class AsyncUnixConnection:
    """A client's connection to the daemon for asyncio: bytes and descriptors in, whole frames
    out in order. A frame being written is finished even when its sender stops waiting (a
    timeout, a cancel): half a frame would leave the stream unusable."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._last_write: asyncio.Future[None] | None = None
        self._writes: set[asyncio.Future[None]] = set()  # not done yet: cancelled by close()
        self._readable: asyncio.Future[None] | None = None  # what a read waits on

    @classmethod
    async def open(cls, path: str, *, timeout_s: float = 10.0) -> AsyncUnixConnection:
        """Connect to ``path``; a full listen backlog is tried again for up to ``timeout_s``,
        then ProtocolError(BUSY)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await _connect(sock, path, timeout_s)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def read(self, size: int) -> tuple[bytes, list[int]]:
        """Up to ``size`` bytes (b"" at the end) and the descriptors that came with them."""
        while True:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                return receive(self._sock, size)
            ready = self._readable = self._loop.create_future()
            fileno = self._sock.fileno()
            self._loop.add_reader(fileno, _set_once, ready)
            try:
                await ready
            finally:
                self._readable = None
                if self._sock.fileno() == fileno:  # not closed meanwhile (the number may be reused)
                    self._loop.remove_reader(fileno)

    async def write(self, data: bytes) -> None:
        """Send ``data`` after every frame written before it."""
        await asyncio.shield(self._queue(data))

    def write_soon(self, data: bytes) -> None:
        """Send ``data`` after every frame written before it, without waiting (errors end the
        connection for the next reader or writer to find)."""
        self._queue(data).add_done_callback(aio.ignore_outcome)

    def _queue(self, data: bytes) -> asyncio.Future[None]:
        job = asyncio.ensure_future(self._write_after(self._last_write, data))
        self._last_write = job
        self._writes.add(job)
        job.add_done_callback(self._writes.discard)
        return job

    async def _write_after(self, previous: asyncio.Future[None] | None, data: bytes) -> None:
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:  # the stream may hold half of that frame
                raise ConnectionResetError("an earlier write on this connection failed")
        await self._loop.sock_sendall(self._sock, data)

    async def flush(self) -> None:
        """Wait until every frame written so far has left (or failed)."""
        if self._last_write is not None:
            await asyncio.wait([self._last_write])

    def close(self) -> None:
        """Close at once: writes still queued are cancelled, a read waiting fails."""
        fileno = self._sock.fileno()
        if fileno >= 0:
            # Unregister before the number is freed: a registration left behind would meet the
            # next socket given that number (epoll no longer knows it: ENOENT on its first use).
            self._loop.remove_reader(fileno)
            self._loop.remove_writer(fileno)
        for job in list(self._writes):
            job.cancel()
        self._sock.close()
        if self._readable is not None:
            _set_once(self._readable)  # the read then finds the socket closed (OSError)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

