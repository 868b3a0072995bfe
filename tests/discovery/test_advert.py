import os
from collections.abc import Iterable

import pytest

from kvpeer.discovery.advert import (
    MAX_ADDRESSES,
    MAX_TXT_BYTES,
    Advertisement,
    decode_fields,
    decode_record,
    encode_fields,
    encode_record,
    txt_size,
)
from kvpeer.discovery.digest import MAX_DIGEST_BYTES, BloomDigest, key_id
from kvpeer.errors import ProtocolError

FP = "0123456789abcdef0123456789abcdef"
KEY = bytes(range(32))  # the cluster key


def keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def advert(**kw: object) -> Advertisement:
    base: dict[str, object] = dict(
        node_id="node-a", addresses=("10.0.0.1",), port=7457, fingerprints=(FP,), epoch=5,
        chunk_count=3, first_chunk_keys=keys(3), digest_key=KEY,
    )
    base.update(kw)
    return Advertisement(**base)  # type: ignore[arg-type]


def test_fields_round_trip() -> None:
    a = advert()
    peer = decode_fields(encode_fields(a), ["10.0.0.1"])
    assert (peer.node_id, peer.port, peer.fingerprints, peer.epoch, peer.chunk_count) == (
        "node-a", 7457, (FP,), 5, 3,
    )
    for key in a.first_chunk_keys:
        assert peer.might_hold_prefix(key, [KEY])


def test_record_round_trip() -> None:
    a = advert()
    assert decode_record(encode_record(a, ["10.0.0.1"])).addresses == ("10.0.0.1",)


@pytest.mark.parametrize("n", [0, 1, 100, 10_000, 200_000])
def test_txt_stays_under_1kb_with_many_fingerprints(n: int) -> None:
    fps = tuple(f"{i:032x}" for i in range(4))
    a = advert(first_chunk_keys=keys(n) if n < 20_000 else [os.urandom(32) for _ in range(n)],
               fingerprints=fps, node_id="n" * 63, epoch=2**62, chunk_count=2**40)
    assert txt_size(encode_fields(a)) <= MAX_TXT_BYTES


def test_worst_case_fields_still_fit_with_a_smaller_digest() -> None:
    fps = tuple(f"{i:064x}" for i in range(8))
    a = advert(node_id="n" * 63, fingerprints=fps, epoch=2**63 - 1, chunk_count=2**63 - 1,
               first_chunk_keys=keys(1000))
    fields = encode_fields(a)
    assert txt_size(fields) <= MAX_TXT_BYTES
    peer = decode_fields(fields, ["10.0.0.1"])
    assert peer.digest is not None and all(peer.might_hold_prefix(k, [KEY]) for k in a.first_chunk_keys)


def test_digest_false_positive_rate_is_low_below_capacity() -> None:
    held = keys(400)
    digest = BloomDigest.decode(BloomDigest.build(held).encode())
    assert all(k in digest for k in held)
    false_hits = sum(k in digest for k in keys(5_000))
    assert false_hits < 5_000 * 0.05
    assert len(digest.encode()) <= MAX_DIGEST_BYTES + 2


def test_empty_peer_holds_nothing() -> None:
    peer = decode_fields(encode_fields(advert(chunk_count=0, first_chunk_keys=())), ["10.0.0.1"])
    assert not peer.might_hold_prefix(os.urandom(32))


def test_the_digest_tells_a_host_without_the_cluster_key_nothing() -> None:
    """Chunk keys are unkeyed hashes of public inputs (tokens, model, namespace name), and the
    digest of them was published unkeyed: any host on the LAN could test whether a guessed
    document was cached (see /tmp/review-trust/bloom_oracle.py)."""
    held, guesses = keys(40), keys(2000)
    fields = encode_fields(advert(chunk_count=40, first_chunk_keys=held))
    assert not any(k.startswith(b"d") for k in fields)  # no digest of the keys themselves
    peer = decode_fields(fields, ["10.0.0.1"])
    assert peer.digest is not None
    # Without the key: "maybe" for every prefix, held or not...
    assert all(peer.might_hold_prefix(k) for k in held + guesses)
    assert all(peer.might_hold_prefix(k, [os.urandom(32)]) for k in held + guesses)
    # ...and testing the chunk keys against the published bits is guessing (a held key hits
    # as often as any: ~1% of the time, not always).
    assert sum(k in peer.digest for k in held) < len(held) // 2
    # With the key: held prefixes certainly answer yes, others mostly no.
    assert all(peer.might_hold_prefix(k, [KEY]) for k in held)
    assert sum(peer.might_hold_prefix(k, [KEY]) for k in guesses) < len(guesses) * 0.05


def test_without_a_cluster_key_no_digest_is_published() -> None:
    fields = encode_fields(advert(digest_key=None))
    assert not any(k[:1] in (b"d", b"k") for k in fields)
    peer = decode_fields(fields, ["10.0.0.1"])
    assert peer.digest is None and peer.might_hold_prefix(os.urandom(32))


def test_a_digest_keyed_with_either_rotation_key_is_read() -> None:
    """During a key rotation a node holds the current and the next key; its peers publish
    with their current one, which may be either."""
    nxt = os.urandom(32)
    held = keys(20)
    peer = decode_fields(encode_fields(advert(first_chunk_keys=held, digest_key=nxt)), ["10.0.0.1"])
    assert all(peer.might_hold_prefix(k, [KEY, nxt]) for k in held)
    assert sum(peer.might_hold_prefix(k, [KEY, nxt]) for k in keys(2000)) < 100


