"""The chunk store: encoded chunks by (key, level), in RAM and on disk, each tier an LRU in bytes.

Owns the bytes of encoded chunks once they are put, their on-disk files and the inventory of
which keys are held. Blobs are opaque here (the codec reads them); the store guards its own
files with a checksum of its own and never returns bytes that fail it: a corrupt file is
deleted and read as a miss.

Tiers. The RAM tier is an LRU bounded by ``ram_bytes``. The disk tier (when ``directory`` is
given and ``disk_bytes`` > 0) receives every put and is bounded by ``disk_bytes``, also LRU; the
RAM tier caches it. Disk writes are write-behind: a put returns once the chunk is readable (RAM,
or the writer's queue) and one writer thread persists it, so a fetch never waits on fsync.
The queue is bounded (``max_pending_bytes``; a put waits beyond it). :meth:`flush` waits for
it to drain; :meth:`close` flushes. When the disk fails (full, read-only, ...) the error is
logged, counted in ``stats()``, and for the next ``DISK_RETRY_S`` seconds puts keep chunks in
RAM only (``ram_only_puts``; StoreError only for a chunk RAM cannot hold either): the daemon
keeps running on the RAM tier. An outage is logged at ERROR once (again only if its error
changes), its retries at DEBUG, the first write that works again at INFO. A file that eviction
cannot remove (a read-only disk) stays indexed and readable; the put that needed its room stays
in RAM. Chunks whose write failed were acknowledged already: they move to the RAM tier (as far
as it holds them). A disk that is down when the store opens (read-only, full, failing) leaves
the store on its RAM tier (``stats()["disk_unavailable"]`` says why); other errors there (no
permission, not a directory) are the configuration's and raise OSError.
When the file system (or the quota on it) fills before ``disk_bytes`` does (others write there
too), the oldest files are evicted for the failed bytes, so that the retry finds room. Store
subdirectories removed under a running store (a tmpfiles cleaner) are made again by the next
write into them.

Crash safety. A file is written under a temporary name, fsynced, renamed into place and its
directory fsynced, so after ``kill -9`` (or power loss) at any point a chunk's file either is
complete or does not exist; leftover temporary files are removed when the store opens. What
was still queued is lost (it is a cache); what :meth:`flush` returned for is not. The index is
rebuilt at start-up from file names and ``stat`` alone (no file is read), in the order of last
use (file mtimes). One process uses a directory at a time (an ``flock`` on ``.lock``).

Threads. ``*_blocking`` methods may run in executor threads concurrently. The async wrappers
run them in the store's own small thread pools, one for puts (which wait while the disk writers
are behind) and one for reads, created with the store and shut down by :meth:`close`: a slow
disk holds up store work only, never the loop's default executor that decodes, transcodes and
encodes share, and a RAM hit never waits behind puts. Inventory callbacks (``subscribe``) run
on the event loop they were subscribed from (from other threads via ``call_soon_threadsafe``),
or in the calling thread when subscribed outside any loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kvpeer.errors import StoreError, StoreInUse
from kvpeer.files import fsync_dir

log = logging.getLogger(__name__)

KEY_BYTES = 32
DISK_RETRY_S = 10.0  # after a failed disk write, puts stay RAM-only this long before retrying
READ_WARN_S = 60.0  # read errors are logged at WARNING at most this often (the rest at DEBUG)
#: Failed removals one eviction (one put) may meet before it tries only files that never
#: resisted, and twice that before it gives up (the put stays in RAM): a mount where every file
#: resists must not cost one failed unlink per file, under the store's lock, on one put.
MAX_STUCK_TRIES = 8
STUCK_RETRY_S = 60.0  # a file eviction could not remove is tried again after this long
# Read errors that say nothing about the file (the process is short of descriptors or memory,
# a stale NFS handle): the chunk stays indexed. Any other leaves the index, file untouched.
_PASSING_READ_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.ENOBUFS, errno.ESTALE}
)
# Errors that mean the disk, not the configuration or one file, is down. Opening the disk tier:
# the store then starts on its RAM tier instead of failing the daemon's start (and systemd's
# restarts). An eviction: puts stay in RAM for a while (any other error concerns that one file,
# and eviction moves on to the next).
_DISK_DOWN_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})
# Write errors that our own oldest files can make room for: the file system is full, or our
# user's quota on it is.
_NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
PUT_THREADS = 2  # the async puts' pool: a put waiting for the writers holds one of these
READ_THREADS = 4  # the async reads' pool (disk reads and checksums of files)
WRITE_BATCH = 64  # files written before their directories are fsynced once
CLEAR_BATCH = 128  # keys dropped per hold of the lock by clear()
FORMAT_DIR = "v1"  # files of this record format live here; a new format gets a new directory
LOCK_FILE = ".lock"
# How long opening a store waits for another process to release its directory before giving up
# (a config error: two daemons on one store.dir). A restart's predecessor lets go as it exits.
LOCK_WAIT_S = 5.0
# Prompts remembered to be ordered once their queued levels are written (older ones are
# forgotten: they are ordered as they were written, first to last).
ORDER_WHEN_WRITTEN = 64
ORDER_WHEN_WRITTEN_KEYS = 65536  # their chunks, all together
ORDER_TOUCH_JOBS = 2  # mtime jobs queued at once for used_as_prefix (more are skipped), which
# leaves the other read threads to reads
TMP_SUFFIX = ".tmp"
# Only this daemon reads its chunk files: clients get KV through the API's shared memory.
PRIVATE_DIR_MODE = 0o700
RAM_COPY_SEARCH = 64  # RAM entries looked at for copies to make room for a disk read's copy
PRIVATE_FILE_MODE = 0o600

# Record: magic, format version, level length, payload length, checksum, key; then level, payload.
_MAGIC = b"KVPCHNK1"
_VERSION = 1
_HEADER = struct.Struct("<8sHBxQ16s32s")
_LEVEL_RE = re.compile(r"^[a-z0-9_]{1,16}$")
_NAME_RE = re.compile(r"^([0-9a-f]{64})\.([a-z0-9_]{1,16})$")

Listener = Callable[[list[bytes], list[bytes]], None]
_Slot = tuple[bytes, str]  # (key, level)
R = TypeVar("R")


def _checksum(key: bytes, level: str, blob: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(key)
    h.update(level.encode())
    h.update(blob)
    return h.digest()


def encode_record(key: bytes, level: str, blob: bytes) -> bytes:
    """Header + level of a chunk's file (the payload follows it)."""
    lvl = level.encode()
    return _HEADER.pack(_MAGIC, _VERSION, len(lvl), len(blob), _checksum(key, level, blob), key) + lvl


