"""Engine hand-off: time from "last byte decoded" in the daemon to "tensor usable" in the client.

Two processes: a daemon-like server (the real ApiServer with a backend that "decodes" by
copying prepared KV into the fetch segment) and this client. For each KV size it compares

* shm: kvpeer's path -- the client maps the daemon's segment and views it with torch, no copy;
* socket: the KV bytes sent over a Unix socket into a buffer the client pre-allocated, then
  viewed with torch (one copy through the kernel, the best a socket can do).

Times are CLOCK_MONOTONIC stamps taken in both processes (the same clock on one host).
Also checks that the client's tensor really points inside the mapping (``zero_copy``) and that
no segment is left under /dev/shm afterwards (``leaked_segments``).

    python -m benchmarks.handoff [--tokens 256 1024 4096] [--repeat 7] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from kvpeer.api import messages as m
from kvpeer.hashing import ModelFingerprint

# SmolLM2-135M's KV geometry in fp16: 23 KiB per token.
FP = ModelFingerprint(name="bench", layers=30, kv_heads=3, head_dim=64, dtype="float16")
CHUNK = 256
MB = 1 << 20
SOCKET_BUFFER = 4 << 20
PAGE = 4096


def _kv_bytes(tokens: int) -> int:
    return 2 * FP.layers * FP.kv_heads * tokens * FP.head_dim * 2


# --------------------------------------------------------------------------- server process


class _Backend:
    """Restores prepared KV chunk by chunk, stamping the end of the last chunk's "decode"."""

    def __init__(self, stamps: Any) -> None:
        self.stamps = stamps
        self.source = torch.randn(FP.layers, FP.kv_heads, 8192, FP.head_dim).to(torch.float16)

    async def put(self, ctx: Any, req: Any, kv: Any) -> m.PutResult:
        raise NotImplementedError

    async def lookup(self, ctx: Any, req: Any) -> m.LookupResult:
        raise NotImplementedError

    async def fetch(self, ctx: Any, req: m.FetchRequest, sink: Any) -> None:
        tokens = len(req.tokens) // CHUNK * CHUNK
        await sink.allocate(layers=FP.layers, kv_heads=FP.kv_heads, head_dim=FP.head_dim,
                      tokens=tokens, dtype="float16", chunk_tokens=CHUNK)
        chunks = tokens // CHUNK
        for index in range(chunks):
            k, v = sink.chunk_view(index)
            k.copy_(self.source[:, :, index * CHUNK : (index + 1) * CHUNK])
            v.copy_(self.source[:, :, index * CHUNK : (index + 1) * CHUNK])
            if index == chunks - 1:
                self.stamps[0] = time.perf_counter_ns()
            # As the fetcher's decoding thread does: the daemon's copy into the client's
            # segment (it never maps one) is part of the hand-off measured.
            await asyncio.get_running_loop().run_in_executor(None, sink.chunk_decoded_blocking, index)
            await sink.chunk_done(index, "exact")

    async def stats(self) -> dict[str, Any]:
        return {}

    async def peers(self) -> list[dict[str, Any]]:
        return []


