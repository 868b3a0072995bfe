"""Chunk keys: deterministic, chained names for the KV of token prefixes.

Tokens are cut into fixed chunks (256 by default). The key of chunk i is
BLAKE2b-256(key of chunk i-1 || model fingerprint || namespace salt || tokens of chunk i as
little-endian uint32), so a key names the whole prefix up to and including its chunk, for one
model and one tenant namespace. Keys are identical across processes, hosts and restarts.
Only full chunks get keys: a trailing partial chunk is always recomputed.

This module is pure: no I/O, no torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_CHUNK_TOKENS = 256
KEY_BYTES = 32
_ZERO_KEY = b"\x00" * KEY_BYTES
_MAX_TOKEN_ID = 2**32 - 1
KV_DTYPES = ("float16", "bfloat16", "float32")  # torch's names of the KV dtypes kvpeer carries
# A model's KV shape, bounded: a fingerprint comes from clients and peers, and sizes what the
# daemon reserves (a put's segment is tokens x layers x kv_heads x head_dim values). Each
# dimension stops at the codec's format limit (kvpeer.codec.container: KV past it could never
# be stored), far past any model's (about 130 layers, 128 KV heads, a 576-wide MLA latent). The
# values per token stop where a default chunk of them is the codec's most per tensor (2**31):
# 8 Mi, four times the widest dense model's (MT-NLG 530B: 105 x 128 x 160); one token's K and
# V then take 64 MiB at most, not the GiBs a 2**29 head_dim asked for.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_KV_VALUES_PER_TOKEN = 1 << 23  # layers x kv_heads x head_dim


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFingerprint:
    """What makes KV of one model incompatible with another's.

    Two engines may exchange KV only if every field matches.
    """

    name: str
    revision: str = ""
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    rope_theta: float = 0.0
    rope_scaling: str = ""  # canonical text of the RoPE scaling config, "" for none

    def __post_init__(self) -> None:
        # Fields arrive from clients and peers: a wrong type must fail here, not deep in a put.
        for text in ("name", "revision", "dtype", "rope_scaling"):
            if not isinstance(getattr(self, text), str):
                raise TypeError(f"model fingerprint: {text} must be a string")
        if not self.name:
            raise ValueError("model fingerprint needs a model name")
        for field, limit in (("layers", MAX_LAYERS), ("kv_heads", MAX_KV_HEADS), ("head_dim", MAX_HEAD_DIM)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"model fingerprint: {field} must be an integer")
            if not 1 <= value <= limit:
                raise ValueError(f"model fingerprint: {field} must be in 1..{limit}, not {value}")
        per_token = self.layers * self.kv_heads * self.head_dim
        if per_token > MAX_KV_VALUES_PER_TOKEN:
            raise ValueError(
                f"model fingerprint: layers x kv_heads x head_dim = {per_token} KV values per token, "
                f"more than {MAX_KV_VALUES_PER_TOKEN}"
            )
        theta = self.rope_theta
        try:
            finite = not isinstance(theta, bool) and isinstance(theta, int | float) and math.isfinite(theta)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise TypeError("model fingerprint: rope_theta must be a finite number")
        # Equal fingerprints must digest alike: repr tells 10000 from 10000.0.
        # (+ 0.0: -0.0 equals 0.0, so it must digest alike too.)
        object.__setattr__(self, "rope_theta", float(theta) + 0.0)
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"model fingerprint: dtype must be one of {KV_DTYPES}, not {self.dtype!r}")

    def digest(self) -> bytes:
        """16-byte digest of every field, in a fixed canonical order."""
        return _fingerprint_digest(self)

    @property
    def hex(self) -> str:
        return self.digest().hex()


@functools.lru_cache(maxsize=256)
def _fingerprint_digest(fp: ModelFingerprint) -> bytes:
    # Asked per chunk and per request (the digest keys every chunk; its hex names the model in
    # adverts and plans): computed once per fingerprint, not each time.
    canonical = repr(sorted(asdict(fp).items())).encode()
    return hashlib.blake2b(canonical, digest_size=16, person=b"kvpeer-model").digest()


def namespace_salt(namespace: str | bytes) -> bytes:
    """Salt of a tenant namespace: keys of one namespace reveal nothing of another's."""
    raw = namespace.encode() if isinstance(namespace, str) else namespace
    return hashlib.blake2b(raw, digest_size=16, person=b"kvpeer-ns").digest()


def token_ids(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """``tokens`` as a flat int64 array; ValueError unless they are integers that fit uint32.
    Floats, bools and strings are refused, not truncated: 1.7 would key as token 1."""
    ids = np.asarray(tokens)
    if ids.ndim != 1:
        raise ValueError("tokens must be a flat sequence of token ids")
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.dtype.kind == "f" and not isinstance(tokens, np.ndarray):
        # NumPy makes floats of a list mixing integer scalar types (uint64 with int64): the
        # items themselves say whether they are integers.
        ids = np.asarray([_integer(item) for item in tokens])
    if ids.dtype == object:  # Python ints too wide for any NumPy integer
        raise ValueError("token ids must fit in uint32")
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, not {ids.dtype}")
    if ids.min() < 0 or ids.max() > _MAX_TOKEN_ID:
        raise ValueError("token ids must fit in uint32")
    return ids.astype(np.int64)


def _integer(item: object) -> int:
    if isinstance(item, bool | np.bool_):
        raise ValueError("token ids must be integers, not bool")
    try:
        return operator.index(item)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"token ids must be integers, not {type(item).__name__}") from None


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    fingerprint: bytes,
    namespace: str | bytes = "",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[bytes]:
    """Keys of every full chunk of ``tokens``, first chunk first.

    ``fingerprint`` is :meth:`ModelFingerprint.digest`. Raises ValueError for token ids that do
    not fit uint32 or a non-positive chunk size.
    """
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    ids = token_ids(tokens)
    salt = namespace_salt(namespace)
    data = ids.astype("<u4").tobytes()
    step = 4 * chunk_tokens
    keys: list[bytes] = []
    previous = _ZERO_KEY
    for start in range(0, (len(data) // step) * step, step):
        h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvpeer-chunk")
        h.update(previous)
        h.update(fingerprint)
        h.update(salt)
        h.update(struct.pack("<I", chunk_tokens))
        h.update(data[start : start + step])
        previous = h.digest()
        keys.append(previous)
    return keys
