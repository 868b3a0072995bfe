"""Messages of the local API (engine <-> its own daemon) and their wire encoding.

Owns every message type, its validation and its msgpack encoding: one frame is a 4-byte
big-endian length then one msgpack map ``{"v": version, "t": type, "id": request id, ...}``.
Decoding untrusted bytes is bounded (frame size, msgpack container and string limits) and
every failure is a :class:`~kvpeer.errors.ProtocolError` with the code the peer gets back.
KV tensors never travel here: they move through shared memory (:mod:`kvpeer.shm`); messages
only name segments.

This module is sans-IO: no sockets, no asyncio, no torch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np

from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.hashing import ModelFingerprint, token_ids

API_VERSION = 2  # 2: segments travel as descriptors (SCM_RIGHTS), not names to open
MAX_TOKENS = 1 << 22
#: MAX_TOKENS uint32 ids and room for the rest of the request (its fingerprint): a request at
#: the token limit fits. Anything larger is an error.
MAX_FRAME_BYTES = 4 * MAX_TOKENS + (1 << 20)
MAX_NAME_LEN = 255  # namespaces, segment names, levels, client info
MAX_LEVEL_LEN = 15  # a level name must fit a segment header slot
#: Chunks of one lookup or fetch answer. MAX_TOKENS / MAX_CHUNKS = 64: with a codec.chunk_tokens
#: below that, the longest prefixes cannot be answered (a fetch is refused with TOO_LARGE).
MAX_CHUNKS = 1 << 16
_LENGTH = struct.Struct(">I")
FRAME_HEADER_BYTES = _LENGTH.size

# --------------------------------------------------------------------------- helpers


def _check_name(what: str, value: str, *, empty: bool = False, limit: int = MAX_NAME_LEN) -> None:
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.INVALID, f"{what} must be a string")
    if not value and not empty:
        raise ProtocolError(ErrorCode.INVALID, f"{what} must not be empty")
    if len(value) > limit:
        raise ProtocolError(ErrorCode.INVALID, f"{what} is longer than {limit} characters")


def _check_int(what: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(ErrorCode.INVALID, f"{what} must be an integer in [{lo}, {hi}]")


def as_tokens(tokens: Any) -> np.ndarray:
    """Token ids as a read-only flat uint32 array; ProtocolError(INVALID) if they do not fit."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.uint32 and tokens.ndim == 1:
        ids = tokens
    else:
        try:
            ids = token_ids(tokens).astype(np.uint32)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(ErrorCode.INVALID, f"tokens: {exc}") from None
    if ids.size > MAX_TOKENS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_TOKENS} tokens")
    if ids.flags.writeable:
        ids = ids.copy()
        ids.flags.writeable = False
    return ids


def _tokens_from_wire(raw: Any) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ProtocolError(ErrorCode.INVALID, "tokens must be little-endian uint32 bytes")
    return as_tokens(np.frombuffer(raw, dtype="<u4").astype(np.uint32))


def fingerprint_to_wire(fp: ModelFingerprint) -> dict[str, Any]:
    return {
        "name": fp.name,
        "revision": fp.revision,
        "layers": fp.layers,
        "kv_heads": fp.kv_heads,
        "head_dim": fp.head_dim,
        "dtype": fp.dtype,
        "rope_theta": fp.rope_theta,
        "rope_scaling": fp.rope_scaling,
        "hex": fp.hex,
    }


def fingerprint_from_wire(raw: Any) -> ModelFingerprint:
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.INVALID, "fingerprint must be a map")
    body = dict(raw)
    stated = body.pop("hex", None)
    try:
        fp = ModelFingerprint(**body)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.INVALID, f"bad model fingerprint: {exc}") from None
    # The fields are what count; a stated digest that disagrees means a client bug or a
    # different hashing version, and silently trusting either would mix caches.
    if stated is not None and stated != fp.hex:
        raise ProtocolError(ErrorCode.INVALID, "fingerprint hex does not match its fields")
    return fp


