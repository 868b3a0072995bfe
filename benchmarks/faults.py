"""Trust and failure figures: fuzzed inputs, wrong keys, tenants, poisoned chunks, dying peers.

    python -m benchmarks.faults [--json] [--quick] [--skip-fuzz] [--clients-s 60]

Runs the fuzz suite of tests/trust (hypothesis, derandomized) and five scenarios with real
daemons in network namespaces (needs root), then prints one table; with ``--json`` the last
line is one JSON object with ``fuzzed_inputs``, ``poisoned_chunks``, ``unauthenticated_accepted``,
``fetches_failed_incorrectly``, ``leaked_segments`` and the other figures measured.

The scenario functions are also what tests/cluster/test_faults.py runs (with smaller sizes), so
the figures and the test assertions come from one implementation. KV is synthetic (seeded, of a
made-up model's shape): no scenario here is about the model. Tampering is done only from the
outside (rewriting a stopped daemon's disk records, talking to its sockets): nothing in the
production code path knows about these tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpeer import codec
from kvpeer.api.client import KVPeerClient
from kvpeer.codec.container import FORMAT_VERSION
from kvpeer.errors import KVPeerError
from kvpeer.hashing import ModelFingerprint
from kvpeer.store import ChunkStore, encode_record
from kvpeer.testing.cluster import DaemonCluster, Node

CHUNK = 256
FP = ModelFingerprint(name="synthetic-faults", layers=4, kv_heads=2, head_dim=64, dtype="float16")
CONFIG: dict[str, dict[str, Any]] = {"transport": {"mtu": 1500}}
SIGNALLING_PORT = 7457
_STORE_NAME = re.compile(r"^([0-9a-f]{64})\.([a-z0-9_]{1,16})$")


# --------------------------------------------------------------------------- helpers
def prefix(chunks: int, seed: int, fp: ModelFingerprint = FP) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Token ids and KV of a synthetic prefix (distinct seeds give distinct chunk keys)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = np.arange(chunks * CHUNK, dtype=np.uint32) + seed * 1_000_003
    shape = (fp.layers, fp.kv_heads, chunks * CHUNK, fp.head_dim)
    k = torch.randn(*shape, generator=gen).to(torch.float16)
    v = (0.5 * torch.randn(*shape, generator=gen)).to(torch.float16)
    return tokens, k, v


def store_files(node: Node) -> dict[tuple[bytes, str], Path]:
    """The chunk records on a (stopped) node's disk tier, by (key, level)."""
    out: dict[tuple[bytes, str], Path] = {}
    for path in (node.workdir / "state" / "store").rglob("*"):
        match = _STORE_NAME.match(path.name)
        if match and path.is_file():
            out[(bytes.fromhex(match[1]), match[2])] = path
    return out


