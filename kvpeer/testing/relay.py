"""User-space impairment relay: delay, loss and reordering between two namespaces.

The kernel here has no netem, so a :class:`~kvpeer.testing.netns.Cluster` built with
``relay=True`` routes the two hosts through a router namespace in which every packet
crosses this program: the router's policy routes send what arrives from host A into TUN
device ``tuna`` and what arrives from B into ``tunb``; the relay reads a packet from one,
decides (:class:`Impairment`, sans-IO, seeded) whether to drop it and when to release it, and
writes it into the other TUN device, from where the kernel forwards it on. It works for any
protocol and port (ICE, DTLS, TCP signalling alike) without touching the endpoints.

Run as ``python -m kvpeer.testing.relay --delay-ms 20 --loss 1 ...`` inside the router
namespace; it prints ``READY`` once attached and, on SIGTERM, one JSON line with packet counts
and its own CPU seconds (so benchmarks report the relay's cost apart).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import heapq
import json
import os
import random
import resource
import signal
import struct
import sys
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_MAX_PACKET = 65_536


@dataclass(slots=True)
class Impairment:
    """Per-direction packet fate: drop with ``loss`` probability, else release after
    ``delay_s`` (+ ``reorder_extra_s`` for a ``reorder`` fraction, which overtakes nothing but
    is overtaken: the packets behind it arrive first)."""

    delay_s: float = 0.0
    loss: float = 0.0  # probability in [0, 1]
    reorder: float = 0.0  # probability in [0, 1]
    reorder_extra_s: float = 0.002
    seed: int = 1
    _rng: random.Random = field(init=False)
    _queue: list[tuple[float, int, bytes]] = field(init=False, default_factory=list)
    _seq: int = field(init=False, default=0)
    passed: int = field(init=False, default=0)
    dropped: int = field(init=False, default=0)
    reordered: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not (0 <= self.loss <= 1 and 0 <= self.reorder <= 1 and self.delay_s >= 0):
            raise ValueError("loss/reorder in [0, 1], delay >= 0")
        self._rng = random.Random(self.seed)

    def submit(self, packet: bytes, now: float) -> None:
        if self.loss and self._rng.random() < self.loss:
            self.dropped += 1
            return
        release = now + self.delay_s
        if self.reorder and self._rng.random() < self.reorder:
            release += self.reorder_extra_s
            self.reordered += 1
        self._seq += 1
        heapq.heappush(self._queue, (release, self._seq, packet))

    def due(self, now: float) -> list[bytes]:
        """Packets whose release time has come, in release order."""
        out = []
        while self._queue and self._queue[0][0] <= now:
            out.append(heapq.heappop(self._queue)[2])
        self.passed += len(out)
        return out

    def next_release(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)


def open_tun(name: str) -> int:
    """Attach to the existing TUN device *name* (created with ``ip tuntap``); non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class _Direction:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: int, dst: int, imp: Impairment
    ) -> None:
        self.loop, self.src, self.dst, self.imp = loop, src, dst, imp
        self.timer: asyncio.TimerHandle | None = None
        self.write_errors = 0
        loop.add_reader(src, self.readable)

    def readable(self) -> None:
        now = self.loop.time()
        # Drain everything queued: one wake-up per burst, not per packet.
        for _ in range(256):
            try:
                packet = os.read(self.src, _MAX_PACKET)
            except BlockingIOError:
                break
            self.imp.submit(packet, now)
        self.flush()

    def flush(self) -> None:
        self.timer = None
        for packet in self.imp.due(self.loop.time()):
            try:
                os.write(self.dst, packet)
            except OSError:
                self.write_errors += 1  # the TUN queue was full: counts as loss
        release = self.imp.next_release()
        if release is not None and self.timer is None:
            self.timer = self.loop.call_at(release, self.flush)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    fd_a, fd_b = open_tun(args.tun_a), open_tun(args.tun_b)

    def impairment(seed: int) -> Impairment:
        return Impairment(
            delay_s=args.delay_ms / 1000, loss=args.loss / 100, reorder=args.reorder / 100,
            reorder_extra_s=args.reorder_extra_ms / 1000, seed=seed,
        )  # fmt: skip

    a_to_b = _Direction(loop, fd_a, fd_b, impairment(args.seed))
    b_to_a = _Direction(loop, fd_b, fd_a, impairment(args.seed + 1))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("READY", flush=True)
    await stop.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "passed": a_to_b.imp.passed + b_to_a.imp.passed,
        "dropped": a_to_b.imp.dropped + b_to_a.imp.dropped,
        "reordered": a_to_b.imp.reordered + b_to_a.imp.reordered,
        "write_errors": a_to_b.write_errors + b_to_a.write_errors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpeer.testing.relay")
    parser.add_argument("--tun-a", default="tuna")
    parser.add_argument("--tun-b", default="tunb")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one way, each direction")
    parser.add_argument("--loss", type=float, default=0.0, help="percent, each direction")
    parser.add_argument("--reorder", type=float, default=0.0, help="percent held back")
    parser.add_argument("--reorder-extra-ms", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(_run(args))
    except ImportError:
        result = asyncio.run(_run(args))
    print(json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
