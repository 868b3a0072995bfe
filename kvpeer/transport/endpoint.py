"""A stand-alone transport endpoint for cluster tests and the transport benchmark.

``python -m kvpeer.transport.endpoint serve ...`` serves synthetic blobs (a fixed pool of
seeded random blobs, so the fetching side can check every byte) and answers ``cpu`` with its
own CPU seconds; it prints ``READY <port>`` once listening. ``... fetch ...`` connects, fetches
``--count`` blobs with ``--parallel`` in flight, verifies them and prints one JSON line with
bytes, seconds and both ends' CPU seconds. Not used by the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import sys
import time
from typing import Any

from kvpeer import aio
from kvpeer.errors import ErrorCode, KVPeerError, ProtocolError
from kvpeer.transport.aiortc_patches import association_stats
from kvpeer.transport.config import TransportConfig
from kvpeer.transport.peer import PeerTransport
from kvpeer.transport.session import PeerSession

POOL = 4


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_pool(blob_bytes: int) -> list[bytes]:
    return [random.Random(i).randbytes(blob_bytes) for i in range(POOL)]


class SyntheticHandler:
    def __init__(self, blob_bytes: int) -> None:
        self.pool = make_pool(blob_bytes)
        self.transport: PeerTransport | None = None

    async def handle_request(
        self, peer_id: str, method: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if method == "cpu":
            session = self.transport.session(peer_id) if self.transport else None
            stats: dict[str, Any] = association_stats(session._pc) if session is not None else {}
            return {"cpu_s": cpu_seconds(), "sctp": stats}
        if method == "echo":
            return body
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, method)

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        index = int.from_bytes(key[-4:], "big")
        return self.pool[index % POOL]


def _config(args: argparse.Namespace) -> TransportConfig:
    tuning: dict[str, Any] = {}
    if args.receive_window is not None:
        tuning["receive_window_bytes"] = args.receive_window
    return TransportConfig(
        host=args.host,
        port=args.port,
        psk=bytes.fromhex(args.psk_hex),
        allow_loopback=args.host.startswith("127."),
        patch_aiortc=not args.stock,
        heartbeat_interval_s=args.heartbeat,
        peer_dead_after_s=args.dead_after,
        max_blob_bytes=max(args.blob_bytes, 1) * 2,
        request_timeout_s=args.request_timeout,
        bulk_channels=args.bulk_channels,
        buffer_high_bytes=args.buffer_high,
        congestion_control=args.cc,
        **tuning,
    )


async def serve(args: argparse.Namespace) -> None:
    down = asyncio.Event()
    handler = SyntheticHandler(args.blob_bytes)
    transport = PeerTransport(args.node_id, _config(args), handler, lambda _: down.set())
    handler.transport = transport
    await transport.start()
    print(f"READY {transport.port}", flush=True)
    try:
        async with asyncio.TaskGroup() as group:
            tracer = group.create_task(trace(transport, args.trace)) if args.trace else None
            # Runs until killed; stdin closing (the parent went away) ends it too.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.read)
            if tracer is not None:
                tracer.cancel()
    finally:
        await transport.close()


async def trace(transport: PeerTransport, path: str, interval_s: float = 0.02) -> None:
    """Append every session's SCTP congestion state to *path* (JSON lines) until cancelled."""
    t0 = time.monotonic()
    out = await asyncio.to_thread(open, path, "a")
    try:
        while True:
            await asyncio.sleep(interval_s)
            for session in transport.sessions():
                stats = association_stats(session._pc)
                if stats:
                    row = {"t": round(time.monotonic() - t0, 4), "peer": session.peer_id}
                    out.write(json.dumps(row | stats) + "\n")  # buffered: a debugging aid
    finally:
        out.close()


