"""Tenant isolation at the key level: one namespace's chunk keys say nothing of another's."""

from __future__ import annotations

import numpy as np

from kvpeer.hashing import chunk_keys, namespace_salt
from tests.trust.fuzzing import FP

CHUNK = 256


def test_the_same_tokens_give_disjoint_keys_in_each_namespace() -> None:
    tokens = np.arange(8 * CHUNK, dtype=np.uint32)
    spaces = ["default", "tenant-a", "tenant-b", "tenant-a ", "Tenant-a"]
    keys = {ns: chunk_keys(tokens, FP.digest(), ns, CHUNK) for ns in spaces}
    every = [k for ks in keys.values() for k in ks]
    assert len(set(every)) == len(every) == 8 * len(spaces)
    # Not even a prefix of one namespace's key predicts another's (independent hashes).
    a, b = keys["tenant-a"][0], keys["tenant-b"][0]
    same_bits = sum(8 - bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))
    assert 64 < same_bits < 192  # ~128 of 256 bits agree by chance


def test_namespace_salts_are_distinct_and_stable() -> None:
    assert namespace_salt("tenant-a") == namespace_salt("tenant-a")
    assert len({namespace_salt(ns) for ns in ("a", "b", "ab", "a\0b", "")}) == 5