def test_the_unkeyed_digest_of_a_node_before_keyed_digests_is_still_read() -> None:
    held = keys(20)
    fields = encode_fields(advert(digest_key=None, chunk_count=20))
    fields[b"d0"] = BloomDigest.build(held).encode()  # what those nodes sent
    peer = decode_fields(fields, ["10.0.0.1"])
    assert peer.digest_key_id is None and all(peer.might_hold_prefix(k) for k in held)
    assert sum(peer.might_hold_prefix(k) for k in keys(2000)) < 100


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.update({b"v": b"2"}),
        lambda f: f.pop(b"p"),
        lambda f: f.update({b"p": b"99999"}),
        lambda f: f.update({b"e": b"-1"}),
        lambda f: f.update({b"id": b"bad id!"}),
        lambda f: f.update({b"id": b"\xff\xfe"}),
        lambda f: f.update({b"fp": b"not-hex"}),
        # A node before keyed digests sends "d0" only.
        lambda f: (f.pop(b"k0"), f.update({b"d0": b"\x09\x03" + b"\x00" * 100})),
        lambda f: (f.pop(b"k0"), f.update({b"d0": b"\x01\x00" + b"\x00" * 100})),
        lambda f: f.update({b"k0": b"\x01\x02"}),
        lambda f: f.update({b"k0": b"\x01\x02\x03\x04\x01\x00" + b"\x00" * 100}),
        lambda f: f.update({b"x": b"y" * 1000}),
    ],
)
def test_malformed_txt_is_rejected(mutate: object) -> None:
    fields = encode_fields(advert())
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(ProtocolError):
        decode_fields(fields, ["10.0.0.1"])


@pytest.mark.parametrize("blob", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa4addr\x01", b"x" * 5000])
def test_malformed_record_is_rejected(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_record(blob)


def test_invalid_advertisement_is_refused() -> None:
    with pytest.raises(ProtocolError):
        advert(port=0)
    with pytest.raises(ProtocolError):
        advert(addresses=("not-an-ip",))


@pytest.mark.parametrize("address", ["::1", "fe80::1%lo", "::ffff:10.0.0.1", "010.0.0.1"])
def test_non_ipv4_peer_addresses_are_refused(address: str) -> None:
    """Only IPv4 is supported: an IPv6 address would become a heartbeat target that our IPv4
    beacon socket cannot send to (uvloop raises ValueError)."""
    with pytest.raises(ProtocolError):
        decode_record(encode_record(advert(), [address, "10.0.0.1"]))


def test_a_peer_without_an_ipv4_address_is_refused() -> None:
    """A host answering AAAA only (zeroconf) or an etcd record with "addr": [] became a live
    peer that every request to failed with IndexError at its first address."""
    with pytest.raises(ProtocolError, match="no IPv4 address"):
        decode_fields(encode_fields(advert()), [])
    with pytest.raises(ProtocolError, match="no IPv4 address"):
        decode_record(encode_record(advert(), []))
    assert advert(addresses=()).addresses == ()  # our own: empty means "the interfaces'"


def test_a_peers_addresses_keep_the_order_it_advertised() -> None:
    """zeroconf returns a service's A records in the order of its cache, not the node's: peers
    dialled a multi-homed node at an address where its transport (on its first) did not
    listen."""
    ordered = ["10.0.0.3", "10.0.0.1", "10.0.0.2"]
    fields = encode_fields(advert(), ordered)
    assert decode_fields(fields, list(reversed(ordered))).addresses == tuple(ordered)


def test_an_advertisement_without_its_address_order_takes_the_addresses_beside_it() -> None:
    """Nodes before the address field sent none: their A records are all there is."""
    fields = encode_fields(advert())
    assert b"a" not in fields
    assert decode_fields(fields, ["10.0.0.2", "10.0.0.1"]).addresses == ("10.0.0.2", "10.0.0.1")


def test_the_address_field_fits_beside_worst_case_fields() -> None:
    fps = tuple(f"{i:064x}" for i in range(8))
    a = advert(
        node_id="n" * 63,
        fingerprints=fps,
        epoch=2**63 - 1,
        chunk_count=2**63 - 1,
        first_chunk_keys=keys(1000),
    )
    many = [f"192.168.{i}.{200 + i}" for i in range(MAX_ADDRESSES + 4)]
    fields = encode_fields(a, many)
    assert txt_size(fields) <= MAX_TXT_BYTES and len(fields[b"a"]) < 255
    assert decode_fields(fields, many).addresses == tuple(many[:MAX_ADDRESSES])


def test_an_advertisement_sent_again_macs_its_keys_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A static node sends its advertisement every heartbeat: each send MACed every first-chunk
    key again on the event loop (~190 ms for 100,000 keys, /tmp/review-disc/digest_cost.py)."""
    import dataclasses

    from kvpeer.discovery import advert as advert_module

    macs: list[int] = []
    real = advert_module.keyed_entries

    def counting(key: bytes, chunk_keys: Iterable[bytes]) -> list[bytes]:
        entries = real(key, chunk_keys)
        macs.append(len(entries))
        return entries

    monkeypatch.setattr(advert_module, "keyed_entries", counting)
    held = advert(first_chunk_keys=keys(50))
    sent = [encode_record(held, ["10.0.0.1"]) for _ in range(3)]
    assert macs == [50] and sent[0] == sent[1] == sent[2]
    # Another epoch, key set or key is another advertisement, built afresh.
    later = dataclasses.replace(held, epoch=held.epoch + 1, first_chunk_keys=keys(60))
    peer = decode_record(encode_record(later, ["10.0.0.1"]))
    assert macs == [50, 60] and all(peer.might_hold_prefix(k, [KEY]) for k in later.first_chunk_keys)
    new_key = os.urandom(32)
    rotated = dataclasses.replace(later, digest_key=new_key)
    assert decode_record(encode_record(rotated, ["10.0.0.1"])).digest_key_id == key_id(new_key)