def decode_record(data: bytes, key: bytes, level: str) -> bytes:
    """The payload of a chunk file read whole; StoreError if it is not exactly what was written."""
    payload_len, digest = _check_header(data, key, level, len(data))
    payload = bytes(memoryview(data)[len(data) - payload_len:])
    _check_payload(payload, key, level, digest)
    return payload


def read_record_blocking(path: Path, key: bytes, level: str) -> bytes:
    """The payload of the chunk file at ``path``, read into the bytes returned (the file is not
    read whole first: one copy of a blob fewer than ``decode_record``); StoreError if it is not
    exactly what was written, OSError if it cannot be read."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(_HEADER.size)
        if len(head) == _HEADER.size:
            head += fh.read(_HEADER.unpack_from(head)[2])  # the level's name
        payload_len, digest = _check_header(head, key, level, size)
        payload = fh.read(payload_len)
    if len(payload) != payload_len:  # shortened while we read it
        raise StoreError(f"truncated record ({len(head) + len(payload)} of {size} bytes)")
    _check_payload(payload, key, level, digest)
    return payload


def _check_header(head: bytes, key: bytes, level: str, size: int) -> tuple[int, bytes]:
    """Payload length and checksum from ``head`` (the header and the level's name, at least) of
    a ``size``-byte record; StoreError unless they are ``key``'s at ``level`` and fit ``size``."""
    if len(head) < _HEADER.size:
        raise StoreError(f"truncated record ({size} bytes)")
    magic, version, level_len, payload_len, digest, rec_key = _HEADER.unpack_from(head)
    if magic != _MAGIC or version != _VERSION:
        raise StoreError("not a chunk record of this version")
    start = _HEADER.size + level_len
    rec_level = head[_HEADER.size:start].decode(errors="replace")
    if rec_key != key or rec_level != level:
        raise StoreError("record holds another chunk than its name says")
    if size != start + payload_len:
        raise StoreError(f"record length {size} != {start + payload_len}")
    return payload_len, digest


def _check_payload(payload: bytes, key: bytes, level: str, digest: bytes) -> None:
    if _checksum(key, level, payload) != digest:
        raise StoreError("checksum mismatch")


def record_size(level: str, blob_len: int) -> int:
    return _HEADER.size + len(level.encode()) + blob_len


class _OncePer:
    """Which line of a flood of like ones logs at WARNING: at most one per ``period_s`` (the
    rest go to DEBUG). Call under the store's lock."""

    def __init__(self, period_s: float) -> None:
        self._period_s = period_s
        self._last = -period_s

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._period_s:
            return False
        self._last = now
        return True


class _StuckFile(OSError):
    """A file eviction could not remove, on a disk that otherwise works."""


class _NoCandidate(_StuckFile):
    """No file left that eviction may try now: all resisted, none is due to be tried again."""


@dataclass(slots=True, eq=False)
class _PendingWrite:
    """A chunk queued for the disk writer (readable from here until its file exists)."""

    blob: bytes
    file_size: int


@dataclass(slots=True)
class _Changes:
    """Keys that appeared in or vanished from the inventory during one operation."""

    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class _Counters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    ram_evictions: int = 0
    disk_evictions: int = 0
    corrupt: int = 0
    disk_errors: int = 0
    disk_read_errors: int = 0
    ram_only_puts: int = 0


class ChunkStore:
    """Encoded chunks by key (32 bytes) and level, RAM LRU over a write-behind disk LRU."""

    def __init__(
        self,
        ram_bytes: int,
        disk_bytes: int = 0,
        directory: Path | None = None,
        *,
        level_order: Sequence[str] = (),
        max_pending_bytes: int = 64 << 20,
        writers: int = 4,
        payload_format: str = "",
    ) -> None:
        """``level_order``: known levels, most faithful first (others are refused); empty: any
        level name, ordered by name. ``max_pending_bytes``: disk writes queued before a put
        waits for the writers. ``writers``: writer threads (concurrent fsyncs share journal
        commits, so a few threads write several times more files per second than one).
        ``payload_format``: what the payloads are (e.g. the codec's blob version); files kept
        under another payload format are not loaded (a node upgraded to a new codec must not
        serve blobs it can no longer read)."""
        if ram_bytes < 0 or disk_bytes < 0:
            raise StoreError("store budgets must be >= 0")
        if payload_format and not re.fullmatch(r"[A-Za-z0-9_.]+", payload_format):
            raise StoreError(f"store payload format {payload_format!r}: letters, digits, _ and . only")
        self._format_dir = f"{FORMAT_DIR}-{payload_format}" if payload_format else FORMAT_DIR
        self.ram_limit = ram_bytes
        self.disk_limit = disk_bytes if directory is not None else 0
        self.directory = directory if self.disk_limit else None
        self.max_pending_bytes = max_pending_bytes
        self._order = {level: i for i, level in enumerate(level_order)}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # queue changes: writer, flush, back-pressure
        self._ram: OrderedDict[_Slot, bytes] = OrderedDict()
        self._disk: OrderedDict[_Slot, int] = OrderedDict()  # slot -> file size, LRU first
        # Which file a slot's index entry is (a number per file indexed): a read that failed
        # removes the file it read, not one put again since.
        self._file_ids: dict[_Slot, int] = {}
        self._file_counter = itertools.count()
        self._pending: dict[_Slot, _PendingWrite] = {}  # queued or being written
        self._queue: deque[_Slot] = deque()
        # Slots a writer thread has in hand, and slots queued again meanwhile (after a delete
        # and a new put): one writer per slot at a time, or the older write's clean-up could
        # unlink the newer file.
        self._writing: set[_Slot] = set()
        self._deferred: list[_Slot] = []
        self._levels: dict[bytes, set[str]] = {}  # readable levels per key (RAM, queue, disk)
        self.ram_used = 0
        self.disk_used = 0  # files on disk + the file sizes of queued writes
        self.pending_bytes = 0
        self._counters = _Counters()
        self._listeners: list[tuple[Listener, asyncio.AbstractEventLoop | None]] = []
        self._lock_fd: int | None = None
        self._disk_failed_at: float | None = None
        self._last_disk_error = ""
        # The error an outage was logged with at ERROR ("" while writes work): its retries fail
        # the same way for as long as it lasts (a read-only remount: hours) and log at DEBUG.
        self._disk_outage = ""
        self._read_warnings = _OncePer(READ_WARN_S)
        self.disk_unavailable = ""  # why the disk tier did not open, if it did not
        self._closing = False  # the writers may stop once the queue is empty
        self._closed = False  # close() began: puts are refused, waiting ones give up
        # Files eviction could not remove on a disk that works (immutable, another owner's, a
        # root_squash mount): still indexed and readable, passed over until their time to be
        # tried again (the cause may be gone: EBUSY, chattr -i). Slot -> that time.
        self._stuck: dict[_Slot, float] = {}
        self._stuck_warnings = _OncePer(READ_WARN_S)
        self._touches = 0  # mtime updates queued by RAM hits (bounded: best effort)
        self._order_when_written: list[list[bytes]] = []  # see _order_written_prompts
        self._order_touches = 0  # _touch_in_order jobs queued or running
        self._writers: list[threading.Thread] = []
        self._n_writers = max(1, writers)
        # Threads start on first use: a store nobody awaits costs none.
        self._put_pool = concurrent.futures.ThreadPoolExecutor(PUT_THREADS, "kvpeer-store-put")
        self._read_pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, "kvpeer-store-read")
        if self.directory is not None:
            try:
                self._open_disk(self.directory)
            except OSError as exc:
                if exc.errno not in _DISK_DOWN_ERRNOS:
                    raise
                self._release_lock()
                self.disk_unavailable = _describe_os_error(exc)
                # Under the unit's ProtectSystem=strict every path but its own StateDirectory=
                # is read-only: the usual cause of EROFS on a store.dir moved to a bigger disk.
                hint = (
                    f" (under the kvpeer unit, add ReadWritePaths={self.directory} with "
                    "`systemctl edit kvpeer`)" if exc.errno == errno.EROFS else ""
                )
                log.error(
                    "store %s: %s%s; running on the RAM tier only (%d bytes) until a restart "
                    "finds the disk usable", self.directory, self.disk_unavailable, hint,
                    self.ram_limit,
                )
                self.directory, self.disk_limit = None, 0
        if self.directory is not None:
            for n in range(self._n_writers):
                thread = threading.Thread(
                    target=self._writer_loop, name=f"kvpeer-store-writer-{n}", daemon=True
                )
                thread.start()
                self._writers.append(thread)

    # ------------------------------------------------------------------ public, synchronous
    def subscribe(self, callback: Listener) -> None:
        """Call ``callback(added_keys, removed_keys)`` whenever keys enter or leave the store."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._listeners.append((callback, loop))

    def has(self, key: bytes) -> bool:
        with self._lock:
            return key in self._levels

    def levels(self, key: bytes) -> list[str]:
        """Levels held for ``key``, most faithful first."""
        with self._lock:
            return self._sorted(self._levels.get(key, ()))

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._levels)

    def __len__(self) -> int:
        with self._lock:
            return len(self._levels)

    def put_blocking(self, key: bytes, level: str, blob: bytes) -> None:
        """Store ``blob`` as ``key`` at ``level``: in RAM and queued for the disk.

        StoreError when it fits no tier (while the disk is failing: when RAM cannot hold it).
        """
        changes = _Changes()
        try:
            self._put(key, level, blob, changes)
        finally:
            self._notify(changes)

    def put_if_held_blocking(self, key: bytes, level: str, blob: bytes) -> bool:
        """:meth:`put_blocking`, only while ``key`` is held at some level; True if it was.

        For a level made from a held one: one made while the key was deleted (an eviction,
        ``evict --all``) must not bring the key back.
        """
        changes = _Changes()
        try:
            return self._put(key, level, blob, changes, if_held=True)
        finally:
            self._notify(changes)

    def get_blocking(self, key: bytes, level: str | None = None) -> bytes | None:
        """The blob of ``key`` at ``level`` (None: the most faithful level held), or None.

        A file that fails its checksum is deleted and counts as a miss.
        """
        changes = _Changes()
        try:
            return self._get(key, level, changes)
        finally:
            self._notify(changes)

    def used_as_prefix(self, keys: Sequence[bytes]) -> None:
        """``keys``, one prompt's chunks in order, were used together (put, fetched): mark the
        run of them held from the first one used last to first, so that the first chunk is the
        most recent. Eviction then takes a prefix from its end: a chunk whose earlier ones are
        gone can never be matched again (its key hashes them), while a prefix that lost its
        tail still serves its head. Levels still queued for the disk join the order once
        written. In RAM only when RAM is the only tier (else it is a cache of the disk, and
        unread levels there would crowd out read ones). The files' mtimes follow (the order
        after a restart), touched off the caller's thread."""
        with self._lock:
            if self._closed:
                return
            held = list(itertools.takewhile(self._levels.__contains__, keys))
            on_disk = self._use_last_to_first(held)
            if self._queued_for_disk(held):
                self._order_once_written(held)
        self._touch_soon(on_disk)

    def delete(self, key: bytes) -> bool:
        """Drop every level of ``key`` from both tiers. True if anything was held."""
        changes = _Changes()
        with self._lock:
            found = self._drop_key(key, changes)
        self._notify(changes)
        return found

    def clear(self) -> int:
        """Drop every chunk; returns how many keys were held.

        In batches: each file is an unlink under the lock, and readers on the event loop
        (``has``) must not wait for all of them (20,000 files: seconds).
        """
        changes = _Changes()
        with self._lock:
            keys = list(self._levels)
        for start in range(0, len(keys), CLEAR_BATCH):
            with self._lock:
                for key in keys[start : start + CLEAR_BATCH]:
                    self._drop_key(key, changes)
        count = len(changes.removed)
        self._notify(changes)
        return count

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued disk write is done (written or failed). False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending or not any(t.is_alive() for t in self._writers),
                timeout=timeout_s,
            )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            return {
                "chunks": len(self._levels),
                "ram_entries": len(self._ram),
                "ram_bytes": self.ram_used,
                "ram_limit": self.ram_limit,
                "disk_entries": len(self._disk),
                "disk_bytes": self.disk_used,
                "disk_limit": self.disk_limit,
                "disk_dir": str(self.directory) if self.directory else None,
                "pending_entries": len(self._pending),
                "pending_bytes": self.pending_bytes,
                "hits": c.hits,
                "misses": c.misses,
                "puts": c.puts,
                "ram_evictions": c.ram_evictions,
                "disk_evictions": c.disk_evictions,
                "corrupt": c.corrupt,
                "disk_errors": c.disk_errors,
                "last_disk_error": self._last_disk_error,
                "ram_only_puts": c.ram_only_puts,
                "disk_read_errors": c.disk_read_errors,
                "disk_failing": self._disk_failing(),
                "disk_unavailable": self.disk_unavailable,
                "disk_stuck_files": len(self._stuck),
            }

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush queued writes (for at most ``timeout_s``), stop the writer, release the lock.

        The async methods raise StoreError from here on; calls already running finish (a put
        waiting for the writers stops waiting) without close waiting for them.
        """
        with self._cond:
            self._closed = True  # from here no put joins the queue that is being flushed
            self._cond.notify_all()
        # Not waited for: a read stuck on a hung disk must not hang close. The read pool stays
        # until the queue is flushed: the mtimes that order prompts across a restart are set
        # there as their last queued levels are written.
        self._put_pool.shutdown(wait=False, cancel_futures=True)
        if self._writers:
            if not self.flush(timeout_s):
                log.warning("store: %d queued chunks not written at close", len(self._pending))
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            for thread in self._writers:
                thread.join(timeout=timeout_s)
            if any(thread.is_alive() for thread in self._writers):
                log.warning("store: a disk write still hangs at close; its chunk may be lost")
            self._writers.clear()
        # Jobs queued are dropped, unless touches are among them: then all run (reads too, which
        # nobody awaits any more: harmless).
        with self._lock:
            touches = self._order_touches
        self._read_pool.shutdown(wait=False, cancel_futures=not touches)
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ public, async
    async def aclose(self, timeout_s: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop while queued writes drain."""
        await asyncio.to_thread(self.close, timeout_s)

    async def put(self, key: bytes, level: str, blob: bytes) -> None:
        changes = _Changes()
        await self._in_pool(self._put_pool, changes, self._put, key, level, blob, changes)

    async def put_if_held(self, key: bytes, level: str, blob: bytes) -> bool:
        changes = _Changes()
        return await self._in_pool(self._put_pool, changes, self._put, key, level, blob, changes, True)

    async def get(self, key: bytes, level: str | None = None) -> bytes | None:
        held = self._held_now(key, level)
        if held is not None:
            return held
        changes = _Changes()
        return await self._in_pool(self._read_pool, changes, self._get, key, level, changes)

    def _held_now(self, key: bytes, level: str | None) -> bytes | None:
        """A RAM (or queued) hit, answered on the caller's thread without waiting: never behind
        disk reads in the pool, never blocking (the lock may be held across a file removal:
        then the pool answers). None: not here, or not known without waiting."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._closed:
                raise StoreError("the store is closed")
            levels = [level] if level is not None else self._sorted(self._levels.get(key, ()))
            if not levels:
                return None
            slot = (key, levels[0])  # the best held: a miss there is for _get to sort out
            blob = self._ram.get(slot)
            if blob is not None:
                self._ram.move_to_end(slot)
            elif slot in self._pending:
                blob = self._pending[slot].blob
            if blob is None:
                return None
            self._counters.hits += 1
            self._used_key(key)
            touch = slot in self._disk and self._touches < READ_THREADS
            if touch:
                self._touches += 1
        finally:
            self._lock.release()
        if touch:  # the file's mtime, off this thread and not waited for
            try:
                self._read_pool.submit(self._touch_queued, slot)
            except RuntimeError:  # the pool is shut down
                with self._lock:
                    self._touches -= 1
        return blob

    def _touch_queued(self, slot: _Slot) -> None:
        try:
            self._touch([slot])
        finally:
            with self._lock:
                self._touches -= 1

    async def _in_pool(
        self, pool: concurrent.futures.Executor, changes: _Changes, fn: Callable[..., R], *args: Any
    ) -> R:
        if self._closed:  # the read pool outlives close() a little (its flush): not for us
            raise StoreError("the store is closed")
        try:
            future = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except RuntimeError as exc:  # the pool is shut down
            raise StoreError("the store is closed") from exc
        # Shielded: a cancelled caller must not lose the inventory changes the thread goes on
        # making; they are announced when the thread is done.
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and (task is None or not task.cancelling()):
                raise StoreError("the store is closed") from None  # close() dropped the job
            raise
        finally:
            if future.done():
                self._notify(changes)
            else:
                future.add_done_callback(lambda _f: self._notify(changes))

    # ------------------------------------------------------------------ internals
    def _sorted(self, levels: Any) -> list[str]:
        return sorted(levels, key=lambda lv: (self._order.get(lv, len(self._order)), lv))

    def _check(self, key: bytes, level: str) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise StoreError(f"a chunk key is {KEY_BYTES} bytes")
        if not _LEVEL_RE.match(level) or (self._order and level not in self._order):
            raise StoreError(f"unknown level {level!r}")

    def _notify(self, changes: _Changes) -> None:
        if not (changes.added or changes.removed):
            return
        added, removed = list(changes.added), list(changes.removed)
        changes.added.clear()
        changes.removed.clear()
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for callback, loop in list(self._listeners):
            if loop is None or loop is here:
                _call_listener(callback, added, removed)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_call_listener, callback, added, removed)

    def _path(self, slot: _Slot) -> Path:
        assert self.directory is not None
        key, level = slot
        return self.directory / self._format_dir / key[:1].hex() / f"{key.hex()}.{level}"

    # The helpers below run with self._lock held.
    def _mark_present(self, slot: _Slot, changes: _Changes) -> None:
        held = self._levels.setdefault(slot[0], set())
        if not held:
            changes.added.append(slot[0])
        held.add(slot[1])

    def _mark_gone(self, slot: _Slot, changes: _Changes) -> None:
        if slot in self._ram or slot in self._disk or slot in self._pending:
            return
        held = self._levels.get(slot[0])
        if held is None:
            return
        held.discard(slot[1])
        if not held:
            del self._levels[slot[0]]
            changes.removed.append(slot[0])

    def _ram_insert(self, slot: _Slot, blob: bytes, changes: _Changes) -> None:
        if len(blob) > self.ram_limit:
            return
        old = self._ram.pop(slot, None)
        if old is not None:
            self.ram_used -= len(old)
        self._ram[slot] = blob
        self.ram_used += len(blob)
        self._mark_present(slot, changes)
        while self.ram_used > self.ram_limit:
            victim, victim_blob = self._ram.popitem(last=False)
            self.ram_used -= len(victim_blob)
            self._counters.ram_evictions += 1
            self._mark_gone(victim, changes)

    def _ram_cache_copy(self, slot: _Slot, blob: bytes, changes: _Changes) -> None:
        """Keep a copy of a file just read in RAM, making room from other copies only: chunks
        held in RAM alone (their write failed: a full or failing disk) are not pushed out by
        reads of chunks the disk keeps anyway."""
        if slot in self._ram or len(blob) > self.ram_limit:
            return
        need = self.ram_used + len(blob) - self.ram_limit
        victims: list[_Slot] = []
        # Least recently used first, and only so far: after a disk outage RAM-only chunks fill
        # its old end, and this runs under the lock on every read from disk.
        for held in itertools.islice(self._ram, RAM_COPY_SEARCH):
            if need <= 0:
                break
            if held in self._disk or held in self._pending:
                victims.append(held)
                need -= len(self._ram[held])
        if need > 0:
            return  # no copies to make room near the old end: the read is served, not cached
        for victim in victims:
            self.ram_used -= len(self._ram.pop(victim))
            self._counters.ram_evictions += 1
            self._mark_gone(victim, changes)
        self._ram_insert(slot, blob, changes)

    def _index_file(self, slot: _Slot, size: int) -> None:
        self._disk[slot] = size
        self._file_ids[slot] = next(self._file_counter)

    def _unindex_file(self, slot: _Slot) -> int | None:
        """Forget the slot's file (the caller removes it, or not); its size, None if none."""
        self._stuck.pop(slot, None)
        self._file_ids.pop(slot, None)
        return self._disk.pop(slot, None)

    def _disk_remove(self, slot: _Slot, changes: _Changes) -> None:
        size = self._unindex_file(slot)
        if size is None:
            return
        self.disk_used -= size
        try:
            self._path(slot).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("store: cannot remove %s: %s", self._path(slot), exc)
        self._mark_gone(slot, changes)

    def _disk_evict_oldest(self, changes: _Changes, *, retries: bool = True) -> int:
        """Evict the least recently used file that can be; returns its size. OSError (the disk
        is down) when it cannot be removed: it then stays indexed, since it is still there and
        readable (forgotten, it would be a good chunk nobody is offered and bytes the budget no
        longer counts). A file that resists on a disk that works (immutable, another owner's)
        stays indexed too, passed over until :data:`STUCK_RETRY_S` later (``retries``: whether
        such files that are due count, in their LRU place): :class:`_StuckFile` says to try the
        next file, :class:`_NoCandidate` that there is none (no room now)."""
        now = time.monotonic()
        victim = next(
            (slot for slot in self._disk
             if slot not in self._stuck or (retries and self._stuck[slot] <= now)),
            None,
        )
        if victim is None:
            raise _NoCandidate(errno.EPERM, "every file left resists removal", str(self.directory))
        path = self._path(victim)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in _DISK_DOWN_ERRNOS:
                raise
            self._stuck[victim] = now + STUCK_RETRY_S
            self._disk.move_to_end(victim)  # behind the files due to go before it
            self._warn_stuck(exc, path)
            raise _StuckFile(exc.errno, exc.strerror, str(path)) from exc
        size = self._unindex_file(victim)
        assert size is not None  # picked from the index under the lock
        self.disk_used -= size
        self._counters.disk_evictions += 1
        self._mark_gone(victim, changes)
        return size

    def _disk_make_room(self, size: int, changes: _Changes) -> None:
        """Evict until ``size`` more bytes fit the disk budget, passing over files that resist;
        :class:`_StuckFile` if none is left to try or too many resisted (no room now); OSError
        if the disk is down."""
        failures = 0
        while self.disk_used + size > self.disk_limit and self._disk:
            try:
                self._disk_evict_oldest(changes, retries=failures < MAX_STUCK_TRIES)
            except _NoCandidate:
                raise
            except _StuckFile:
                failures += 1
                if failures >= 2 * MAX_STUCK_TRIES:
                    raise

    def _disk_evict_bytes(self, size: int, changes: _Changes) -> int:
        """Evict the least recently used files until ``size`` bytes are freed (passing over
        files that resist, until the disk is down or only such files are left); returns how many."""
        freed = failures = 0
        with contextlib.suppress(OSError):  # the write's error, logged by the caller, says why
            while freed < size and self._disk:
                try:
                    freed += self._disk_evict_oldest(changes, retries=failures < MAX_STUCK_TRIES)
                except _NoCandidate:
                    break
                except _StuckFile:
                    failures += 1
                    if failures >= 2 * MAX_STUCK_TRIES:
                        break
        return freed

    def _warn_stuck(self, exc: OSError, path: Path) -> None:
        """A WARNING at most once a minute (the rest at DEBUG): a mount where every file resists
        would otherwise log one per file."""
        log.log(
            logging.WARNING if self._stuck_warnings.due() else logging.DEBUG,
            "store: cannot evict %s (%s): it stays, passed over for %.0fs (%d such files)",
            path, exc.strerror, STUCK_RETRY_S, len(self._stuck),
        )

    def _note_disk_error(self, exc: OSError, doing: str, path: Path) -> tuple[int, str]:
        """Record a failed disk write or eviction: puts keep chunks in RAM only for the next
        ``DISK_RETRY_S``. Returns the level and line to log once the lock is released: ERROR for
        an outage's first error (and for a different one), DEBUG for its retries."""
        kind = _describe_os_error(exc)
        self._disk_failed_at = time.monotonic()
        self._last_disk_error = kind
        line = f"store: disk tier {self.directory}: cannot {doing} {path}: {kind}"
        if kind == self._disk_outage:
            return logging.DEBUG, f"{line} (still; retrying every {DISK_RETRY_S:.0f}s)"
        self._disk_outage = kind
        return logging.ERROR, f"{line}; chunks stay in RAM only, retrying every {DISK_RETRY_S:.0f}s"

    def _unqueue(self, slot: _Slot, changes: _Changes) -> None:
        entry = self._pending.pop(slot, None)
        if entry is not None:
            self.pending_bytes -= len(entry.blob)
            self.disk_used -= entry.file_size
            self._cond.notify_all()
            self._mark_gone(slot, changes)

    def _drop_key(self, key: bytes, changes: _Changes) -> bool:
        found = False
        for level in list(self._levels.get(key, ())):
            slot = (key, level)
            blob = self._ram.pop(slot, None)
            if blob is not None:
                self.ram_used -= len(blob)
            self._unqueue(slot, changes)  # a writer holding it sees this and unlinks the file
            self._disk_remove(slot, changes)
            self._mark_gone(slot, changes)
            found = True
        return found

    def _disk_failing(self) -> bool:
        if self._disk_failed_at is None:
            return False
        if time.monotonic() - self._disk_failed_at >= DISK_RETRY_S:
            self._disk_failed_at = None  # try the disk again
            return False
        return True

    # Operations (called without the lock).
    def _put(
        self, key: bytes, level: str, blob: bytes, changes: _Changes, if_held: bool = False
    ) -> bool:
        self._check(key, level)
        if not isinstance(blob, bytes | bytearray | memoryview) or not blob:
            raise StoreError("a blob is non-empty bytes")
        blob = bytes(blob)
        slot = (key, level)
        file_size = record_size(level, len(blob))
        failing = ""
        no_room = False  # the disk works, but what resists eviction left no room for this one
        note: tuple[int, str] | None = None
        with self._cond:
            if self._closed:
                raise StoreError("the store is closed")
            if if_held and key not in self._levels:
                return False
            self._counters.puts += 1
            to_disk = (
                self.directory is not None and slot not in self._disk
                and slot not in self._pending and file_size <= self.disk_limit
            )
            if to_disk and self._disk_failing():
                to_disk = False
                failing = self._last_disk_error
            if to_disk:
                # Back-pressure: a put waits while the writer is far behind.
                self._cond.wait_for(
                    lambda: self.pending_bytes + len(blob) <= self.max_pending_bytes
                    or not self._pending or self._closed
                )
                if self._closed:
                    raise StoreError("the store is closed")
                if if_held and key not in self._levels:
                    return False  # deleted while this waited (clear() empties the queue, too)
            self._ram_insert(slot, blob, changes)
            if to_disk and slot not in self._disk and slot not in self._pending:
                try:
                    self._disk_make_room(file_size, changes)
                except _StuckFile:  # no room now, but the disk works: this one stays in RAM
                    no_room = True
                except OSError as exc:  # no room: the disk is down (read-only, failing)
                    note = self._note_disk_error(exc, "remove", Path(exc.filename or self.directory or "."))
                    failing = self._last_disk_error
                else:
                    self._pending[slot] = _PendingWrite(blob=blob, file_size=file_size)
                    self.pending_bytes += len(blob)
                    self.disk_used += file_size
                    self._queue.append(slot)
                    self._mark_present(slot, changes)
                    self._cond.notify_all()
            elif slot in self._disk:
                self._disk.move_to_end(slot)
            in_ram = slot in self._ram
            held = in_ram or slot in self._disk or slot in self._pending
        if note is not None:
            log.log(note[0], "%s", note[1])
        if failing and not in_ram:
            raise StoreError(f"disk tier {self.directory}: {failing}; not stored")
        if not held:
            raise StoreError(
                f"a {len(blob)}-byte chunk exceeds the store's budgets "
                f"(ram {self.ram_limit}, disk {self.disk_limit} bytes)"
            )
        if failing or no_room:  # held in RAM: the disk's error was logged when it happened
            with self._lock:
                self._counters.ram_only_puts += 1
        return True

    def _get(self, key: bytes, level: str | None, changes: _Changes) -> bytes | None:
        with self._lock:
            candidates = [level] if level is not None else self._sorted(self._levels.get(key, ()))
        for lv in candidates:
            slot = (key, lv)
            with self._lock:
                blob = self._ram.get(slot)
                on_disk = slot in self._disk
                file_id = self._file_ids.get(slot)
                if blob is not None:
                    self._ram.move_to_end(slot)
                elif slot in self._pending:
                    blob = self._pending[slot].blob
                if blob is not None:
                    self._counters.hits += 1
                    self._used_key(key)
            if blob is not None:
                if on_disk:  # the hot path: one file's mtime, not every level's
                    self._touch([slot])
                return blob
            if not on_disk:
                continue
            blob = self._read_disk_blocking(slot, file_id, changes)
            if blob is None:
                continue
            with self._lock:
                self._counters.hits += 1
                if slot in self._disk:
                    self._ram_cache_copy(slot, blob, changes)
                used = self._used_key(key)
            self._touch(used)  # a read from disk: every level's file (the order after a restart)
            return blob
        with self._lock:
            self._counters.misses += 1
        return None

    def _read_disk_blocking(self, slot: _Slot, file_id: int | None, changes: _Changes) -> bytes | None:
        """Read the file ``file_id`` of ``slot``; on failure, drop it unless it was replaced
        (evicted and put again) meanwhile: the new file is not this read's to judge."""
        path = self._path(slot)

        def still_the_file_read() -> bool:  # called with the lock held
            return file_id is not None and self._file_ids.get(slot) == file_id

        try:
            blob = read_record_blocking(path, *slot)
        except FileNotFoundError:  # evicted or deleted by another thread meanwhile
            with self._lock:
                if still_the_file_read():
                    self._disk_remove(slot, changes)
            return None
        except OSError as exc:
            passing = exc.errno in _PASSING_READ_ERRNOS
            with self._lock:
                self._counters.disk_read_errors += 1
                errors = self._counters.disk_read_errors
                if not passing and still_the_file_read():
                    # Out of the index (no I/O here, under the lock): lookups stop offering a
                    # chunk every fetch would fail on. The file stays; a restart looks again.
                    self.disk_used -= self._unindex_file(slot) or 0
                    self._mark_gone(slot, changes)
                loud = self._read_warnings.due()
            log.log(
                logging.WARNING if loud else logging.DEBUG,
                "store: cannot read %s: %s; %s (%d read errors so far)",
                path, _describe_os_error(exc), "kept" if passing else "dropped from the index", errors,
            )
            return None
        except StoreError as exc:
            with self._lock:
                self._counters.corrupt += 1
                replaced = not still_the_file_read()
                if not replaced:
                    self._disk_remove(slot, changes)
            log.warning("store: %s is corrupt (%s); %s", path, exc, "replaced since" if replaced else "deleted")
            return None
        return blob

    def _used_key(self, key: bytes) -> list[_Slot]:
        """A read of one level is a use of the key: all its levels move to the disk LRU's recent
        end (else a hot prefix would lose its other levels first); in RAM only the read one does
        (RAM is a cache of the disk: unread levels there would crowd out read ones). Returns the
        key's slots on disk. Called with the lock held."""
        on_disk = []
        for level in self._levels.get(key, ()):
            slot = (key, level)
            if slot in self._disk:
                self._disk.move_to_end(slot)
                on_disk.append(slot)
        return on_disk

    def _use_last_to_first(self, held: list[bytes]) -> list[_Slot]:
        """:meth:`used_as_prefix`'s moves; returns the files to touch, in order. Lock held."""
        on_disk: list[_Slot] = []
        for key in reversed(held):
            if self.directory is None:
                for level in self._levels.get(key, ()):
                    if (key, level) in self._ram:
                        self._ram.move_to_end((key, level))
            on_disk += self._used_key(key)
        return on_disk

    def _queued_for_disk(self, keys: list[bytes]) -> bool:
        # From the end: a prompt's queued levels are its newest chunks' (a turn, their warming).
        return any((key, level) in self._pending for key in reversed(keys) for level in self._levels.get(key, ()))

    def _order_once_written(self, held: list[bytes]) -> None:
        """Remember ``held`` for :meth:`_order_written_prompts`; an earlier entry it extends (the
        same put, then its warming; an earlier turn) is dropped, and the oldest past the bounds.
        Lock held."""
        waiting = [e for e in self._order_when_written if e != held[: len(e)]]
        waiting.append(held)
        while len(waiting) > ORDER_WHEN_WRITTEN or sum(map(len, waiting)) > ORDER_WHEN_WRITTEN_KEYS:
            if len(waiting) == 1:
                break
            del waiting[0]
        self._order_when_written = waiting

    def _order_written_prompts(self) -> list[_Slot]:
        """Prompts marked while some of their levels were queued for the disk, whose queued
        levels are all written now: marked again (a written file joins the LRU at its recent
        end, after the chunks marked before it). Lock held; returns the files to touch."""
        waiting, on_disk = [], []
        for held in self._order_when_written:
            if self._queued_for_disk(held):
                waiting.append(held)
            else:
                on_disk += self._use_last_to_first(list(itertools.takewhile(self._levels.__contains__, held)))
        self._order_when_written = waiting
        return on_disk

    def _touch_soon(self, slots: list[_Slot]) -> None:
        """Touch ``slots`` in order off this thread: best effort, a few such jobs queued at most
        (they share the read threads with fetches)."""
        if not slots:
            return
        with self._lock:
            if self._order_touches >= ORDER_TOUCH_JOBS:
                return
            self._order_touches += 1
        try:
            self._read_pool.submit(self._touch_in_order, slots)
        except RuntimeError:  # the pool is shut down: the store closed
            with self._lock:
                self._order_touches -= 1

    def _touch_in_order(self, slots: list[_Slot]) -> None:
        """Each file a microsecond newer than the one before: the kernel stamps a touch with a
        clock of a few milliseconds' grain, which gave a whole prompt's files one mtime."""
        try:
            now = time.time_ns()
            for n, slot in enumerate(slots):
                with contextlib.suppress(OSError):
                    os.utime(self._path(slot), ns=(now + n * 1000, now + n * 1000))
        finally:
            with self._lock:
                self._order_touches -= 1

    def _touch(self, slots: list[_Slot]) -> None:
        for slot in slots:  # a file's mtime is its last use: the LRU order after a restart
            with contextlib.suppress(OSError):
                os.utime(self._path(slot))

    # ------------------------------------------------------------------ the disk writer
    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if self._closing and not self._queue:
                    return
                batch: list[tuple[_Slot, _PendingWrite]] = []
                # Share the queue among the writers rather than one taking it all.
                share = min(WRITE_BATCH, -(-len(self._queue) // self._n_writers))
                while self._queue and len(batch) < share:
                    slot = self._queue.popleft()
                    entry = self._pending.get(slot)
                    if entry is None:
                        continue
                    if slot in self._writing:
                        self._deferred.append(slot)
                        continue
                    self._writing.add(slot)
                    batch.append((slot, entry))
            if batch:  # else all deferred: their holder queues them again, and wakes us
                self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[_Slot, _PendingWrite]]) -> None:
        written: list[tuple[_Slot, _PendingWrite, Path]] = []
        failed: list[tuple[_Slot, _PendingWrite]] = []
        error: OSError | None = None
        error_path = Path()
        for slot, entry in batch:
            path = self._path(slot)
            try:
                self._write_one_blocking(path, encode_record(*slot, entry.blob), entry.blob)
            except OSError as exc:
                error, error_path = exc, path
                failed.append((slot, entry))
            else:
                written.append((slot, entry, path))
        dirs = {path.parent for _slot, _entry, path in written}
        for directory in dirs:  # once per batch: renames become durable together
            _fsync_dir_or_warn(directory)
        changes = _Changes()
        freed = 0
        note: tuple[int, str] | None = None
        recovered = ""
        with self._cond:
            for slot, _entry in batch:
                self._writing.discard(slot)
            if self._deferred:
                self._queue.extend(self._deferred)
                self._deferred.clear()
            for slot, entry, path in written:
                if self._pending.get(slot) is not entry:  # deleted (or replaced) meanwhile
                    try:  # our own file: no other writer had this slot in hand
                        path.unlink(missing_ok=True)
                    except OSError as exc:
                        log.warning("store: cannot remove %s: %s", path, exc)
                    continue
                del self._pending[slot]
                self.pending_bytes -= len(entry.blob)
                self._index_file(slot, entry.file_size)
                self._stuck.pop(slot, None)  # a new file of ours
            ordered = self._order_written_prompts() if self._order_when_written else []
            for slot, entry in failed:
                self._counters.disk_errors += 1
                if self._pending.get(slot) is entry:
                    # The put was acknowledged: keep its bytes in RAM (evicting colder chunks)
                    # rather than drop them with the queue entry.
                    self._ram_insert(slot, entry.blob, changes)
                    self._unqueue(slot, changes)
            if error is not None and error.errno in _NO_ROOM_ERRNOS:
                # The file system (or our quota on it) filled before our budget did (others
                # write there too): make the failed bytes' room from our coldest files, so the
                # retry can land.
                freed = self._disk_evict_bytes(sum(entry.file_size for _s, entry in failed), changes)
            if error is not None:
                note = self._note_disk_error(error, "write", error_path)
            elif written:
                self._disk_failed_at = None
                recovered, self._disk_outage = self._disk_outage, ""
            self._cond.notify_all()
        if note is not None:
            log.log(note[0], "%s", note[1])
        if recovered:
            log.info("store: disk tier %s: writing again (it had failed: %s)", self.directory, recovered)
        if freed:
            log.warning("store: no room on the file system: evicted %d bytes of the oldest chunks", freed)
        self._touch_soon(ordered)
        self._notify(changes)

    def _write_one_blocking(self, path: Path, header: bytes, blob: bytes) -> None:
        try:
            _write_file_blocking(path, header, blob)
        except FileNotFoundError:
            # Our directories were removed under us (a tmpfiles cleaner, an rm -rf of the
            # cache): made again, once, rather than the disk tier broken until a restart.
            self._make_dirs_again_blocking(path.parent)
            _write_file_blocking(path, header, blob)

    def _make_dirs_again_blocking(self, prefix_dir: Path) -> None:
        """The format directory and ``prefix_dir`` in it, where missing, each made durable in its
        parent (a file renamed into a new directory is lost with it in a crash). The store
        directory itself is the configuration's: a missing one fails the write."""
        for directory in (prefix_dir.parent, prefix_dir):
            try:
                directory.mkdir(mode=PRIVATE_DIR_MODE)
            except FileExistsError:
                continue
            fsync_dir(directory.parent)

    def _open_disk(self, directory: Path) -> None:
        try:
            base = directory / self._format_dir
            new_base = not base.exists()
            base.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            if new_base:  # what flush later reports durable must not sit in a lost directory
                _fsync_dir_or_warn(directory)
            others = [p.name for p in directory.iterdir()
                      if p.is_dir() and p.name.startswith(FORMAT_DIR) and p.name != self._format_dir]
            self._lock_fd = os.open(
                directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE
            )
        except OSError as exc:
            raise _store_dir_error(directory, exc) from exc
        try:
            _flock_within(self._lock_fd, LOCK_WAIT_S)
        except BlockingIOError as exc:
            holder = _lock_holder(self._lock_fd)
            self._release_lock()
            raise StoreInUse(f"store directory {directory} is in use by another process{holder}") from exc
        except OSError as exc:  # no lock at all here (NFS without lockd: ENOLCK): the disk tier's
            self._release_lock()  # own failure, as an unwritable directory's
            error = _store_dir_error(directory, exc)
            if exc.errno == errno.ENOLCK:
                error = OSError(exc.errno, f"{error.strerror} (the file system gives no locks, e.g. "
                                "NFS without lockd: use a local store.dir)")
            raise error from exc
        _say_lock_holder(self._lock_fd)
        for made_here in (base, *(directory / name for name in others)):
            _make_private(made_here)  # older formats' chunks too: they are KV all the same
        try:
            found, removed_tmp = self._scan_disk(base)
        except BaseException:
            self._release_lock()
            raise
        changes = _Changes()  # nobody has subscribed yet; the daemon lists keys() at start
        for _mtime, slot, size in found:
            self._index_file(slot, size)
            self.disk_used += size
            self._mark_present(slot, changes)
        try:
            self._disk_make_room(0, changes)  # the budget may have shrunk since the last run
        except OSError as exc:
            log.warning(
                "store %s: over its budget, and cannot evict %s: %s",
                directory, exc.filename, _describe_os_error(exc),
            )
        log.info(
            "store %s: %d chunks in %d files (one per level held), %d bytes on disk (limit %d); "
            "%d interrupted writes removed",
            directory, len(self._levels), len(self._disk), self.disk_used, self.disk_limit, removed_tmp,
        )
        if others:
            log.warning(
                "store %s: ignoring %s (chunks of another format, unreadable by this version; "
                "they do not count against store.disk_bytes: delete them to free the space)",
                directory, ", ".join(sorted(others)),
            )

    def _scan_disk(self, base: Path) -> tuple[list[tuple[int, _Slot, int]], int]:
        """The chunk files under ``base`` as (mtime, slot, size), oldest first, and how many
        interrupted writes were removed. A file that cannot be looked at is skipped."""
        found: list[tuple[int, _Slot, int]] = []
        removed_tmp = 0
        made_dirs = False
        unknown_levels: set[str] = set()
        for prefix in range(256):
            sub = base / f"{prefix:02x}"
            try:
                try:
                    sub.mkdir(mode=PRIVATE_DIR_MODE)
                    made_dirs = True
                except FileExistsError:
                    pass
                entries = list(os.scandir(sub))
            except OSError as exc:
                raise _store_dir_error(sub, exc) from exc
            for entry in entries:
                try:
                    if entry.name.endswith(TMP_SUFFIX):  # a write that a crash interrupted
                        Path(entry.path).unlink(missing_ok=True)
                        removed_tmp += 1
                        continue
                    match = _NAME_RE.match(entry.name)
                    if match is None:
                        continue
                    key, level = bytes.fromhex(match.group(1)), match.group(2)
                    if self._order and level not in self._order:
                        unknown_levels.add(level)  # another version's: left alone, said below
                        continue
                    st = entry.stat()
                    if st.st_size < record_size(level, 1):
                        Path(entry.path).unlink(missing_ok=True)
                        continue
                except OSError as exc:  # one file: skipped, not the whole tier
                    log.warning("store: skipping %s: %s", entry.path, _describe_os_error(exc))
                    continue
                found.append((st.st_mtime_ns, (key, level), st.st_size))
        if made_dirs:
            _fsync_dir_or_warn(base)
        if unknown_levels:
            log.warning(
                "store %s: ignoring chunk files of levels this version does not know (%s); "
                "they do not count against store.disk_bytes",
                base, ", ".join(sorted(unknown_levels)),
            )
        found.sort()
        return found, removed_tmp


