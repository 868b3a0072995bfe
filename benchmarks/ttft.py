"""Time to usable KV: fetching a prefix's KV from peers vs recomputing it (issue 5).

    python -m benchmarks.ttft [--json] [--model PATH_OR_GGUF] [--tokens 2048] [--rate 100mbit]
        [--delay 2ms] [--loss 0] [--drop-to RATE --drop-after SECONDS] [--peers N]
        [--policy adaptive|split|fixed:LEVEL[,...]] [--plot FILE.png]

Real model (SmolLM2 by default), real daemons in network namespaces (kvpeer.testing.cluster):
``--peers`` serving nodes each hold the prefix (put at the top level ``exact`` for the adaptive
policy, at LEVEL for ``fixed:LEVEL``), one more node fetches it for a client in the root
namespace. Every serving host's egress is tbf-shaped to ``--rate``; ``--drop-to`` changes it
(``tc qdisc replace``) ``--drop-after`` seconds into the fetch. The same prefix is recomputed
(prefill) in the same run with the daemons up (as the client's own fallback prefill runs):
``--recompute-runs`` times before the fetches and once more before each of ``--repeat`` rounds,
so the reference prefills are interleaved with the fetches; ``recompute_s`` is their median
(a fetch is one sample: against the best of several prefills, a fetch that gives up and
prefills read 0.9x for the same prefill), ``recompute_best_s`` their minimum. ``fetch_s`` is
request -> KV usable, including the recompute of any tail the fetcher left to the client. top-1
agreement compares the next-token argmax over a teacher-forced continuation, fetched cache vs
the original cache. ``split`` is the adaptive policy with ``FetchRequest.split``: where the daemon
finds it sooner, the client prefills the prefix's first chunks (``head``, in ``head_s``, in a
thread) while the rest is fetched (``in_shm_s``: when the last fetched chunk was in), then
appends the fetched KV to that cache. Several policies (comma-separated) run on the same cluster, each on a cold
client cache.

With --json the last line is one JSON object: ``fetch_s`` (the first policy's median over the
rounds), ``recompute_s``, ``speedup_vs_recompute`` (of those two), ``speedups`` (the first
policy's, per round), ``bytes_moved``, ``levels_used``, ``top1_agreement`` (the first policy's
median round), and ``runs`` (every policy and round). Needs root. A ``--delay``/``--loss``
other than 0 puts the two nodes (one serving peer) on routed subnets through the user-space
impairment relay (kvpeer.testing.relay; its CPU seconds are reported) with static discovery;
with several peers they are not applied (``delay_applied: false``). ``--delay 0 --loss 0``:
one plain bridge.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpeer import codec
from kvpeer.integrations.transformers import cache_argument, cache_of
from kvpeer.testing.netns import parse_rate

CHUNK = 256
CONTINUATION = 64


@dataclass(slots=True)
class Run:
    policy: str
    fetch_s: float = 0.0
    head_tokens: int = 0  # a split fetch: tokens the client prefilled while the rest came
    head_s: float = 0.0  # ...and how long that prefill took
    restored_tokens: int = 0
    recompute_rest_s: float = 0.0
    bytes_moved: int = 0
    levels_used: dict[str, int] = field(default_factory=dict)
    levels: list[str] = field(default_factory=list)
    top1_agreement: float = 0.0
    speedup_vs_recompute: float = 0.0
    usable_s: float = 0.0  # request -> the whole fetched prefix in the client's memory
    cache_build_s: float = 0.0  # fetched KV -> a transformers cache
    chunk_times: list[float] = field(default_factory=list)  # request -> chunk usable
    breakdown: dict[str, float] = field(default_factory=dict)  # the daemon's fetch timeline
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU-seconds per process, fetch only


def _process_cpu_s(pid: int | None) -> float:
    """User + system CPU-seconds a process (all its threads) has used so far; 0 if gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(cluster: Any, servers: list[Any], client_node: Any) -> dict[str, float]:
    """CPU-seconds so far of the processes a fetch runs through. On a 2-core machine their sum
    over 2 bounds the fetch time from below: it says whether a fetch waited on CPU or the link."""
    return {
        "fetching_daemon": _process_cpu_s(client_node.process.pid),
        "serving_daemons": sum(_process_cpu_s(node.process.pid) for node in servers),
        "relay": _process_cpu_s(cluster.net.relay_pid),
        "client": time.process_time(),
    }


