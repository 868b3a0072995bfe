"""The signalling port under abuse: a host without the key holding handshake slots open, and a
key holder claiming the node id of a peer that has a session open from another address."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.transport import PeerTransport
from kvpeer.transport import messages as m
from kvpeer.transport import peer as peer_mod
from kvpeer.transport.auth import ClientHandshake
from tests.transport.pairs import KEY, Handler, config, run

# -- the handshake table, sans-IO ------------------------------------------------------------


def _slots(limit: int, per_address: int, interval: float = 1.0, evictors: int = 4096) -> Any:
    return peer_mod._HandshakeSlots(limit, per_address, interval, evictors)


def test_a_full_table_drops_the_oldest_unproven_handshake_of_the_busiest_address() -> None:
    slots = _slots(limit=4, per_address=3)
    for key, address in (("a1", "A"), ("b1", "B"), ("a2", "A"), ("c1", "C")):
        assert slots.admit(key, address, 0.0).admitted
    admission = slots.admit("d1", "D", 0.0)  # A holds the most: its oldest goes, not b1
    assert admission.admitted and admission.evict == "a1" and admission.evicted_address == "A"
    slots.proven("b1")
    admission = slots.admit("c2", "C", 0.0)  # C counting its newcomer holds the most: its own goes
    assert admission.evict == "c1"
    admission = slots.admit("e1", "E", 0.0)  # one each: the oldest unproven (b1 proved the key)
    assert admission.evict == "a2"
    assert sorted(slots) == ["b1", "c2", "d1", "e1"]


def test_a_handshake_that_proved_the_key_is_never_dropped_for_a_newcomer() -> None:
    slots = _slots(limit=2, per_address=2)
    slots.admit("a1", "A", 0.0)
    slots.admit("a2", "A", 0.0)
    slots.proven("a1")
    assert slots.admit("b1", "B", 0.0).evict == "a2"
    slots.proven("b1")
    refused = slots.admit("c1", "C", 0.0)
    assert not refused.admitted and refused.evict is None and "past the key" in refused.reason
    slots.release("a1")  # a slot freed: the newcomer takes it, dropping nobody
    admitted = slots.admit("c1", "C", 0.0)
    assert admitted.admitted and admitted.evict is None


def test_one_address_past_its_share_is_refused_not_given_another_slot() -> None:
    slots = _slots(limit=8, per_address=2)
    slots.admit("a1", "A", 0.0)
    slots.admit("a2", "A", 0.0)
    refused = slots.admit("a3", "A", 0.0)
    assert not refused.admitted and refused.evict is None and "from A" in refused.reason
    assert sorted(slots) == ["a1", "a2"]


def test_an_address_takes_or_loses_a_slot_at_most_once_per_interval() -> None:
    slots = _slots(limit=2, per_address=2, interval=1.0)
    slots.admit("a1", "A", 0.0)
    slots.admit("b1", "B", 0.0)
    assert slots.admit("c1", "C", 0.0).evict == "a1"
    for again in ("C", "A"):  # C took a slot, A lost one, half a second ago
        refused = slots.admit(f"{again}2", again, 0.5)
        assert not refused.admitted and refused.evict is None
        assert f"{again} took or lost one" in refused.reason
    assert slots.admit("d1", "D", 0.5).evict == "b1"  # another address may
    assert slots.admit("c2", "C", 1.0).evict == "c1"  # and C again, a second on
    slots.proven("d1")  # an address whose handshake proved the key is not held back
    slots.release("d1")
    slots.admit("x1", "X", 1.0)
    assert slots.admit("d2", "D", 1.0).admitted


def test_the_addresses_remembered_for_the_interval_are_bounded() -> None:
    """Peers choose their addresses: past `evictors` in one interval, the oldest is forgotten
    (and may take a slot again early) rather than the memory growing."""
    slots = _slots(limit=1, per_address=1, interval=1.0, evictors=4)
    slots.admit("first", "A0", 0.0)
    for i in range(1, 6):  # A1..A5 each drop the one before
        assert slots.admit(f"k{i}", f"A{i}", 0.0).admitted
    assert not slots.admit("again", "A5", 0.0).admitted  # remembered
    assert slots.admit("again", "A1", 0.0).admitted  # forgotten: the sixth pushed it out


def test_a_real_peer_handshake_outlives_many_addresses_reopening_every_cut() -> None:
    """The review's churn: 100 addresses, one connection each, reopened the moment it is cut.
    Each one cut is the oldest unproven (a tie at one per address), so the table turned over
    thousands of times a second and a real peer's handshake went before its proof (0 of 45
    sessions through 10 ms of delay). Now an address takes or loses a slot once a second, so
    the table turns over about once a second, never in one burst."""
    slots = _slots(limit=64, per_address=8, interval=1.0)
    held: dict[str, str] = {}  # attacker address -> its key
    n = 0

    def churn(now: float) -> None:
        nonlocal n
        for i in range(100):
            address = f"10.0.0.{i}"
            if address in held:
                continue
            n += 1
            admission = slots.admit(f"x{n}", address, now)
            if admission.admitted:
                held[address] = f"x{n}"
            if admission.evict is not None:
                held.pop(admission.evicted_address, None)

    for step in range(300):  # 3 s of the attack, at 10 ms steps
        churn(step / 100)
    assert slots.admit("real", "10.9.9.9", 2.995).admitted
    evicted = 0
    for step in range(300, 400):  # a second of it, a round trip of the real peer's many times
        before = set(slots)
        churn(step / 100)
        evicted += len(before - set(slots))
        assert "real" in list(slots)
    assert evicted > 0  # the attack went on meanwhile
    slots.proven("real")


def test_warnings_about_an_address_come_once_a_minute_and_remember_a_bounded_number() -> None:
    warned: OrderedDict[str, float] = OrderedDict()
    every = peer_mod._warning_every
    assert every(warned, "A", 0.0) == logging.WARNING
    assert every(warned, "A", 30.0) == logging.DEBUG
    assert every(warned, "B", 30.0) == logging.WARNING
    assert every(warned, "A", 61.0) == logging.WARNING
    for i in range(peer_mod._MAX_WARNED):
        every(warned, f"x{i}", 100.0)
    assert len(warned) == peer_mod._MAX_WARNED and every(warned, "new", 101.0) == logging.DEBUG
    assert every(warned, "new", 161.0) == logging.WARNING  # the old ones aged out
    assert len(warned) <= peer_mod._MAX_WARNED


class _CountingDict(OrderedDict[str, float]):
    """Counts the entries its users look at."""

    looked = 0

    def items(self) -> Any:
        for item in super().items():
            self.looked += 1
            yield item


def test_warnings_from_a_flood_of_new_addresses_cost_no_scan_of_the_table_each() -> None:
    """Once the table was full of fresh entries, every event from a new address rescanned all
    of them (256 per event under a flood of addresses). Now entries age out from the front."""
    warned = _CountingDict()
    for i in range(peer_mod._MAX_WARNED):
        peer_mod._warning_every(warned, f"x{i}", 0.0)
    warned.looked = 0
    for i in range(1000):
        assert peer_mod._warning_every(warned, f"new{i}", 1.0) == logging.DEBUG
    assert warned.looked <= 2 * 1000


# -- a host without the key --------------------------------------------------------------------


async def _half_handshake(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from *source* that said Hello and got its Challenge, then stalls before the
    proof: once the Challenge is back, the server surely holds a slot for it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    await peer_mod._write_message(writer, ClientHandshake((KEY,)).hello())
    await asyncio.wait_for(peer_mod._expect(reader, m.Challenge), 10)
    return reader, writer


def test_a_host_holding_every_handshake_slot_does_not_lock_out_a_key_holder(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle connections from a few addresses filled every slot, and every newcomer was closed
    at once, unlogged: a real peer could not open a session while they were held (the review's
    slowloris). Now a newcomer takes the slot of one that has not proved the key."""
    monkeypatch.setattr(peer_mod, "MAX_HANDSHAKES", 4)
    monkeypatch.setattr(peer_mod, "MAX_HANDSHAKES_PER_ADDRESS", 2)
    monkeypatch.setattr(peer_mod, "_preauth_timeout_s", lambda connect_timeout_s: connect_timeout_s)  # no help from that

    async def body() -> None:
        victim = PeerTransport("victim", config(), Handler())
        real = PeerTransport("real", config(), Handler())
        await victim.start()
        await real.start()
        held = [await _half_handshake(victim.port, source) for source in ("127.0.0.2", "127.0.0.3") * 2]
        try:
            session = await real.connect("victim", "127.0.0.1", victim.port)
            assert await session.request("echo", {}) == {"from": "real"}
            assert victim.counters["handshakes_evicted"] == 1
            # The oldest of an address holding two: the first from 127.0.0.2, cut off.
            assert await asyncio.wait_for(held[0][0].read(1), 10) == b""
            # A third from an address that holds its share is refused (and logged).
            reader, writer = await asyncio.open_connection("127.0.0.1", victim.port, local_addr=("127.0.0.3", 0))
            assert await asyncio.wait_for(reader.read(1), 10) == b""
            writer.close()
            assert victim.counters["handshakes_refused"] == 1
        finally:
            for _reader, writer in held:
                writer.close()
            await real.close()
            await victim.close()

    with caplog.at_level(logging.DEBUG, logger="kvpeer.transport.peer"):
        run(body)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped a handshake from 127.0.0.2" in w and "127.0.0.1" in w for w in warnings), warnings
    assert any("refused a handshake from 127.0.0.3" in w for w in warnings), warnings


