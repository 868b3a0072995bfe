"""Shared-memory segments that carry KV between the daemon and the engines of its node.

Owns the segment byte layout, creating/opening/unlinking segments, and the daemon's registry
of live segments with their owners and leases. A segment is a file under ``/dev/shm`` that the
daemon creates (never a client), named ``kvpeer-<daemon pid>-<instance>-<random>``, traceable
to its creator so a restarted daemon can sweep what a crashed one left behind. ``<instance>``
names the registry's instance file, ``.kvpeer-instance-<instance>``, which the registry holds
locked (shared flock) for its life: a segment is live while someone holds its instance file's
lock. Unlike a pid, that answer is the same from every pid namespace (daemons in containers
share /dev/shm with ``--ipc=host``) and never goes to a new process.

Segment files stay the daemon's own (mode 0600): a client is handed an open descriptor of its
segment with the message that names it (``SCM_RIGHTS``, :mod:`kvpeer.api.unix`), never the
right to open it by name. Clients of other users, the socket's group members included, cannot
open each other's segments even though ``/dev/shm`` lists their names.

Layout (little-endian)::

    magic "KVPS" | version u16 | reserved u16 | header_bytes u32 | dtype u8 | pad 3
    layers u32 | kv_heads u32 | tokens u32 | head_dim u32 | chunk_tokens u32 | chunks u32
    matched_tokens u32 | pad u32 | k_offset u64 | v_offset u64 | tensor_bytes u64
    levels: chunks x 16 bytes (ASCII level name of each restored chunk, NUL = not restored)
    ... K at k_offset, V at v_offset, each [layers, kv_heads, tokens, head_dim] C-contiguous,
    page aligned so ``torch.frombuffer`` maps them without a copy.

The daemon never maps a segment: its client holds it read-write, and so may shrink it
(``ftruncate``), after which any access through a mapping past the new end is a SIGBUS that
no Python code can catch. The daemon holds a :class:`DaemonSegment`, a file descriptor, and
moves bytes with ``pread``/``pwrite`` (a shrunk file is then a short read, an error for that
request only). Clients map (:class:`Segment`): a client that shrinks its own segment only
hurts itself.

Python's ``multiprocessing.shared_memory`` is deliberately not used: its resource tracker
unlinks segments it believes its process owns when that process exits, which would delete a
daemon-owned segment under a client (or the other way round). Plain ``os.open`` + ``mmap``
leaves the lifecycle to the one owner, the daemon's :class:`SegmentRegistry`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvpeer.errors import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = b"KVPS"
VERSION = 1
PAGE = mmap.PAGESIZE
LEVEL_SLOT = 16
MAX_SEGMENT_BYTES = 1 << 40  # sanity bound on what a header may claim
# The most of the segments' file system (RAM: /dev/shm is a tmpfs, half of RAM by default) one
# user's clients may hold at once, whatever api.max_shm_bytes_per_uid says.
OWNER_SHARE_OF_SHM = 0.5

_HEADER = struct.Struct("<4sHHIB3xIIIIIIIIQQQ")
_MATCHED_AT = 40  # offset of matched_tokens in _HEADER
# What a client accepts: also the names of older versions, which had no instance part.
_NAME = re.compile(r"^kvpeer-(\d{1,10})-[A-Za-z0-9_-]{22,64}$")
# Segments, and pages reserved ahead for the next segment (SegmentRegistry.reserve_spare),
# renamed to a segment name when used so no client ever opens a spare: group 1 the instance.
_SWEEPABLE = re.compile(r"^kvpeer(?:\.spare)?-\d{1,10}-([0-9a-f]{16})-[0-9a-f]{40}$")
_LEGACY = re.compile(r"^kvpeer(?:\.spare)?-\d{1,10}-[A-Za-z0-9_-]{22,64}$")
INSTANCE_PREFIX = ".kvpeer-instance-"
_INSTANCE = re.compile(r"^\.kvpeer-instance-([0-9a-f]{16})$")
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ProtocolError(ErrorCode.INVALID, f"unsupported KV dtype {dtype}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentLayout:
    """Shapes of one segment and where each part lies in it."""

    dtype: str
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    chunk_tokens: int

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_CODES:
            raise ProtocolError(ErrorCode.INVALID, f"unsupported dtype {self.dtype!r}")
        for name in ("layers", "kv_heads", "tokens", "head_dim", "chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise ProtocolError(ErrorCode.INVALID, f"segment {name} must be a positive int")
        if self.size > MAX_SEGMENT_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, "segment larger than 1 TiB")

    @property
    def chunks(self) -> int:
        return -(-self.tokens // self.chunk_tokens)

    @property
    def header_bytes(self) -> int:
        return _HEADER.size + LEVEL_SLOT * self.chunks

    @property
    def tensor_bytes(self) -> int:
        itemsize = DTYPES[self.dtype].itemsize
        return self.layers * self.kv_heads * self.tokens * self.head_dim * itemsize

    @property
    def k_offset(self) -> int:
        return _align(self.header_bytes)

    @property
    def v_offset(self) -> int:
        return _align(self.k_offset + self.tensor_bytes)

    @property
    def size(self) -> int:
        return self.v_offset + self.tensor_bytes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.tokens, self.head_dim)

    def pack_header(self, matched_tokens: int = 0) -> bytes:
        return _HEADER.pack(
            MAGIC, VERSION, 0, self.header_bytes, _DTYPE_CODES[self.dtype], self.layers,
            self.kv_heads, self.tokens, self.head_dim, self.chunk_tokens, self.chunks,
            matched_tokens, 0, self.k_offset, self.v_offset, self.tensor_bytes,
        )

    @classmethod
    def parse_header(cls, buf: bytes | memoryview | mmap.mmap, size: int) -> SegmentLayout:
        """Layout stated by a segment's header, checked against the segment's real size."""
        if size < _HEADER.size:
            raise ProtocolError(ErrorCode.MALFORMED, "segment smaller than its header")
        (magic, version, _r, header_bytes, dtype, layers, kv_heads, tokens, head_dim,
         chunk_tokens, chunks, _matched, _pad, k_off, v_off, nbytes) = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.MALFORMED, "not a kvpeer segment (bad magic)")
        if version != VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"segment version {version}")
        if dtype not in _DTYPE_NAMES:
            raise ProtocolError(ErrorCode.MALFORMED, f"segment dtype code {dtype}")
        layout = cls(dtype=_DTYPE_NAMES[dtype], layers=layers, kv_heads=kv_heads, tokens=tokens,
                     head_dim=head_dim, chunk_tokens=chunk_tokens)
        stated = (header_bytes, chunks, k_off, v_off, nbytes)
        expected = (layout.header_bytes, layout.chunks, layout.k_offset, layout.v_offset,
                    layout.tensor_bytes)
        if stated != expected or layout.size > size:
            raise ProtocolError(ErrorCode.MALFORMED, "segment header disagrees with its size")
        return layout


def valid_name(name: str) -> bool:
    """True for names this module makes (never a path: nothing outside SHM_DIR opens)."""
    return bool(_NAME.match(name))


def new_instance() -> str:
    return secrets.token_hex(8)


def new_name(instance: str | None = None, *, spare: bool = False) -> str:
    """A fresh segment (or spare) name of registry ``instance`` (None: of no live registry)."""
    kind = "kvpeer.spare" if spare else "kvpeer"
    return f"{kind}-{os.getpid()}-{instance or new_instance()}-{secrets.token_hex(20)}"


class Segment:
    """One mapped segment, as a client sees it: its header and zero-copy K/V tensors."""

    def __init__(
        self, name: str, layout: SegmentLayout, mapping: mmap.mmap, path: Path | None = None
    ) -> None:
        self.name = name
        self.layout = layout
        self.path = path  # None when mapped from a descriptor (a client cannot open it by name)
        self._mmap: mmap.mmap | None = mapping
        count = layout.layers * layout.kv_heads * layout.tokens * layout.head_dim
        dtype = DTYPES[layout.dtype]
        # torch.frombuffer keeps a reference to the object it is given but no buffer export,
        # so mmap.close() would unmap under live tensors. Handing it a memoryview makes every
        # tensor hold an export: close() then fails (BufferError) instead of crashing later.
        view = memoryview(mapping)
        self.k: torch.Tensor = torch.frombuffer(
            view, dtype=dtype, count=count, offset=layout.k_offset
        ).view(layout.shape)
        self.v: torch.Tensor = torch.frombuffer(
            view, dtype=dtype, count=count, offset=layout.v_offset
        ).view(layout.shape)
        del view

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, name: str, *, directory: Path = SHM_DIR) -> Segment:
        """Map a segment by its name (the daemon's own user and tests: a client is handed a
        descriptor instead, see :meth:`from_descriptor`)."""
        if not valid_name(name):
            raise ProtocolError(ErrorCode.INVALID, f"not a kvpeer segment name: {name!r}")
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return cls.from_descriptor(name, fd, path=path)
        finally:
            os.close(fd)

    @classmethod
    def from_descriptor(cls, name: str, fd: int, *, path: Path | None = None) -> Segment:
        """Map the segment open at ``fd`` (the client's side: the daemon sends the descriptor
        with the message that names the segment). ``fd`` stays the caller's to close: the
        mapping holds the file by itself."""
        size = os.fstat(fd).st_size
        if size < _HEADER.size:
            raise ProtocolError(ErrorCode.MALFORMED, "segment smaller than its header")
        # Populate the page tables now: the client maps when the first chunk lands, so
        # the faults are taken while later chunks decode, not when the engine reads.
        mapping = map_populated(fd, size)
        try:
            layout = SegmentLayout.parse_header(mapping, size)
        except BaseException:
            mapping.close()
            raise
        return cls(name, layout, mapping, path)

    # ------------------------------------------------------------------ header state
    def _buf(self) -> mmap.mmap:
        if self._mmap is None:
            raise ProtocolError(ErrorCode.INVALID, f"segment {self.name} is closed")
        return self._mmap

    @property
    def matched_tokens(self) -> int:
        return int(struct.unpack_from("<I", self._buf(), _MATCHED_AT)[0])

    def levels(self) -> list[str | None]:
        buf = self._buf()
        out: list[str | None] = []
        for index in range(self.layout.chunks):
            start = _HEADER.size + LEVEL_SLOT * index
            raw = bytes(buf[start : start + LEVEL_SLOT]).rstrip(b"\0")
            out.append(raw.decode("ascii", "replace") if raw else None)
        return out

    # ------------------------------------------------------------------ zero-copy check
    def address_range(self) -> tuple[int, int]:
        """[start, end) of this process's mapping of the segment."""
        view = np.frombuffer(self._buf(), dtype=np.uint8)
        start = int(view.ctypes.data)
        del view
        return start, start + self.layout.size

    def holds(self, tensor: torch.Tensor) -> bool:
        """True if ``tensor``'s data lies inside this mapping (no copy was made)."""
        start, end = self.address_range()
        first = tensor.data_ptr()
        last = first + (tensor.numel() - 1) * tensor.element_size() if tensor.numel() else first
        return start <= first and last < end

    # ------------------------------------------------------------------ teardown
    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> bool:
        """Unmap if nothing else uses the mapping; True if unmapped now.

        Tensors an engine still holds keep the mapping alive (it is unmapped when the last
        one is freed): unmapping under them would crash the process, not just fail a read.
        """
        mapping, self._mmap = self._mmap, None
        self.k = self.v = torch.empty(0)
        if mapping is None:
            return True
        try:
            mapping.close()
        except BufferError:
            return False
        return True

    def unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class DaemonSegment:
    """One segment as the daemon holds it: an open file, never a mapping (see the module
    docstring). Reads and writes are ``pread``/``pwrite`` and check the file's length, so a
    client that shrank it gets an error for its request, and nobody a SIGBUS.

    Thread-safe: the bulk reads and writes run in executor threads (``*_blocking``) while the
    event loop may release the segment; the file is closed when the last of them ends, so a
    released segment's descriptor number is never reused under a write still running.
    """

    def __init__(self, name: str, layout: SegmentLayout, fd: int, path: Path) -> None:
        self.name = name
        self.layout = layout
        self.path = path
        self._fd = fd
        self._users = 0
        self._closing = False
        self._closer: Callable[[int], None] = os.close
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls, layout: SegmentLayout, *, directory: Path = SHM_DIR, instance: str | None = None,
    ) -> DaemonSegment:
        """Create and reserve a new segment of registry ``instance``."""
        reserved = Reserved.make(layout.size, directory=directory, instance=instance)
        return cls.from_reserved(reserved, layout)

    @classmethod
    def from_reserved(cls, reserved: Reserved, layout: SegmentLayout) -> DaemonSegment:
        """Turn reserved, never-shared pages into a segment of ``layout`` (takes ownership of
        ``reserved``; it must hold at least ``layout.size`` bytes)."""
        if reserved.size < layout.size:
            reserved.discard()
            raise ValueError(f"{reserved.size} bytes reserved, {layout.size} needed")
        try:
            if reserved.spare:  # it becomes a segment now
                name = new_name(reserved.instance)
                reserved.spare = False
                os.rename(reserved.path, reserved.path.with_name(name))
                reserved.name, reserved.path = name, reserved.path.with_name(name)
            if reserved.size > layout.size:
                os.ftruncate(reserved.fd, layout.size)  # give back the pages past the end
            # Before its descriptor goes to a client: nobody can race the header.
            _pwrite_all(reserved.fd, layout.pack_header(), 0)
        except BaseException:
            reserved.discard()
            raise
        return cls(reserved.name, layout, reserved.fd, reserved.path)

    # ------------------------------------------------------------------ the client's K/V
    def read_rows_blocking(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of tokens [start, stop) of K and V as the client wrote them, in the daemon's
        own memory: what it encodes cannot change under it (INVALID if the file was shrunk).
        A put is read a chunk at a time, and only the chunks it encodes: a whole put copied at
        once would hold all of its KV (GBs) in the daemon."""
        layout = self.layout
        if not 0 <= start < stop <= layout.tokens:
            raise ProtocolError(ErrorCode.INTERNAL, f"tokens [{start}, {stop}) outside the segment")
        shape = (layout.layers, layout.kv_heads, stop - start, layout.head_dim)
        k = torch.empty(shape, dtype=DTYPES[layout.dtype])
        v = torch.empty(shape, dtype=DTYPES[layout.dtype])
        with self._using() as fd:
            self._read_rows(fd, k, layout.k_offset, start, stop)
            self._read_rows(fd, v, layout.v_offset, start, stop)
        return k, v

    def read_kv_blocking(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole of K and V (copies): see :meth:`read_rows_blocking`."""
        return self.read_rows_blocking(0, self.layout.tokens)

    def _read_rows(self, fd: int, target: torch.Tensor, offset: int, start: int, stop: int) -> None:
        """The inverse of :meth:`_write_rows`: one run of bytes per (layer, head)."""
        for buffer, at in self._runs(target, offset, start, stop):
            done = 0
            while done < len(buffer):
                got = os.preadv(fd, [buffer[done:]], at + done)
                if got == 0:
                    raise self._shrunk()
                done += got

    def write_chunk_blocking(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write chunk ``index`` from ``k``/``v``: contiguous ``[layers, kv_heads, rows,
        head_dim]`` tensors whose first rows hold the chunk's tokens (rows >= its length)."""
        start, stop = self.chunk_span(index)
        with self._using() as fd:
            self._check_length(fd)
            self._write_rows(fd, k, self.layout.k_offset, start, stop)
            self._write_rows(fd, v, self.layout.v_offset, start, stop)

    def _write_rows(self, fd: int, source: torch.Tensor, offset: int, start: int, stop: int) -> None:
        """In the file a chunk is one run of bytes per (layer, head): one pwrite each."""
        if not source.is_contiguous() or source.dtype != DTYPES[self.layout.dtype]:
            raise ProtocolError(ErrorCode.INTERNAL, "chunk source must be contiguous, of the segment's dtype")
        for buffer, at in self._runs(source, offset, start, stop):
            _pwrite_all(fd, buffer, at)

    def _runs(
        self, tensor: torch.Tensor, offset: int, start: int, stop: int
    ) -> Iterator[tuple[memoryview, int]]:
        """For each (layer, head), the bytes of tokens [start, stop) in ``tensor`` (contiguous
        ``[layers, kv_heads, rows, head_dim]``, its first rows those tokens) and where they lie
        in the file (K or V at ``offset``)."""
        layout = self.layout
        flat = tensor.view(-1).view(torch.uint8).numpy().data
        row_bytes = layout.head_dim * DTYPES[layout.dtype].itemsize
        run = (stop - start) * row_bytes
        lane_bytes = tensor.shape[2] * row_bytes
        for lane in range(layout.layers * layout.kv_heads):
            at = offset + (lane * layout.tokens + start) * row_bytes
            yield flat[lane * lane_bytes : lane * lane_bytes + run], at

    def chunk_span(self, index: int) -> tuple[int, int]:
        """[start, stop) of chunk ``index``'s tokens."""
        if not 0 <= index < self.layout.chunks:
            raise ProtocolError(ErrorCode.INTERNAL, f"chunk {index} outside the segment")
        start = index * self.layout.chunk_tokens
        return start, min(start + self.layout.chunk_tokens, self.layout.tokens)

    # ------------------------------------------------------------------ header state
    def set_level(self, index: int, level: str) -> None:
        """Mark chunk ``index`` restored at ``level`` in the header."""
        if not 0 <= index < self.layout.chunks:
            raise ProtocolError(ErrorCode.INVALID, f"chunk {index} outside the segment")
        raw = level.encode("ascii")
        if not 0 < len(raw) < LEVEL_SLOT:
            raise ProtocolError(ErrorCode.INVALID, f"level name {level!r} does not fit")
        with self._using() as fd:
            _pwrite_all(fd, raw.ljust(LEVEL_SLOT, b"\0"), _HEADER.size + LEVEL_SLOT * index)

    def set_matched_tokens(self, tokens: int) -> None:
        with self._using() as fd:
            _pwrite_all(fd, struct.pack("<I", tokens), _MATCHED_AT)

    def duplicate_descriptor(self) -> int:
        """A new descriptor of the segment's file, for its client (the caller closes it);
        NOT_FOUND once the segment is released."""
        with self._using() as fd:
            return os.dup(fd)

    # ------------------------------------------------------------------ file lifetime
    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        with self._lock:
            if self._closing:
                raise ProtocolError(
                    ErrorCode.NOT_FOUND,
                    f"segment {self.name} was released (by its client, its lease or a disconnect)",
                )
            self._users += 1
        try:
            yield self._fd
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and self._users == 0
            if last:
                self._closer(self._fd)

    def _check_length(self, fd: int) -> None:
        # A pwrite past the end would quietly grow the file back: say what happened instead.
        if os.fstat(fd).st_size < self.layout.size:
            raise self._shrunk()

    def _shrunk(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.INVALID,
            f"segment {self.name} is shorter than its {self.layout.size} bytes: its client truncated it",
        )

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, closer: Callable[[int], None] = os.close) -> None:
        """Close the file now, or when the last read or write still running ends; the segment
        is closed to new work at once either way. ``closer`` closes the descriptor (see
        :meth:`SegmentRegistry._drop`)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._closer = closer
            idle = self._users == 0
        if idle:
            closer(self._fd)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written


@dataclass(slots=True)
class Reserved:
    """Pages reserved for a segment that is not a segment yet: a fresh, zero-filled file of
    the daemon's own (mode 0600, shared with no client), open."""

    name: str
    path: Path
    fd: int
    size: int
    instance: str
    spare: bool

    @classmethod
    def make(
        cls, size: int, *, directory: Path = SHM_DIR, instance: str | None = None, spare: bool = False
    ) -> Reserved:
        instance = instance or new_instance()
        name = new_name(instance, spare=spare)
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # Reserve the pages now (zero-filled, tens of ms per GiB): a sparse tmpfs file that
            # cannot be backed later would SIGBUS the client that maps it.
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return cls(name, path, fd, size, instance, spare)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def map_populated(fd: int, size: int) -> mmap.mmap:
    """Map ``fd`` shared read-write with every page's table entry made now, by reading one byte
    of each page in numpy, which releases the GIL. (``MAP_POPULATE`` does the same inside
    ``mmap.mmap``, which holds the GIL: 45-55 ms for a 94 MB segment here, 200 ms on a loaded
    machine, during which no other thread of the process ran, an event loop included.)
    Reading never changes what a page holds."""
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        pages = np.frombuffer(mapping, dtype=np.uint8)[:: mmap.PAGESIZE]
        np.bitwise_or.reduce(pages)
        del pages  # the export must end before the mapping can be closed
    except BaseException:
        mapping.close()
        raise
    return mapping

# --------------------------------------------------------------------------- registry


@dataclass(slots=True)
class _Entry:
    segment: DaemonSegment
    owner: int  # connection id
    expires: float


class SegmentRegistry:
    """The daemon's live segments: who owns each, and until when.

    A segment goes away when its owner releases it, when the owner's connection closes, or when
    its lease runs out, whichever comes first. Time is passed in (``now``), never read here.
    """

    def __init__(
        self,
        *,
        directory: Path = SHM_DIR,
        lease_s: float = 600.0,
        max_bytes_per_owner: int = 64 << 30,
    ) -> None:
        self.directory = directory
        self.lease_s = lease_s
        self.max_bytes_per_owner = max_bytes_per_owner
        self._entries: dict[str, _Entry] = {}
        self._admitted: dict[int, int] = {}  # owner -> bytes of segments being made for it
        # Whose cap an owner's segments count against (set_account): one user's many
        # connections share one cap. An owner with none is its own account.
        self._accounts: dict[int, object] = {}
        # Closing a released segment's last descriptor frees its pages: ~200 ms per GiB of
        # kernel time, which the event loop that releases it must not spend.
        self._freeing = ThreadPoolExecutor(1, thread_name_prefix="kvpeer-shm-free")
        # One segment's pages reserved and mapped ahead (see reserve_spare); threads take it.
        self._spare: Reserved | None = None
        self._spare_lock = threading.Lock()
        self._closed = False
        # This registry's instance file, held locked while it lives (see the module docstring);
        # claimed before the first file bearing its name is made.
        self._instance: str | None = None
        self._instance_fd: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def set_account(self, owner: int, account: object) -> None:
        """Count ``owner``'s segments against ``account``'s cap (the daemon: the connection's
        uid), until :meth:`release_owner`."""
        self._accounts[owner] = account

    def _account(self, owner: int) -> object:
        return self._accounts.get(owner, ("owner", owner))

    def _bytes_of_account(self, account: object) -> int:
        held = sum(e.segment.layout.size for e in self._entries.values() if self._account(e.owner) == account)
        being_made = sum(n for owner, n in self._admitted.items() if self._account(owner) == account)
        return held + being_made

    def create(self, layout: SegmentLayout, *, owner: int, now: float) -> DaemonSegment:
        self.admit(layout, owner)
        try:
            segment = self.make(layout)
        except BaseException:
            self.withdraw(layout, owner)
            raise
        return self.adopt(segment, owner=owner, now=now)

    # create() in three steps, for callers that make the segment off the event loop: reserving
    # the pages of a large segment zero-fills them (tens of ms), and only make() touches no
    # registry state, so only make() may run in another thread.
    def admit(self, layout: SegmentLayout, owner: int) -> None:
        """TOO_LARGE if no account may hold a segment of this size (past ``max_bytes_per_owner``
        or half of the file system), BUSY if ``owner``'s account (:meth:`set_account`) may not
        hold another one now; else its bytes count against ``owner``
        until :meth:`adopt` (or :meth:`withdraw`), so that segments being made at once cannot
        all pass the cap."""
        # The configured cap (64 GiB by default) may be more than the tmpfs holds, and its pages
        # are RAM: one user's requests (a one-token put of a model with huge dimensions) filled
        # it for every other client and process on the host.
        share = int(self._capacity() * OWNER_SHARE_OF_SHM)
        limit = min(self.max_bytes_per_owner, share or self.max_bytes_per_owner)
        if layout.size > limit:  # no release would make room: not worth a retry
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"a segment of {layout.size} bytes is more than a user's clients may hold ({limit} "
                f"bytes: api.max_shm_bytes_per_uid, and {OWNER_SHARE_OF_SHM:.0%} of {self.directory})",
            )
        held = self._bytes_of_account(self._account(owner))
        if held + layout.size > self.max_bytes_per_owner:
            raise ProtocolError(
                ErrorCode.BUSY, "too much shared memory held by this user's clients: release segments"
            )
        if share and held + layout.size > share:
            raise ProtocolError(
                ErrorCode.BUSY,
                f"a segment of {layout.size} bytes would put this user's clients past "
                f"{OWNER_SHARE_OF_SHM:.0%} of {self.directory} ({share} bytes): release segments",
            )
        self._admitted[owner] = self._admitted.get(owner, 0) + layout.size

    def _capacity(self) -> int:
        """The size of the file system segments live on (0: unknown)."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 0
        return st.f_blocks * st.f_frsize

    def withdraw(self, layout: SegmentLayout, owner: int) -> None:
        """An admitted segment will not be adopted (its making failed or its client left)."""
        left = self._admitted.get(owner, 0) - layout.size
        if left > 0:
            self._admitted[owner] = left
        else:
            self._admitted.pop(owner, None)

    def make(self, layout: SegmentLayout) -> DaemonSegment:
        """Create and map the segment (thread-safe; not registered yet: see :meth:`adopt`).
        Takes the spare when it is large enough (see :meth:`reserve_spare`)."""
        try:
            spare = self._take_spare(layout.size)
            if spare is not None:
                return DaemonSegment.from_reserved(spare, layout)
            return DaemonSegment.create(layout, directory=self.directory, instance=self._hold_instance())
        except OSError as exc:
            raise ProtocolError(ErrorCode.BUSY, f"cannot create a shared-memory segment: {exc}") from None

    # A fetch's segment is zero-filled when its pages are reserved: tens of ms of CPU per
    # GiB, inside the fetch and beside the event loop. The spare moves that work to when the
    # daemon is idle. Only fresh pages ever become a spare,
    # never a released segment: its client may still map it, and it holds another fetch's KV.
    def reserve_spare(self, size: int, *, max_bytes: int) -> bool:
        """Reserve and map ``size`` bytes for the next :meth:`make` (blocking: run it in a
        thread, when idle). Keeps a spare already large enough; False when ``size`` is over
        ``max_bytes`` or the registry closed meanwhile (nothing is kept)."""
        with self._spare_lock:
            if self._spare is not None and size <= self._spare.size <= 2 * size:
                return True
        if size > max_bytes:
            return False
        try:
            instance = self._hold_instance()
        except OSError:  # closed meanwhile
            return False
        reserved = Reserved.make(size, directory=self.directory, instance=instance, spare=True)
        old: Reserved | None = reserved
        with self._spare_lock:
            kept = not self._closed  # closed while this thread reserved: nobody would unlink it
            if kept:
                old, self._spare = self._spare, reserved
        if old is not None:
            old.discard()
        return kept

    @property
    def spare_bytes(self) -> int:
        spare = self._spare
        return 0 if spare is None else spare.size

    def _take_spare(self, size: int) -> Reserved | None:
        with self._spare_lock:
            spare = self._spare
            # One over twice the size waits for a fetch of its own size: truncating it would
            # throw away most of what was reserved.
            if spare is None or not size <= spare.size <= 2 * size:
                return None
            self._spare = None
        return spare

    def drop_spare(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()

    def adopt(self, segment: DaemonSegment, *, owner: int, now: float | None) -> DaemonSegment:
        """Register a segment from :meth:`make` (admitted for ``owner``) as ``owner``'s,
        leased from ``now``; None: not leased until :meth:`lease` (a fetch's segment, which
        its client gets when the fetch ends, however long it runs)."""
        self.withdraw(segment.layout, owner)
        expires = math.inf if now is None else now + self.lease_s
        self._entries[segment.name] = _Entry(segment, owner, expires)
        return segment

    def lease(self, name: str, owner: int, now: float) -> None:
        """The segment is handed to its client now: it has ``lease_s`` from here to release it."""
        self.get(name, owner)
        self._entries[name].expires = now + self.lease_s

    def hold(self, name: str, owner: int) -> DaemonSegment:
        """The daemon works on the segment now (a put being read and encoded, which may take
        longer than a lease): it does not expire until released."""
        segment = self.get(name, owner)
        self._entries[name].expires = math.inf
        return segment

    def get(self, name: str, owner: int) -> DaemonSegment:
        entry = self._entries.get(name)
        if entry is None or entry.owner != owner:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such segment for this client")
        return entry.segment

    def release(self, name: str, owner: int) -> None:
        """Owner is done: unlink and unmap. NOT_FOUND for a name the owner does not hold."""
        self.get(name, owner)
        self._drop(name)

    def release_owner(self, owner: int) -> int:
        """The owner's connection closed: drop everything it held. Returns how many."""
        names = [n for n, e in self._entries.items() if e.owner == owner]
        for name in names:
            self._drop(name)
        self._accounts.pop(owner, None)
        return len(names)

    def expire(self, now: float) -> list[str]:
        """Drop segments whose lease ran out; returns their names."""
        names = [n for n, e in self._entries.items() if e.expires <= now]
        for name in names:
            log.warning(
                "segment %s of API client %d: lease expired (api.lease_s, %.0f s), released",
                name, self._entries[name].owner, self.lease_s,
            )
            self._drop(name)
        return names

    def next_expiry(self) -> float | None:
        """When the next lease runs out (None: no segment is leased)."""
        nearest = min((e.expires for e in self._entries.values()), default=math.inf)
        return None if nearest == math.inf else nearest

    def close(self) -> None:
        with self._spare_lock:
            self._closed = True
        for name in list(self._entries):
            self._drop(name)
        self._freeing.shutdown(wait=True)  # the daemon stops with its segments' pages freed
        self.drop_spare()
        with self._spare_lock:
            fd, self._instance_fd = self._instance_fd, None
        if fd is not None and self._instance is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.directory / f"{INSTANCE_PREFIX}{self._instance}")
            os.close(fd)  # releases the lock

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        entry.segment.unlink()
        entry.segment.close(closer=self._close_off_the_caller)

    def _close_off_the_caller(self, fd: int) -> None:
        try:
            self._freeing.submit(os.close, fd)
        except RuntimeError:  # shut down: nobody to hand it to
            os.close(fd)

    def _hold_instance(self) -> str:
        """This registry's instance, its file claimed and locked on first use (thread-safe);
        OSError once the registry is closed (a file made then would outlive it)."""
        with self._spare_lock:
            if self._closed:
                raise OSError("the segment registry is closed")
            if self._instance_fd is None:
                self._instance, self._instance_fd = _claim_instance(self.directory)
            assert self._instance is not None
            return self._instance

    def sweep_stale(self) -> list[str]:
        """Unlink the segments, spares and instance files of registries that no longer run
        (see :func:`sweep_stale`); ours stay, as do those of live registries in any pid
        namespace. For start-up, before the API socket exists."""
        try:
            self._hold_instance()
        except OSError as exc:  # without our own instance we could not tell ours from others'
            log.warning("shared-memory sweep skipped: %s", exc)
            return []
        return sweep_stale(self.directory)


