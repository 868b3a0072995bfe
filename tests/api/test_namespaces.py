"""api.namespaces: a local user may put into and read only the namespaces it is given; without
the setting namespaces stay cooperative. Peer credentials are faked: the tests run as one user."""

from __future__ import annotations

import dataclasses
import grp
import json
import logging
import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvpeer.api import messages as m
from kvpeer.api import server as server_mod
from kvpeer.api.client import KVPeerClient
from kvpeer.api.server import resolve_namespaces
from kvpeer.errors import ApiError, ConfigError, ErrorCode
from tests.api.fakes import FP, kv, serving

ALICE, BOB = os.geteuid() + 4242, os.geteuid() + 4343  # never the daemon's own uid
ENGINES = 4545
POLICY = {"team-a": [str(ALICE), f"@{ENGINES}"], "shared": ["*"]}


@pytest.fixture
def peer(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Who the next connections claim to be (SO_PEERCRED)."""
    who = SimpleNamespace(uid=ALICE, gid=ALICE)
    monkeypatch.setattr(server_mod, "_peer_credentials", lambda writer: (os.getpid(), who.uid, who.gid))
    yield who


def _forbidden(call: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()  # type: ignore[operator]
    assert info.value.code == ErrorCode.FORBIDDEN
    return info.value


def test_a_user_uses_only_the_namespaces_it_is_given(peer: SimpleNamespace) -> None:
    """Any user the socket let in could say hello with another tenant's namespace and put KV
    there (poisoning its engines) or probe which prefixes it holds."""
    k, v = kv(8)
    with serving(namespaces=POLICY) as api:
        with KVPeerClient(api.socket_path, namespace="team-a") as alice:
            assert alice.put(list(range(8)), k, v, FP).stored == 2
        peer.uid = peer.gid = BOB
        error = _forbidden(lambda: KVPeerClient(api.socket_path, namespace="team-a"))
        assert "'team-a'" in error.reason and str(BOB) in error.reason and "api.namespaces" in error.reason
        with KVPeerClient(api.socket_path, namespace="shared") as bob:  # "*": everyone
            assert bob.lookup(list(range(8)), FP).matched_tokens == 0
        peer.gid = ENGINES  # bob's primary group is one the namespace lists
        with KVPeerClient(api.socket_path, namespace="team-a") as bob:
            assert bob.lookup(list(range(8)), FP).matched_tokens == 8


def test_a_refused_namespace_is_a_warning_once_per_user_and_namespace(
    peer: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A client retrying a refused hello in a loop logged a WARNING each time."""
    peer.uid = peer.gid = BOB
    with serving(namespaces=POLICY) as api, caplog.at_level(logging.DEBUG, logger="kvpeer.api.server"):
        for _ in range(3):
            _forbidden(lambda: KVPeerClient(api.socket_path, namespace="team-a"))
        peer.uid = peer.gid = BOB + 1
        _forbidden(lambda: KVPeerClient(api.socket_path, namespace="team-a"))
    refusals = [r for r in caplog.records if "refused namespace" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]


def test_requests_without_a_hello_are_in_default_and_refused_unless_it_is_listed(peer: SimpleNamespace) -> None:
    lookup = m.encode(m.LookupRequest(id=1, tokens=list(range(8)), fingerprint=FP))
    with serving(namespaces=POLICY) as api:
        (answer,) = _raw(api.socket_path, lookup)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.FORBIDDEN
        assert "'default'" in answer.reason
    with serving(namespaces={**POLICY, "default": [str(ALICE)]}) as api:
        (answer,) = _raw(api.socket_path, lookup)
        assert isinstance(answer, m.LookupResult)


def test_without_the_setting_namespaces_are_cooperative_and_our_own_user_may_use_any(peer: SimpleNamespace) -> None:
    with serving() as api, KVPeerClient(api.socket_path, namespace="team-a") as anyone:
        assert anyone.lookup(list(range(8)), FP).matched_tokens == 0
    peer.uid = peer.gid = os.geteuid()
    with serving(namespaces=POLICY) as api, KVPeerClient(api.socket_path, namespace="elsewhere") as own:
        assert own.lookup(list(range(8)), FP).matched_tokens == 0


def test_names_resolve_at_start_and_unknown_ones_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"alice": ALICE, "bob": BOB, "carol": BOB + 1}
    groups = {"engines": (ENGINES, ["carol", "gone"])}  # "gone": in /etc/group, not in passwd

    def getpwnam(name: str) -> SimpleNamespace:
        return SimpleNamespace(pw_uid=users[name])

    def getgrnam(name: str) -> SimpleNamespace:
        gid, members = groups[name]
        return SimpleNamespace(gr_gid=gid, gr_mem=members)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    policy = resolve_namespaces((("team-a", ("alice", "@engines")), ("team-b", ("bob",))))
    assert policy is not None
    assert policy.allows("team-a", ALICE, 1) and not policy.allows("team-a", BOB, 1)
    assert policy.allows("team-a", BOB + 1, 1)  # carol: a supplementary member of engines
    assert policy.allows("team-a", 7, ENGINES)  # anyone whose primary group is engines
    assert not policy.allows("team-c", ALICE, ENGINES)  # not listed: nobody
    assert resolve_namespaces(()) is None and resolve_namespaces(None) is None
    with pytest.raises(ConfigError, match=r"api\.namespaces\.team-a: no user named 'alise'"):
        resolve_namespaces({"team-a": ["alise"]})
    with pytest.raises(ConfigError, match=r"api\.namespaces\.team-b: no group named 'engine'"):
        resolve_namespaces({"team-a": ["alice"], "team-b": ["@engine"]})


