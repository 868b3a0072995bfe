"""The HMAC handshake: mutual proof, key rotation, SDP bound into the transcript."""

from __future__ import annotations

import dataclasses
import os

import pytest

from kvpeer.errors import AuthError
from kvpeer.transport.auth import ClientHandshake, ServerHandshake
from kvpeer.transport.messages import ServerProof

K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)


def _run(
    client_keys: tuple[bytes, ...], server_keys: tuple[bytes, ...]
) -> tuple[ClientHandshake, ServerHandshake]:
    client, server = ClientHandshake(client_keys), ServerHandshake(server_keys)
    client.on_server_proof(
        server.on_client_proof(client.on_challenge(server.on_hello(client.hello())))
    )
    offer = client.offer("a", 1500, "v=0 offer")
    server.on_offer(offer)
    client.on_answer(server.answer("b", 9000, "v=0 answer"))
    return client, server


def test_same_key_authenticates() -> None:
    client, server = _run((K1,), (K1,))
    assert client.key_index == 0 and server.key_index == 0


def test_rotation_accepts_current_or_next() -> None:
    _run((K1, K2), (K2,))  # client still offers the old key first
    _, server = _run((K2,), (K1, K2))
    assert server.key_index == 1


def test_wrong_key_fails_before_any_sdp() -> None:
    client, server = ClientHandshake((K1,)), ServerHandshake((K2,))
    proof = client.on_challenge(server.on_hello(client.hello()))
    with pytest.raises(AuthError):
        server.on_client_proof(proof)
    # The server never proved anything and refuses to take an offer.
    with pytest.raises(AuthError):
        server.answer("b", 1500, "sdp")


def test_client_refuses_server_without_key() -> None:
    client, impostor = ClientHandshake((K1,)), ServerHandshake((K3,))
    client.on_challenge(impostor.on_hello(client.hello()))
    with pytest.raises(AuthError):
        client.on_server_proof(ServerProof(proof=os.urandom(32)))
    honest = ServerHandshake((K1,))
    # A proof computed for another nonce pair (a replay) does not verify either.
    other = ClientHandshake((K1,))
    replayed = honest.on_client_proof(other.on_challenge(honest.on_hello(other.hello())))
    with pytest.raises(AuthError):
        client.on_server_proof(replayed)
    with pytest.raises(AuthError):
        client.offer("a", 1500, "sdp")


def test_tampered_offer_or_answer_is_refused() -> None:
    client, server = ClientHandshake((K1,)), ServerHandshake((K1,))
    client.on_server_proof(
        server.on_client_proof(client.on_challenge(server.on_hello(client.hello())))
    )
    offer = client.offer("a", 1500, "a=fingerprint:sha-256 AA:BB")
    for tampered in (
        dataclasses.replace(offer, sdp="a=fingerprint:sha-256 AA:BC"),
        dataclasses.replace(offer, node_id="mallory"),
        dataclasses.replace(offer, mtu=9000),
    ):
        with pytest.raises(AuthError):
            server.on_offer(tampered)
    server.on_offer(offer)
    answer = server.answer("b", 1500, "a=fingerprint:sha-256 CC:DD")
    with pytest.raises(AuthError):
        client.on_answer(dataclasses.replace(answer, sdp="a=fingerprint:sha-256 CC:DE"))
    client.on_answer(answer)