def _timeline_breakdown(log_text: str) -> dict[str, float]:
    """Where the fetching daemon's last fetch spent its time, from its DEBUG fetch timeline:
    ``receive_s`` first request -> last chunk received, ``decode_s`` decoder busy (decode and
    restore into shared memory, summed), ``queued_s`` received chunks waiting for the decoder
    (summed), ``tail_s`` last chunk received -> last chunk reported, ``daemon_s`` the whole fetch
    as the daemon saw it."""
    lines = [line for line in log_text.splitlines() if "fetch timeline:" in line]
    if not lines:
        return {}
    events = []
    for item in lines[-1].split("fetch timeline:", 1)[1].split():
        t, kind, index, _level, _nbytes = item.split(":")
        events.append((float(t), kind, int(index)))
    received = {i: t for t, kind, i in events if kind == "received"}
    starts = {i: t for t, kind, i in events if kind == "decode_start"}
    ends = {i: t for t, kind, i in events if kind == "decode_end"}
    requests = [t for t, kind, _ in events if kind == "request"]
    done = [t for t, kind, _ in events if kind == "done"]
    if not received or not done:
        return {}
    last_received = max(received.values())
    return {
        "receive_s": round(last_received - min(requests, default=0.0), 4),
        "decode_s": round(sum(ends[i] - starts[i] for i in ends if i in starts), 4),
        "queued_s": round(sum(starts[i] - received[i] for i in starts if i in received), 4),
        "tail_s": round(max(done) - last_received, 4),
        "daemon_s": round(max(t for t, _, _ in events), 4),
    }


def _text(tokenizer: Any, need: int) -> list[int]:
    """Token ids of a long, fixed text shipped with Python (nothing is downloaded)."""
    from pydoc_data import topics

    parts = [topics.topics[name] for name in sorted(topics.topics)]
    text = "\n\n".join(parts[1::2])
    ids = tokenizer(text)["input_ids"]
    if len(ids) < need:
        raise SystemExit(f"the benchmark text has {len(ids)} tokens, {need} needed")
    return [int(t) for t in ids[:need]]


def _prefill(model: Any, ids: list[int], cache: Any = None) -> Any:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=True, **{cache_argument(model): cache})


def _timed_prefill(model: Any, ids: list[int]) -> tuple[Any, float]:
    started = time.perf_counter()
    cache = cache_of(_prefill(model, ids))
    return cache, time.perf_counter() - started


def _argmax_continuation(model: Any, cache: Any, continuation: list[int]) -> torch.Tensor:
    out = _prefill(model, continuation, cache)
    return out.logits[0].argmax(dim=-1)


def _seconds(text: str) -> float:
    text = text.strip().lower()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("s"):
        return float(text[:-1])
    return float(text)


