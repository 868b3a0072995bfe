"""A tiny in-memory ApiBackend and a server running in a thread, for API tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import torch

from kvpeer import shm
from kvpeer.api import messages as m
from kvpeer.api.server import ApiServer, ClientContext, FetchSink, PutKV
from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.hashing import ModelFingerprint, chunk_keys

CHUNK = 4
_M = TypeVar("_M", bound=m.Message)
FP = ModelFingerprint(name="tiny", layers=2, kv_heads=3, head_dim=8, dtype="float32")


def kv(
    tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (FP.layers, FP.kv_heads, tokens, FP.head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


class FakeBackend:
    """Keeps exact chunks in a dict keyed by chunk key; can be told to stall or fail."""

    def __init__(self, chunk_tokens: int = CHUNK) -> None:
        self.chunk_tokens = chunk_tokens
        self.chunks: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fetches = 0
        self.requests: list[m.Message] = []  # put and fetch requests as the backend got them
        self.stall_after: int | None = None  # stop before restoring this chunk (until cancelled)
        self.fail_fetch = False
        self.fail_after_allocate = False
        self.release_stall = asyncio.Event()
        self.split_head = 0  # chunks a fetch asking for a split leaves to its client

    def _keys(self, ctx: ClientContext, tokens: Any, fp: ModelFingerprint) -> list[bytes]:
        return chunk_keys(tokens, fp.digest(), ctx.namespace, self.chunk_tokens)

    async def put(self, ctx: ClientContext, req: m.PutRequest, kv: PutKV) -> m.PutResult:
        self.requests.append(req)
        keys = self._keys(ctx, req.tokens, req.fingerprint)
        stored = 0
        for i, key in enumerate(keys):
            if key not in self.chunks and i * self.chunk_tokens >= req.kv_from:
                self.chunks[key] = kv.read_blocking(i * self.chunk_tokens, (i + 1) * self.chunk_tokens)
                stored += 1
        return m.PutResult(chunks=len(keys), stored=stored, chunk_tokens=self.chunk_tokens)

    def _available(
        self, ctx: ClientContext, tokens: Any, fp: ModelFingerprint, first_chunk: int = 0
    ) -> list[bytes]:
        out = []
        for key in self._keys(ctx, tokens, fp)[first_chunk:]:
            if key not in self.chunks:
                break
            out.append(key)
        return out

    async def lookup(self, ctx: ClientContext, req: m.LookupRequest) -> m.LookupResult:
        self.requests.append(req)
        keys = self._available(ctx, req.tokens, req.fingerprint)  # all local: local_only or not
        return m.LookupResult(
            matched_tokens=len(keys) * self.chunk_tokens,
            chunk_tokens=self.chunk_tokens,
            sources=["local"] * len(keys),
        )

    async def fetch(self, ctx: ClientContext, req: m.FetchRequest, sink: FetchSink) -> None:
        self.fetches += 1
        self.requests.append(req)
        if self.fail_fetch:
            raise ProtocolError(ErrorCode.NOT_FOUND, "told to fail")
        first = req.kv_from // self.chunk_tokens
        if req.split and self.split_head:
            sink.leave_head(self.split_head)
            first += self.split_head
        keys = self._available(ctx, req.tokens, req.fingerprint, first)
        if not keys:
            return
        first_k = self.chunks[keys[0]][0]
        fp = req.fingerprint
        await sink.allocate(
            layers=fp.layers,
            kv_heads=fp.kv_heads,
            head_dim=fp.head_dim,
            tokens=len(keys) * self.chunk_tokens,
            dtype=first_k.dtype,
            chunk_tokens=self.chunk_tokens,
        )
        if self.fail_after_allocate:
            await sink.flush()  # the segment announcement is out: the client maps it
            raise ProtocolError(ErrorCode.INTEGRITY, "told to fail after allocating")
        for i, key in enumerate(keys):
            if self.stall_after is not None and i >= self.stall_after:
                await self.release_stall.wait()
            k_view, v_view = sink.chunk_view(i)
            k_view.copy_(self.chunks[key][0])
            v_view.copy_(self.chunks[key][1])
            await sink.chunk_done(i, "exact")

    async def stats(self) -> dict[str, Any]:
        return {"chunks": len(self.chunks), "fetches": self.fetches}

    async def peers(self) -> list[dict[str, Any]]:
        return [{"node_id": "peer-1", "chunks": 3}]

    async def evict(self, ctx: ClientContext, *, all: bool) -> dict[str, Any]:
        dropped = len(self.chunks)
        self.chunks.clear()
        return {"evicted": dropped}


class ServerThread:
    """An ApiServer on its own event loop in a thread, so blocking clients can call it."""

    def __init__(self, backend: FakeBackend, **kwargs: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvpapi", dir="/tmp"))
        self.socket_path = self.dir / "api.sock"
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.server = ApiServer(self.socket_path, backend, **kwargs)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.backend.release_stall = asyncio.Event()
        await self.server.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)


class ScriptedDaemon:
    """A fake daemon on a Unix socket that speaks the wire format and does what a test says,
    faults included (stop reading, drop a connection, answer late), for client tests.

    Each connection is served in its own thread; ``handle`` answers one message (override it).
    ``seen`` holds every message received, with the number of the connection it came on.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvpfake", dir="/tmp"))
        self.socket_path = self.dir / "api.sock"
        self.seen: list[tuple[int, m.Message]] = []
        self._changed = threading.Condition()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.socket_path))
        self._server.listen(8)
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        """Answer ``message`` from connection number ``index`` (default: hello and release)."""
        if isinstance(message, m.Hello):
            send(conn, m.HelloOk(id=message.id))
        elif isinstance(message, m.Release):
            send(conn, m.Released(id=message.id))

    def wait_for(self, kind: type[_M], count: int = 1, timeout_s: float = 10.0) -> list[_M]:
        """Block until ``count`` messages of ``kind`` have come; returns them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._received(kind)) >= count, timeout_s):
                raise TimeoutError(f"{count} {kind.TYPE} message(s) not received in time")
            return self._received(kind)

    def received(self, kind: type[_M]) -> list[_M]:
        with self._changed:
            return self._received(kind)

    def _received(self, kind: type[_M]) -> list[_M]:
        return [msg for _, msg in self.seen if isinstance(msg, kind)]

    def drop(self, index: int) -> None:
        """Close connection ``index`` as a daemon that exits does."""
        with self._changed:
            conn = self._conns[index]
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._changed:
                index = len(self._conns)
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        decoder = m.FrameDecoder()
        with contextlib.suppress(OSError):
            while conn.fileno() != -1:
                data = conn.recv(1 << 16)
                if not data:
                    return
                decoder.feed(data)
                for frame in decoder.frames():
                    assert isinstance(frame, bytes)
                    message = m.decode_body(frame)
                    with self._changed:
                        self.seen.append((index, message))
                        self._changed.notify_all()
                    self.handle(conn, index, message)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        self._server.close()
        with self._changed:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._accepting.join(10)
        for thread in self._threads:
            thread.join(10)
        for conn in conns:
            conn.close()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
            os.rmdir(self.dir)


def send(conn: socket.socket, message: m.Message, segment: shm.DaemonSegment | None = None) -> None:
    """Send ``message``; with ``segment``, its descriptor goes along, as the daemon sends it."""
    if segment is None:
        conn.sendall(m.encode(message))
        return
    fd = segment.duplicate_descriptor()
    try:
        data = m.encode(message)
        sent = socket.send_fds(conn, [data], [fd])
        conn.sendall(data[sent:])
    finally:
        os.close(fd)


def small_segment(tokens: int = 4) -> shm.DaemonSegment:
    """A real segment in /dev/shm for a scripted daemon to hand out (unlink and close it)."""
    return shm.DaemonSegment.create(
        shm.SegmentLayout(dtype=FP.dtype, layers=FP.layers, kv_heads=FP.kv_heads, tokens=tokens,
                          head_dim=FP.head_dim, chunk_tokens=4)
    )


def our_segments() -> set[str]:
    """Segments created by this process (the in-test server names them with our pid)."""
    prefix = f"kvpeer-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition the test cannot await (a file vanishing), failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(chunk_tokens: int = CHUNK, **kwargs: Any) -> Iterator[ServerThread]:
    with ServerThread(FakeBackend(chunk_tokens), **kwargs) as server:
        yield server
