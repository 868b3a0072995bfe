"""The live-peer table and its liveness policy, sans-IO: time is passed in as ``now``.

A peer enters through its advertisement (`observe`), stays alive while there is evidence it
runs (an advertisement or a heartbeat within ``timeout_s``), leaves at once on a goodbye
(`withdraw`) or when the transport says so (`mark_dead`), and leaves when silent for
``timeout_s`` (`expire`). A peer marked dead or expired keeps its last advertisement, so fresh
evidence of life (a heartbeat) brings it back without waiting for its next announcement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from kvpeer.discovery.advert import PeerEvent, PeerInfo

# Peers are unauthenticated here and choose their node ids: bound the table. Clusters are
# tens or hundreds of nodes.
MAX_PEERS = 4096
# ...and bound what one address holds, so that one host cannot fill the table on its own. A
# host runs one daemon per GPU at most.
MAX_PEERS_PER_ADDRESS = 16


@dataclass(slots=True)
class _Entry:
    info: PeerInfo
    last_seen: float
    alive: bool = True


class PeerTable:
    """Peers by node id; every mutating call returns the events it caused.

    When the table is full a new peer takes the place of the entry dead the longest: dead
    entries (kept for a heartbeat to revive them) must not lock out peers that run.
    """

    def __init__(
        self,
        self_id: str,
        timeout_s: float | None,
        forget_after_s: float | None = None,
        max_peers: int = MAX_PEERS,
        max_per_address: int = MAX_PEERS_PER_ADDRESS,
    ) -> None:
        self._self_id = self_id
        self._max_peers = max_peers
        self._max_per_address = max_per_address
        self.refused = 0  # new peers not taken because the table was full
        self.crowded = 0  # new peers not taken because their address held its share
        self.evicted = 0  # dead entries dropped to make room for a new peer
        self._timeout_s = timeout_s  # None: no timeout-based liveness
        # A dead peer's record is kept this long (for a heartbeat to revive it), then dropped
        # so that the table of a long-running node does not grow with every peer ever seen.
        self._forget_after_s = forget_after_s if forget_after_s is not None else (
            6 * timeout_s if timeout_s is not None else None
        )
        self._entries: dict[str, _Entry] = {}
        self._alive: dict[str, PeerInfo] = {}
        self._dead: dict[str, None] = {}  # the dead entries, the longest dead first
        self._by_address: dict[str, dict[str, None]] = {}  # first address -> node ids there

    def alive(self) -> Mapping[str, PeerInfo]:
        return MappingProxyType(self._alive)

    def known(self, node_id: str) -> PeerInfo | None:
        """Last advertisement of a peer, alive or not."""
        entry = self._entries.get(node_id)
        return entry.info if entry else None

    def known_ids(self) -> list[str]:
        return list(self._entries)

    def observe(self, info: PeerInfo, now: float, listed: bool = False) -> list[PeerEvent]:
        """A peer advertised itself (new or changed record, or a beacon). ``listed``: from an
        address the operator configured, so taken even when the table is full."""
        if info.node_id == self._self_id:
            return []
        entry = self._entries.get(info.node_id)
        if entry is None:
            if not self._make_room(info.addresses[0], listed):
                return []
            self._entries[info.node_id] = _Entry(info, now)
            self._index(info)
            self._alive[info.node_id] = info
            return [PeerEvent(kind="added", peer=info)]
        previous, was_alive = entry.info, entry.alive
        self._unindex(previous)
        self._index(info)
        entry.info, entry.last_seen, entry.alive = info, now, True
        self._alive[info.node_id] = info
        self._dead.pop(info.node_id, None)
        if not was_alive:
            return [PeerEvent(kind="added", peer=info)]
        if previous == info:
            return []
        return [PeerEvent(kind="updated", peer=info, epoch_changed=previous.epoch != info.epoch)]

    def heard(self, node_id: str, now: float) -> list[PeerEvent]:
        """Evidence of life without a new advertisement (a heartbeat)."""
        entry = self._entries.get(node_id)
        if entry is None:
            return []
        entry.last_seen = now
        if entry.alive:
            return []
        entry.alive = True
        self._alive[node_id] = entry.info
        self._dead.pop(node_id, None)
        return [PeerEvent(kind="added", peer=entry.info)]

    def withdraw(self, node_id: str) -> list[PeerEvent]:
        """The peer said goodbye (or its registry key vanished): forget it."""
        entry = self._forget(node_id)
        if entry is None:
            return []
        return [PeerEvent(kind="removed", peer=entry.info, reason="goodbye")] if entry.alive else []

    def mark_dead(
        self, node_id: str, reason: Literal["timeout", "transport"] = "transport"
    ) -> list[PeerEvent]:
        """The peer vanished without a goodbye; keep its record for a possible return."""
        entry = self._entries.get(node_id)
        if entry is None or not entry.alive:
            return []
        entry.alive = False
        del self._alive[node_id]
        self._dead[node_id] = None
        return [PeerEvent(kind="removed", peer=entry.info, reason=reason)]

    def expire(self, now: float) -> list[PeerEvent]:
        """Mark dead every live peer silent for longer than the timeout."""
        if self._timeout_s is None:
            return []
        events: list[PeerEvent] = []
        for node_id, entry in list(self._entries.items()):
            silent = now - entry.last_seen
            if entry.alive and silent > self._timeout_s:
                events.extend(self.mark_dead(node_id, "timeout"))
            elif not entry.alive and self._forget_after_s is not None and silent > self._forget_after_s:
                self._forget(node_id)
        return events

    def next_expiry(self) -> float | None:
        """When `expire` next has something to do, or None."""
        if self._timeout_s is None:
            return None
        times = [e.last_seen for e in self._entries.values() if e.alive]
        return min(times) + self._timeout_s if times else None

    def _make_room(self, address: str, listed: bool) -> bool:
        """Whether a new peer at ``address`` may enter, evicting a dead entry if need be."""
        at_address = self._by_address.get(address, {})
        if len(at_address) >= self._max_per_address:
            dead = [node_id for node_id in at_address if node_id in self._dead]
            if not dead:
                self.crowded += 1
                return False
            self._evict(min(dead, key=lambda node_id: self._entries[node_id].last_seen))
        if len(self._entries) >= self._max_peers:
            if self._dead:
                self._evict(next(iter(self._dead)))
            elif not listed:
                self.refused += 1
                return False
        return True

    def _evict(self, node_id: str) -> None:
        self.evicted += 1
        self._forget(node_id)

    def _forget(self, node_id: str) -> _Entry | None:
        entry = self._entries.pop(node_id, None)
        if entry is not None:
            self._unindex(entry.info)
            self._alive.pop(node_id, None)
            self._dead.pop(node_id, None)
        return entry

    def _index(self, info: PeerInfo) -> None:
        self._by_address.setdefault(info.addresses[0], {})[info.node_id] = None

    def _unindex(self, info: PeerInfo) -> None:
        at_address = self._by_address[info.addresses[0]]
        del at_address[info.node_id]
        if not at_address:
            del self._by_address[info.addresses[0]]


class UpdateThrottle:
    """Coalesces advertisement updates to at most one per ``min_interval_s``."""

    def __init__(self, min_interval_s: float) -> None:
        self._min = min_interval_s
        self._last: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait before publishing an update asked for at ``now`` (0: publish now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self._min - now)

    def published(self, now: float) -> None:
        self._last = now


class RateLimit:
    """A token bucket: `allow` is True at most ``rate_per_s`` times a second on average,
    ``burst`` times in a row."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