def _check_positive(what: str, value: Any, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(ErrorCode.INVALID, f"{what} must be a number")
    if not math.isfinite(value) or not 0 < value <= hi:
        raise ProtocolError(ErrorCode.INVALID, f"{what} must be in (0, {hi:g}]")


def _without_none(body: dict[str, Any], *names: str) -> dict[str, Any]:
    """Optional fields added after API version 1 shipped travel only when set, so a daemon that
    predates them still accepts requests that do not use them."""
    for name in names:
        if body.get(name) is None:
            body.pop(name, None)
    return body


def _without_zero(body: dict[str, Any], *names: str) -> dict[str, Any]:
    """As :func:`_without_none`, for later fields whose unset value is 0."""
    for name in names:
        if body.get(name) == 0:
            body.pop(name, None)
    return body


def _check_kv_from(tokens: np.ndarray, kv_from: int) -> None:
    """The KV starts at a token of the request (so at least one token's KV is in it)."""
    _check_int("kv_from", kv_from, 0, max(0, int(tokens.size) - 1))


def _check_fingerprint(fp: Any) -> None:
    if not isinstance(fp, ModelFingerprint):
        raise ProtocolError(ErrorCode.INVALID, "fingerprint must be a ModelFingerprint")


DTYPES = ("float16", "bfloat16", "float32")


# --------------------------------------------------------------------------- base


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every API message: a request id the answer repeats (0 = not tied to a request)."""

    TYPE: ClassVar[str] = ""
    id: int = 0

    def __post_init__(self) -> None:
        _check_int("id", self.id, 0, 2**53)

    def to_wire(self) -> dict[str, Any]:
        """Fields as msgpack-ready values (subclasses convert what msgpack cannot carry)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Message:
        return cls(**body)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """First request of a connection: the tenant namespace and who the client is."""

    TYPE: ClassVar[str] = "hello"
    namespace: str = "default"
    client: str = ""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_name("namespace", self.namespace)
        _check_name("client", self.client, empty=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class _TokensRequest(Message):
    tokens: np.ndarray = field(compare=False)
    fingerprint: ModelFingerprint

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        object.__setattr__(self, "tokens", as_tokens(self.tokens))
        _check_fingerprint(self.fingerprint)

    def to_wire(self) -> dict[str, Any]:
        body = Message.to_wire(self)
        body["tokens"] = self.tokens.astype("<u4").tobytes()
        body["fingerprint"] = fingerprint_to_wire(self.fingerprint)
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Message:
        body = dict(body)
        body["tokens"] = _tokens_from_wire(body.get("tokens"))
        body["fingerprint"] = fingerprint_from_wire(body.get("fingerprint"))
        return cls(**body)


@dataclass(frozen=True, slots=True, kw_only=True)
class PutRequest(_TokensRequest):
    """Store the KV of ``tokens``: the daemon answers with a :class:`SegmentReady` to fill.

    The KV shape is ``[fingerprint.layers, fingerprint.kv_heads, len(tokens) - kv_from,
    fingerprint.head_dim]`` in ``dtype``; the daemon keys and stores only the full chunks of it.
    ``kv_from``: the KV given starts at this token (the daemon holds the chunks before it
    already, from an earlier put of the same prefix): every token still keys the chunks, and
    the chunks that start at or after ``kv_from`` are stored.
    ``prefill_s``: how long the client's own prefill of ``tokens`` (from ``kv_from`` on) took,
    if it knows; the daemon learns the client's recompute speed from it (a fetch is worth it only
    while it beats that).
    """

    TYPE: ClassVar[str] = "put"
    level: str | None = None
    dtype: str = "float16"
    prefill_s: float | None = None
    kv_from: int = 0

    def __post_init__(self) -> None:
        _TokensRequest.__post_init__(self)
        if self.level is not None:
            _check_name("level", self.level, limit=MAX_LEVEL_LEN)
        if self.dtype not in DTYPES:
            raise ProtocolError(ErrorCode.INVALID, f"dtype must be one of {DTYPES}")
        if self.tokens.size == 0:
            raise ProtocolError(ErrorCode.INVALID, "put needs at least one token")
        _check_kv_from(self.tokens, self.kv_from)
        if self.prefill_s is not None:
            _check_positive("prefill_s", self.prefill_s, 86400)

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the put's segment holds."""
        return int(self.tokens.size) - self.kv_from

    def to_wire(self) -> dict[str, Any]:
        return _without_zero(_without_none(_TokensRequest.to_wire(self), "prefill_s"), "kv_from")


@dataclass(frozen=True, slots=True, kw_only=True)
class PutCommit(Message):
    """The client filled the put segment: the daemon may read and store it now."""

    TYPE: ClassVar[str] = "put_commit"
    segment: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_name("segment", self.segment)


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupRequest(_TokensRequest):
    """How much of this prefix is available, and where from (no data moves).

    ``local_only``: only the leading chunks this daemon holds itself (no peer is asked, so the
    answer never waits on the network).
    """

    TYPE: ClassVar[str] = "lookup"
    local_only: bool = False

    def __post_init__(self) -> None:
        _TokensRequest.__post_init__(self)
        if not isinstance(self.local_only, bool):
            raise ProtocolError(ErrorCode.INVALID, "local_only must be true or false")

    def to_wire(self) -> dict[str, Any]:
        return _without_zero(_TokensRequest.to_wire(self), "local_only")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchRequest(_TokensRequest):
    """Restore the longest available prefix of ``tokens`` into a shared-memory segment.

    ``deadline_s``: the daemon stops after this long and reports what it restored (the rest is
    recomputed by the engine). ``min_level``: the least faithful codec level acceptable.
    ``recompute_tokens_per_s``: how fast the client would prefill these tokens itself; the
    daemon stops fetching (and says "recompute the rest") once recomputing would be quicker.
    ``kv_from``: the client holds the KV of the tokens before this one already (its own prefix
    cache): the fetch restores the chunks from the one holding token ``kv_from`` on, and the
    segment starts at that chunk (:attr:`FetchResult.first_token`).
    ``split``: the client will prefill the first chunks itself while the rest is fetched, if the
    daemon finds that quicker (a slow link); :attr:`FetchStarted.first_token` says where the
    segment starts, so where the client's own prefill stops, as soon as the segment exists.
    """

    TYPE: ClassVar[str] = "fetch"
    deadline_s: float | None = None
    min_level: str | None = None
    recompute_tokens_per_s: float | None = None
    kv_from: int = 0
    split: bool = False

    def __post_init__(self) -> None:
        _TokensRequest.__post_init__(self)
        if self.deadline_s is not None:
            _check_positive("deadline_s", self.deadline_s, 86400)
        if self.min_level is not None:
            _check_name("min_level", self.min_level, limit=MAX_LEVEL_LEN)
        if self.recompute_tokens_per_s is not None:
            _check_positive("recompute_tokens_per_s", self.recompute_tokens_per_s, 1e9)
        _check_kv_from(self.tokens, self.kv_from)
        if not isinstance(self.split, bool):
            raise ProtocolError(ErrorCode.INVALID, "split must be true or false")

    def to_wire(self) -> dict[str, Any]:
        body = _without_none(_TokensRequest.to_wire(self), "recompute_tokens_per_s")
        return _without_zero(body, "kv_from", "split")


@dataclass(frozen=True, slots=True, kw_only=True)
class Release(Message):
    """The client is done with a segment: the daemon unlinks it and frees its mapping."""

    TYPE: ClassVar[str] = "release"
    segment: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_name("segment", self.segment)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    """The client gave up on fetch ``fetch`` (its request id): the daemon stops it, drops its
    segment and answers that fetch with an error. Answered with :class:`Cancelled` either way
    (a fetch that is over or unknown is nothing to cancel). A daemon that predates it answers
    UNKNOWN_TYPE: its fetch runs to the end, and the client releases what that names."""

    TYPE: ClassVar[str] = "cancel"
    fetch: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_int("fetch", self.fetch, 0, 2**53)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeersRequest(Message):
    TYPE: ClassVar[str] = "peers"


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictRequest(Message):
    """Operations: drop cached chunks (``all`` is the only selector so far)."""

    TYPE: ClassVar[str] = "evict"
    all: bool = False

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not isinstance(self.all, bool):
            raise ProtocolError(ErrorCode.INVALID, "all must be a boolean")
        if not self.all:
            raise ProtocolError(ErrorCode.INVALID, "evict needs a selector (all=True)")


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloOk(Message):
    TYPE: ClassVar[str] = "hello_ok"
    version: int = API_VERSION
    server: str = ""
    namespace: str = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentReady(Message):
    """A put segment the client must fill (K then V at the offsets the segment header states)."""

    TYPE: ClassVar[str] = "segment"
    segment: str
    size: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_name("segment", self.segment)
        _check_int("size", self.size, 1, 2**48)


@dataclass(frozen=True, slots=True, kw_only=True)
class PutResult(Message):
    """``chunks``: full chunks in the prefix; ``stored``: how many were new to the store."""

    TYPE: ClassVar[str] = "put_result"
    chunks: int
    stored: int
    chunk_tokens: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_int("chunks", self.chunks, 0, MAX_TOKENS)
        _check_int("stored", self.stored, 0, self.chunks)
        _check_int("chunk_tokens", self.chunk_tokens, 1, MAX_TOKENS)


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupResult(Message):
    """``sources``: for each chunk of the available prefix, "local" or the peer's node id."""

    TYPE: ClassVar[str] = "lookup_result"
    matched_tokens: int
    chunk_tokens: int
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_int("chunk_tokens", self.chunk_tokens, 1, MAX_TOKENS)
        _check_int("matched_tokens", self.matched_tokens, 0, MAX_TOKENS)
        if not isinstance(self.sources, list | tuple) or len(self.sources) > MAX_CHUNKS:
            raise ProtocolError(ErrorCode.INVALID, "sources must be a list of chunk sources")
        for source in self.sources:
            _check_name("source", source)
        object.__setattr__(self, "sources", list(self.sources))

    @property
    def local_chunks(self) -> int:
        return sum(1 for s in self.sources if s == "local")

    @property
    def peer_chunks(self) -> int:
        return len(self.sources) - self.local_chunks


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchStarted(Message):
    """The daemon allocated the fetch's segment; chunks land in it as progress events say.

    ``first_token``: the segment's first row is this token's KV (the start of the chunk holding
    the request's ``kv_from``, or for a split fetch a later chunk's: the client prefills the
    tokens before it itself).
    """

    TYPE: ClassVar[str] = "fetch_started"
    segment: str
    size: int
    first_token: int = 0

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_name("segment", self.segment)
        _check_int("size", self.size, 1, 2**48)
        _check_int("first_token", self.first_token, 0, MAX_TOKENS)

    def to_wire(self) -> dict[str, Any]:
        return _without_zero(Message.to_wire(self), "first_token")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchProgress(Message):
    """Chunk ``index`` is restored in the segment at ``level``: the engine may use it now."""

    TYPE: ClassVar[str] = "fetch_progress"
    index: int
    level: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_int("index", self.index, 0, MAX_CHUNKS - 1)
        _check_name("level", self.level, limit=MAX_LEVEL_LEN)


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResult(Message):
    """The end of a fetch: the KV of tokens ``[first_token, matched_tokens)`` is restored
    (``matched_tokens`` 0 = nothing), one chunk per entry of ``levels``.

    ``segment`` is "" when nothing was restored; it holds the KV from ``first_token`` on (0,
    unless the request's ``kv_from`` asked for the chunks from a later one). Tokens from
    ``recompute_from`` on are the engine's to compute.
    """

    TYPE: ClassVar[str] = "fetch_result"
    segment: str = ""
    matched_tokens: int = 0
    chunk_tokens: int = 1
    levels: list[str] = field(default_factory=list)
    recompute_from: int = 0
    first_token: int = 0

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_name("segment", self.segment, empty=True)
        _check_int("matched_tokens", self.matched_tokens, 0, MAX_TOKENS)
        _check_int("chunk_tokens", self.chunk_tokens, 1, MAX_TOKENS)
        _check_int("recompute_from", self.recompute_from, 0, MAX_TOKENS)
        if not isinstance(self.levels, list | tuple) or len(self.levels) > MAX_CHUNKS:
            raise ProtocolError(ErrorCode.INVALID, "levels must be a list")
        for level in self.levels:
            _check_name("level", level, limit=MAX_LEVEL_LEN)
        object.__setattr__(self, "levels", list(self.levels))
        _check_int("first_token", self.first_token, 0, MAX_TOKENS)
        if self.first_token % self.chunk_tokens or (self.first_token and not self.levels):
            raise ProtocolError(ErrorCode.INVALID, "first_token must start a restored chunk")
        if self.first_token + len(self.levels) * self.chunk_tokens != self.matched_tokens:
            raise ProtocolError(
                ErrorCode.INVALID, "matched_tokens must be first_token + levels x chunk_tokens"
            )

    def to_wire(self) -> dict[str, Any]:
        return _without_zero(Message.to_wire(self), "first_token")


@dataclass(frozen=True, slots=True, kw_only=True)
class Released(Message):
    TYPE: ClassVar[str] = "released"


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancelled(Message):
    TYPE: ClassVar[str] = "cancelled"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsResult(Message):
    TYPE: ClassVar[str] = "stats_result"
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not isinstance(self.stats, dict):
            raise ProtocolError(ErrorCode.INVALID, "stats must be a map")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeersResult(Message):
    TYPE: ClassVar[str] = "peers_result"
    peers: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not isinstance(self.peers, list | tuple) or not all(
            isinstance(p, dict) for p in self.peers
        ):
            raise ProtocolError(ErrorCode.INVALID, "peers must be a list of maps")
        object.__setattr__(self, "peers", list(self.peers))


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictResult(Message):
    TYPE: ClassVar[str] = "evict_result"
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse(Message):
    """The request ``id`` failed (id 0: a frame that could not be tied to a request)."""

    TYPE: ClassVar[str] = "error"
    code: int
    reason: str = ""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_int("code", self.code, 0, 65535)
        if not isinstance(self.reason, str):
            raise ProtocolError(ErrorCode.INVALID, "reason must be a string")
        object.__setattr__(self, "reason", self.reason[:1000])

    @property
    def error_code(self) -> ErrorCode:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.INTERNAL


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, PutRequest, PutCommit, LookupRequest, FetchRequest, Release, Cancel,
        StatsRequest, PeersRequest, EvictRequest, HelloOk, SegmentReady, PutResult,
        LookupResult, FetchStarted, FetchProgress, FetchResult, Released, Cancelled,
        StatsResult, PeersResult, EvictResult, ErrorResponse,
    )
}
REQUEST_TYPES = frozenset(
    {"hello", "put", "put_commit", "lookup", "fetch", "release", "cancel", "stats", "peers", "evict"}
)