async def fetch(args: argparse.Namespace) -> dict[str, Any]:
    down_at: list[float] = []
    transport = PeerTransport(
        args.node_id,
        _config(args),
        SyntheticHandler(0),
        lambda _: down_at.append(time.monotonic()),
    )
    pool = make_pool(args.blob_bytes)
    await transport.start()
    result: dict[str, Any] = {"ok": False}
    try:
        try:
            session = await transport.connect(args.peer_id, args.peer_host, args.peer_port)
        except KVPeerError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print("CONNECTED", flush=True)
        remote_cpu0 = (await session.request("cpu", {}))["cpu_s"]
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        verified = 0
        next_index = 0
        failures: list[str] = []

        async def worker() -> None:
            nonlocal verified, next_index
            while next_index < args.count:
                index = next_index
                next_index += 1
                key = b"blob" + index.to_bytes(4, "big")
                try:
                    blob = await session.fetch_blob(key, "")
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                if blob != pool[index % POOL]:
                    failures.append(f"blob {index} differs")
                    return
                if verified == 0:
                    print("FIRST", flush=True)  # tests wait for a transfer in progress
                verified += len(blob)

        await asyncio.gather(*(worker() for _ in range(args.parallel)))
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        result = {"ok": not failures, "failures": failures[:5], "bytes_verified": verified,
                  "seconds": seconds, "cpu_receiver_s": cpu, "packet_bytes": session.packet_bytes,
                  "rtt_s": session.rtt_s}  # fmt: skip
        if not failures:
            remote = await session.request("cpu", {})
            result["cpu_sender_s"] = remote["cpu_s"] - remote_cpu0
            result["sender_sctp"] = remote.get("sctp")
        elif down_at:
            result["down_after_s"] = down_at[0] - (t0 + 0.0)
    finally:
        await transport.close()
    return result


async def watch(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, then report when the peer is declared down (monotonic clock, system-wide)."""
    down = asyncio.Event()
    transport = PeerTransport(
        args.node_id, _config(args), SyntheticHandler(0), lambda _: down.set()
    )
    await transport.start()
    fetched = 0

    async def keep_fetching(session: PeerSession) -> None:
        nonlocal fetched
        while True:
            try:
                await session.fetch_blob(b"blob" + fetched.to_bytes(4, "big"), "")
            except KVPeerError:
                return  # the transfer in flight fails when the peer dies: expected
            fetched += 1
            if fetched == 1:
                print("FIRST", flush=True)

    try:
        session = await transport.connect(args.peer_id, args.peer_host, args.peer_port)
        print("CONNECTED", flush=True)
        async with asyncio.TaskGroup() as group:
            busy = group.create_task(keep_fetching(session)) if args.busy else None
            await aio.wait_for(down.wait(), args.request_timeout)
            down_at = time.monotonic()
            if busy is not None:
                busy.cancel()
        return {"ok": True, "down_at": down_at, "blobs_before_down": fetched}
    finally:
        await transport.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpeer.transport.endpoint")
    parser.add_argument("role", choices=["serve", "fetch", "watch"])
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--psk-hex", required=True)
    parser.add_argument("--blob-bytes", type=int, default=4 << 20)
    parser.add_argument("--stock", action="store_true", help="aiortc as shipped (no patches)")
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--dead-after", type=float, default=2.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--busy", action="store_true", help="watch: fetch while watching")
    parser.add_argument("--peer-id")
    parser.add_argument("--peer-host")
    parser.add_argument("--peer-port", type=int)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--bulk-channels", type=int, default=1)
    parser.add_argument("--buffer-high", type=int, default=4 << 20, help="flow control")
    parser.add_argument(
        "--cc", choices=["rate", "reno"], default="rate", help="SCTP congestion control"
    )
    parser.add_argument("--receive-window", type=int, help="SCTP rwnd bytes (default: config's)")
    parser.add_argument("--trace", help="serve: append SCTP congestion state to this file")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--log", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log, stream=sys.stderr)
    run: Any = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    if args.role == "serve":
        run(serve(args))
    else:
        print(json.dumps(run(fetch(args) if args.role == "fetch" else watch(args))), flush=True)


if __name__ == "__main__":
    main()
