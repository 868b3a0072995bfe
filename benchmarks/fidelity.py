"""Fidelity per codec level: next-token top-1 agreement, KL divergence and perplexity change.

    python -m benchmarks.fidelity [--json] [--model PATH_OR_GGUF] [--text FILE] [--windows N]
                                  [--profile auto|none|FILE[,...]] [--tail last|every|none[,...]]
                                  [--chunk TOKENS] [--rotary-prior auto|on|off] [--plot PNG]
    python -m benchmarks.fidelity --fisher SAMPLES [--windows 2] [--levels q8]   (calibration text)

For each window of the text: the prefix's KV is computed, cut into 256-token chunks (--chunk), each
chunk encoded and decoded at the level (fp16 in, as engines hold it; tail steps on the prefix's
last chunk as the daemon encodes, --tail), and the continuation is run
teacher-forced on the decoded cache and on the original one. KL(original || decoded) and
top-1 agreement are averaged over all continuation positions (>= 1,000 by default: 4 windows of
256), perplexity over the continuation's true next tokens. The default text is the evaluation
half of pydoc's topics; the calibration profile ("auto": the stored one for the model's
fingerprint, if any) was measured on the other half. A PNG plot (ratio vs KL and top-1) is
written next to the table when matplotlib is installed. With --json the last line is one object.

``--fisher``: where a level's KL comes from, on the calibration text. A Fisher-information map
of the continuation w.r.t. every K/V element (benchmarks._kv.fisher_diagonal) times the level's
actual squared error predicts its KL; printed: the prediction, the K share, the share of the
heaviest tokens, and how many bits/element an oracle allocation of steps per group (tensor-layer,
head, channel, token) would save at equal rate (0.5*log2 of arithmetic over geometric mean of
the groups' mean KL contribution). These measurements chose the codec's steps and exact tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks import _kv
from kvpeer import codec
from kvpeer.codec import profile as profiles
from kvpeer.models import load_model, model_fingerprint


def _profile(spec: str, model: Any) -> profiles.CodecProfile | None:
    if spec == "none":
        return None
    if spec == "auto":
        return profiles.for_fingerprint(model_fingerprint(model))
    return profiles.CodecProfile.from_json(Path(spec).read_text())


def run(model_spec: str | None, text: str, windows: int, prefix: int, continuation: int,
        levels: list[str], profile_spec: str = "auto", model_tok: tuple[Any, Any] | None = None,
        use_rope: bool = False, tail: str = "last", chunk: int = _kv.CHUNK,
        rotary_prior: str = "auto") -> dict[str, Any]:
    if tail not in ("last", "every", "none"):
        raise SystemExit(f"--tail {tail!r}: last, every or none")
    model, tok = model_tok or load_model(model_spec)
    _kv.check_positions(model, prefix + continuation, "--prefix + --continuation")
    profile = _profile(profile_spec, model)
    fingerprint = model_fingerprint(model)
    theta = fingerprint.rope_theta if use_rope else 0.0
    if rotary_prior not in ("auto", "on", "off"):
        raise SystemExit(f"--rotary-prior {rotary_prior!r}: auto, on or off")
    # auto: the plain call reads the keys (for a model with rotate-half RoPE that is what the
    # daemon decides from the fingerprint's theta too); on / off force it
    rotate_half = None if rotary_prior == "auto" else rotary_prior == "on"
    wins = _kv.windows(tok, text, prefix, continuation, windows)
    prepared = []
    for w in wins:
        k, v = _kv.prefix_kv(model, w.prefix)
        ref = _kv.continuation_logprobs(model, k, v, w.continuation)
        targets = torch.cat([w.continuation[0, 1:], torch.tensor([-1])])
        prepared.append((k.half(), v.half(), w.continuation, ref, targets))
    rows = []
    for level in levels:
        kls, agrees, nlls, ref_nll = [], [], [], []
        size = fp16 = 0
        for k, v, cont, ref, targets in prepared:
            ks, vs = [], []
            chunks = list(_kv.chunks(k, v, chunk))
            for i, (kc, vc) in enumerate(chunks):
                rope = codec.RopeSpec(theta=theta, start=i * chunk) if theta else None
                # "last": what the daemon does; "every": the plain call on each chunk
                is_tail = tail == "every" or (tail == "last" and i == len(chunks) - 1)
                blob = codec.encode(kc, vc, level, profile=profile, rope=rope, tail=is_tail,
                                    rotate_half=rotate_half)
                size += len(blob)
                fp16 += kc.numel() * 4
                k2, v2 = codec.decode(blob)
                ks.append(k2)
                vs.append(v2)
            test = _kv.continuation_logprobs(model, torch.cat(ks, 2).float(), torch.cat(vs, 2).float(), cont)
            a, b, c = _kv.compare(ref, test, targets)
            kls.append(a)
            agrees.append(b)
            nlls.append(c)
            valid = targets >= 0
            ref_nll.append(-ref.gather(1, targets.clamp(min=0)[:, None])[:, 0][valid])
        fid = _kv.summarize(kls, agrees, nlls)
        base = float(torch.cat(ref_nll).mean())
        rows.append({
            "level": level, "ratio": fp16 / size, "kl": fid.kl, "top1": fid.top1,
            "ppl": math.exp(base + fid.nll_delta), "ppl_ref": math.exp(base),
            "ppl_delta": math.exp(base + fid.nll_delta) - math.exp(base), "positions": fid.positions,
        })
    return {
        "model": getattr(model.config, "kvpeer_model_name", model_spec),
        "profile": profile.source if profile else "none",
        "keys_pre_rope": bool(theta), "tail": tail, "chunk": chunk, "rotary_prior": rotary_prior,
        "windows": len(wins), "prefix": prefix, "continuation": continuation, "rows": rows,
    }


def _allocation_gain(contrib: torch.Tensor, keep: tuple[int, ...]) -> float:
    """Bits/element an oracle saves by re-allocating steps over groups (dims ``keep`` of [2,L,H,T,D])."""
    drop = tuple(d for d in range(contrib.dim()) if d not in keep)
    per_group = contrib.double().mean(dim=drop) if drop else contrib.double()
    per_group = per_group.clamp(min=1e-30)
    return float(0.5 * torch.log2(per_group.mean() / per_group.log().mean().exp()))


def fisher(model_spec: str | None, windows: int, prefix: int, continuation: int, samples: int,
           levels: list[str]) -> dict[str, Any]:
    model, tok = load_model(model_spec)
    for p in model.parameters():
        p.requires_grad_(False)
    rows = []
    for i, w in enumerate(_kv.windows(tok, _kv.calibration_text(), prefix, continuation, windows)):
        k, v = _kv.prefix_kv(model, w.prefix)
        k, v = k.half().float(), v.half().float()
        fk, fv = _kv.fisher_diagonal(model, k, v, w.continuation, samples, seed=i)
        info = torch.stack([fk, fv])
        for level in levels:
            decoded = [codec.decode(codec.encode(kc.half(), vc.half(), level, tail=False)) for kc, vc in _kv.chunks(k, v)]
            err = torch.stack([torch.cat([d[0] for d in decoded], 2), torch.cat([d[1] for d in decoded], 2)]).float()
            contrib = 0.5 * info * (err - torch.stack([k, v])) ** 2  # [2, L, H, T, D]
            total = float(contrib.sum())
            per_token = contrib.sum(dim=(0, 1, 2, 4)).sort(descending=True).values
            rows.append({
                "window": i, "level": level, "predicted_kl": total,
                "k_share": float(contrib[0].sum()) / total,
                "top1_token_share": float(per_token[:1].sum()) / total,
                "top5_token_share": float(per_token[:5].sum()) / total,
                "gain_tensor_layer": _allocation_gain(contrib, (0, 1)),
                "gain_head": _allocation_gain(contrib, (0, 1, 2)),
                "gain_channel": _allocation_gain(contrib, (0, 1, 2, 4)),
                "gain_token": _allocation_gain(contrib, (0, 1, 2, 3)),
            })
    return {"model": getattr(model.config, "kvpeer_model_name", model_spec), "samples": samples, "rows": rows}


def fisher_table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}; Fisher map from {result['samples']} samples per window (calibration text)",
        f"{'win':>3} {'level':<6} {'pred KL':>9} {'K share':>7} {'top1 tok':>8} {'top5 tok':>8} "
        f"{'oracle bits saved by: layer':>27} {'head':>5} {'chan':>5} {'token':>6}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['window']:>3} {r['level']:<6} {r['predicted_kl']:9.2e} {r['k_share']:7.2f} {r['top1_token_share']:8.2f} "
            f"{r['top5_token_share']:8.2f} {r['gain_tensor_layer']:27.2f} {r['gain_head']:5.2f} {r['gain_channel']:5.2f} {r['gain_token']:6.2f}"
        )
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}; {result['windows']} windows of {result['prefix']}-token prefix + "
        f"{result['continuation']} continuation; profile: {result['profile']}; keys pre-RoPE: {result['keys_pre_rope']}; "
        f"{result['chunk']}-token chunks, tail steps: {result['tail']}",
        f"{'level':<7} {'ratio':>6} {'KL':>9} {'top-1':>7} {'ppl':>8} {'Δppl':>8} {'positions':>9}",
    ]
    for r in result["rows"]:
        lines.append(f"{r['level']:<7} {r['ratio']:6.2f} {r['kl']:9.2e} {r['top1']:7.4f} {r['ppl']:8.3f} {r['ppl_delta']:+8.4f} {r['positions']:9d}")
    return "\n".join(lines)


def side_by_side(results: list[dict[str, Any]], names: list[str]) -> str:
    """Ratio and KL per level of several runs (profiles) of the same windows, and their ratios to the first."""
    first = {r["level"]: r for r in results[0]["rows"]}
    lines = [f"{'level':<7} " + " ".join(f"{n + ' ratio':>12} {n + ' KL':>12}" for n in names)
             + "".join(f" {names[i] + '/' + names[0] + ' size':>16} {'KL':>6}" for i in range(1, len(names)))]
    for row in results[0]["rows"]:
        level = row["level"]
        others = [{r["level"]: r for r in res["rows"]}[level] for res in results]
        line = f"{level:<7} " + " ".join(f"{o['ratio']:12.2f} {o['kl']:12.2e}" for o in others)
        for o in others[1:]:
            line += f" {first[level]['ratio'] / o['ratio']:16.3f} {o['kl'] / max(first[level]['kl'], 1e-30):6.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, names: list[str] | None = None) -> bool:
    """Ratio vs KL and vs top-1 per level, one line per run (profile), into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, result in enumerate(results):
        rows = result["rows"]
        label = names[i] if names else result["profile"][:40]
        for axis, key in ((ax[0], "kl"), (ax[1], "top1")):
            axis.plot([r["ratio"] for r in rows], [max(r[key], 1e-9) for r in rows], "o-", label=f"profile {label}")
            for r in rows:
                axis.annotate(r["level"], (r["ratio"], max(r[key], 1e-9)))
    for axis, key, label in ((ax[0], "kl", "mean KL divergence"), (ax[1], "top1", "top-1 agreement")):
        axis.set_xlabel("size ratio vs fp16")
        axis.set_ylabel(label)
        if key == "kl":
            axis.set_yscale("log")
        if len(results) > 1:
            axis.legend()
    fig.suptitle(f"kvpeer codec fidelity: {results[0]['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", default=None, help="text file to evaluate on (default: pydoc topics, eval half)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--levels", default=",".join(codec.LEVELS))
    parser.add_argument("--profile", default="auto",
                        help="auto (stored for the model), none, or a JSON file; comma-separated: each on the same windows")
    parser.add_argument("--rope", action="store_true", help="quantize keys before RoPE (default rope only)")
    parser.add_argument("--tail", default="last",
                        help="which chunks get the codec's tail steps: last (what the daemon does), every (the "
                             "plain call on each chunk), none; comma-separated: each on the same windows")
    parser.add_argument("--chunk", type=int, default=_kv.CHUNK,
                        help="tokens per encoded chunk (the prefix length: the whole prefix in one plain call)")
    parser.add_argument("--rotary-prior", default="auto", choices=("auto", "on", "off"),
                        help="the codec's rotary-index prior on keys: auto (the plain call: read from the "
                             "keys), on, off (forced)")
    parser.add_argument("--plot", default="benchmarks/out/fidelity.png", help="PNG to write (its folder is made)")
    parser.add_argument("--fisher", type=int, default=0, metavar="SAMPLES",
                        help="instead: where each level's KL comes from (Fisher map, calibration text)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fisher:
        found = fisher(args.model, args.windows, args.prefix, args.continuation, args.fisher, args.levels.split(","))
        print(fisher_table(found))
        if args.json:
            print(json.dumps(found))
        return
    text = _kv.read_text(args.text, _kv.evaluation_text)
    model_tok = load_model(args.model)
    runs = [(spec, tail) for spec in args.profile.split(",") for tail in args.tail.split(",")]
    names = [spec if "," not in args.tail else f"{spec}/tail {tail}" for spec, tail in runs]
    results = [
        run(args.model, text, args.windows, args.prefix, args.continuation, args.levels.split(","), spec,
            model_tok=model_tok, use_rope=args.rope, tail=tail, chunk=args.chunk,
            rotary_prior=args.rotary_prior)
        for spec, tail in runs
    ]
    for result in results:
        print(table(result))
    if len(results) > 1:
        print(side_by_side(results, names))
    if args.plot and plot(results, Path(args.plot), names):
        print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"runs": results}))


if __name__ == "__main__":
    main()
