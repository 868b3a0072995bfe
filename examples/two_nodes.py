"""Two kvpeer nodes share a real model's prefix KV, end to end (what `make demo` runs).

Two `kvpeerd` daemons start in two Linux network namespaces joined by a bridge (needs root).
Client A prefills a long prompt (a handbook + a question) with SmolLM2-135M and puts its KV into
daemon A. Client B asks daemon B for the same prefix: B finds A over zeroconf, fetches the encoded
KV over a WebRTC data channel and hands it over through shared memory; B then answers from the
fetched KV. The clients run in this process and reach each daemon through its Unix socket.

    python examples/two_nodes.py [--level exact|q8|...] [--min-level exact|q8|...|any]
                                 [--max-new-tokens 40] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvpeer.codec import LEVELS

HERE = Path(__file__).resolve().parent
QUESTION = (
    "According to the handbook, below which outside temperature must the dome stay closed, "
    "and why?"
)


def build_prompt(tokenizer: object) -> list[int]:
    document = (HERE / "data" / "handbook.txt").read_text()
    messages = [
        {"role": "system", "content": "You answer questions about the document you are given."},
        {"role": "user", "content": f"{document}\n\nQuestion: {QUESTION}"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[attr-defined]
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # choices=: a level the daemons refuse was found only after the namespaces were made and
    # the model loaded.
    parser.add_argument(
        "--level", default="q8", choices=LEVELS, help="codec level daemon A stores (default q8)"
    )
    parser.add_argument(
        "--min-level", default="q8", choices=(*LEVELS, "any"),
        help="lowest level B accepts (default q8; 'any' lets the fetcher go as low as the link needs)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the work directory for inspection (a failed run always keeps it)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("two_nodes.py needs root: it creates two network namespaces (ip netns).", file=sys.stderr)
        return 2

    from kvpeer.models import load_model

    print("loading SmolLM2-135M-Instruct ...", flush=True)
    model, tokenizer = load_model()
    workdir = Path(tempfile.mkdtemp(prefix="kvpeer-demo-"))
    try:
        share_and_compare(args, model, tokenizer, workdir)
    except BaseException:  # kept: the daemons' logs in there say what went wrong
        print(f"work directory kept, with the daemons' logs: {workdir}", file=sys.stderr)
        raise
    if args.keep:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def share_and_compare(args: argparse.Namespace, model: Any, tokenizer: Any, workdir: Path) -> None:
    """A puts the prompt's KV, B fetches it and answers; then B's answer from its own prefill."""
    from kvpeer.api.client import KVPeerClient
    from kvpeer.integrations.transformers import cache_from_kv, cache_of, generate, prefill_and_put
    from kvpeer.models import model_fingerprint
    from kvpeer.testing.cluster import DaemonCluster

    fingerprint = model_fingerprint(model)
    tokens = build_prompt(tokenizer)
    print(f"prompt: {len(tokens)} tokens (handbook + question)")
    with DaemonCluster(2, workdir=workdir) as cluster:
        node_a, node_b = cluster.nodes
        print(f"daemons up: A={node_a.node_id} ({node_a.ip}), B={node_b.node_id} ({node_b.ip})")

        with KVPeerClient(socket_path=node_a.socket_path) as client_a:
            started = time.perf_counter()
            put = prefill_and_put(client_a, model, tokens, fingerprint, level=args.level)
            prefill_s = time.perf_counter() - started
        print(f"A: prefilled and put {put.chunks} chunks in {prefill_s:.2f}s")

        cluster.wait_until_peer_holds(node_b, node_a.node_id, timeout_s=30)
        with KVPeerClient(socket_path=node_b.socket_path) as client_b:
            started = time.perf_counter()
            # "any": the smallest level (None would mean the daemon's fetch.min_level, q5).
            min_level = LEVELS[-1] if args.min_level == "any" else args.min_level
            with client_b.fetch(tokens, fingerprint, min_level=min_level) as result:
                matched, levels = result.matched_tokens, list(result.levels)  # waits for the end
                fetch_s = time.perf_counter() - started
                cache = cache_from_kv(result.k, result.v, model)  # copies out of the segment
            stats_b = client_b.stats()

        # The same prefix recomputed locally on B, for the comparison.
        started = time.perf_counter()
        with torch.no_grad():
            local = model(torch.tensor([tokens[:matched]]), use_cache=True)
        recompute_s = time.perf_counter() - started

        answer_fetched = generate(model, tokenizer, tokens, cache, matched, args.max_new_tokens)
        answer_local = generate(
            model, tokenizer, tokens, cache_of(local), matched, args.max_new_tokens
        )

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fp16_bytes = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * matched
    wire = int(stats_b.get("bytes_from_peers", 0))
    print()
    print(f"prefix tokens matched : {matched} of {len(tokens)}")
    print(f"bytes on the wire     : {wire:,} (fp16 KV would be {fp16_bytes:,}; "
          f"{fp16_bytes / max(wire, 1):.2f}x smaller)")
    print(f"levels per chunk      : {', '.join(levels)}")
    print(f"fetch time            : {fetch_s:.3f}s   local recompute: {recompute_s:.3f}s "
          f"({recompute_s / fetch_s:.2f}x)")
    print(f"B's answer (fetched KV): {answer_fetched!r}")
    print(f"answer without kvpeer : {answer_local!r}")
    print(f"identical             : {answer_fetched == answer_local}")


if __name__ == "__main__":
    sys.exit(main())