def test_a_connection_that_does_not_prove_the_key_is_closed_long_before_connect_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole handshake had connect_timeout_s, so an idle connection held its slot that long;
    the part before the proof now has its own, shorter limit. Its log line names the timeout
    (it read "handshake with (...) failed: ", str(TimeoutError()) being empty)."""
    monkeypatch.setattr(peer_mod, "_preauth_timeout_s", lambda _connect_timeout_s: 1.0)

    async def body() -> None:
        victim = PeerTransport("victim", config(connect_timeout_s=60.0), Handler())
        await victim.start()
        try:
            idle_reader, idle = await asyncio.open_connection("127.0.0.1", victim.port)
            stalled_reader, stalled = await _half_handshake(victim.port, "127.0.0.1")
            for reader in (idle_reader, stalled_reader):  # well under the 60 s
                assert await asyncio.wait_for(reader.read(1), 30) == b""
            idle.close()
            stalled.close()
        finally:
            await victim.close()

    with caplog.at_level(logging.INFO, logger="kvpeer.transport.peer"):
        run(body)
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 2 and all(line.endswith("failed: TimeoutError") for line in failed), failed


async def _prove_key(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply_after_s: float = 0.0
) -> ClientHandshake:
    """A key holder's side of the signalling handshake up to the server's proof, answering the
    challenge after ``reply_after_s`` (a long round trip); the handshake, ready to offer."""
    handshake = ClientHandshake((KEY,))
    await peer_mod._write_message(writer, handshake.hello())
    challenge = await asyncio.wait_for(peer_mod._expect(reader, m.Challenge), 10)
    await asyncio.sleep(reply_after_s)
    await peer_mod._write_message(writer, handshake.on_challenge(challenge))
    handshake.on_server_proof(await asyncio.wait_for(peer_mod._expect(reader, m.ServerProof), 10))
    return handshake


def test_the_time_to_prove_the_key_follows_connect_timeout() -> None:
    preauth = peer_mod._preauth_timeout_s
    assert preauth(10.0) == 2.0  # the default: a fifth, 2 s
    assert preauth(40.0) == 8.0  # a slow network's longer connect_timeout_s
    assert preauth(5.0) == 2.0  # never under 2 s
    assert preauth(1.0) == 1.0  # ... unless the whole handshake has less


def test_a_peer_three_seconds_away_proves_the_key_when_connect_timeout_allows_it() -> None:
    """The time to prove the key was 2 s whatever connect_timeout_s said, so a peer whose
    round trip (Challenge out, ClientProof back) took longer never got in."""

    async def body() -> None:
        victim = PeerTransport("victim", config(connect_timeout_s=40.0), Handler())
        await victim.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", victim.port)
            await _prove_key(reader, writer, reply_after_s=3.0)  # the round trip; 8 s allowed
            writer.close()
        finally:
            await victim.close()

    run(body)


def test_a_peer_that_proved_the_key_keeps_connect_timeout_for_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the proof the deadline moves to connect_timeout_s: a key holder slower than the
    time to prove the key to send its offer still gets an answer (here: a Reject, all sessions
    being taken), not a hang-up."""
    monkeypatch.setattr(peer_mod, "_preauth_timeout_s", lambda _connect_timeout_s: 0.5)
    monkeypatch.setattr(peer_mod, "MAX_SESSIONS", 0)

    async def body() -> None:
        victim = PeerTransport("victim", config(connect_timeout_s=60.0), Handler())
        await victim.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", victim.port)
            handshake = await _prove_key(reader, writer)
            await asyncio.sleep(2.0)  # four times the time to prove the key
            await peer_mod._write_message(writer, handshake.offer("slow", 1500, "v=0"))
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(peer_mod._read_message(reader), 10)
            assert info.value.code == ErrorCode.BUSY
            writer.close()
        finally:
            await victim.close()

    run(body)


