"""The one recipe for an engine's :class:`~kvpeer.hashing.ModelFingerprint`.

Two engines exchange KV only if every fingerprint field matches, so the fields read from a
Hugging Face config must come out the same whichever engine (transformers, vLLM) and whichever
transformers release (4.x keeps ``rope_theta``/``rope_scaling`` at the top of the config, 5.x
moves them into ``rope_parameters``; vLLM patches one into the other) holds it. The shapes
(layers, KV heads, head dim) each engine reads its own way; this module owns the rest.

Must not change a digest that is already published: the shipped codec profiles are keyed by the
transformers-side fingerprint (SmolLM2: ``rope_scaling='{"rope_type": "default"}'``).

Pure: no torch, no transformers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from kvpeer.errors import ConfigError
from kvpeer.hashing import ModelFingerprint

# Config fields older configs keep beside the RoPE dict, under their spellings (vLLM's too).
_THETA_NAMES = ("rope_theta", "rotary_emb_base")
_PARTIAL_NAMES = ("partial_rotary_factor", "rotary_pct", "rotary_emb_fraction")

# RoPE types whose frequencies follow the length of the whole sequence (transformers'
# ``dynamic_rope_update``; ``su`` is longrope's first name): a prefix's KV then depends on what
# follows it, which a key made of the prefix's tokens cannot tell.
_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope", "su"})


# Last path parts that name a training run's output, not a model: two such paths (``/runs/a/final``,
# ``/runs/b/final``) must not come out as one model, so the parts above them are kept too.
_GENERIC_PART = re.compile(
    r"(final|latest|best|last|model|main|merged|output|export|hf|snapshots?|"
    r"checkpoint[-_]?\d*|step[-_]?\d+|epoch[-_]?\d+|[0-9a-f]{40})(\.\w+)?",
    re.IGNORECASE,
)


def model_name(source: object) -> str:
    """A model's name that is the same on every host: the last part of its local path, hub id
    (``org/name``) or file (``name.gguf``); from a Hugging Face cache path
    (``…/models--org--name/snapshots/<sha>``) the model's name, but a GGUF file there its own
    name (``…/snapshots/<sha>/name.Q4_K_M.gguf``: one repo holds several quantizations, each
    with other KV); below a generic last part (``final``, ``checkpoint-500``, ``model.gguf``) the
    parts above it as well (``run-a/final``). Where that is still ambiguous, engines take an
    explicit ``kvpeer_model_name``."""
    text = str(source).rstrip("/")
    parts = [part for part in PurePosixPath(text).parts if part != "/"]
    for index in range(len(parts) - 1, -1, -1):
        if parts[index].startswith("models--"):
            repo = parts[index].rsplit("--", 1)[-1]
            if not text.lower().endswith(".gguf"):
                return repo
            # Past ``snapshots/<sha>`` (a sha differs between hosts): the file, under the repo's
            # name where the file's own name is generic.
            parts = [repo, *parts[index + 3 :]]
            break
    kept: list[str] = []
    for part in reversed(parts):
        kept.insert(0, part)
        if not _GENERIC_PART.fullmatch(part):
            break
    return "/".join(kept) or text


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def rope_fields(config: Any) -> tuple[float, str]:
    """``(rope_theta, rope_scaling)`` of a Hugging Face (text) config, the same for transformers
    4.x and 5.x configs and for vLLM's patched ones; ``(0.0, "")`` for a model without RoPE.

    ``rope_scaling`` is the JSON (sorted keys) of the RoPE parameters without ``rope_theta``:
    the legacy ``type`` key read as ``rope_type``, ``rope_type`` "default" when absent, fields
    kept beside the dict (``partial_rotary_factor``, ``original_max_position_embeddings``)
    moved into it, a partial rotary factor of 1 (all of the head) left out.

    A RoPE whose frequencies depend on the sequence's length (dynamic NTK, longrope) is refused
    (ConfigError): kvpeer shares a prefix's KV whatever follows it.
    """
    raw = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(raw) if isinstance(raw, Mapping) else {}
    top_theta = _first(config, _THETA_NAMES)
    if params and all(isinstance(value, Mapping) for value in params.values()):
        # One dict per attention type (sliding / full): each is canonical on its own.
        parts = {kind: _canonical(dict(part), config, top_theta) for kind, part in params.items()}
        thetas = [theta for theta, _ in parts.values() if theta > 0]
        if not thetas:
            return 0.0, ""
        full = parts.get("full_attention")
        theta = full[0] if full is not None and full[0] > 0 else max(thetas)
        return theta, json.dumps({kind: rope for kind, (_, rope) in parts.items()}, sort_keys=True, default=str)
    theta, rope = _canonical(params, config, top_theta)
    if theta <= 0 and not rope:
        return 0.0, ""
    return theta, json.dumps(rope, sort_keys=True, default=str)


def _canonical(params: dict[str, Any], config: Any, top_theta: Any) -> tuple[float, dict[str, Any]]:
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = top_theta
    theta = float(theta or 0.0)
    if not math.isfinite(theta):
        theta = 0.0
    if theta <= 0 and not params:
        return 0.0, {}  # no RoPE: the fields beside it mean nothing
    legacy = params.pop("type", None)
    if legacy is not None:
        params.setdefault("rope_type", legacy)
    if params.get("rope_type") in _LENGTH_DEPENDENT_ROPE:
        raise ConfigError(
            f"a {params['rope_type']!r} RoPE makes a prefix's KV depend on the length of the whole "
            "sequence, and kvpeer shares the KV of a prefix whatever follows it"
        )
    partial = params.get("partial_rotary_factor", _first(config, _PARTIAL_NAMES))
    params.pop("partial_rotary_factor", None)
    if partial is not None and float(partial) != 1.0:
        params["partial_rotary_factor"] = partial
    ompe = getattr(config, "original_max_position_embeddings", None)
    if ompe is not None:
        params.setdefault("original_max_position_embeddings", ompe)
    params.setdefault("rope_type", "default")
    return theta, params


def _first(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def fingerprint(
    config: Any, *, name: str, layers: int, kv_heads: int, head_dim: int, dtype: object,
    revision: str = "",
) -> ModelFingerprint:
    """The fingerprint of a model served with ``config`` (its Hugging Face text config).

    ``revision`` is the operator's to give (``kvpeer_revision``): nothing both engines read
    alike names a model's weights (transformers 4 records the hub commit in the config, 5 does
    not, and vLLM's ``--revision`` may be a branch name), so by default one name and shape is
    one model."""
    theta, scaling = rope_fields(config)
    return ModelFingerprint(
        name=name, revision=revision, layers=int(layers), kv_heads=int(kv_heads),
        head_dim=int(head_dim), dtype=dtype_name(dtype), rope_theta=theta, rope_scaling=scaling,
    )