# --------------------------------------------------------------------------- encode / decode


def _default(value: Any) -> Any:
    # Backends return stats with numpy scalars, tuples of paths...: degrade to plain values.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def encode(message: Message) -> bytes:
    """One frame: length prefix + msgpack body. ProtocolError(TOO_LARGE) above the limit."""
    body = message.to_wire()
    body["v"] = API_VERSION
    body["t"] = message.TYPE
    payload: bytes = msgpack.packb(body, use_bin_type=True, default=_default)
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{message.TYPE} message exceeds {MAX_FRAME_BYTES} bytes")
    return _LENGTH.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """Body length from a frame's 4-byte header (the caller enforces MAX_FRAME_BYTES)."""
    (length,) = _LENGTH.unpack(header)
    return int(length)


def _unpack_failure(exc: BaseException) -> str:
    """What msgpack found wrong: several of its errors carry no text, which left the client an
    error ending in a bare colon."""
    # StackError (the C unpacker's nesting limit) and RecursionError (the pure-Python one's)
    if isinstance(exc, msgpack.StackError | RecursionError):
        return "maps or arrays nested too deeply"
    if isinstance(exc, msgpack.FormatError):
        return "a byte that begins no msgpack value"
    if isinstance(exc, msgpack.ExtraData):
        return "more bytes after the first msgpack value"
    return str(exc) or type(exc).__name__


