"""A conversation's turns through a real daemon: whole prompts vs ``kv_from``.

Each turn of a chat re-sends the whole history. An engine that puts every turn's KV copied
the whole history out and through shared memory every turn (quadratic in the conversation);
with ``kv_from`` it gives only the KV past the chunks the daemon holds. Likewise a fetch by an
engine whose own prefix cache holds the history restored all of it; with ``kv_from`` only the
new chunks are decoded and handed over.

One daemon on loopback (no peers), SmolLM2-135M's KV geometry in fp16 (random values), the
daemon's default level. Two conversations of the same shape with different tokens run side by
side: one whole, one with ``kv_from``, each run first in turn. Times are the client's wall clock
per call (median over ``--repeat`` conversations). Turn 1 is the same work in both: the control.

    python -m benchmarks.conversation [--turns 8] [--turn-tokens 512] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvpeer.api.client import AsyncKVPeerClient
from kvpeer.config import load_config
from kvpeer.daemon import Daemon
from kvpeer.hashing import ModelFingerprint

FP = ModelFingerprint(name="bench-conversation", layers=30, kv_heads=3, head_dim=64, dtype="float16",
                      rope_theta=1e5)
CHUNK = 256
MB = 1 << 20


def _kv_bytes(tokens: int) -> int:
    return 2 * FP.layers * FP.kv_heads * tokens * FP.head_dim * 2


def _config(directory: Path) -> Path:
    path = directory / "kvpeer.toml"
    path.write_text(
        f'[node]\nnode_id = "bench"\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n'
        '[transport]\nhost = "127.0.0.1"\nallow_loopback = true\nport = 0\n'
        '[discovery]\nbackend = "static"\ninterfaces = ["127.0.0.1"]\n'
        f'[codec]\nchunk_tokens = {CHUNK}\n'
    )
    return path


async def _conversation(client: AsyncKVPeerClient, first_token: int, turns: int, turn_tokens: int,
                        kv: tuple[torch.Tensor, torch.Tensor], *, use_kv_from: bool) -> list[dict[str, float]]:
    """One conversation; per turn: the put's and the fetch's seconds and KV bytes moved."""
    rows = []
    for turn in range(1, turns + 1):
        tokens = list(range(first_token, first_token + turn * turn_tokens))
        held = (turn - 1) * turn_tokens // CHUNK * CHUNK  # the daemon's chunks from the last turn
        put_from = held if use_kv_from else 0
        started = time.perf_counter()
        await client.put(tokens, kv[0][:, :, put_from : len(tokens)], kv[1][:, :, put_from : len(tokens)],
                         FP, kv_from=put_from)
        put_s = time.perf_counter() - started
        # Another engine that computed the last turn itself asks for this one's prefix.
        fetch_from = (turn - 1) * turn_tokens if use_kv_from else 0
        started = time.perf_counter()
        async with client.fetch(tokens, FP, kv_from=fetch_from) as result:
            restored = result.matched_tokens - result.first_token
            assert result.matched_tokens == len(tokens) // CHUNK * CHUNK
        fetch_s = time.perf_counter() - started
        rows.append({"turn": turn, "tokens": len(tokens), "put_s": put_s, "put_mb": _kv_bytes(len(tokens) - put_from) / MB,
                     "fetch_s": fetch_s, "fetch_mb": _kv_bytes(restored) / MB})
    return rows


async def _run(turns: int, turn_tokens: int, repeat: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    shape = (FP.layers, FP.kv_heads, turns * turn_tokens, FP.head_dim)
    kv = torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()
    with tempfile.TemporaryDirectory(prefix="kvpconv", dir="/tmp") as directory:
        node = Daemon(load_config(_config(Path(directory)), env={}))
        await node.start()
        try:
            async with AsyncKVPeerClient(node.config.api.socket_path) as client:
                await _conversation(client, 1, 1, turn_tokens, kv, use_kv_from=False)  # warm-up
                runs: dict[bool, list[list[dict[str, float]]]] = {False: [], True: []}
                for i in range(repeat):
                    # Interleaved, each kind first in turn: the same load on both.
                    for use_kv_from in (bool(i % 2), not i % 2):
                        first = 10_000 + (2 * i + use_kv_from) * turns * turn_tokens
                        runs[use_kv_from].append(await _conversation(
                            client, first, turns, turn_tokens, kv, use_kv_from=use_kv_from))
        finally:
            await node.stop()

    def median(use_kv_from: bool, turn: int, key: str) -> float:
        return statistics.median(run[turn][key] for run in runs[use_kv_from])

    rows = []
    for t in range(turns):
        row: dict[str, Any] = {"turn": t + 1, "tokens": runs[False][0][t]["tokens"]}
        for use_kv_from, name in ((False, "whole"), (True, "kv_from")):
            for key in ("put_s", "put_mb", "fetch_s", "fetch_mb"):
                row[f"{key}_{name}"] = round(median(use_kv_from, t, key), 4)
        rows.append(row)

    def total(key: str) -> float:
        return round(sum(row[key] for row in rows), 3)

    return {
        "rows": rows,
        "turns": turns,
        "turn_tokens": turn_tokens,
        "repeat": repeat,
        "put_seconds_whole": total("put_s_whole"),
        "put_seconds_kv_from": total("put_s_kv_from"),
        "put_mb_whole": total("put_mb_whole"),
        "put_mb_kv_from": total("put_mb_kv_from"),
        "fetch_seconds_whole": total("fetch_s_whole"),
        "fetch_seconds_kv_from": total("fetch_s_kv_from"),
        "fetch_mb_whole": total("fetch_mb_whole"),
        "fetch_mb_kv_from": total("fetch_mb_kv_from"),
        "put_speedup": round(total("put_s_whole") / total("put_s_kv_from"), 2),
        "fetch_speedup": round(total("fetch_s_whole") / total("fetch_s_kv_from"), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--turn-tokens", type=int, default=512, help="tokens each turn adds")
    parser.add_argument("--repeat", type=int, default=3, help="conversations of each kind (median per turn)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.turns < 1 or args.turn_tokens < CHUNK or args.repeat < 1:
        parser.error(f"--turns and --repeat must be >= 1, --turn-tokens >= {CHUNK}")
    logging.getLogger("kvpeer").setLevel(logging.ERROR)  # a daemon on loopback warns of no cluster key
    result = asyncio.run(_run(args.turns, args.turn_tokens, args.repeat))
    print(f"{'turn':>4} {'tokens':>7} | {'put ms':>8} {'MB':>6} | {'kv_from':>8} {'MB':>6} | "
          f"{'fetch ms':>8} {'MB':>6} | {'kv_from':>8} {'MB':>6}")
    for row in result["rows"]:
        print(f"{row['turn']:>4} {row['tokens']:>7} | {1e3 * row['put_s_whole']:>8.1f} {row['put_mb_whole']:>6.1f} | "
              f"{1e3 * row['put_s_kv_from']:>8.1f} {row['put_mb_kv_from']:>6.1f} | "
              f"{1e3 * row['fetch_s_whole']:>8.1f} {row['fetch_mb_whole']:>6.1f} | "
              f"{1e3 * row['fetch_s_kv_from']:>8.1f} {row['fetch_mb_kv_from']:>6.1f}")
    print(f"whole conversation: puts {result['put_seconds_whole']:.2f} s / {result['put_mb_whole']:.0f} MB whole, "
          f"{result['put_seconds_kv_from']:.2f} s / {result['put_mb_kv_from']:.0f} MB with kv_from "
          f"({result['put_speedup']}x); fetches {result['fetch_seconds_whole']:.2f} s / "
          f"{result['fetch_mb_whole']:.0f} MB vs {result['fetch_seconds_kv_from']:.2f} s / "
          f"{result['fetch_mb_kv_from']:.0f} MB ({result['fetch_speedup']}x)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