def _fsync_dir_or_warn(directory: Path) -> None:
    """Make new entries of ``directory`` durable; a file system that refuses (EINVAL on some
    FUSE and network mounts) is said, as the writer says it, not a reason to run without a
    disk tier."""
    try:
        fsync_dir(directory)
    except OSError as exc:
        log.warning("store: cannot fsync %s: %s", directory, _describe_os_error(exc))


def _make_private(directory: Path) -> None:
    """Chunk files are for this daemon alone: an engine user in its group (which the API
    socket needs) must not read other namespaces' KV off the disk. Directories made by an
    older version were group-readable."""
    try:
        if directory.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
            directory.chmod(PRIVATE_DIR_MODE)
    except OSError as exc:
        log.warning(
            "store %s: cannot make it private to this user (%s): other users of its group "
            "can read the cached KV", directory, _describe_os_error(exc),
        )


def _flock_within(fd: int, wait_s: float) -> None:
    """Take the exclusive lock on ``fd``, waiting up to ``wait_s`` for a holder to let go (a
    predecessor whose writer thread finishes a slow write as it exits); OSError if it does not."""
    give_up = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= give_up:
                raise
            time.sleep(0.1)


def _say_lock_holder(fd: int) -> None:
    """Write this process's pid into the held lock file, for the error of one that finds it
    taken (the lock is the flock; the pid only names who holds it)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # a name in an error message is not worth failing the start for
        log.debug("store: cannot write the lock holder's pid: %s", exc)


def _lock_holder(fd: int) -> str:
    """`` (pid N)`` as the lock file names the process that holds it, else empty."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _store_dir_error(path: Path, exc: OSError) -> OSError:
    """An OSError that keeps the errno (what start does with it) and names the directory."""
    return OSError(exc.errno, f"store directory {path}: {_describe_os_error(exc)}")


def _write_file_blocking(path: Path, header: bytes, blob: bytes) -> None:
    """Write a chunk file atomically: temporary file, fsync, rename (the caller fsyncs the dir)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _call_listener(callback: Listener, added: list[bytes], removed: list[bytes]) -> None:
    try:
        callback(added, removed)
    except Exception:  # a listener's bug must not break the store or its caller
        log.exception("store listener %r failed", callback)


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)
