"""Inventories, sans-IO: this node's chunk set (`InventoryLog`) and what peers hold
(`InventoryTable`), and the full/delta message between them (`InventoryUpdate`).

The epoch names a version of a node's chunk set. It starts at the microseconds since the Unix
epoch when the log is created and grows by one per change, so a restarted node never reuses an
epoch a peer may remember: a delta asked from a stale or unknown epoch is answered in full.
No asyncio, no sockets: the daemon moves the messages (see sync.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.hashing import KEY_BYTES

INVENTORY_VERSION = 1
MAX_INVENTORY_KEYS = 262_144  # 8 MiB of keys: a 256-token chunk each is 67M tokens
DEFAULT_HISTORY_KEYS = 65_536
# Keys per "inventory" answer: 6,000 x ~34 bytes keeps one answer under the transport's
# 256 KiB control-message limit. A larger full inventory is sent as numbered pages.
PAGE_KEYS = 6_000
MAX_PAGES = -(-MAX_INVENTORY_KEYS // PAGE_KEYS)
# Epochs whose sorted keys are kept for askers still paging through them (8 bytes a key each).
MAX_SNAPSHOTS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class InventoryUpdate:
    """A node's chunk set ("full") or its changes since ``base_epoch`` ("delta")."""

    kind: Literal["full", "delta"]
    epoch: int
    base_epoch: int = 0  # delta only
    keys: tuple[bytes, ...] = ()  # full only
    added: tuple[bytes, ...] = ()  # delta only
    removed: tuple[bytes, ...] = ()  # delta only

    def __post_init__(self) -> None:
        if self.kind not in ("full", "delta"):
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"inventory kind {self.kind!r}")
        for name in ("epoch", "base_epoch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise ProtocolError(ErrorCode.INVALID, f"inventory {name} out of range")
        if self.kind == "full" and (self.added or self.removed or self.base_epoch):
            raise ProtocolError(ErrorCode.INVALID, "a full inventory carries only keys")
        if self.kind == "delta":
            if self.keys:
                raise ProtocolError(ErrorCode.INVALID, "a delta carries added/removed, not keys")
            if self.base_epoch > self.epoch:
                raise ProtocolError(ErrorCode.INVALID, "delta base epoch after its epoch")
        total = len(self.keys) + len(self.added) + len(self.removed)
        if total > MAX_INVENTORY_KEYS:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"inventory of {total} keys")
        for group in (self.keys, self.added, self.removed):
            # map() keeps the per-key checks in C: a full inventory has ~10^5 keys.
            if group and (set(map(type, group)) != {bytes} or set(map(len, group)) != {KEY_BYTES}):
                raise ProtocolError(ErrorCode.INVALID, "inventory key is not 32 bytes")

    def to_dict(self) -> dict[str, Any]:
        """msgpack-able form (what an "inventory" request answers)."""
        out: dict[str, Any] = {"v": INVENTORY_VERSION, "kind": self.kind, "epoch": self.epoch}
        if self.kind == "full":
            out["keys"] = list(self.keys)
        else:
            out.update(base=self.base_epoch, add=list(self.added), remove=list(self.removed))
        return out

    @classmethod
    def from_dict(cls, message: Mapping[str, Any]) -> InventoryUpdate:
        """Validate a peer's answer; ProtocolError for anything malformed or too large."""
        if not isinstance(message, Mapping):
            raise ProtocolError(ErrorCode.MALFORMED, "inventory is not a map")
        if message.get("v") != INVENTORY_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"inventory v={message.get('v')!r}")

        def keys(name: str) -> tuple[bytes, ...]:
            value = message.get(name, [])
            if not isinstance(value, list | tuple):
                raise ProtocolError(ErrorCode.INVALID, f"inventory {name} is not a list")
            if len(value) > MAX_INVENTORY_KEYS:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"inventory {name}: {len(value)} keys")
            return tuple(value)

        return cls(
            kind=message.get("kind"),  # type: ignore[arg-type]  # validated in __post_init__
            epoch=message.get("epoch"),  # type: ignore[arg-type]
            base_epoch=message.get("base", 0),
            keys=keys("keys"),
            added=keys("add"),
            removed=keys("remove"),
        )


def initial_epoch() -> int:
    return time.time_ns() // 1000