def _raw(path: object, payload: bytes) -> list[m.Message]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        decoder = m.FrameDecoder()
        while True:
            frames = list(decoder.frames())
            if frames:
                return [m.decode_body(frame) for frame in frames if isinstance(frame, bytes)]
            decoder.feed(sock.recv(65536))


def test_evict_drops_every_tenants_chunks_so_only_root_or_the_daemons_user_may(peer: SimpleNamespace) -> None:
    k, v = kv(8)
    with serving(namespaces=POLICY) as api:
        with KVPeerClient(api.socket_path, namespace="team-a") as alice:
            alice.put(list(range(8)), k, v, FP)
            error = _forbidden(alice.evict_all)
            assert "evict" in error.reason and str(ALICE) in error.reason
        assert api.backend.chunks  # nothing dropped
        peer.uid = peer.gid = os.geteuid()
        with KVPeerClient(api.socket_path, namespace=None) as own:
            assert own.evict_all() == {"evicted": 2}
    with serving() as api, KVPeerClient(api.socket_path, namespace=None) as anyone:
        assert anyone.evict_all() == {"evicted": 0}  # cooperative: as before


def test_the_cli_asks_stats_and_peers_without_a_namespace(
    peer: SimpleNamespace, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A user whom api.namespaces gives no "default" (an operator's own account) still gets
    kvpeer status, stats and peers; a refusal reads as one, not as an unreachable daemon."""
    from kvpeer import cli

    peer.uid = peer.gid = BOB
    with serving(namespaces=POLICY) as api:
        assert cli.client_main(["--socket", str(api.socket_path), "--json", "stats"]) == 0
        assert cli.client_main(["--socket", str(api.socket_path), "peers"]) == 0
        # A namespace given before them is not theirs to use (they are not per namespace):
        # it used to send a hello that api.namespaces refused.
        assert cli.client_main(["--socket", str(api.socket_path), "--namespace", "team-a", "stats"]) == 0
        tokens, model = tmp_path / "prompt.tokens", tmp_path / "model.json"
        tokens.write_text("1 2 3")
        model.write_text(json.dumps(dataclasses.asdict(FP)))
        capsys.readouterr()
        lookup = ["lookup", "--namespace", "team-a", "--tokens", str(tokens), "--model", str(model)]
        assert cli.client_main(["--socket", str(api.socket_path), *lookup]) == 1  # per namespace
        assert capsys.readouterr().err.startswith("kvpeer: the daemon refused: namespace 'team-a'")