def _policies(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    for policy in out:
        if policy not in ("adaptive", "split") and not (
            policy.startswith("fixed:") and policy.split(":", 1)[1] in codec.LEVELS
        ):
            raise SystemExit(f"--policy: {policy!r} is not adaptive, split or fixed:LEVEL {codec.LEVELS}")
    return out


def _fetch_once(
    args: argparse.Namespace,
    cluster: Any,
    model: Any,
    fp: Any,
    tokens: list[int],
    continuation: list[int],
    reference: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: str,
    run_index: int,
    peers: int,
    label: str,
) -> Run:
    from kvpeer.api.client import KVPeerClient
    from kvpeer.integrations.transformers import append_kv, cache_from_kv

    servers, client_node = cluster.nodes[:peers], cluster.nodes[-1]
    split = policy == "split"  # adaptive, the client prefilling the head the daemon leaves it
    level = "exact" if policy in ("adaptive", "split") else policy.split(":", 1)[1]
    # A namespace of its own per run: chunk keys are salted by namespace, so every policy
    # starts cold (nothing cached on the fetching node) without evicting anything.
    namespace = f"ttft-{run_index}-{policy.replace(':', '-')}"
    puts_before = {}
    for node in servers:
        with KVPeerClient(socket_path=node.socket_path, namespace=namespace) as client:
            puts_before[node.node_id] = client.stats()["store"]["puts"]
            client.put(tokens, k, v, fp, level=level)
    _wait_until_warm(servers, namespace, len(tokens) // CHUNK, level, puts_before)
    for node in servers:
        cluster.wait_until_peer_holds(client_node, node.node_id, timeout_s=60)
    _wait_until_visible(client_node, namespace, tokens, fp)
    for node in servers:
        cluster.net.set_rate(node.host, args.rate)

    run = Run(policy=label)
    chunks = len(tokens) // CHUNK
    timer: threading.Timer | None = None
    if args.drop_to:
        timer = threading.Timer(
            args.drop_after,
            lambda: [cluster.net.set_rate(node.host, args.drop_to) for node in servers],
        )
    with KVPeerClient(
        socket_path=client_node.socket_path, namespace=namespace, timeout_s=600
    ) as client:
        before = client.stats().get("bytes_from_peers", 0)
        cpu_before = _cpu_snapshot(cluster, servers, client_node)
        started = time.perf_counter()
        if timer is not None:
            timer.start()
        # Fixed policies: the peers hold only that level and it is the floor, so every chunk
        # travels at it; the adaptive policy gets the --min-level floor.
        min_level = level if policy.startswith("fixed:") else args.min_level
        with client.fetch(
            tokens, fp, min_level=min_level, recompute_tokens_per_s=args.recompute_tokens_per_s,
            split=split,
        ) as result:
            head: Future[Any] | None = None
            first = result.wait_first_token() if split else 0
            if 0 < first < len(tokens):
                # The head is prefilled in a thread while this one times the chunks' arrival.
                pool = ThreadPoolExecutor(1)
                head = pool.submit(_timed_prefill, model, tokens[:first])
                pool.shutdown(wait=False)  # once the head is prefilled
                run.head_tokens = first
            try:
                for index in range(first // CHUNK, chunks):
                    if not result.wait_for_chunk(index):
                        break
                    run.chunk_times.append(time.perf_counter() - started)
                result.wait()
                run.usable_s = time.perf_counter() - started
            finally:  # the head's thread ends (and says how it ended) before the run does
                head_cache = None
                if head is not None:
                    head_cache, run.head_s = head.result()
            matched = result.matched_tokens
            run.levels = list(result.levels)
            build_started = time.perf_counter()
            fetched_cache = head_cache
            if matched and head_cache is not None:
                append_kv(head_cache, result.k, result.v, model)  # after the head, copied
            elif matched:
                fetched_cache = cache_from_kv(result.k, result.v, model)
            matched = max(matched, run.head_tokens)
            run.cache_build_s = time.perf_counter() - build_started
        fetched_at = time.perf_counter() - started
        cpu_after = _cpu_snapshot(cluster, servers, client_node)
        run.cpu_s = {name: round(cpu_after[name] - cpu_before[name], 3) for name in cpu_before}
        run.bytes_moved = int(client.stats().get("bytes_from_peers", 0)) - int(before)
    if timer is not None:
        timer.cancel()
    run.breakdown = _timeline_breakdown(client_node.log_text())
    run.restored_tokens = matched - run.head_tokens
    # The client recomputes whatever the fetch did not bring (all of it if nothing came).
    rest_started = time.perf_counter()
    if matched < len(tokens):
        out = _prefill(model, tokens[matched:], fetched_cache)
        fetched_cache = cache_of(out)
    run.recompute_rest_s = time.perf_counter() - rest_started if matched < len(tokens) else 0.0
    run.fetch_s = fetched_at + run.recompute_rest_s
    predicted = _argmax_continuation(model, fetched_cache, continuation)
    run.top1_agreement = float((predicted == reference).float().mean())
    run.levels_used = dict(Counter(run.levels))
    return run


def _wait_until_warm(
    servers: list[Any], namespace: str, chunks: int, level: str, puts_before: dict[str, int]
) -> None:
    """Wait until each serving node made the lower levels of the chunks it was given (a
    prefix is usually put long before another node fetches it)."""
    from kvpeer.api.client import KVPeerClient

    expected = chunks * (len(codec.LEVELS) - codec.level_rank(level))
    deadline = time.monotonic() + 600
    for node in servers:
        with KVPeerClient(socket_path=node.socket_path, namespace=namespace) as client:
            while client.stats()["store"]["puts"] - puts_before[node.node_id] < expected:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{node.node_id} did not make the lower levels in time")
                time.sleep(0.5)


def _wait_until_visible(node: Any, namespace: str, tokens: list[int], fp: Any) -> None:
    """Wait until the fetching node sees the whole prefix on its peers (inventories synced)."""
    from kvpeer.api.client import KVPeerClient

    deadline = time.monotonic() + 60
    with KVPeerClient(socket_path=node.socket_path, namespace=namespace) as client:
        while client.lookup(tokens, fp).matched_tokens < len(tokens):
            if time.monotonic() > deadline:
                raise SystemExit("the fetching node never saw the prefix on its peers")
            time.sleep(0.2)


def _plot(path: Path, runs: list[Run], recompute_s: float, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colours = {name: plt.get_cmap("viridis")(i / max(1, len(codec.LEVELS) - 1))
               for i, name in enumerate(codec.LEVELS)}
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.2 * len(runs) + 0.8), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        for index, (t, level) in enumerate(zip(run.chunk_times, run.levels, strict=False),
                                           start=run.head_tokens // CHUNK):  # after a split's head
            ax.barh(index, t, color=colours.get(level, "grey"), height=0.7)
            ax.text(t, index, f" {level}", va="center", fontsize=7)
        ax.axvline(recompute_s, color="red", linestyle="--", label="recompute")
        ax.axvline(run.fetch_s, color="black", linestyle=":", label="usable")
        ax.set_title(f"{run.policy}: usable after {run.fetch_s:.2f}s "
                     f"({run.speedup_vs_recompute:.1f}x vs recompute)", fontsize=9)
        ax.set_ylabel("chunk")
        ax.set_xlim(0, max(recompute_s, run.fetch_s) * 1.05)
    axes[-1, 0].set_xlabel("seconds since the fetch request (bar end: chunk usable)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ttft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="GGUF file or local transformers directory")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--delay", default="2ms")
    parser.add_argument("--loss", type=float, default=0.0, help="percent, each direction")
    parser.add_argument("--drop-to", default=None)
    parser.add_argument("--drop-after", type=_seconds, default=1.0)
    parser.add_argument(
        "--peers", default="1", help="serving peers; N,M,... runs each count on one cluster"
    )
    parser.add_argument("--policy", default="adaptive")
    parser.add_argument("--min-level", default=None, help="quality floor of the adaptive policy")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument(
        "--recompute-runs", type=int, default=2,
        help="reference prefills before the fetches (one more before each round)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="rounds: every policy (and peer count) is fetched once per round, each round after a "
        "reference prefill",
    )
    parser.add_argument(
        "--recompute-rate", type=float, default=None,
        help="tokens/s the daemon is told the client recomputes at (default: measured); sets "
        "the adaptive policy's deadline (recompute time / 10), e.g. to replay a slower machine",
    )
    parser.add_argument("--plot", default="ttft-timeline.png")
    parser.add_argument("--logs", default=None, help="copy the daemons' logs into this folder")
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True,
        help="one untimed fetch (first policy) before the measured ones",
    )
    args = parser.parse_args(argv)
    policies = _policies(args.policy)
    if args.tokens <= 0 or args.tokens % CHUNK:
        raise SystemExit(f"--tokens must be a positive multiple of {CHUNK}")
    try:
        peer_counts = [int(p) for p in str(args.peers).split(",") if p.strip()]
    except ValueError:
        raise SystemExit("--peers takes N or N,M,...") from None
    if not peer_counts or min(peer_counts) < 1:
        raise SystemExit("--peers must be >= 1")
    parse_rate(args.rate)
    if args.drop_to:
        parse_rate(args.drop_to)
    logging.basicConfig(level=logging.WARNING)

    from kvpeer.integrations.transformers import kv_from_cache
    from kvpeer.models import load_model, model_fingerprint
    from kvpeer.testing.cluster import DaemonCluster

    model, tokenizer = load_model(args.model)
    fp = model_fingerprint(model)
    ids = _text(tokenizer, args.tokens + CONTINUATION)
    tokens, continuation = ids[: args.tokens], ids[args.tokens :]

    # The prefix's KV and the reference continuation (the prefill the fetch has to beat is timed
    # below, with the daemons up); this one's time is printed for comparison.
    t0 = time.perf_counter()
    out = _prefill(model, tokens)
    before_s = time.perf_counter() - t0
    k, v = kv_from_cache(cache_of(out))
    reference = _argmax_continuation(model, cache_of(out), continuation)

    impaired = _seconds(args.delay) > 0 or args.loss > 0
    # The relay joins exactly two namespaces (one serving peer): with more peers the links are
    # plain shaped bridge ports and --delay/--loss are not applied (said below and in the JSON).
    relay = impaired and max(peer_counts) == 1
    delay_applied = relay or not impaired
    relay_stats: dict[str, Any] | None = None
    config = {
        "transport": {"mtu": args.mtu},
        "store": {"ram_bytes": "1GiB", "disk_bytes": "2GiB"},
    }
    runs: list[Run] = []
    up_times: list[float] = []
    warmup: Run | None = None
    with tempfile.TemporaryDirectory(prefix="kvpeer-ttft-") as tmp:
        with DaemonCluster(
            max(peer_counts) + 1, workdir=Path(tmp), mtu=args.mtu, rate=args.rate, config=config,
            relay=relay,
        ) as cluster:
            if relay:
                # One-way delay and loss each direction, in the router between the two nodes.
                cluster.net.set_impairment(delay_ms=_seconds(args.delay) * 1000, loss_pct=args.loss)
            try:
                # The reference prefill, under the conditions the client's own fallback prefill
                # meets (daemons and relay up, idle): timed before they started it read 5-10%
                # faster than the same prefill in a fetch that gave up.
                def reference_prefill() -> None:
                    t0 = time.perf_counter()
                    _prefill(model, tokens)
                    up_times.append(time.perf_counter() - t0)

                for _ in range(max(1, args.recompute_runs)):
                    reference_prefill()
                # What the client tells its daemon with each fetch: its own prefill speed.
                args.recompute_tokens_per_s = args.recompute_rate or args.tokens / statistics.median(up_times)
                run_index = 0
                if args.warmup:
                    # The first fetch over fresh sessions meets a bandwidth drop with SCTP's window
                    # grown on the idle fast link and loses ~1 s more in loss recovery than any
                    # later one: an untimed run first, so every policy starts from the same state.
                    warmup = _fetch_once(
                        args, cluster, model, fp, tokens, continuation, reference, k, v,
                        policies[0], run_index, peer_counts[0], "warmup",
                    )
                    run_index += 1
                for round_index in range(max(1, args.repeat)):
                    if round_index:
                        # Interleaved with the fetches: the machine's load drifts over a run.
                        reference_prefill()
                    for peers in peer_counts:
                        for policy in policies:
                            label = policy if len(peer_counts) == 1 else f"{policy}@{peers}p"
                            runs.append(
                                _fetch_once(
                                    args, cluster, model, fp, tokens, continuation, reference,
                                    k, v, policy, run_index, peers, label,
                                )
                            )
                            run_index += 1
                if relay:
                    for node in cluster.nodes:  # first: their goodbyes still need the relay
                        cluster.stop_node(node)
                    relay_stats = cluster.net.stop_relay()
            finally:
                if args.logs:
                    # The daemons log each fetch's level switches, preemptions and stalls (kept
                    # when a run failed too: that is when they are needed).
                    Path(args.logs).mkdir(parents=True, exist_ok=True)
                    for node in cluster.nodes:
                        shutil.copyfile(node.log_path, Path(args.logs) / f"{node.node_id}.log")

    # A fetch is one sample, so it is compared with the typical prefill, not the luckiest one.
    recompute_s = statistics.median(up_times)
    for run in [*runs, *([warmup] if warmup is not None else [])]:
        run.speedup_vs_recompute = recompute_s / run.fetch_s if run.fetch_s > 0 else 0.0
    title = (f"{args.tokens} tokens, {args.peers} peer(s) at {args.rate}"
             + (f" -> {args.drop_to} after {args.drop_after:g}s" if args.drop_to else ""))
    print(f"ttft: {title}; model {fp.name} ({fp.layers}x{fp.kv_heads}x{fp.head_dim} {fp.dtype})")
    print(f"recompute (prefill) of {args.tokens} tokens: {recompute_s:.2f} s, median of runs with "
          f"the daemons up: {', '.join(f'{t:.2f}' for t in up_times)} (one before they started: "
          f"{before_s:.2f})")
    if not delay_applied:
        print(f"note: --delay {args.delay} / --loss {args.loss}% not applied (the impairment "
              "relay joins two nodes: one serving peer only)")
    elif relay:
        cpu = f", relay CPU {relay_stats['cpu_s']:.1f} s" if relay_stats else ""
        print(f"link: {args.delay} one-way delay, {args.loss}% loss each direction through the "
              f"user-space relay (routed subnets, static discovery){cpu}")
    header = (f"{'policy':<15} {'fetch_s':>8} {'speedup':>8} {'head':>5} {'head_s':>6} {'in_shm_s':>8} "
              f"{'cache_s':>7} {'restored':>9} {'rest_s':>7} {'MB':>7} {'top1':>6}  levels")
    print(header)
    for run in runs:
        levels = " ".join(f"{lv}x{n}" for lv, n in run.levels_used.items()) or "-"
        print(f"{run.policy:<15} {run.fetch_s:>8.2f} {run.speedup_vs_recompute:>7.1f}x "
              f"{run.head_tokens:>5} {run.head_s:>6.2f} {run.usable_s:>8.2f} {run.cache_build_s:>7.2f} "
              f"{run.restored_tokens:>9} {run.recompute_rest_s:>7.2f} {run.bytes_moved / 1e6:>7.1f} "
              f"{run.top1_agreement:>6.3f}  {levels}")
    if warmup is not None:
        # Over fresh sessions the warm-up shows how soon a fetch on an unmeasured link gives up.
        print(f"warm-up (untimed): KV in shm after {warmup.usable_s:.2f} s, "
              f"{warmup.restored_tokens} tokens restored, {warmup.bytes_moved / 1e6:.1f} MB, "
              f"usable after {warmup.fetch_s:.2f} s")
    if any(run.breakdown for run in runs):
        print("where the fetching daemon's time went (s): receive = first request -> last chunk "
              "in, decode = decoder busy, queued = chunks waiting for it, tail = last in -> done")
        print(f"{'policy':<15} {'daemon':>7} {'receive':>8} {'decode':>7} {'queued':>7} {'tail':>6}")
        for run in runs:
            b = run.breakdown
            if b:
                print(f"{run.policy:<15} {b['daemon_s']:>7.3f} {b['receive_s']:>8.3f} "
                      f"{b['decode_s']:>7.3f} {b['queued_s']:>7.3f} {b['tail_s']:>6.3f}")
    if any(run.cpu_s for run in runs):
        print("CPU-seconds during the fetch (request -> KV usable), per process; 2 cores here")
        print(f"{'policy':<15} {'fetching':>8} {'serving':>8} {'relay':>6} {'client':>7} {'sum':>6}")
        for run in runs:
            c = run.cpu_s
            print(f"{run.policy:<15} {c['fetching_daemon']:>8.2f} {c['serving_daemons']:>8.2f} "
                  f"{c['relay']:>6.2f} {c['client']:>7.2f} {sum(c.values()):>6.2f}")
    plotted = _plot(Path(args.plot), runs, recompute_s, title) if args.plot else False
    if plotted:
        print(f"timeline: {args.plot}")
    # The first policy's rounds; its median round speaks for it (the only round by default).
    first_runs = [run for run in runs if run.policy == runs[0].policy]
    first = sorted(first_runs, key=lambda run: run.fetch_s)[(len(first_runs) - 1) // 2]
    fetch_s = statistics.median(run.fetch_s for run in first_runs)
    if len(first_runs) > 1:
        speedups = ", ".join(f"{run.speedup_vs_recompute:.1f}x" for run in first_runs)
        print(f"{runs[0].policy}: {len(first_runs)} rounds, median fetch {fetch_s:.2f} s, "
              f"{recompute_s / fetch_s:.1f}x; per round {speedups}")
    result = {
        "fetch_s": round(fetch_s, 4),
        "recompute_s": round(recompute_s, 4),
        "recompute_best_s": round(min(up_times), 4),
        "recompute_runs_s": [round(t, 4) for t in up_times],
        "speedup_vs_recompute": round(recompute_s / fetch_s, 3) if fetch_s > 0 else 0.0,
        "speedups": [round(run.speedup_vs_recompute, 3) for run in first_runs],
        "bytes_moved": first.bytes_moved,
        "levels_used": first.levels_used,
        "top1_agreement": round(first.top1_agreement, 4),
        "tokens": args.tokens,
        "rate": args.rate,
        "peers": peer_counts,
        "drop_to": args.drop_to,
        "drop_after": args.drop_after if args.drop_to else None,
        "delay_applied": delay_applied,
        "delay": args.delay,
        "loss_pct": args.loss,
        "relay": relay_stats,
        "model": fp.name,
        "runs": [
            {k2: v2 for k2, v2 in asdict(run).items() if k2 != "chunk_times"} for run in runs
        ],
        "warmup": (
            {k2: v2 for k2, v2 in asdict(warmup).items() if k2 != "chunk_times"}
            if warmup is not None else None
        ),
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
