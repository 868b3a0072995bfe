"""PeerTransport: the signalling server, outgoing connections and the registry of sessions.

Owns the TCP signalling exchange (length-prefixed msgpack, authenticated by
:mod:`kvpeer.transport.auth` before any SDP moves), the creation of aiortc peer connections
(no STUN/TURN servers, host candidates on our LAN address only) and the sessions per peer id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcsctptransport import REMOTE_DEFAULT_MAX_MESSAGE_SIZE
from aiortc.sdp import SessionDescription

from kvpeer import aio
from kvpeer.errors import AuthError, ErrorCode, KVPeerError, ProtocolError, TransportError
from kvpeer.transport import aiortc_patches
from kvpeer.transport import messages as m
from kvpeer.transport.auth import ClientHandshake, ServerHandshake
from kvpeer.transport.config import DEFAULT_SCTP_PACKET, KEYLESS_RISK, TransportConfig
from kvpeer.transport.netinfo import interface_mtu, sctp_packet_size
from kvpeer.transport.session import PeerSession, RequestHandler

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
#: Signalling messages are small (an SDP is a few KB); anything bigger is hostile.
_SIGNALLING_LIMIT = 128 * 1024
#: Addresses whose failed authentication was logged loudly (bounded: peers choose them).
_MAX_WARNED = 256
# Handshakes in progress (accepted, key not proven yet or channels not open): at most this many
# at once, and this many from one address. Past the first, a newcomer takes the slot of a
# handshake that has not proved the key (see _HandshakeSlots); past the second it is closed.
MAX_HANDSHAKES = 64
MAX_HANDSHAKES_PER_ADDRESS = 8
#: Seconds a connection has to prove the key (Hello, then ClientProof: one round trip): a fifth
#: of connect_timeout_s, at least this many, at most connect_timeout_s (_preauth_timeout_s).
#: Anyone on the LAN can open one, so it holds a slot this long, not connect_timeout_s; the rest
#: of the handshake (SDP, ICE, DTLS) has connect_timeout_s from the proof on.
PREAUTH_TIMEOUT_S = 2.0
#: One address takes the slot of an unproven handshake, or loses one to a newcomer, at most once
#: per this many seconds; past that its newcomer to a full table is refused. Without it,
#: addresses holding one idle connection each (a tie for "the address holding the most")
#: reopened each one cut at once and flushed the whole table thousands of times a second, a real
#: peer's handshake with it, before its proof came back.
EVICTION_INTERVAL_S = 1.0
#: Addresses remembered for EVICTION_INTERVAL_S (the peers choose them): past this many, the
#: oldest is forgotten early, so more addresses than this shorten the interval for all. Each
#: eviction records two, so the limit holds up to half as many churning addresses: 32,768 (at
#: 4,096 it gave way to ~8,200 addresses, cheap to have on one LAN). ~11 MB when full.
MAX_EVICTORS = 65536
#: Refused or dropped handshakes and sessions are warned about once per address per this many
#: seconds (at DEBUG between), for at most _MAX_WARNED addresses at a time.
WARN_INTERVAL_S = 60.0
#: After a failed connect, a peer is not tried again for the first wait, doubled per failure up
#: to the second (seconds); a success ends the episode.
CONNECT_BACKOFF_S = (1.0, 30.0)


#: Peers remembered as failing at most (ids come from unauthenticated adverts): the oldest go.
MAX_BACKOFFS = 4096
#: Open sessions kept per peer id: two, for both sides connecting at once. A newer one closes
#: the oldest, so a peer reconnecting in a loop (or two hosts sharing a node id) cannot pile up
#: peer connections, each with its UDP socket, buffers and tasks.
MAX_SESSIONS_PER_PEER = 2
#: Sessions opened to us from one source address, and in all. The node id is
#: the peer's claim, so MAX_SESSIONS_PER_PEER does not bound one key holder: each session holds
#: a UDP socket, an SCTP association whose receive window may fill (receive_window_bytes, 4 MiB
#: by default) and tasks. A host runs one daemon (at most MAX_SESSIONS_PER_PEER sessions), so 8
#: leaves room for a few daemons behind one address; 256 is a cluster of a couple of hundred
#: nodes with a session to each, and at most ~1 GiB of default receive windows. Past either,
#: a peer that proved the key is refused (Reject BUSY) before a peer connection is made.
MAX_SESSIONS_PER_ADDRESS = 8
MAX_SESSIONS = 256


def _first_warning(warned: set[str], address: str) -> int:
    """WARNING the first time for ``address``, DEBUG after (at most _MAX_WARNED remembered)."""
    if address in warned:
        return logging.DEBUG
    if len(warned) < _MAX_WARNED:
        warned.add(address)
    return logging.WARNING


def _forget_before(remembered: OrderedDict[str, float], cutoff: float) -> None:
    """Drop the entries of *remembered* (address -> when, oldest first) from before *cutoff*.
    Each entry is dropped once, so a caller per event costs O(1) amortized."""
    while remembered:
        address, at = next(iter(remembered.items()))
        if at > cutoff:
            return
        del remembered[address]


def _warning_every(warned: OrderedDict[str, float], address: str, now: float) -> int:
    """WARNING for ``address`` at most once per WARN_INTERVAL_S, DEBUG between. At most
    _MAX_WARNED addresses are remembered (peers choose them): past that, DEBUG until some age out.
    *now* must not decrease between calls (the entries stay in time order)."""
    _forget_before(warned, now - WARN_INTERVAL_S)
    if address in warned or len(warned) >= _MAX_WARNED:
        return logging.DEBUG
    warned[address] = now
    return logging.WARNING


def _preauth_timeout_s(connect_timeout_s: float) -> float:
    """Seconds a signalling connection has to prove the key: about one round trip plus our own
    processing, so it follows connect_timeout_s (a network slow enough to need a longer
    connect_timeout_s needs longer for this too), never under PREAUTH_TIMEOUT_S unless
    connect_timeout_s itself is."""
    return min(connect_timeout_s, max(PREAUTH_TIMEOUT_S, connect_timeout_s / 5))


_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class _Admission(Generic[_K]):
    """What to do with a new signalling connection."""

    admitted: bool
    evict: _K | None = None  # the handshake dropped to make room for it
    evicted_address: str = ""
    reason: str = ""  # why it was refused


@dataclass(slots=True)
class _Slot:
    address: str
    proven: bool = False


class _HandshakeSlots(Generic[_K]):
    """The signalling port's handshake slots (sans-IO): who holds one, from where, and whether it
    proved the key yet.

    Anyone on the LAN can take a slot before proving the key, so a full table must not lock the
    cluster out: a newcomer takes the slot of a handshake that has not proved the key, never of
    one that has. Which one: the oldest of the address holding the most unproven slots (the
    newcomer counted with its own). Plain "oldest" would let a few addresses that reopen each
    dropped connection at once flush a real peer's handshake before its proof arrives; this way
    a peer's one handshake goes only when no address holds more than one. Many addresses holding
    one each are that case: each may take or lose a slot to another once per *interval* only
    (else its newcomer is refused), so the table turns over at most as often as there are such
    addresses per interval, and a real peer's handshake, one round trip, outlives that.
    """

    def __init__(self, limit: int, per_address: int, interval: float, evictors: int) -> None:
        self.limit = limit
        self.per_address = per_address
        self.interval = interval
        self.evictors = evictors
        self._slots: dict[_K, _Slot] = {}  # oldest first
        # When each address last took or lost a slot (within the interval), oldest first.
        self._evicted_at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[_K]:
        return iter(list(self._slots))

    def admit(self, key: _K, address: str, now: float) -> _Admission[_K]:
        """Give *key* (a connection from *address*, at *now*) a slot, or say why not."""
        held = sum(1 for slot in self._slots.values() if slot.address == address)
        if held >= self.per_address:
            return _Admission(False, reason=f"{held} handshakes from {address} in progress")
        admission: _Admission[_K] = _Admission(True)
        if len(self._slots) >= self.limit:
            unproven = [(k, slot.address) for k, slot in self._slots.items() if not slot.proven]
            if not unproven:
                return _Admission(
                    False, reason=f"{len(self._slots)} handshakes in progress, all past the key"
                )
            _forget_before(self._evicted_at, now - self.interval)
            if address in self._evicted_at:
                return _Admission(False, reason=(
                    f"all {len(self._slots)} handshake slots taken, and {address} took or lost "
                    f"one less than {self.interval:g} s ago"
                ))  # fmt: skip
            counts = Counter(a for _, a in unproven)
            counts[address] += 1
            most = max(counts[a] for _, a in unproven)
            victim, victim_address = next((k, a) for k, a in unproven if counts[a] == most)
            del self._slots[victim]
            admission = _Admission(True, evict=victim, evicted_address=victim_address)
            # The address that lost its slot waits too: else each drop frees an address to drop
            # the next at once, and as many addresses as slots flush the table in one burst.
            for party in (address, victim_address):
                self._evicted_at.pop(party, None)
                self._evicted_at[party] = now
            while len(self._evicted_at) > self.evictors:
                self._evicted_at.popitem(last=False)
        self._slots[key] = _Slot(address)
        return admission

    def proven(self, key: _K) -> None:
        """*key* proved the key: its slot is no longer taken for a newcomer's, and its address
        may take another's at once (the interval holds back hosts without the key, not a peer
        that redials)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.proven = True
            self._evicted_at.pop(slot.address, None)

    def release(self, key: _K) -> None:
        self._slots.pop(key, None)


