"""Discovery at scale: TXT size, inventory bytes per update, time for a node to learn.

    python -m benchmarks.discovery [--json] [--peers 100] [--prefixes 10000] [--real auto|daemon|agents|off]

Simulated part (sans-IO, N peers with K prefixes each, ``--chunks`` chunks per prefix): the
largest TXT record, the bytes of an inventory delta after one put and of a full inventory,
the Bloom digest's false-positive rate, and the time a new node spends decoding and applying
every peer's full inventory (msgpack round trip included, no network).

Real part (N = 3 namespaces on a bridge, needs root): ``time_to_learn_s`` from a put on one
node until another node's lookup finds the prefix. With ``--real daemon`` (the default when
kvpeerd starts) through real daemons and the local API; with ``--real agents`` (fallback when
the daemon does not start) through discovery agents only: from the inventory change on one
node until another sees the new epoch in its TXT record (the inventory pull would follow).
With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from kvpeer.discovery import Advertisement, BloomDigest, InventoryLog, InventoryTable
from kvpeer.discovery.advert import encode_fields, txt_size

ROUNDS = 5


def _keys(n: int, rng: Any) -> list[bytes]:
    return [rng.randbytes(32) for _ in range(n)]


def simulate(peers: int, prefixes: int, chunks: int) -> dict[str, Any]:
    import random

    rng = random.Random(7)
    logs: list[InventoryLog] = []
    txt_max = 0
    firsts_of_peer0: list[bytes] = []
    for p in range(peers):
        log = InventoryLog(epoch=1_000_000 + p)
        keys = _keys(prefixes * chunks, rng)
        firsts = keys[::chunks]
        log.add(keys, first=firsts)
        if p == 0:
            firsts_of_peer0 = firsts
        advert = Advertisement(
            node_id=f"node-{p:03d}", port=7457, fingerprints=("ab" * 16, "cd" * 16),
            epoch=log.epoch, chunk_count=len(log), first_chunk_keys=log.first_chunk_keys(),
            digest_key=b"cluster key of the benchmark....",  # a node with a key sends the digest
        )
        # One address, as a node on one NIC sends it (zeroconf carries the node's order in "a").
        txt_max = max(txt_max, txt_size(encode_fields(advert, [f"10.0.{p // 250}.{p % 250 + 1}"])))
        logs.append(log)

    # One put of a new prefix on a node that already holds K prefixes.
    before = logs[0].epoch
    chain = _keys(chunks, rng)
    logs[0].add(chain, first=chain[:1])
    delta_bytes = len(msgpack.packb(logs[0].since(before)))
    # A full inventory is paged (PAGE_KEYS keys each): every page counts, as a peer asks for all.
    wires = [_full_inventory_pages(log) for log in logs]
    full_bytes = [sum(map(len, pages)) for pages in wires]

    # A new node learns everything: unpack every peer's pages, join them, apply them.
    table = InventoryTable()
    started, cpu_started = time.perf_counter(), time.process_time()
    for p, pages in enumerate(wires):
        answers = [msgpack.unpackb(page) for page in pages]
        joined = {**answers[0], "keys": [key for answer in answers for key in answer["keys"]]}
        table.apply(f"node-{p:03d}", joined)
    learn_s = time.perf_counter() - started
    learn_cpu_s = time.process_time() - cpu_started

    digest = BloomDigest.build(firsts_of_peer0)
    probes = _keys(10_000, rng)
    false_positive = sum(k in digest for k in probes) / len(probes)
    small = BloomDigest.build(firsts_of_peer0[:200])
    small_fp = sum(k in small for k in probes) / len(probes)
    return {
        "peers": peers,
        "prefixes": prefixes,
        "chunks_per_prefix": chunks,
        "txt_bytes": txt_max,
        "inventory_bytes_per_update": delta_bytes,
        "inventory_full_bytes": max(full_bytes),
        "learn_all_bytes": sum(full_bytes),
        "learn_all_apply_s": learn_s,
        "learn_all_apply_cpu_s": learn_cpu_s,
        "digest_fill": digest.fill_ratio(),
        "digest_false_positive": false_positive,
        "digest_false_positive_200_prefixes": small_fp,
    }


def _full_inventory_pages(log: InventoryLog) -> list[bytes]:
    """The wire form of every page of ``log``'s full inventory, as InventorySync asks for them."""
    first = log.since(None)
    pages = [first] + [log.since(None, page=n, at=first["epoch"]) for n in range(1, first.get("pages", 1))]
    return [msgpack.packb(page) for page in pages]


def real_with_daemons(workdir: Path) -> list[float]:
    import numpy as np
    import torch

    from kvpeer.api.client import KVPeerClient
    from kvpeer.hashing import ModelFingerprint
    from kvpeer.testing.cluster import DaemonCluster

    fp = ModelFingerprint(name="bench-discovery", layers=2, kv_heads=2, head_dim=16, dtype="float16")
    times = []
    with DaemonCluster(3, workdir=workdir) as cluster:
        a, b, _ = cluster.nodes
        with KVPeerClient(socket_path=b.socket_path) as client_b:
            deadline = time.monotonic() + 60
            while len(client_b.peers()) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("daemons did not discover each other")
                time.sleep(0.05)
        rng = np.random.default_rng(1)
        with KVPeerClient(socket_path=a.socket_path) as client_a, KVPeerClient(
            socket_path=b.socket_path
        ) as client_b:
            for _ in range(ROUNDS):
                tokens = rng.integers(0, 30_000, 512).tolist()
                k = torch.randn(2, 2, 512, 16, dtype=torch.float16)
                started = time.perf_counter()
                client_a.put(tokens, k, k.clone(), fp, level="exact")
                while client_b.lookup(tokens, fp).matched_tokens < 512:
                    if time.perf_counter() - started > 60:
                        raise TimeoutError("lookup on B never found the prefix")
                    time.sleep(0.01)
                times.append(time.perf_counter() - started)
    return times