def _copy_server_blocking(listener: socket.socket, backend: _Backend, stamps: Any, stop: Any) -> None:
    """The baseline's server: a plain blocking socket with big buffers, sendall from the
    decoded bytes (no asyncio buffering, no extra copy in user space)."""
    with listener:
        listener.settimeout(1.0)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(ConnectionError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                while True:
                    header = conn.recv(4)
                    if len(header) < 4:
                        break
                    (tokens,) = struct.unpack(">I", header)
                    out = bytearray(_kv_bytes(tokens))
                    half = len(out) // 2
                    shape = (FP.layers, FP.kv_heads, tokens, FP.head_dim)
                    k = torch.frombuffer(out, dtype=torch.float16, count=half // 2).view(shape)
                    v = torch.frombuffer(out, dtype=torch.float16, count=half // 2, offset=half).view(shape)
                    k.copy_(backend.source[:, :, :tokens])
                    v.copy_(backend.source[:, :, :tokens])
                    stamps[1] = time.perf_counter_ns()
                    conn.sendall(memoryview(out))


def _server_main(directory: str, stamps: Any, ready: Any, stop: Any) -> None:
    from kvpeer.api.server import ApiServer

    async def main() -> None:
        backend = _Backend(stamps)
        api = ApiServer(Path(directory) / "api.sock", backend)  # type: ignore[arg-type]
        await api.start()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(Path(directory) / "copy.sock"))  # bound before "ready" is signalled
        listener.listen(1)
        copier = threading.Thread(
            target=_copy_server_blocking, args=(listener, backend, stamps, stop), daemon=True
        )
        copier.start()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await api.close()
        copier.join(10)

    asyncio.run(main())


# --------------------------------------------------------------------------- client side


def _recv_exactly_into(sock: socket.socket, buffer: bytearray) -> None:
    view = memoryview(buffer)
    got = 0
    while got < len(buffer):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("server closed")
        got += n


def _touch(t: torch.Tensor) -> int:
    """Read one byte per page: what an engine's first pass over the KV costs in page faults."""
    return int(t.reshape(-1).view(torch.uint8)[::PAGE].sum())


def _socket_handoff(sock: socket.socket, tokens: int, stamps: Any) -> tuple[float, float]:
    buffer = bytearray(_kv_bytes(tokens))  # allocated before the clock: the baseline's best case
    sock.sendall(struct.pack(">I", tokens))
    _recv_exactly_into(sock, buffer)
    half = len(buffer) // 2
    k = torch.frombuffer(buffer, dtype=torch.float16, count=half // 2)
    v = torch.frombuffer(buffer, dtype=torch.float16, count=half // 2, offset=half)
    usable = time.perf_counter_ns()
    _touch(k) + _touch(v)
    touched = time.perf_counter_ns()
    return (usable - stamps[1]) / 1e6, (touched - stamps[1]) / 1e6


def _shm_handoff(client: Any, tokens: int, stamps: Any) -> tuple[float, float, bool]:
    handle = client.fetch(list(range(tokens)), FP)
    k, v = handle.k, handle.v
    usable = time.perf_counter_ns()
    _touch(k) + _touch(v)
    touched = time.perf_counter_ns()
    zero_copy = handle.zero_copy() and handle.segment is not None and handle.segment.holds(k)
    assert k.shape[2] == tokens and v.shape[2] == tokens
    del k, v
    handle.release()
    return (usable - stamps[0]) / 1e6, (touched - stamps[0]) / 1e6, zero_copy


def _our_segments(pid: int) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"kvpeer-{pid}-")}


def run(token_sizes: list[int], repeat: int) -> dict[str, Any]:
    from kvpeer.api.client import KVPeerClient

    ctx = mp.get_context("spawn")
    stamps = ctx.Array("q", 2, lock=False)
    ready, stop = ctx.Event(), ctx.Event()
    directory = tempfile.mkdtemp(prefix="kvpho", dir="/tmp")
    server = ctx.Process(target=_server_main, args=(directory, stamps, ready, stop), daemon=True)
    server.start()
    rows: list[dict[str, Any]] = []
    zero_copy = True
    try:
        if not ready.wait(120):
            raise RuntimeError("benchmark server did not start")
        with KVPeerClient(Path(directory) / "api.sock") as client, socket.socket(socket.AF_UNIX) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.connect(str(Path(directory) / "copy.sock"))
            for tokens in token_sizes:
                shm_ms, shm_touch, sock_ms, sock_touch = [], [], [], []
                for _ in range(repeat + 1):  # the first round warms both paths up
                    took, touched, ok = _shm_handoff(client, tokens, stamps)
                    shm_ms.append(took)
                    shm_touch.append(touched)
                    zero_copy = zero_copy and ok
                    took, touched = _socket_handoff(sock, tokens, stamps)
                    sock_ms.append(took)
                    sock_touch.append(touched)
                mb = _kv_bytes(tokens) / MB
                shm_med, sock_med = statistics.median(shm_ms[1:]), statistics.median(sock_ms[1:])
                shm_t, sock_t = statistics.median(shm_touch[1:]), statistics.median(sock_touch[1:])
                rows.append({
                    "tokens": tokens, "mb": round(mb, 2),
                    "shm_ms": round(shm_med, 3), "socket_ms": round(sock_med, 3),
                    "shm_ms_per_mb": round(shm_med / mb, 4), "socket_ms_per_mb": round(sock_med / mb, 4),
                    "speedup": round(sock_med / shm_med, 2),
                    "shm_touched_ms": round(shm_t, 3), "socket_touched_ms": round(sock_t, 3),
                    "speedup_touched": round(sock_t / shm_t, 2),
                })
        leaked_live = len(_our_segments(server.pid or -1))
    finally:
        stop.set()
        server.join(60)
        if server.is_alive():
            server.kill()
        with contextlib.suppress(OSError):
            for name in ("api.sock", "copy.sock"):
                (Path(directory) / name).unlink(missing_ok=True)
            os.rmdir(directory)
    leaked = max(leaked_live, len(_our_segments(server.pid or -1)))
    largest = rows[-1]
    return {
        "rows": rows,
        "zero_copy": zero_copy,
        "speedup_vs_socket_copy": largest["speedup"],
        "speedup_vs_socket_copy_touched": largest["speedup_touched"],
        "leaked_segments": leaked,
        "handoff_ms_per_mb": largest["shm_ms_per_mb"],
        "socket_copy_ms_per_mb": largest["socket_ms_per_mb"],
        "largest_mb": largest["mb"],
        "repeat": repeat,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 8192],
                        help="prefix lengths (multiples of 256, at most 8192)")
    parser.add_argument("--repeat", type=int, default=7, help="measured rounds per size (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if any(t % CHUNK or not 0 < t <= 8192 for t in args.tokens):
        parser.error("--tokens must be multiples of 256 in [256, 8192]")
    result = run(sorted(args.tokens), args.repeat)
    print("hand-off = last byte decoded in the daemon -> tensor usable in the client (median);")
    print("+touch   = the same, then one read per 4 KiB page of K and V (first-use page faults)")
    print(f"{'tokens':>7} {'MB':>7} {'shm ms':>9} {'socket ms':>10} {'shm ms/MB':>10} "
          f"{'sock ms/MB':>11} {'speedup':>8} {'shm+touch':>10} {'sock+touch':>11} {'speedup':>8}")
    for row in result["rows"]:
        print(f"{row['tokens']:>7} {row['mb']:>7.2f} {row['shm_ms']:>9.3f} {row['socket_ms']:>10.3f} "
              f"{row['shm_ms_per_mb']:>10.4f} {row['socket_ms_per_mb']:>11.4f} {row['speedup']:>7.1f}x "
              f"{row['shm_touched_ms']:>10.3f} {row['socket_touched_ms']:>11.3f} "
              f"{row['speedup_touched']:>7.1f}x")
    print(f"zero copy (pointer inside the mapping): {result['zero_copy']}; "
          f"leaked segments: {result['leaked_segments']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