def _claim_instance(directory: Path) -> tuple[str, int]:
    """Create and lock (shared) a fresh instance file; returns its instance and descriptor.

    A sweeper may take the new file for a dead registry's between its creation and the lock:
    it then removes it holding the exclusive lock, so our lock fails or the path no longer
    names our file, and we try another name. Never blocks.
    """
    for _ in range(8):
        instance = new_instance()
        path = directory / f"{INSTANCE_PREFIX}{instance}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return instance, fd
        except OSError:
            pass
        os.close(fd)
    raise OSError(f"could not claim an instance file in {directory}")


@contextlib.contextmanager
def _dead_instance(directory: Path, instance: str) -> Iterator[bool]:
    """Whether no live registry holds ``instance``; while True, its file is locked exclusive,
    so that no registry can claim it meanwhile. Never blocks, whoever made the file.

    Can't tell (another user's file we may not open, not a regular file): False, which keeps
    its segments.
    """
    path = directory / f"{INSTANCE_PREFIX}{instance}"
    try:
        # O_NONBLOCK: a FIFO planted under this name would block a plain open for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield True  # no registry ever held it (or a sweep removed it): nothing is live
        return
    except OSError:
        yield False
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # held: its registry lives, in whatever pid namespace
            return
        yield True
    finally:
        os.close(fd)