class InventoryLog:
    """This node's chunk keys, an epoch, and a bounded history of changes for deltas."""

    def __init__(self, *, epoch: int | None = None, history_keys: int = DEFAULT_HISTORY_KEYS) -> None:
        self._keys: set[bytes] = set()
        self._first: set[bytes] = set()
        self.epoch = initial_epoch() if epoch is None else epoch
        self._oldest = self.epoch  # deltas can be answered from this epoch on
        self._history: deque[tuple[int, bool, tuple[bytes, ...]]] = deque()  # epoch, added, keys
        self._history_keys = 0
        self._history_cap = history_keys
        # Sorted keys of recent epochs that full answers were cut from, least recently used
        # first: the later pages of a full inventory come from its first page's epoch.
        self._snapshots: OrderedDict[int, tuple[bytes, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def keys(self) -> frozenset[bytes]:
        return frozenset(self._keys)

    def first_chunk_keys(self) -> frozenset[bytes]:
        """Keys marked as a prefix's first chunk (what the advertisement's digest covers)."""
        return frozenset(self._first)

    def add(self, keys: Iterable[bytes], *, first: Iterable[bytes] = ()) -> int:
        """Record keys now held; ``first`` marks which of them start a prefix. Returns the epoch."""
        new = tuple(k for k in dict.fromkeys(keys) if k not in self._keys)
        self._keys.update(new)
        self._first.update(k for k in first if k in self._keys)
        if new:
            self._record(True, new)
        return self.epoch

    def remove(self, keys: Iterable[bytes]) -> int:
        """Record keys no longer held (evicted). Returns the epoch."""
        gone = tuple(k for k in dict.fromkeys(keys) if k in self._keys)
        self._keys.difference_update(gone)
        self._first.difference_update(gone)
        if gone:
            self._record(False, gone)
        return self.epoch

    def _record(self, added: bool, keys: tuple[bytes, ...]) -> None:
        self.epoch += 1
        self._history.append((self.epoch, added, keys))
        self._history_keys += len(keys)
        while self._history_keys > self._history_cap and self._history:
            epoch, _, dropped = self._history.popleft()
            self._history_keys -= len(dropped)
            self._oldest = epoch

    def full(self) -> InventoryUpdate:
        return InventoryUpdate(kind="full", epoch=self.epoch, keys=tuple(self._keys))

    def update_since(self, epoch: int | None) -> InventoryUpdate:
        """Delta since ``epoch`` when the history covers it and it is smaller, else full."""
        return self._delta_since(epoch) or self.full()

    def _delta_since(self, epoch: int | None) -> InventoryUpdate | None:
        """Delta since ``epoch``; None when the history does not cover it or full is smaller."""
        if epoch is None or not self._oldest <= epoch <= self.epoch:
            return None
        first_op: dict[bytes, bool] = {}
        for entry_epoch, added, keys in self._history:
            if entry_epoch <= epoch:
                continue
            for key in keys:
                first_op.setdefault(key, added)
        add = tuple(k for k, was_add in first_op.items() if was_add and k in self._keys)
        remove = tuple(k for k, was_add in first_op.items() if not was_add and k not in self._keys)
        if len(add) + len(remove) >= len(self._keys):
            return None
        return InventoryUpdate(
            kind="delta", epoch=self.epoch, base_epoch=epoch, added=add, removed=remove
        )

    def since(self, epoch: int | None, page: int = 0, at: int | None = None) -> dict[str, Any]:
        """The answer to an "inventory" request, msgpack-able.

        A delta that fits one answer is sent whole; otherwise the full inventory is cut into
        pages of ``PAGE_KEYS`` keys (sorted, so pages of one epoch fit together) and the answer
        says how many there are: the asker fetches the rest with ``page=N, at=<epoch of page
        0>``. Those come from that epoch's keys, kept for the last MAX_SNAPSHOTS epochs
        paged, so the pages fit together even while the chunk set changes (restarting at every
        change, a busy node was never synced); a page of an epoch no longer kept is refused.
        ``page=N`` without ``at`` pages the current epoch (askers from before this).
        Pages are cut from the sorted keys directly, never from one full `InventoryUpdate`
        (which refuses more than MAX_INVENTORY_KEYS keys); beyond that many keys, peers are
        sent the first MAX_INVENTORY_KEYS (the rest are cache misses to them).
        """
        if page == 0:
            at = self.epoch
            delta = self._delta_since(epoch)
            if delta is not None and len(delta.added) + len(delta.removed) <= PAGE_KEYS:
                return delta.to_dict()
        elif at is not None and at != self.epoch:
            if at not in self._snapshots:
                raise ProtocolError(ErrorCode.INVALID, f"inventory of epoch {at} is gone")
        else:
            at = self.epoch
        keys = self._sorted_keys(at)
        count = min(len(keys), MAX_INVENTORY_KEYS)
        pages = max(1, -(-count // PAGE_KEYS))
        if not 0 <= page < pages:
            raise ProtocolError(ErrorCode.INVALID, f"inventory page {page} of {pages}")
        chunk = keys[page * PAGE_KEYS : min((page + 1) * PAGE_KEYS, count)]
        answer = InventoryUpdate(kind="full", epoch=at, keys=chunk).to_dict()
        answer.update(page=page, pages=pages)
        return answer

    def _sorted_keys(self, epoch: int) -> tuple[bytes, ...]:
        """Sorted keys of ``epoch``: the current one, or one in ``_snapshots``."""
        keys = self._snapshots.get(epoch)
        if keys is None:
            keys = self._snapshots[epoch] = tuple(sorted(self._keys))
            while len(self._snapshots) > MAX_SNAPSHOTS:
                self._snapshots.popitem(last=False)
        self._snapshots.move_to_end(epoch)
        return keys


@dataclass(slots=True)
class _PeerInventory:
    epoch: int
    keys: set[bytes]
    fingerprints: frozenset[str]


class StaleDeltaError(ProtocolError):
    """A delta does not start at the epoch the table holds: ask for a full inventory."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.INVALID, reason)


class InventoryTable:
    """What each peer holds (chunk keys), with each peer's epoch and model fingerprints.

    Kept per peer, without a global key -> peers index: applying a full inventory is then one
    C-level set construction, and a lookup probes each peer's set (peers number in the tens
    or hundreds; keys in the millions).
    """

    def __init__(self) -> None:
        self._peers: dict[str, _PeerInventory] = {}
        self.keys_refused = 0  # peers' keys beyond MAX_INVENTORY_KEYS, not held

    @property
    def counters(self) -> Mapping[str, int]:
        """Event counts for metrics."""
        return {"inventory_keys_refused": self.keys_refused}

    def apply(
        self,
        peer_id: str,
        message: Mapping[str, Any] | InventoryUpdate,
        fingerprints: Iterable[str] | None = None,
    ) -> int:
        """Apply a peer's full or delta inventory; returns the peer's epoch now held.

        Raises ProtocolError for a malformed message and StaleDeltaError for a delta whose base
        is not the epoch held (the caller asks for a full inventory then).
        """
        update = message if isinstance(message, InventoryUpdate) else InventoryUpdate.from_dict(message)
        peer = self._peers.get(peer_id)
        fps = frozenset(fingerprints) if fingerprints is not None else None
        if update.kind == "full":
            old_fps = peer.fingerprints if peer else frozenset()
            self._peers[peer_id] = _PeerInventory(
                update.epoch, set(update.keys), fps if fps is not None else old_fps
            )
            return update.epoch
        if peer is None or peer.epoch != update.base_epoch:
            held = None if peer is None else peer.epoch
            raise StaleDeltaError(f"delta from epoch {update.base_epoch}, table holds {held}")
        peer.keys.difference_update(update.removed)
        self._add_capped(peer.keys, update.added)
        peer.epoch = update.epoch
        if fps is not None:
            peer.fingerprints = fps
        return update.epoch

    def _add_capped(self, keys: set[bytes], added: Sequence[bytes]) -> None:
        """Each delta is within the cap, but deltas add up: hold no more than a full inventory
        holds. Keys left out are cache misses to us, as they are beyond a full inventory."""
        room = MAX_INVENTORY_KEYS - len(keys)
        if len(added) <= room:
            keys.update(added)
            return
        new = [key for key in dict.fromkeys(added) if key not in keys]
        keys.update(new[:room])
        self.keys_refused += max(len(new) - room, 0)

    def set_fingerprints(self, peer_id: str, fingerprints: Iterable[str]) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.fingerprints = frozenset(fingerprints)

    def drop(self, peer_id: str) -> None:
        """Forget a peer (gone, or marked dead)."""
        self._peers.pop(peer_id, None)

    def epoch(self, peer_id: str) -> int | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.epoch

    def peer_ids(self) -> list[str]:
        return list(self._peers)

    def keys_of(self, peer_id: str) -> frozenset[bytes]:
        peer = self._peers.get(peer_id)
        return frozenset(peer.keys) if peer else frozenset()

    def peers_for(self, key: bytes, fingerprint: str | None = None) -> set[str]:
        """Peers holding ``key``; with ``fingerprint``, only peers that serve that model."""
        return {
            peer_id
            for peer_id, peer in self._peers.items()
            if key in peer.keys and (fingerprint is None or fingerprint in peer.fingerprints)
        }

    def holders(self, keys: Sequence[bytes], fingerprint: str | None = None) -> list[set[str]]:
        """Which peers hold each of ``keys`` (an empty set where none does); with
        ``fingerprint``, only peers that serve that model (picked once, not per key)."""
        serving = [
            (peer_id, peer.keys)
            for peer_id, peer in self._peers.items()
            if fingerprint is None or fingerprint in peer.fingerprints
        ]
        return [{peer_id for peer_id, held in serving if key in held} for key in keys]

    def longest_prefix(
        self, keys: Sequence[bytes], fingerprint: str | None = None
    ) -> tuple[int, list[set[str]]]:
        """How many leading chunks some peer holds, and which peers hold each of them."""
        holders: list[set[str]] = []
        for key in keys:
            peers = self.peers_for(key, fingerprint)
            if not peers:
                break
            holders.append(peers)
        return len(holders), holders

    def snapshot(self) -> dict[str, frozenset[bytes]]:
        """Every peer's key set (for tests and stats)."""
        return {p: frozenset(inv.keys) for p, inv in self._peers.items()}

    def sizes(self) -> dict[str, int]:
        """How many keys each peer holds, without copying the sets (stats asks often: the vLLM
        connector's health probe does)."""
        return {p: len(inv.keys) for p, inv in self._peers.items()}