class PeerBackingOff(TransportError):
    """A connect refused at once: the peer's last connect failed and its wait is not over."""

    def __init__(self, reason: str, retry_in_s: float) -> None:
        super().__init__(reason)
        self.retry_in_s = retry_in_s  # when a connect is worth trying again


@dataclass(slots=True)
class _Backoff:
    retry_at: float
    wait_s: float
    reason: str
    address: tuple[str, int]  # where it failed: a peer at a new address is tried at once


async def _read_message(reader: asyncio.StreamReader) -> m.Message:
    try:
        header = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(header)
        if length > _SIGNALLING_LIMIT:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"signalling message of {length} bytes")
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise TransportError("signalling connection closed by the peer") from None
    message = m.decode(data, m.SIGNALLING_TYPES, _SIGNALLING_LIMIT)
    if isinstance(message, m.Reject):
        code = ErrorCode(message.code)
        # The reason is remote text bound for our log: quoted, so it cannot forge log lines;
        # not even that from a host that may hold no key.
        if code == ErrorCode.UNAUTHENTICATED:
            raise AuthError("peer refused us: authentication failed")
        raise ProtocolError(code, f"peer refused us: {message.reason!r}")
    return message


_M = TypeVar("_M", bound=m.Message)


async def _expect(reader: asyncio.StreamReader, kind: type[_M]) -> _M:
    message = await _read_message(reader)
    if not isinstance(message, kind):
        raise ProtocolError(ErrorCode.INVALID, f"expected {kind.TYPE}, got {message.TYPE}")
    return message