def real_with_agents(workdir: Path) -> list[float]:
    from kvpeer.discovery.harness import start_agents
    from kvpeer.testing.netns import Cluster

    times = []
    with Cluster(n_hosts=3, prefix="kvpb") as net:
        specs = [
            (h, f"b{i}", ["--interface", h.ip, "--update-interval", "1.0"])
            for i, h in enumerate(net.hosts)
        ]
        agents = start_agents(net.popen, specs, log_dir=workdir)
        a, b, _ = agents
        b.wait_event("added", 60, peer="b0")
        for round_ in range(ROUNDS):
            key = os.urandom(32).hex()
            started = time.time()
            a.send(op="add", keys=[key], first=[key])
            epoch = a.wait_event("added_keys", 60, chunks=round_ + 1)["epoch"]
            seen = b.wait_for(
                lambda e, ep=epoch: e.get("event") == "updated" and e.get("epoch") == ep, 60
            )
            times.append(seen["t"] - started)
        for agent in agents:
            agent.quit()
    return times


def measure_real(mode: str) -> tuple[str, list[float]]:
    if mode == "off" or os.geteuid() != 0:
        return "off", []
    with tempfile.TemporaryDirectory(prefix="kvpeer-bench-") as tmp:
        if mode in ("auto", "daemon"):
            try:
                return "daemon", real_with_daemons(Path(tmp) / "daemons")
            except Exception as exc:
                if mode == "daemon":
                    raise
                print(f"(real daemons unavailable: {type(exc).__name__}: {exc}; using agents)",
                      file=sys.stderr)
        (Path(tmp) / "agents").mkdir()
        return "agents", real_with_agents(Path(tmp) / "agents")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.discovery")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--prefixes", type=int, default=10_000)
    parser.add_argument("--chunks", type=int, default=4, help="chunks per prefix")
    parser.add_argument("--real", default="auto", choices=["auto", "daemon", "agents", "off"])
    args = parser.parse_args(argv)

    sim = simulate(args.peers, args.prefixes, args.chunks)
    mode, times = measure_real(args.real)
    small = simulate(3, 10, args.chunks)

    rows = [
        ("", f"N={small['peers']} K={small['prefixes']}", f"N={sim['peers']} K={sim['prefixes']}"),
        ("largest TXT record (bytes)", small["txt_bytes"], sim["txt_bytes"]),
        ("inventory delta, one put (bytes)", small["inventory_bytes_per_update"],
         sim["inventory_bytes_per_update"]),
        ("full inventory of one peer (bytes)", small["inventory_full_bytes"],
         sim["inventory_full_bytes"]),
        ("new node learns all: bytes", small["learn_all_bytes"], sim["learn_all_bytes"]),
        ("new node learns all: apply wall (s)", f"{small['learn_all_apply_s']:.4f}",
         f"{sim['learn_all_apply_s']:.3f}"),
        ("new node learns all: apply CPU (s)", f"{small['learn_all_apply_cpu_s']:.4f}",
         f"{sim['learn_all_apply_cpu_s']:.3f}"),
        ("Bloom digest fill", f"{small['digest_fill']:.2f}", f"{sim['digest_fill']:.2f}"),
        ("Bloom false positives", f"{small['digest_false_positive']:.3f}",
         f"{sim['digest_false_positive']:.3f}"),
    ]
    width = max(len(str(r[0])) for r in rows)
    print(f"discovery benchmark ({args.chunks} chunks per prefix; simulated, sans-IO)")
    for label, x, y in rows:
        print(f"  {label:<{width}}  {x!s:>14}  {y!s:>14}")
    median = statistics.median(times) if times else None
    if times:
        print(f"real N=3 ({mode}): time to learn after a put, {len(times)} rounds: "
              f"median {median:.3f} s, min {min(times):.3f} s, max {max(times):.3f} s")
    else:
        print("real N=3: skipped (--real off, or not root: network namespaces need root)")
    if args.json:
        print(json.dumps({
            "time_to_learn_s": median,
            "time_to_learn_mode": mode,
            "time_to_learn_rounds_s": times,
            "txt_bytes": sim["txt_bytes"],
            "inventory_bytes_per_update": sim["inventory_bytes_per_update"],
            "inventory_full_bytes": sim["inventory_full_bytes"],
            "learn_all_bytes": sim["learn_all_bytes"],
            "learn_all_apply_s": sim["learn_all_apply_s"],
            "learn_all_apply_cpu_s": sim["learn_all_apply_cpu_s"],
            "digest_false_positive": sim["digest_false_positive"],
            "digest_false_positive_200_prefixes": sim["digest_false_positive_200_prefixes"],
            "peers": sim["peers"],
            "prefixes": sim["prefixes"],
        }))


if __name__ == "__main__":
    main()
