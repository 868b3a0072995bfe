import subprocess
import sys

import numpy as np
import pytest

from kvpeer.api.messages import as_tokens
from kvpeer.errors import ProtocolError
from kvpeer.hashing import ModelFingerprint, chunk_keys, namespace_salt

FP = ModelFingerprint(name="m", layers=2, kv_heads=1, head_dim=4, dtype="float16").digest()


def test_only_full_chunks_get_keys() -> None:
    assert len(chunk_keys(list(range(10)), FP, chunk_tokens=4)) == 2
    assert chunk_keys(list(range(3)), FP, chunk_tokens=4) == []


def test_keys_are_chained_prefix_names() -> None:
    a = chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], FP, chunk_tokens=4)
    b = chunk_keys([9, 2, 3, 4, 5, 6, 7, 8], FP, chunk_tokens=4)
    assert a[0] != b[0]
    assert a[1] != b[1]  # same second chunk, different history


def test_namespace_and_model_change_every_key() -> None:
    tokens = list(range(16))
    base = chunk_keys(tokens, FP, "tenant-a", chunk_tokens=4)
    assert not set(base) & set(chunk_keys(tokens, FP, "tenant-b", chunk_tokens=4))
    other = ModelFingerprint(name="m", layers=2, kv_heads=1, head_dim=4, dtype="bfloat16")
    assert not set(base) & set(chunk_keys(tokens, other.digest(), "tenant-a", chunk_tokens=4))
    assert namespace_salt("a") != namespace_salt("b")


def test_keys_are_identical_in_another_process() -> None:
    code = (
        "from kvpeer.hashing import ModelFingerprint, chunk_keys;"
        "fp = ModelFingerprint(name='m', layers=2, kv_heads=1, head_dim=4, dtype='float16');"
        "print(','.join(k.hex() for k in chunk_keys(list(range(600)), fp.digest(), 'ns')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123"},
    ).stdout.strip()
    here = ",".join(k.hex() for k in chunk_keys(list(range(600)), FP, "ns"))
    assert out == here


def test_bad_tokens_are_rejected() -> None:
    with pytest.raises(ValueError):
        chunk_keys([-1] * 4, FP, chunk_tokens=4)
    with pytest.raises(ValueError):
        chunk_keys([2**32] * 4, FP, chunk_tokens=4)
    for wide in ([2**63] * 4, [2**64] * 4, np.array([2**63] * 4, dtype=np.uint64)):
        with pytest.raises(ValueError, match="fit in uint32"):  # OverflowError for 2**63
            chunk_keys(wide, FP, chunk_tokens=4)
    # Truncated, 1.7 keyed as token 1 and True as 1: another prompt's KV.
    for not_ids in ([1.7, 2, 3, 4], np.array([1.0, 2, 3, 4]), [True, False, True, True], ["5", "6", "7", "8"]):
        with pytest.raises(ValueError, match="must be integers"):
            chunk_keys(not_ids, FP, chunk_tokens=4)
        with pytest.raises(ProtocolError, match="must be integers"):
            as_tokens(not_ids)
    assert chunk_keys(np.array([1, 2, 3, 4], dtype=np.uint16), FP, chunk_tokens=4) == chunk_keys(
        [1, 2, 3, 4], FP, chunk_tokens=4
    )
    # NumPy promotes a list mixing uint64 and int64 scalars to float64: still integers.
    mixed = [np.uint64(1), np.int64(2), 3, np.int32(4)]
    assert chunk_keys(mixed, FP, chunk_tokens=4) == chunk_keys([1, 2, 3, 4], FP, chunk_tokens=4)
    with pytest.raises(ValueError, match="must be integers"):
        chunk_keys([np.uint64(1), np.int64(2), 3.0, 4], FP, chunk_tokens=4)
    with pytest.raises(ValueError):
        ModelFingerprint(name="m", layers=0, kv_heads=1, head_dim=4, dtype="float16")


def test_equal_fingerprints_digest_alike() -> None:
    as_int = ModelFingerprint(name="m", layers=2, kv_heads=2, head_dim=8, dtype="float16", rope_theta=10000)
    as_float = ModelFingerprint(name="m", layers=2, kv_heads=2, head_dim=8, dtype="float16", rope_theta=10000.0)
    assert as_int == as_float and as_int.hex == as_float.hex


@pytest.mark.parametrize("dtype", ["torch.float16", "fp16", "int8", ""])
def test_a_fingerprint_names_its_dtype_as_kvpeer_does(dtype: str) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelFingerprint(name="m", layers=2, kv_heads=2, head_dim=8, dtype=dtype)


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        ((1, 1, 2**29), "head_dim must be in 1..4096"),  # a one-token put reserved 2 GiB
        ((1, 2**20, 4), "kv_heads must be in 1..1024"),
        ((2**20, 1, 4), "layers must be in 1..1024"),
        ((1024, 1024, 4096), "KV values per token"),  # each within bounds, together 4 Gi
    ],
)
def test_a_fingerprint_of_no_real_model_shape_is_refused_naming_the_field_and_limit(
    shape: tuple[int, int, int], says: str
) -> None:
    layers, kv_heads, head_dim = shape
    with pytest.raises(ValueError, match=says):
        ModelFingerprint(name="m", layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype="float16")


@pytest.mark.parametrize(
    "shape",
    [(126, 8, 128), (61, 1, 576), (96, 96, 128), (105, 128, 160), (1024, 1, 4096)],  # Llama 3 405B,
)  # DeepSeek V3's MLA latent, GPT-3 175B, MT-NLG 530B, the edges
def test_every_real_models_kv_shape_fits_a_fingerprint(shape: tuple[int, int, int]) -> None:
    layers, kv_heads, head_dim = shape
    ModelFingerprint(name="m", layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype="float32")


def test_the_fingerprint_bounds_are_within_the_codecs() -> None:
    """A fingerprint the daemon takes must name KV the codec can store: a default chunk of it
    at most the codec's most values per tensor."""
    from kvpeer import hashing
    from kvpeer.codec import container

    assert hashing.MAX_LAYERS <= container.MAX_LAYERS
    assert hashing.MAX_KV_HEADS <= container.MAX_KV_HEADS
    assert hashing.MAX_HEAD_DIM <= container.MAX_HEAD_DIM
    assert hashing.MAX_KV_VALUES_PER_TOKEN * hashing.DEFAULT_CHUNK_TOKENS <= container.MAX_ELEMENTS