async def _write_message(writer: asyncio.StreamWriter, message: m.Message) -> None:
    data = m.encode(message, _SIGNALLING_LIMIT)
    writer.write(_LENGTH.pack(len(data)) + data)
    await writer.drain()


class PeerTransport:
    """Sessions with peers: ``await start()``, ``await connect(...)``, ``await close()``."""

    def __init__(
        self,
        node_id: str,
        config: TransportConfig,
        handler: RequestHandler,
        on_peer_down: Callable[[str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.handler = handler
        self.on_peer_down = on_peer_down
        #: auth_failures, handshakes_failed, handshakes_refused (past MAX_HANDSHAKES_PER_ADDRESS,
        #: or every slot past the key), handshakes_evicted (not past the key, for a newcomer),
        #: sessions_opened, peers_down,
        #: sessions_replaced (closed for a newer one past MAX_SESSIONS_PER_PEER),
        #: sessions_refused (past MAX_SESSIONS_PER_ADDRESS or MAX_SESSIONS),
        #: sessions_refused_id_in_use (its node id is open from another address), and
        #: sessions_key_current / sessions_key_next / sessions_key_none: the key each session
        #: opened with (a rotation is over when peers only open sessions with the next key).
        self.counters: Counter[str] = Counter()
        self._key_names = tuple(
            name for name, key in (("current", config.psk), ("next", config.next_psk)) if key is not None
        ) or ("none",)  # fmt: skip
        self._session_keys: dict[PeerSession, str] = {}
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, PeerSession] = {}
        self._all: dict[PeerSession, None] = {}  # every open session, oldest first
        self._replaced: set[asyncio.Task[None]] = set()  # closing sessions a newer one replaced
        self._crowded_warned: set[str] = set()
        self._down: dict[str, None] = {}  # peers said down, and not up since (oldest first)
        self._connecting: dict[str, asyncio.Task[PeerSession]] = {}
        # Peers whose last connect failed: when to try again, the wait after that, and why.
        self._backoff: dict[str, _Backoff] = {}
        self._handshakes: _HandshakeSlots[asyncio.Task[Any]] = _HandshakeSlots(
            MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS, EVICTION_INTERVAL_S, MAX_EVICTORS
        )
        self._handshake_writers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._handshake_warned: OrderedDict[str, float] = OrderedDict()
        # Incoming sessions by source address: those open, and handshakes admitted past the
        # session caps that have not registered theirs yet (both count toward the caps).
        self._session_sources: dict[PeerSession, str] = {}
        self._admitted: dict[asyncio.Task[Any], str] = {}
        # The address of every session's peer (an incoming one's source, an outgoing one's
        # destination), and the node ids admitted handshakes claim: a node id is held by one
        # address at a time (see _held_elsewhere).
        self._remote_addresses: dict[PeerSession, str] = {}
        self._claims: dict[asyncio.Task[Any], str] = {}
        self._claim_warned: OrderedDict[str, float] = OrderedDict()
        self._refusal_warned: set[str] = set()
        self._mtu = config.mtu or interface_mtu(config.host)
        self._closing = False
        self._auth_warned: set[str] = set()
        if config.keyless_risk is not None:
            logger.log(config.keyless_risk, "%s", KEYLESS_RISK)
        if config.patch_aiortc:
            aiortc_patches.apply()

    @property
    def port(self) -> int:
        if self._server is None:
            raise TransportError("transport not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_signalling, self.config.host, self.config.port, reuse_address=True
        )
        logger.info(
            "signalling on %s:%d (interface MTU %d)", self.config.host, self.port, self._mtu
        )

    def session(self, peer_id: str) -> PeerSession | None:
        """The open session with *peer_id*, if there is one: not one that is ending (the peer
        said Bye, or we close it), which takes no new work; another of the peer's, if any."""
        session = self._sessions.get(peer_id)
        if session is None or not (session.closed or session.closing):
            return session
        # A copy first: session_key may be asked from the metrics thread.
        return next(
            (s for s in list(self._all) if s.peer_id == peer_id and not (s.closed or s.closing)), None
        )

    def sessions(self) -> list[PeerSession]:
        """The open sessions. Also called from the metrics thread while the loop adds and
        removes sessions: it copies the table first (one C call, under the GIL) and then asks
        each session, so the loop's changes meanwhile never break the iteration."""
        return [s for s in list(self._sessions.values()) if not s.closed]

    def session_key(self, peer_id: str) -> str | None:
        """Which of our keys the open session with *peer_id* authenticated with: ``"current"``
        (transport.psk), ``"next"`` (next_psk) or ``"none"`` (no key); None without a session."""
        session = self.session(peer_id)
        return None if session is None else self._session_keys.get(session)

    async def connect(self, peer_id: str, host: str, port: int) -> PeerSession:
        """An open, authenticated session with *peer_id* (reused when one exists)."""
        if self._closing:
            raise TransportError("transport is closing")
        if peer_id == self.node_id:
            raise TransportError("refusing to connect to ourselves")
        existing = self.session(peer_id)
        if existing is not None:
            return existing
        task = self._connecting.get(peer_id)
        if task is None:
            failed = self._backoff.get(peer_id)
            now = time.monotonic()
            if failed is not None and now < failed.retry_at and failed.address == (host, port):
                # Every lookup and fetch asks an unsynced peer: without this, one unreachable
                # peer costs each of them a handshake (or a connect timeout) and a log line.
                wait = failed.retry_at - now
                raise PeerBackingOff(
                    f"{peer_id} unreachable ({failed.reason}); next try in {wait:.1f}s", wait
                )
            task = asyncio.get_running_loop().create_task(self._connect(peer_id, host, port))
            self._connecting[peer_id] = task
            task.add_done_callback(lambda done: self._connect_done(peer_id, host, port, done))
        # Several callers may wait on one attempt; cancelling one must not cancel the others.
        try:
            return await asyncio.shield(task)
        except KVPeerError:
            # The peer dialled us meanwhile (it may refuse ours then, FORBIDDEN, when it sees
            # us come from another address than it dialled): its session serves as well.
            existing = self.session(peer_id)
            if existing is not None:
                return existing
            raise
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                # close() cancelled the attempt, not our caller: say so, as for a later call.
                raise TransportError("transport is closing") from None
            raise

    def _connect_done(self, peer_id: str, host: str, port: int, task: asyncio.Task[PeerSession]) -> None:
        self._connecting.pop(peer_id, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return  # _register ended its episode
        if self.session(peer_id) is not None:  # the peer's own session to us (connect returns it)
            logger.debug("connect to peer %s failed, but it opened a session to us: %s", peer_id, exc)
            return
        failed = self._backoff.get(peer_id)
        wait = CONNECT_BACKOFF_S[0] if failed is None else min(failed.wait_s * 2, CONNECT_BACKOFF_S[1])
        self._backoff.pop(peer_id, None)  # re-inserted last: the dict stays in age order
        self._backoff[peer_id] = _Backoff(time.monotonic() + wait, wait, str(exc), (host, port))
        while len(self._backoff) > MAX_BACKOFFS:
            del self._backoff[next(iter(self._backoff))]
        if failed is None:  # once per episode; the counters keep the rest
            logger.warning(
                "cannot connect to peer %s at %s:%d: %s; retrying after %.0f s, backing off to "
                "%.0f s", peer_id, host, port, exc, wait, CONNECT_BACKOFF_S[1],
            )
        else:
            logger.debug("connect to peer %s failed again: %s; next try in %.0f s", peer_id, exc, wait)

    def forget_failures(self, peer_id: str) -> None:
        """Try ``peer_id`` at the next connect, whatever its backoff (it was seen to come back)."""
        self._backoff.pop(peer_id, None)

    def backing_off(self) -> list[str]:
        """Peers whose last connect failed and that are not tried again yet."""
        now = time.monotonic()
        # A copy first: the metrics thread asks too, while the loop may change the dict.
        return [peer for peer, failed in self._backoff.copy().items() if now < failed.retry_at]

    async def close(self) -> None:
        """Stop accepting, close every session gracefully (bounded), then stop."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in [*self._connecting.values(), *self._handshakes]:
            task.cancel()
        closing = [*(s.close() for s in list(self._all)), *self._replaced]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._server.wait_closed(), self.config.close_timeout_s)

    # -- outgoing --------------------------------------------------------------------------

    async def _connect(self, peer_id: str, host: str, port: int) -> PeerSession:
        timeout = self.config.connect_timeout_s
        writer: asyncio.StreamWriter | None = None
        pc: RTCPeerConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(self.config.host, 0)
                )
                remote = _address(writer)
                handshake = ClientHandshake(self.config.keys)
                await _write_message(writer, handshake.hello())
                challenge = await _expect(reader, m.Challenge)
                await _write_message(writer, handshake.on_challenge(challenge))
                handshake.on_server_proof(await _expect(reader, m.ServerProof))

                pc, control, bulk = self._new_peer_connection()
                await aiortc_patches.gather_host_candidates(pc, self._ice_addresses(), self.config)
                await pc.setLocalDescription(await pc.createOffer())
                offer = handshake.offer(self.node_id, self._mtu, pc.localDescription.sdp)
                await _write_message(writer, offer)
                answer = await _expect(reader, m.Answer)
                handshake.on_answer(answer)
                if answer.node_id != peer_id:
                    raise TransportError(
                        f"expected peer {peer_id}, {host}:{port} is {answer.node_id}"
                    )
                packet = self._configure_association(pc, answer.mtu)
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
                limit = self._message_limit(peer_id, answer.sdp)
                session = self._new_session(peer_id, pc, control, bulk, packet, limit)
                await session.wait_open(timeout)
                _check_not_ended(session)
                # Not checked against sessions from other addresses (_held_elsewhere): we chose
                # where to dial. The peer's own session to us may come from another address than
                # the one we dialled (address translation); both stay, as in any racing pair.
        except AuthError as exc:
            self.counters["auth_failures"] += 1
            # Said once per episode by _connect_done (with the reason): a peer holding another key
            # would otherwise log a warning per lookup and fetch.
            logger.debug("authentication with %s at %s:%d failed: %s", peer_id, host, port, exc)
            await _close_pc(pc)
            raise
        except TimeoutError:
            self.counters["handshakes_failed"] += 1
            await _close_pc(pc)
            raise TransportError(f"connecting to {peer_id} at {host}:{port} timed out") from None
        except (OSError, KVPeerError) as exc:
            self.counters["handshakes_failed"] += 1
            await _close_pc(pc)
            if isinstance(exc, KVPeerError):
                raise
            raise TransportError(f"connecting to {peer_id} at {host}:{port}: {exc}") from None
        except Exception as exc:  # aiortc on an SDP it cannot take (AssertionError, KeyError, ...)
            # The answer's MAC held, so a key holder sent it: still one bad peer, which callers
            # skip like any other failed connection, not a bug of ours to raise as such.
            self.counters["handshakes_failed"] += 1
            logger.info("handshake with %s at %s:%d failed: %r", peer_id, host, port, exc)
            await _close_pc(pc)
            raise TransportError(f"connecting to {peer_id} at {host}:{port}: {exc!r}") from exc
        except BaseException:  # cancelled
            await _close_pc(pc)
            raise
        finally:
            if writer is not None:
                writer.close()
        return self._register(session, handshake.key_index, remote)

    # -- incoming --------------------------------------------------------------------------

    async def _on_signalling(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        address = _address(writer)
        # Anyone on the LAN may connect before proving the key: each open handshake holds a task
        # and a descriptor, so their number is bounded, and those that have not proved the key
        # give way to newcomers (a host that holds slots open must not lock out real peers).
        admission = self._handshakes.admit(task, address, time.monotonic())
        if admission.evict is not None:
            # Its connection is cut, and its handshake fails as for a peer that hung up. Not
            # cancelled: asyncio (3.11) logs a server callback's cancellation as an error.
            self._handshake_writers[admission.evict].transport.abort()
            self._log_handshake_dropped("handshakes_evicted", admission.evicted_address, (
                f"dropped a handshake from {admission.evicted_address} that had not proved the "
                f"key, for one from {address} (all {MAX_HANDSHAKES} slots taken)"
            ))  # fmt: skip
        if not admission.admitted:
            self._log_handshake_dropped(
                "handshakes_refused", address, f"refused a handshake from {address}: {admission.reason}"
            )
            writer.close()
            return
        self._handshake_writers[task] = writer
        pc: RTCPeerConnection | None = None
        try:
            async with asyncio.timeout(_preauth_timeout_s(self.config.connect_timeout_s)) as deadline:
                handshake = ServerHandshake(self.config.keys)
                await _write_message(writer, handshake.on_hello(await _expect(reader, m.Hello)))
                proof = await _expect(reader, m.ClientProof)
                try:
                    server_proof = handshake.on_client_proof(proof)
                except AuthError:
                    # Tell nothing but "no": no node id, no SDP, no hint which key was close.
                    await _write_message(
                        writer,
                        m.Reject(code=ErrorCode.UNAUTHENTICATED, reason="authentication failed"),
                    )
                    raise
                self._handshakes.proven(task)
                deadline.reschedule(asyncio.get_running_loop().time() + self.config.connect_timeout_s)
                await _write_message(writer, server_proof)
                offer = await _expect(reader, m.Offer)
                handshake.on_offer(offer)
                if offer.node_id == self.node_id:
                    raise ProtocolError(ErrorCode.INVALID, "peer uses our node id")
                if self._closing:
                    raise ProtocolError(ErrorCode.SHUTTING_DOWN, "shutting down")
                refusal = self._session_refusal(address)
                if refusal is not None:
                    await _write_message(writer, m.Reject(code=ErrorCode.BUSY, reason=refusal))
                    self._log_refusal(address, offer.node_id, refusal)
                    return
                # Checked once, here: from now on this claim holds the id (_claims, then its
                # session) against any other address's. A session we dial to the id meanwhile
                # stays beside it: the peer may be dialling us at once, and its source address
                # need not be the one we dialled.
                holder = self._held_elsewhere(offer.node_id, address)
                if holder is not None:
                    await _write_message(writer, m.Reject(
                        code=ErrorCode.FORBIDDEN, reason=f"node id {offer.node_id!r} is in use"
                    ))  # fmt: skip
                    self._log_claim_refused(offer.node_id, address, *holder)
                    return
                self._admitted[task] = address
                self._claims[task] = offer.node_id
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
                try:
                    limit = self._message_limit(offer.node_id, offer.sdp)
                except ProtocolError as exc:  # the peer proved the key: tell it why
                    reject = m.Reject(code=exc.code, reason=exc.reason[: m.MAX_REASON])
                    await _write_message(writer, reject)
                    raise
                control, bulk = self._channels(pc)
                await aiortc_patches.gather_host_candidates(pc, self._ice_addresses(), self.config)
                packet = self._configure_association(pc, offer.mtu)
                await pc.setLocalDescription(await pc.createAnswer())
                answer = handshake.answer(self.node_id, self._mtu, pc.localDescription.sdp)
                await _write_message(writer, answer)
                session = self._new_session(offer.node_id, pc, control, bulk, packet, limit)
                await session.wait_open(self.config.connect_timeout_s)
                _check_not_ended(session)
            self._register(session, handshake.key_index, address, source=address)
        except AuthError as exc:
            self.counters["auth_failures"] += 1
            self._log_auth_failure(peer, exc)
            await _close_pc(pc)
        except (TimeoutError, OSError, KVPeerError) as exc:
            self.counters["handshakes_failed"] += 1
            logger.info("handshake with %s failed: %s", peer, str(exc) or type(exc).__name__)
            await _close_pc(pc)
        except asyncio.CancelledError:
            await _close_pc(pc)
            raise
        except Exception as exc:  # aiortc on an SDP it cannot take (KeyError, ValueError, ...)
            self.counters["handshakes_failed"] += 1
            logger.info("handshake with %s failed: %r", peer, exc)
            await _close_pc(pc)
        finally:
            writer.close()
            self._handshakes.release(task)
            self._handshake_writers.pop(task, None)
            self._admitted.pop(task, None)
            self._claims.pop(task, None)

    def _held_elsewhere(self, peer_id: str, address: str) -> tuple[str, bool] | None:
        """Who holds *peer_id* from another address than *address*, for a peer that claims it
        in an incoming handshake: that address, and whether it is a session we dialled; or None.
        Holders are open sessions either way round and incoming handshakes past this check.

        A node id is only the claim of a peer that holds the cluster key. A newer session of an
        id closes the oldest (_replace_oldest), so without this any key holder could close a
        node's session and take the requests meant for it. A node always dials from its
        transport.host, so a restarted one comes from the same address and still replaces its
        old session; one that moved waits until its old session is found dead (the heartbeat
        ends a session silent for peer_dead_after_s, so an open one was heard from lately).
        Sessions we dial are not refused by this: we chose the address.
        """
        for session, remote in self._remote_addresses.items():
            if session.peer_id == peer_id and remote != address and not (session.closed or session.closing):
                return remote, session not in self._session_sources
        for task, claimed in self._claims.items():
            if claimed == peer_id and self._admitted.get(task) != address:
                return self._admitted.get(task, "?"), False
        return None

    def _log_handshake_dropped(self, counter: str, address: str, message: str) -> None:
        # Anyone on the LAN can cause this, as often as it likes: warn once a minute per address.
        self.counters[counter] += 1
        level = _warning_every(self._handshake_warned, address, time.monotonic())
        logger.log(level, "%s (%d so far)", message, self.counters[counter])

    def _log_claim_refused(self, peer_id: str, address: str, holder: str, dialled: bool) -> None:
        self.counters["sessions_refused_id_in_use"] += 1
        level = _warning_every(self._claim_warned, address, time.monotonic())
        if dialled:  # the node we dialled may come back from another address through NAT
            held = f"we have a session open to {peer_id!r} at {holder}"
            guess = "the same node behind address translation, two hosts with one node id"
        else:
            held = f"a session with {peer_id!r} at {holder} is open"
            guess = "two hosts with one node id"
        logger.log(
            level, "refused a session from %s as peer %r: %s (%s, or a key holder posing as %r?)",
            address, peer_id, held, guess, peer_id,
        )  # fmt: skip

    def _session_refusal(self, address: str) -> str | None:
        """Why a session from *address* is refused (MAX_SESSIONS_PER_ADDRESS, MAX_SESSIONS), or
        None: it may open."""
        # Sessions peers opened to us: our own (and a pair's duplicate) do not shut them out.
        if len(self._session_sources) + len(self._admitted) >= MAX_SESSIONS:
            return f"too many sessions ({MAX_SESSIONS})"
        from_address = sum(1 for a in self._session_sources.values() if a == address)
        from_address += sum(1 for a in self._admitted.values() if a == address)
        if from_address >= MAX_SESSIONS_PER_ADDRESS:
            return f"too many sessions from {address} ({MAX_SESSIONS_PER_ADDRESS})"
        return None

    def _log_refusal(self, address: str, peer_id: str, reason: str) -> None:
        # A key holder can repeat this at will: warn once per address, then only count.
        self.counters["sessions_refused"] += 1
        logger.log(
            _first_warning(self._refusal_warned, address),
            "refused a session with peer %r at %s: %s (%d refused so far)",
            peer_id, address, reason, self.counters["sessions_refused"],
        )  # fmt: skip

    def _log_auth_failure(self, peer: Any, exc: AuthError) -> None:
        # Anyone on the LAN can trigger this: warn once per address, then only count.
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        logger.log(
            _first_warning(self._auth_warned, address),
            "peer at %s failed authentication (%d failures so far): %s",
            address, self.counters["auth_failures"], exc.reason,
        )  # fmt: skip

    # -- shared ----------------------------------------------------------------------------

    def _ice_addresses(self) -> list[str]:
        return [self.config.host]

    def _configure_association(self, pc: RTCPeerConnection, remote_mtu: int) -> int:
        """Size the SCTP association for both MTUs (and tune it); returns the packet size."""
        packet = self._packet_bytes(remote_mtu)
        if self.config.patch_aiortc:
            aiortc_patches.configure_association(
                pc,
                packet,
                self.config.receive_window_bytes,
                loss_tolerant=self.config.loss_tolerant,
                congestion_control=self.config.congestion_control,
            )
        return packet

    def _message_limit(self, peer_id: str, remote_sdp: str) -> int:
        """Largest control message to send *peer_id*: ours, or less if its SDP says so.

        aiortc's send raises ValueError above the peer's a=max-message-size (64 KiB when the
        attribute is absent, RFC 8841). Bulk frames have no smaller size to fall back to, so a
        peer that cannot take our frame_bytes is refused here, in the handshake.
        """
        remote = _max_message_size(remote_sdp)
        if remote == 0:  # "any size"
            return self.config.max_message_bytes
        if self.config.frame_bytes > remote:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"peer {peer_id} takes data-channel messages of at most {remote} bytes, less than "
                f"transport.frame_bytes ({self.config.frame_bytes}) on {self.node_id}",
            )
        return min(self.config.max_message_bytes, remote)

    def _packet_bytes(self, remote_mtu: int) -> int:
        if not self.config.patch_aiortc:
            return DEFAULT_SCTP_PACKET
        return sctp_packet_size(
            self._mtu,
            remote_mtu,
            maximum=self.config.max_packet_bytes,
            minimum=DEFAULT_SCTP_PACKET,
        )

    def _new_peer_connection(
        self,
    ) -> tuple[RTCPeerConnection, RTCDataChannel, list[RTCDataChannel]]:
        # No STUN/TURN: aiortc would otherwise add Google's public STUN server.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        control, bulk = self._channels(pc)
        return pc, control, bulk

    def _channels(self, pc: RTCPeerConnection) -> tuple[RTCDataChannel, list[RTCDataChannel]]:
        # Negotiated channels with fixed ids: both sides create the same set, no DCEP round trip.
        control = pc.createDataChannel("control", negotiated=True, id=0, ordered=True)
        bulk = [
            pc.createDataChannel(f"bulk{i}", negotiated=True, id=1 + i, ordered=True)
            for i in range(self.config.bulk_channels)
        ]
        return control, bulk

    def _new_session(
        self,
        peer_id: str,
        pc: RTCPeerConnection,
        control: RTCDataChannel,
        bulk: list[RTCDataChannel],
        packet: int,
        message_limit: int,
    ) -> PeerSession:
        return PeerSession(
            peer_id=peer_id,
            pc=pc,
            control=control,
            bulk=bulk,
            config=self.config,
            handler=self.handler,
            on_end=self._session_ended,
            packet_bytes=packet,
            message_limit=message_limit,
        )

    def _register(
        self, session: PeerSession, key_index: int | None, remote: str, source: str | None = None
    ) -> PeerSession:
        """Make *session* one of ours; *remote*: its peer's address; *source*: the same, for
        an incoming one (those count toward MAX_SESSIONS_PER_ADDRESS and MAX_SESSIONS)."""
        session.start()
        self._all[session] = None
        self._remote_addresses[session] = remote
        if source is not None:
            self._session_sources[session] = source
        key = self._key_names[key_index or 0]
        self._session_keys[session] = key
        self.counters[f"sessions_key_{key}"] += 1
        current = self.session(session.peer_id)
        # Both sides may connect at once: keep the first open session as the one callers get;
        # the other stays up (the peer may use it) until either side closes it.
        if current is None:
            self._sessions[session.peer_id] = session
        self._down.pop(session.peer_id, None)
        if self._backoff.pop(session.peer_id, None) is not None:  # a session, either way round
            logger.info("peer %s is reachable again", session.peer_id)
        self.counters["sessions_opened"] += 1
        logger.info(
            "session with %s open (%s key, SCTP packets of %d bytes)",
            session.peer_id, key, session.packet_bytes,
        )  # fmt: skip
        self._replace_oldest(session)
        return session

    def _replace_oldest(self, newest: PeerSession) -> None:
        """Close the oldest sessions of newest's peer id beyond MAX_SESSIONS_PER_PEER."""
        peer_id = newest.peer_id
        older = [
            s for s in self._all
            if s.peer_id == peer_id and s is not newest and not (s.closed or s.closing)
        ]  # fmt: skip
        excess = older[: max(0, len(older) + 1 - MAX_SESSIONS_PER_PEER)]
        if not excess:
            return
        for old in excess:
            if self._sessions.get(peer_id) is old:
                self._sessions[peer_id] = newest
            task = asyncio.get_running_loop().create_task(old.close())
            self._replaced.add(task)
            task.add_done_callback(self._replaced.discard)
        self.counters["sessions_replaced"] += len(excess)
        # Worth saying (a duplicated node id is a misconfiguration), but once: it may repeat.
        first = peer_id not in self._crowded_warned
        if first and len(self._crowded_warned) < _MAX_WARNED:
            self._crowded_warned.add(peer_id)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "peer %s opened a session while it had %d open (a reconnect loop, or two hosts with "
            "one node id?): closing the oldest", peer_id, len(older),
        )  # fmt: skip

    def _session_ended(self, session: PeerSession, by_peer: bool) -> None:
        if session not in self._all:  # its handshake failed: the peer was never up
            return
        del self._all[session]
        self._session_keys.pop(session, None)
        self._session_sources.pop(session, None)
        self._remote_addresses.pop(session, None)
        if self._sessions.get(session.peer_id) is session:
            del self._sessions[session.peer_id]
            replacement = next(
                (s for s in self._all if s.peer_id == session.peer_id and not s.closing), None
            )
            if replacement is not None:
                self._sessions[session.peer_id] = replacement
        if (
            by_peer and not self._closing and self.session(session.peer_id) is None
            and session.peer_id not in self._down
        ):
            # Daemons dial each other, so a pair often has two sessions, and a peer that stops
            # ends both: its down is said (and counted, and called back) once, not per session.
            self._down[session.peer_id] = None
            while len(self._down) > _MAX_WARNED:  # forgotten: at worst said twice
                del self._down[next(iter(self._down))]
            self.counters["peers_down"] += 1
            logger.info("peer %s down", session.peer_id)
            if self.on_peer_down is not None:
                try:
                    self.on_peer_down(session.peer_id)
                except Exception:
                    logger.exception("on_peer_down callback failed")


def _address(writer: asyncio.StreamWriter) -> str:
    """The IP address at the other end of a signalling connection."""
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def _check_not_ended(session: PeerSession) -> None:
    """Raise if *session* ended before it was registered: its peer connection failed in the loop
    turn its channels opened, and its end (a task) ran before the handshake resumed. Registered,
    it would never end again, and stay in the transport's tables for good."""
    if session.closed:
        raise TransportError(f"the connection to {session.peer_id} failed as it opened")


def _max_message_size(sdp: str) -> int:
    """The data-channel message limit an SDP states (0: any size), as aiortc reads it."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "application":
            if media.sctpCapabilities is None:
                return REMOTE_DEFAULT_MAX_MESSAGE_SIZE
            return int(media.sctpCapabilities.maxMessageSize)
    return REMOTE_DEFAULT_MAX_MESSAGE_SIZE


async def _close_pc(pc: RTCPeerConnection | None) -> None:
    if pc is not None:
        with contextlib.suppress(Exception):
            await aio.wait_for(pc.close(), 5.0)