def decode_body(payload: bytes) -> Message:
    """Decode one frame body; ProtocolError with the code the sender should get back."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message exceeds {MAX_FRAME_BYTES} bytes")
    if not payload:
        raise ProtocolError(ErrorCode.MALFORMED, "empty message (a frame of length 0)")
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=MAX_FRAME_BYTES,
            max_str_len=1 << 20,
            max_array_len=1 << 16,
            max_map_len=1 << 12,
            max_ext_len=0,
        )
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack message: {_unpack_failure(exc)}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "a message must be a msgpack map")
    version = body.pop("v", None)
    if version != API_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"API version {version!r}, expected {API_VERSION}")
    kind = body.pop("t", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(body) - known
    if unknown:
        raise ProtocolError(ErrorCode.INVALID, f"{kind}: unknown fields {sorted(map(str, unknown))}")
    try:
        return cls.from_wire(body)
    except TypeError as exc:
        raise ProtocolError(ErrorCode.INVALID, f"{kind}: {exc}") from None


def request_id_of(payload: bytes) -> int:
    """Best-effort request id of a body that failed to decode, so the error reaches its caller."""
    try:
        body = msgpack.unpackb(payload, raw=False, max_bin_len=MAX_FRAME_BYTES,
                               max_str_len=1 << 20, max_array_len=1 << 16, max_map_len=1 << 12,
                               max_ext_len=0, strict_map_key=False)
    except Exception:  # any garbage: the id is simply unknown
        return 0
    rid = body.get("id") if isinstance(body, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= 2**53 else 0


class FrameDecoder:
    """Sans-IO frame splitter: feed bytes, iterate complete frame bodies.

    An oversized frame yields a ProtocolError(TOO_LARGE) in its place and its body is skipped,
    so the stream stays in sync and later frames still decode.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._skip = 0
        self._max = max_frame

    @property
    def pending(self) -> bool:
        """True while a frame has started arriving but is not complete."""
        return bool(self._buffer) or self._skip > 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> Iterator[bytes | ProtocolError]:
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                if self._skip:
                    return
            if len(self._buffer) < FRAME_HEADER_BYTES:
                return
            length = frame_length(bytes(self._buffer[:FRAME_HEADER_BYTES]))
            if length > self._max:
                del self._buffer[:FRAME_HEADER_BYTES]
                self._skip = length
                yield ProtocolError(ErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds {self._max}")
                continue
            if len(self._buffer) < FRAME_HEADER_BYTES + length:
                return
            body = bytes(self._buffer[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + length])
            del self._buffer[: FRAME_HEADER_BYTES + length]
            yield body