# -- a key holder posing as another node -------------------------------------------------------


class _Impostor(Handler):
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"from": "IMPOSTOR"}


@contextlib.asynccontextmanager
async def _transports(*specs: tuple[str, str, Any]) -> AsyncIterator[list[PeerTransport]]:
    """Started transports, one per (node id, host, handler); all closed after."""
    transports = [PeerTransport(node_id, config(host=host), handler) for node_id, host, handler in specs]
    try:
        for transport in transports:
            await transport.start()
        yield transports
    finally:
        for transport in transports:
            await transport.close()


@pytest.mark.parametrize("direction", ["node-b dialled node-a", "node-a dialled node-b"])
def test_a_key_holder_cannot_take_over_the_node_id_of_a_peer_open_from_another_address(
    direction: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two sessions claiming node-b closed the real node-b's session (the oldest of three) and
    node-a's requests for node-b then went to the impostor. Now a claim from another address
    than the open session's is refused before the answer, with a warning naming both."""

    async def body() -> None:
        specs = [("node-a", "127.0.0.1", Handler()), ("node-b", "127.0.0.1", Handler())]
        specs += [("node-b", "127.0.0.2", _Impostor()), ("node-b", "127.0.0.2", _Impostor())]
        async with _transports(*specs) as (a, b, m1, m2):
            if direction == "node-b dialled node-a":
                real = await b.connect("node-a", "127.0.0.1", a.port)
            else:
                await a.connect("node-b", "127.0.0.1", b.port)
                real = b.session("node-a")
                assert real is not None
            for impostor in (m1, m2):
                with pytest.raises(ProtocolError) as info:
                    await impostor.connect("node-a", "127.0.0.1", a.port)
                assert info.value.code == ErrorCode.FORBIDDEN
            assert not (real.closed or real.closing)
            session = a.session("node-b")
            assert session is not None and await session.request("echo", {}) == {"from": "node-a"}
            assert a.counters["sessions_refused_id_in_use"] == 2 and a.counters["sessions_replaced"] == 0

    with caplog.at_level(logging.DEBUG, logger="kvpeer.transport.peer"):
        run(body)
    claims = [r for r in caplog.records if "as peer 'node-b'" in r.getMessage()]
    assert [r.levelno for r in claims] == [logging.WARNING, logging.DEBUG]
    assert "from 127.0.0.2" in claims[0].getMessage() and "at 127.0.0.1" in claims[0].getMessage()


def test_a_node_back_from_another_address_gets_in_once_its_old_session_ended() -> None:
    async def body() -> None:
        specs = [("node-a", "127.0.0.1", Handler()), ("node-b", "127.0.0.1", Handler())]
        async with _transports(*specs, ("node-b", "127.0.0.2", Handler())) as (a, old, moved):
            down = asyncio.Event()
            a.on_peer_down = lambda _peer: down.set()
            await old.connect("node-a", "127.0.0.1", a.port)
            await old.close()
            await asyncio.wait_for(down.wait(), 10)
            session = await moved.connect("node-a", "127.0.0.1", a.port)
            assert await session.request("echo", {}) == {"from": "node-b"}

    run(body)


def test_a_node_restarted_at_its_address_replaces_its_old_sessions() -> None:
    """The same address may still replace: a restarted node's old session is dead but not
    noticed yet (here it is alive, which makes no difference to the rule)."""

    async def body() -> None:
        specs = [("node-a", "127.0.0.1", Handler())]
        specs += [("node-b", "127.0.0.2", Handler()) for _ in range(3)]
        async with _transports(*specs) as (a, *incarnations):
            sessions = [await b.connect("node-a", "127.0.0.1", a.port) for b in incarnations]
            for _ in range(100):  # the oldest is told Bye
                if sessions[0].closed:
                    break
                await asyncio.sleep(0.1)
            assert sessions[0].closed and a.counters["sessions_replaced"] == 1
            assert a.counters["sessions_refused_id_in_use"] == 0

    run(body)


def test_two_nodes_on_two_addresses_dialling_each_other_at_once_both_get_a_session() -> None:
    """The simultaneous open: each side holds the other's incoming session and its own outgoing
    one, both from (to) the one address of the peer, so neither claim is refused."""

    async def body() -> None:
        async with _transports(("node-a", "127.0.0.1", Handler()), ("node-b", "127.0.0.2", Handler())) as (a, b):
            ab, ba = await asyncio.gather(a.connect("node-b", "127.0.0.2", b.port), b.connect("node-a", "127.0.0.1", a.port))
            assert await ab.request("echo", {}) == {"from": "node-a"}
            assert await ba.request("echo", {}) == {"from": "node-b"}
            for node in (a, b):
                assert node.counters["sessions_refused_id_in_use"] == 0 and node.counters["handshakes_failed"] == 0

    run(body)


@contextlib.asynccontextmanager
async def _forwarder(listen: str, target: tuple[str, int]) -> AsyncIterator[int]:
    """A port forward that keeps the source address (DNAT): a peer dialling *listen* reaches
    *target* from its own address, not the one it dialled. Yields the port to dial."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        up_reader, up_writer = await asyncio.open_connection(*target, local_addr=(source, 0))
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(forward, listen, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


def test_two_nodes_behind_port_forwards_dialling_each_other_at_once_both_get_a_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each node's session to the other (dialled at the forward's address) found the other's
    session to it (from the other's own address) "held elsewhere" and closed itself, which closed
    the other's incoming one: neither node had a session, and both backed off to race again.
    A session we dial is not a claim on an id: it is not refused by the address rule."""

    async def body() -> None:
        async with _transports(("node-a", "127.0.0.1", Handler()), ("node-b", "127.0.0.2", Handler())) as (a, b):
            async with _forwarder("127.0.1.101", ("127.0.0.1", a.port)) as to_a, _forwarder(
                "127.0.1.102", ("127.0.0.2", b.port)
            ) as to_b:
                ab, ba = await asyncio.gather(a.connect("node-b", "127.0.1.102", to_b), b.connect("node-a", "127.0.1.101", to_a))
                assert await ab.request("echo", {}) == {"from": "node-a"}
                assert await ba.request("echo", {}) == {"from": "node-b"}
                for node, other in ((a, "node-b"), (b, "node-a")):
                    session = node.session(other)
                    assert session is not None and await session.request("echo", {}) == {"from": node.node_id}
                    assert not node.backing_off()

    with caplog.at_level(logging.INFO, logger="kvpeer.transport.peer"):
        run(body)
    assert not [r for r in caplog.records if "meanwhile" in r.getMessage()]