def corrupt_stored_chunks(node: Node) -> int:
    """Open a stopped node's store and codec-verify every chunk; the count that fails."""
    store = ChunkStore(ram_bytes=1 << 30, disk_bytes=4 << 30, directory=node.workdir / "state" / "store",
                       level_order=codec.LEVELS, payload_format=f"codec{FORMAT_VERSION}")  # the daemon's
    bad = 0
    try:
        if not store.keys() and store_files(node):
            raise RuntimeError(f"{node.node_id}'s chunk files were not read: another payload format?")
        for key in store.keys():
            for level in store.levels(key):
                blob = store.get_blocking(key, level)
                try:
                    if blob is None or codec.verify(blob).level != level:
                        bad += 1
                except KVPeerError:
                    bad += 1
    finally:
        store.close()
    return bad


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_in(cluster: DaemonCluster, node: Node, script: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run a Python snippet inside ``node``'s namespace; it prints one JSON object last."""
    done = cluster.net.run(node.host, [sys.executable, "-c", script, *args], timeout=timeout)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _put(node: Node, tokens: np.ndarray, k: torch.Tensor, v: torch.Tensor, level: str = "exact",
         namespace: str = "default") -> int:
    with KVPeerClient(socket_path=node.socket_path, namespace=namespace) as client:
        return client.put(tokens, k, v, FP, level=level).stored


def _wait_log(node: Node, pattern: str, timeout_s: float) -> float | None:
    """Seconds until ``pattern`` appears in the node's log (polled), None if it never did."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if re.search(pattern, node.log_text()):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- in-namespace scripts
# A client that holds a wrong cluster key and tries to get past the handshake. It records every
# message type the server sends; the server must send nothing but its Challenge and a Reject.
_ROGUE_HANDSHAKE = r"""
import asyncio, json, struct, sys
from kvpeer.transport import messages as m
from kvpeer.transport.auth import ClientHandshake
LIMIT = 1 << 17
async def main(host, port):
    seen, leaked = [], 0
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    async def send(msg):
        data = m.encode(msg, LIMIT)
        w.write(struct.pack("!I", len(data)) + data)
        await w.drain()
    async def recv():
        nonlocal leaked
        try:
            head = await asyncio.wait_for(r.readexactly(4), 10)
            data = await asyncio.wait_for(r.readexactly(struct.unpack("!I", head)[0]), 10)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return None
        leaked += data.count(b"v=0") + data.count(b"fingerprint")
        msg = m.decode(data, m.SIGNALLING_TYPES, LIMIT)
        seen.append(msg.TYPE)
        return msg
    hs = ClientHandshake((b"not-the-cluster-key-" * 2,))
    await send(hs.hello())
    challenge = await recv()
    if isinstance(challenge, m.Challenge):
        await send(hs.on_challenge(challenge))
    await recv()
    try:  # push on regardless: an offer with a forged MAC
        await send(m.Offer(node_id="rogue", mtu=1500, sdp="v=0\r\n", mac=b"\0" * 32))
        await recv()
    except ConnectionError:
        pass
    w.close()
    print(json.dumps({"seen": seen, "leaked": leaked}))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

# Garbage on the signalling port: random bytes, huge length prefixes, valid frames of garbage,
# a valid hello then garbage, and slowloris connections that send half a header and stop.
_SIGNALLING_GARBAGE = r"""
import json, os, random, socket, struct, sys, time
import msgpack
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(6)
sent = refused = 0
def frame(body): return struct.pack("!I", len(body)) + body
def payloads():
    hello = msgpack.packb({"v": 1, "t": "hello", "nonce": b"x" * 32})
    yield rnd.randbytes(rnd.randint(1, 300))
    yield struct.pack("!I", 0xFFFFFFFF) + rnd.randbytes(64)
    yield frame(rnd.randbytes(rnd.randint(0, 200)))
    yield frame(msgpack.packb({"v": 1, "t": [1, 2], "nonce": b"x"}))
    yield frame(msgpack.packb({"v": 1, "t": "client_proof", "proofs": [b"y" * 32]}))
    yield frame(hello) + frame(rnd.randbytes(50))
    body = bytearray(hello); body[rnd.randrange(len(body))] ^= 0xFF
    yield frame(bytes(body))
for i in range(n):
    for data in payloads():
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(data)
                s.settimeout(2)
                try:
                    s.recv(4096)
                except (TimeoutError, OSError):
                    pass
            sent += 1
        except OSError:
            refused += 1
print(json.dumps({"sent": sent, "refused": refused}))
"""


def garbage_on_api_socket(path: Path, rounds: int, seed: int = 6) -> int:
    """Send malformed frames to the daemon's Unix socket; returns how many were sent."""
    from tests.trust import fuzzing  # the fuzz seeds: valid API frames to mutate

    rnd = np.random.default_rng(seed)
    sent = 0
    for _ in range(rounds):
        seed_frame = fuzzing.API_SEEDS[int(rnd.integers(len(fuzzing.API_SEEDS)))]
        data = bytearray(seed_frame)
        for _ in range(int(rnd.integers(1, 4))):
            data[int(rnd.integers(len(data)))] = int(rnd.integers(256))
        variants = [
            bytes(data),
            bytes(rnd.bytes(int(rnd.integers(1, 200)))),
            (0xFFFFFFF0).to_bytes(4, "big") + b"x" * 16,
            seed_frame[: int(rnd.integers(1, len(seed_frame)))],
        ]
        for payload in variants:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                try:
                    sock.connect(str(path))
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    with contextlib.suppress(TimeoutError, OSError):
                        while sock.recv(65536):
                            pass
                except OSError:
                    pass
            sent += 1
    return sent


# --------------------------------------------------------------------------- scenarios
def scenario_trust(workdir: Path) -> dict[str, Any]:
    """Wrong key (a rogue daemon and a raw rogue client) and namespace isolation.

    Nodes 0 and 1 share the cluster key; node 2 runs with a key of its own.
    """
    rogue_key = workdir / "rogue.key"
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(rogue_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")

    def per_node(index: int) -> dict[str, dict[str, Any]]:
        return {"transport": {"psk_file": str(rogue_key)}} if index == 2 else {}

    figures: dict[str, Any] = {}
    tokens, k, v = prefix(2, seed=11)
    with DaemonCluster(3, workdir=workdir, config=CONFIG, per_node_config=per_node) as cluster:
        a, b, rogue = cluster.nodes
        _put(a, tokens, k, v, namespace="tenant-a")
        cluster.wait_until_peer_holds(b, a.node_id)
        cluster.wait_until_peer_holds(rogue, a.node_id)  # discovery is public; the data is not

        # The rogue daemon asks its peers: every handshake must fail.
        with KVPeerClient(socket_path=rogue.socket_path, namespace="tenant-a") as client:
            rogue_lookup = client.lookup(tokens, FP).matched_tokens
            with client.fetch(tokens, FP, deadline_s=10) as result:
                rogue_fetch = result.matched_tokens
        raw = run_in(cluster, rogue, _ROGUE_HANDSHAKE, a.ip, str(SIGNALLING_PORT))
        refusals = _wait_log(a, "failed authentication", 10.0)

        # Namespaces: locally on a, and through peer b.
        seen_in_b: dict[str, int] = {}
        for node, where in ((a, "local"), (b, "peer")):
            with KVPeerClient(socket_path=node.socket_path, namespace="tenant-b") as client:
                seen_in_b[f"{where}_lookup"] = client.lookup(tokens, FP).matched_tokens
                with client.fetch(tokens, FP, deadline_s=10) as result:
                    seen_in_b[f"{where}_fetch"] = result.matched_tokens
        with KVPeerClient(socket_path=b.socket_path, namespace="tenant-a") as client:
            with client.fetch(tokens, FP, deadline_s=20, min_level="exact") as result:
                own_fetch = result.matched_tokens
                own_equal = own_fetch == 2 * CHUNK and torch.equal(result.k, k) and torch.equal(result.v, v)

        logs = {n.node_id: n.log_text() for n in cluster.nodes}
    honest_logs = logs[a.node_id] + logs[b.node_id]
    sessions_with_rogue = len(re.findall(rf"session with {re.escape(rogue.node_id)} open", honest_logs))
    sessions_with_rogue += len(re.findall(r"session with \S+ open", logs[rogue.node_id]))
    raw_accepted = int(any(t in ("server_proof", "answer") for t in raw["seen"]))
    figures.update(
        wrong_key_refusals=len(re.findall(r"failed authentication", honest_logs)),
        wrong_key_refusal_logged=refusals is not None,
        rogue_client_saw=raw["seen"],
        rogue_sdp_bytes_seen=raw["leaked"],
        rogue_matched_tokens=rogue_lookup + rogue_fetch,
        unauthenticated_accepted=sessions_with_rogue + raw_accepted,
        cross_namespace_matched_tokens=sum(seen_in_b.values()),
        cross_namespace_detail=seen_in_b,
        same_namespace_fetch_ok=own_equal,
    )
    return figures


def _tamper(node: Node, key: bytes, level: str, blob: bytes) -> None:
    """Replace one chunk record on a stopped node's disk with ``blob`` (a valid store record)."""
    path = store_files(node)[(key, level)]
    path.write_bytes(encode_record(key, level, blob) + blob)


def scenario_poisoned(workdir: Path) -> dict[str, Any]:
    """A peer whose store holds bad chunks (on its disk, rewritten while it was stopped).

    Prefix P: chunk 1's payload bit-flipped (codec digest no longer matches; the store record's
    own checksum is recomputed, so the serving peer's store accepts it). Prefix Q: chunk 0 is a
    valid blob of another shape (head_dim 32): a chunk that cannot belong to the key asked.
    The fetching node must hand over only P's chunk 0, and store nothing bad.
    """
    tokens_p, k_p, v_p = prefix(3, seed=21)
    tokens_q, k_q, v_q = prefix(2, seed=22)
    from kvpeer.hashing import chunk_keys

    keys_p = chunk_keys(tokens_p, FP.digest(), "default", CHUNK)
    keys_q = chunk_keys(tokens_q, FP.digest(), "default", CHUNK)
    with DaemonCluster(2, workdir=workdir, config=CONFIG) as cluster:
        a, b = cluster.nodes
        _put(a, tokens_p, k_p, v_p)
        _put(a, tokens_q, k_q, v_q)
        cluster.stop_node(a)
        good = bytearray(_read_blob(a, keys_p[1], "exact"))
        good[len(good) // 2] ^= 0x10
        _tamper(a, keys_p[1], "exact", bytes(good))
        other = torch.randn(FP.layers, FP.kv_heads, CHUNK, 32).half()
        _tamper(a, keys_q[0], "exact", codec.encode(other, other, "exact"))
        cluster.start_node(a)
        cluster.wait_until_peer_holds(b, a.node_id)
        handed: dict[str, Any] = {}
        with KVPeerClient(socket_path=b.socket_path) as client:
            with client.fetch(tokens_p, FP, deadline_s=20, min_level="exact") as result:
                handed["p_matched"] = result.matched_tokens
                handed["p_recompute_from"] = result.recompute_from
                handed["p_equal"] = torch.equal(result.k, k_p[:, :, : result.matched_tokens])
            with client.fetch(tokens_q, FP, deadline_s=20, min_level="exact") as result:
                handed["q_matched"] = result.matched_tokens
                handed["q_shape_ok"] = result.k.shape[-1] == FP.head_dim
        cluster.stop_node(b)
        bad_stored = corrupt_stored_chunks(b)
        b_keys = {key for key, _ in store_files(b)}
        log_b = b.log_text()
    poisoned_handed = int(handed["p_matched"] > CHUNK or not handed["p_equal"])
    poisoned_handed += int(handed["q_matched"] > 0 or not handed["q_shape_ok"])
    stored_corrupt = bad_stored + int(keys_p[1] in b_keys)
    stored_wrong_shape = int(keys_q[0] in b_keys)
    return {
        "poisoned_chunks": poisoned_handed + stored_corrupt + stored_wrong_shape,
        "poisoned_handed_over": poisoned_handed,
        "poisoned_stored_corrupt": stored_corrupt,
        "poisoned_stored_wrong_shape": stored_wrong_shape,
        "poison_detail": handed,
        "poison_rejections_logged": len(re.findall(r"does not decode|failed:|digest", log_b)),
    }


def _read_blob(node: Node, key: bytes, level: str) -> bytes:
    data = store_files(node)[(key, level)].read_bytes()
    from kvpeer.store import decode_record

    return decode_record(data, key, level)


def scenario_kill(workdir: Path, fetches: int = 20, chunks: int = 4, deadline_s: float = 30.0) -> dict[str, Any]:
    """SIGKILL a serving peer while ``fetches`` concurrent fetches run on a third node."""
    prefixes = [prefix(chunks, seed=100 + i) for i in range(fetches)]
    outcomes: Counter[str] = Counter()
    durations: list[float] = []
    with DaemonCluster(3, workdir=workdir, rate="50mbit", config=CONFIG) as cluster:
        a, b, c = cluster.nodes
        for node in (a, b):
            with KVPeerClient(socket_path=node.socket_path) as client:
                for tokens, k, v in prefixes:
                    client.put(tokens, k, v, FP, level="exact")
        cluster.wait_until_peer_holds(c, a.node_id)
        cluster.wait_until_peer_holds(c, b.node_id)
        first_chunk = threading.Event()

        def one(index: int) -> str:
            tokens, k, v = prefixes[index]
            started = time.monotonic()
            try:
                with KVPeerClient(socket_path=c.socket_path, timeout_s=deadline_s + 30) as client:
                    with client.fetch(tokens, FP, deadline_s=deadline_s, min_level="exact") as result:
                        if result.wait_for_chunk(0):
                            first_chunk.set()
                        n = result.matched_tokens
                        ok = (
                            n % CHUNK == 0
                            and result.recompute_from == n
                            and torch.equal(result.k, k[:, :, :n])
                            and torch.equal(result.v, v[:, :, :n])
                        )
            except KVPeerError as exc:
                return f"error: {exc}"
            finally:
                first_chunk.set()
            took = time.monotonic() - started
            durations.append(took)
            if not ok:
                return "wrong data"
            if took > deadline_s + 2.0:
                return "late"
            return "full" if n == chunks * CHUNK else "shorter prefix"

        with ThreadPoolExecutor(max_workers=fetches) as pool:
            futures = [pool.submit(one, i) for i in range(fetches)]
            first_chunk.wait(timeout=deadline_s)
            cluster.stop_node(a, sig=signal.SIGKILL)
            detected = _wait_log(c, rf"peer {re.escape(a.node_id)} (is )?down|{re.escape(a.node_id)} failed on chunk|{re.escape(a.node_id)} stalled", 15.0)
            for future in futures:
                outcomes[future.result()] += 1
        with KVPeerClient(socket_path=c.socket_path) as client:
            alive = client.stats()["ready"]
    correct = outcomes["full"] + outcomes["shorter prefix"]
    return {
        "kill_fetches": fetches,
        "kill_fetches_full": outcomes["full"],
        "kill_fetches_shorter_prefix": outcomes["shorter prefix"],
        "fetches_failed_incorrectly": fetches - correct,
        "kill_outcomes": dict(outcomes),
        "dead_peer_detected_s": None if detected is None else round(detected, 2),
        "kill_fetch_max_s": round(max(durations), 2) if durations else None,
        "fetcher_alive_after_kill": bool(alive),
    }


def scenario_clients(workdir: Path, clients: int = 50, seconds: float = 60.0,
                     garbage_rounds: int = 50, signalling_rounds: int = 20) -> dict[str, Any]:
    """Garbage on both sockets, then ``clients`` concurrent API clients for ``seconds``."""
    fp = FP
    shared = [prefix(2, seed=300 + i) for i in range(8)]
    with DaemonCluster(1, workdir=workdir, config=CONFIG) as cluster:
        (node,) = cluster.nodes
        assert node.process is not None
        pid = node.process.pid
        with KVPeerClient(socket_path=node.socket_path) as client:  # warm up the daemon once
            client.put(*shared[0], fp, level="q8")
            with client.fetch(shared[0][0], fp) as result:
                result.wait()
        shm_before, fds_before = shm_entries(), fd_count(pid)

        api_garbage = garbage_on_api_socket(node.socket_path, garbage_rounds)
        sig = run_in(cluster, node, _SIGNALLING_GARBAGE, node.ip, str(SIGNALLING_PORT), str(signalling_rounds),
                     timeout=120.0)

        errors: Counter[str] = Counter()
        ops: Counter[str] = Counter()
        stop_at = time.monotonic() + seconds

        def worker(index: int) -> None:
            rnd = np.random.default_rng(index)
            with KVPeerClient(socket_path=node.socket_path, namespace=f"ns{index % 4}") as client:
                while time.monotonic() < stop_at:
                    tokens, k, v = shared[int(rnd.integers(len(shared)))]
                    op = int(rnd.integers(3))
                    try:
                        if op == 0:
                            client.put(tokens, k, v, fp, level="q8")
                        elif op == 1:
                            client.lookup(tokens, fp)
                        else:
                            with client.fetch(tokens, fp, deadline_s=10) as result:
                                n = result.matched_tokens
                                # q8 of unit-variance keys errs up to ~0.07 (fast rotary channels
                                # are coarser); another prefix's keys differ by ~1
                                if n and not torch.allclose(result.k.float(), k[:, :, :n].float(), atol=0.2):
                                    errors["wrong data"] += 1
                        ops[("put", "lookup", "fetch")[op]] += 1
                    except KVPeerError as exc:
                        errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1

        with ThreadPoolExecutor(max_workers=clients) as pool:
            for future in [pool.submit(worker, i) for i in range(clients)]:
                future.result()

        with KVPeerClient(socket_path=node.socket_path) as client:  # still serving?
            client.put(*shared[1], fp, level="q8")
            still_serving = client.lookup(shared[1][0], fp).matched_tokens == 2 * CHUNK
        # Frees run on the daemon's own thread and leases end on their own: up to 30 s on a
        # loaded machine before a segment still there counts as leaked.
        shm_after = _settled(shm_entries, shm_before, lambda now: not (now - shm_before), timeout_s=30.0)
        fds_after = _settled(lambda: fd_count(pid), fds_before, lambda now: now <= fds_before)
        with KVPeerClient(socket_path=node.socket_path) as client:  # does the daemon still hold them?
            live_segments = client.stats()["api"]["live_segments"]
        cluster.stop_node(node)
        corrupt = corrupt_stored_chunks(node)
    ours = {name for name in shm_after - shm_before if "kvpeer" in name}
    return {
        "garbage_api_frames": api_garbage,
        "garbage_signalling_connections": sig["sent"],
        "still_serving_after_garbage": still_serving,
        "corrupt_chunks_stored": corrupt,
        "clients": clients,
        "client_seconds": seconds,
        "client_ops": sum(ops.values()),
        "client_errors": sum(errors.values()),
        "client_error_detail": dict(errors.most_common(5)),
        "leaked_segments": len(ours),
        "leaked_segment_names": sorted(ours)[:5],
        "live_segments_at_end": live_segments,  # the daemon's registry, the stats client's excluded
        "leaked_fds": max(0, fds_after - fds_before),
    }


def _settled(read: Callable[[], Any], before: Any, ok: Callable[[Any], bool], timeout_s: float = 10.0) -> Any:
    """Read a count until it is back where it was (leases and closes finish asynchronously)."""
    deadline = time.monotonic() + timeout_s
    now = read()
    while not ok(now) and time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
    return now


# --------------------------------------------------------------------------- fuzzing
def run_fuzz() -> dict[str, Any]:
    """Run the fuzz tests of tests/trust (same budgets as the suite) and count the inputs."""
    from tests.trust import fuzzing, test_fuzz

    fuzzing.COUNTS.clear()
    started = time.monotonic()
    for name in dir(test_fuzz):
        test = getattr(test_fuzz, name)
        if name.startswith("test_") and hasattr(test, "hypothesis"):
            test()
    return {
        "fuzzed_inputs": sum(fuzzing.COUNTS.values()),
        "fuzzed_by_target": dict(fuzzing.COUNTS),
        "fuzz_seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- main
@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvpeer-faults-") as tmp:
        yield Path(tmp)


ROWS = [
    ("fuzzed_inputs", "malformed inputs fuzzed (all rejected typed)"),
    ("garbage_api_frames", "garbage frames on the API socket"),
    ("garbage_signalling_connections", "garbage connections on the signalling port"),
    ("still_serving_after_garbage", "daemon still serving after garbage"),
    ("corrupt_chunks_stored", "corrupt chunks in the store afterwards"),
    ("wrong_key_refusals", "wrong-key handshakes refused (counted in logs)"),
    ("unauthenticated_accepted", "unauthenticated peers accepted"),
    ("rogue_matched_tokens", "tokens a wrong-key node could look up/fetch"),
    ("cross_namespace_matched_tokens", "tokens seen from another namespace"),
    ("poisoned_chunks", "poisoned chunks stored or handed over"),
    ("kill_fetches", "concurrent fetches when a holder was SIGKILLed"),
    ("kill_fetches_full", "  ended full (from the other holder)"),
    ("kill_fetches_shorter_prefix", "  ended with a correct shorter prefix"),
    ("fetches_failed_incorrectly", "  ended wrongly / late / with an error"),
    ("dead_peer_detected_s", "dead peer noticed by the fetching node (s)"),
    ("kill_fetch_max_s", "slowest of those fetches (s)"),
    ("clients", "concurrent local API clients"),
    ("client_ops", "  put/lookup/fetch operations done"),
    ("client_errors", "  errors"),
    ("leaked_segments", "  leaked shared-memory segments"),
    ("leaked_fds", "  leaked daemon file descriptors"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--quick", action="store_true", help="test-sized scenarios (15 s of clients)")
    parser.add_argument("--skip-fuzz", action="store_true")
    parser.add_argument("--clients-s", type=float, default=None, help="seconds of the 50-client run")
    args = parser.parse_args(argv)
    seconds = args.clients_s or (15.0 if args.quick else 60.0)

    figures: dict[str, Any] = {}
    if not args.skip_fuzz:
        figures.update(run_fuzz())
    skipped = os.geteuid() != 0
    if skipped:
        print("scenarios skipped: network namespaces need root", file=sys.stderr)
    else:
        for run in (
            lambda w: scenario_clients(w, seconds=seconds),
            scenario_trust,
            scenario_poisoned,
            scenario_kill,
        ):
            with _workdir() as workdir:
                figures.update(run(workdir))

    width = max(len(label) for _, label in ROWS)
    print(f"{'figure':<{width}}  value")
    for key, label in ROWS:
        if key in figures:
            print(f"{label:<{width}}  {figures[key]}")
    if args.json:
        print(json.dumps(figures, sort_keys=True, default=str))
    return 1 if skipped else 0  # a partial table must not pass for the whole one


if __name__ == "__main__":
    raise SystemExit(main())
