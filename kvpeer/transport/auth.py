"""Mutual HMAC authentication of the signalling handshake, with the SDP bound into it.

Sans-IO. The exchange (client = the side that connects)::

    C -> S  Hello(nc)                 no identity from either side yet
    S -> C  Challenge(ns)
    C -> S  ClientProof([HMAC_k("kvpeer/1 client" | nc | ns) for k in client keys])
    S -> C  ServerProof(HMAC_k("kvpeer/1 server" | nc | ns))      k: the key that matched
    C -> S  Offer(node_id, mtu, sdp, mac=HMAC_k("kvpeer/1 offer" | nc | ns | fields))
    S -> C  Answer(node_id, mtu, sdp, mac=HMAC_k("kvpeer/1 answer" | offer mac | fields))

The server proves itself only after the client did, and nobody sends an SDP (and with it the
DTLS fingerprint, addresses and node id) before both proofs verified: a peer without the key
learns nothing but two random nonces. Role labels stop reflection; the answer MAC chains the
offer MAC, so the whole transcript is bound. Holding two keys (current + next) lets a cluster
rotate keys without a flag day: the client proves with both, the server accepts either and,
where both sides hold the next key, uses it, so that a rotation is over (the old key can go)
once every session uses the next key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from kvpeer.errors import AuthError
from kvpeer.transport.messages import (
    NONCE_BYTES,
    Answer,
    Challenge,
    ClientProof,
    Hello,
    Offer,
    ServerProof,
)

_LABEL = b"kvpeer/1 "


def _mac(key: bytes, label: str, *parts: bytes) -> bytes:
    mac = hmac.new(key, _LABEL + label.encode(), hashlib.sha256)
    for part in parts:
        # Length-prefix every part so that no two transcripts encode to the same bytes.
        mac.update(struct.pack("!I", len(part)))
        mac.update(part)
    return mac.digest()


def _description_parts(node_id: str, mtu: int, sdp: str) -> tuple[bytes, bytes, bytes]:
    return node_id.encode(), struct.pack("!I", mtu), sdp.encode()


class ClientHandshake:
    """The connecting side: ``hello()``, ``on_challenge()``, ``on_server_proof()``,
    ``offer()``, ``on_answer()``, in that order."""

    def __init__(self, keys: tuple[bytes, ...], nonce: bytes | None = None) -> None:
        if not 1 <= len(keys) <= 2:
            raise ValueError("one or two keys")
        self._keys = keys
        self._nonce_c = nonce or secrets.token_bytes(NONCE_BYTES)
        self._nonce_s: bytes | None = None
        self._key: bytes | None = None
        self._offer_mac: bytes | None = None

    def hello(self) -> Hello:
        return Hello(nonce=self._nonce_c)

    def on_challenge(self, challenge: Challenge) -> ClientProof:
        self._nonce_s = challenge.nonce
        proofs = [_mac(k, "client", self._nonce_c, challenge.nonce) for k in self._keys]
        return ClientProof(proofs=proofs)

    def on_server_proof(self, proof: ServerProof) -> None:
        assert self._nonce_s is not None, "on_challenge first"
        for key in self._keys:
            expected = _mac(key, "server", self._nonce_c, self._nonce_s)
            if hmac.compare_digest(expected, proof.proof):
                self._key = key
                return
        raise AuthError("server does not hold the cluster key")

    def offer(self, node_id: str, mtu: int, sdp: str) -> Offer:
        key, nonce_s = self._authenticated()
        mac = _mac(key, "offer", self._nonce_c, nonce_s, *_description_parts(node_id, mtu, sdp))
        self._offer_mac = mac
        return Offer(node_id=node_id, mtu=mtu, sdp=sdp, mac=mac)

    def on_answer(self, answer: Answer) -> None:
        key, _ = self._authenticated()
        assert self._offer_mac is not None, "offer first"
        parts = _description_parts(answer.node_id, answer.mtu, answer.sdp)
        if not hmac.compare_digest(_mac(key, "answer", self._offer_mac, *parts), answer.mac):
            raise AuthError("answer MAC mismatch (tampered SDP or wrong key)")

    def _authenticated(self) -> tuple[bytes, bytes]:
        if self._key is None or self._nonce_s is None:
            raise AuthError("handshake out of order: server not authenticated")
        return self._key, self._nonce_s

    @property
    def key_index(self) -> int | None:
        """Which of our keys the peer holds (0 current, 1 next); None before the proof."""
        return None if self._key is None else self._keys.index(self._key)


class ServerHandshake:
    """The accepting side: ``on_hello()``, ``on_client_proof()``, ``on_offer()``, ``answer()``."""

    def __init__(self, keys: tuple[bytes, ...], nonce: bytes | None = None) -> None:
        if not 1 <= len(keys) <= 2:
            raise ValueError("one or two keys")
        self._keys = keys
        self._nonce_s = nonce or secrets.token_bytes(NONCE_BYTES)
        self._nonce_c: bytes | None = None
        self._key: bytes | None = None
        self._offer_mac: bytes | None = None

    def on_hello(self, hello: Hello) -> Challenge:
        self._nonce_c = hello.nonce
        return Challenge(nonce=self._nonce_s)

    def on_client_proof(self, proof: ClientProof) -> ServerProof:
        if self._nonce_c is None:
            raise AuthError("handshake out of order: no hello")
        # Compare every pair, so timing does not tell which key (if any) was close. The last
        # key that matches wins: the next key, when the client holds both.
        matched: bytes | None = None
        for key in self._keys:
            expected = _mac(key, "client", self._nonce_c, self._nonce_s)
            for candidate in proof.proofs:
                if hmac.compare_digest(expected, candidate):
                    matched = key
        if matched is None:
            raise AuthError("client does not hold the cluster key")
        self._key = matched
        return ServerProof(proof=_mac(matched, "server", self._nonce_c, self._nonce_s))

    def on_offer(self, offer: Offer) -> None:
        if self._key is None or self._nonce_c is None:
            raise AuthError("handshake out of order: client not authenticated")
        parts = _description_parts(offer.node_id, offer.mtu, offer.sdp)
        expected = _mac(self._key, "offer", self._nonce_c, self._nonce_s, *parts)
        if not hmac.compare_digest(expected, offer.mac):
            raise AuthError("offer MAC mismatch (tampered SDP or wrong key)")
        self._offer_mac = offer.mac

    def answer(self, node_id: str, mtu: int, sdp: str) -> Answer:
        if self._key is None or self._offer_mac is None:
            raise AuthError("handshake out of order: no verified offer")
        mac = _mac(self._key, "answer", self._offer_mac, *_description_parts(node_id, mtu, sdp))
        return Answer(node_id=node_id, mtu=mtu, sdp=sdp, mac=mac)

    @property
    def key_index(self) -> int | None:
        """Which of our keys the client proved (0 current, 1 next); None before the proof."""
        return None if self._key is None else self._keys.index(self._key)
