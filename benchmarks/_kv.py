"""Shared helpers of the codec benchmarks: real KV from a model, texts, and fidelity measures.

Texts ship with Python (pydoc's topic help), so nothing is downloaded: the calibration text and
the evaluation text are disjoint halves of it (calibration never sees the evaluated text).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpeer.codec.calibrate import (
    cache_from,
    calibration_text,
    continuation_logprobs,
    evaluation_text,
    fisher_diagonal,
    mean_kl,
    prefix_kv,
)

log = logging.getLogger(__name__)

CHUNK = 256
__all__ = [
    "cache_from", "calibration_text", "continuation_logprobs", "evaluation_text", "fisher_diagonal", "mean_kl", "prefix_kv",
]


def read_text(path: str | None, default: Callable[[], str]) -> str:
    return Path(path).read_text() if path else default()


def check_positions(model: Any, needed: int, option: str) -> None:
    """A clear error, not an IndexError deep in the model, when a run needs more positions than
    the model has (GPT-2's learned position table, e.g. benchmarks.tiny_model's 768)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and needed > limit:
        raise SystemExit(f"the model takes at most {limit} positions; {option} asks for {needed}")


@dataclass(frozen=True, slots=True)
class Window:
    """One evaluation window: a prefix whose KV is coded and a teacher-forced continuation."""

    prefix: torch.Tensor  # [1, P] token ids
    continuation: torch.Tensor  # [1, C]


def windows(tokenizer: Any, text: str, prefix: int, continuation: int, count: int) -> list[Window]:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    span = prefix + continuation
    if len(ids) < span:
        raise ValueError(f"text has {len(ids)} tokens, need {span}")
    stride = max(span, (len(ids) - span) // max(count - 1, 1))
    out = []
    for i in range(count):
        start = i * stride
        if start + span > len(ids):
            break
        out.append(Window(ids[None, start : start + prefix], ids[None, start + prefix : start + span]))
    return out


def chunks(k: torch.Tensor, v: torch.Tensor, size: int = CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, k.shape[2], size):
        yield k[:, :, start : start + size].contiguous(), v[:, :, start : start + size].contiguous()


@dataclass(frozen=True, slots=True)
class Fidelity:
    kl: float  # mean KL(original || decoded) per position
    top1: float  # fraction of positions whose argmax agrees
    nll_delta: float  # mean NLL of the true next tokens, decoded minus original
    positions: int


def compare(ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position KL, top-1 agreement and NLL delta (targets: next tokens, -1 where unknown)."""
    kl = (ref.exp() * (ref - test)).sum(-1)
    agree = (ref.argmax(-1) == test.argmax(-1)).float()
    valid = targets >= 0
    idx = targets.clamp(min=0)[:, None]
    nll = (ref.gather(1, idx)[:, 0] - test.gather(1, idx)[:, 0]) * valid
    return kl, agree, nll


def summarize(kls: list[torch.Tensor], agrees: list[torch.Tensor], nlls: list[torch.Tensor]) -> Fidelity:
    kl = torch.cat(kls)
    return Fidelity(
        kl=float(kl.mean()),
        top1=float(torch.cat(agrees).mean()),
        nll_delta=float(torch.cat(nlls).sum() / max(1, kl.numel() - len(kls))),
        positions=int(kl.numel()),
    )