def sweep_stale(directory: Path = SHM_DIR, names: Iterable[str] | None = None) -> list[str]:
    """Unlink segments and spares whose registry is gone (nobody holds its instance file's lock),
    then that instance file. Names of older versions (no instance part) are left alone: their
    pid alone cannot tell a dead daemon from one in another pid namespace."""
    try:
        candidates = list(names) if names is not None else os.listdir(directory)
    except OSError:
        return []
    by_instance: dict[str, list[str]] = {}
    legacy = 0
    for name in candidates:
        if match := _SWEEPABLE.match(name):
            by_instance.setdefault(match.group(1), []).append(name)
        elif match := _INSTANCE.match(name):
            by_instance.setdefault(match.group(1), [])
        elif _LEGACY.match(name):
            legacy += 1
    removed: list[str] = []
    for instance, owned in by_instance.items():
        with _dead_instance(directory, instance) as dead:
            if dead:
                removed += _unlink_all(directory, [*owned, f"{INSTANCE_PREFIX}{instance}"])
    removed = [name for name in removed if not name.startswith(INSTANCE_PREFIX)]
    if removed:
        log.info("removed %d shared-memory segments left by stopped daemons", len(removed))
    if legacy:
        log.warning(
            "%d shared-memory segments of an older kvpeer left in %s: remove them by hand "
            "(kvpeer-<pid>-*) once no older daemon runs", legacy, directory,
        )
    return removed


def _unlink_all(directory: Path, names: Iterable[str]) -> list[str]:
    removed: list[str] = []
    for name in names:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            continue
        except OSError as exc:  # another user's file in a sticky /dev/shm: leave it, say so
            log.warning("could not remove stale shared-memory file %s: %s", name, exc)
            continue
        removed.append(name)
    return removed
