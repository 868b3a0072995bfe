"""Wire messages of the peer protocol: signalling (TCP) and control channel, plus bulk frames.

Sans-IO: frozen dataclasses validated on construction, :func:`encode` / :func:`decode` in a pair
(msgpack map with a version and a type, size-limited before decoding), and the fixed binary
header of bulk frames. Imports neither asyncio nor aiortc. Every decode failure raises
:class:`~kvpeer.errors.ProtocolError` with a code; nothing here logs or touches a socket.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, fields
from types import NoneType
from typing import Any, ClassVar

import msgpack

from kvpeer.errors import ErrorCode, ProtocolError

VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = 32
MAX_NODE_ID = 128
MAX_SDP = 64 * 1024
MAX_METHOD = 64
MAX_REASON = 512
MAX_KEY = 64
MAX_LEVEL = 32
_U32 = 2**32 - 1
_U63 = 2**63 - 1
#: What a decode error quotes of msgpack's own message.
_MAX_DETAIL = 160

_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bytes": (bytes,),
    "bool": (bool,),
    "bytes | None": (bytes, NoneType),
}


def _accepted_types(annotation: str) -> tuple[type, ...]:
    if annotation in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[annotation]
    if annotation.startswith("dict"):
        return (dict,)
    if annotation.startswith("list"):
        return (list,)
    raise TypeError(f"unsupported field annotation {annotation!r}")


class Message:
    """Base of every message: checks field types, then the subclass's ``_validate``."""

    TYPE: ClassVar[str] = ""
    __slots__ = ()

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            accepted = _accepted_types(str(f.type))
            # bool is an int subclass: never let True pass as a sequence number.
            if not isinstance(value, accepted) or (
                isinstance(value, bool) and bool not in accepted
            ):
                raise ProtocolError(ErrorCode.INVALID, f"{self.TYPE}.{f.name}: expected {f.type}")
        self._validate()

    def _validate(self) -> None:
        """Range checks of one message type (raise ProtocolError INVALID)."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ProtocolError(ErrorCode.INVALID, what)


# -- signalling (TCP, before the peer connection exists) ------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """Client -> server: opens the handshake with the client's nonce. Carries no identity."""

    TYPE: ClassVar[str] = "hello"
    nonce: bytes

    def _validate(self) -> None:
        _check(len(self.nonce) == NONCE_BYTES, "hello.nonce: wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(Message):
    """Server -> client: the server's nonce."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes

    def _validate(self) -> None:
        _check(len(self.nonce) == NONCE_BYTES, "challenge.nonce: wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientProof(Message):
    """Client -> server: one HMAC per key the client holds (current, next)."""

    TYPE: ClassVar[str] = "client_proof"
    proofs: list[bytes]

    def _validate(self) -> None:
        _check(1 <= len(self.proofs) <= 2, "client_proof.proofs: 1 or 2 expected")
        for proof in self.proofs:
            _check(isinstance(proof, bytes) and len(proof) == MAC_BYTES, "client_proof: bad mac")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerProof(Message):
    """Server -> client: the server's HMAC with the key that matched."""

    TYPE: ClassVar[str] = "server_proof"
    proof: bytes

    def _validate(self) -> None:
        _check(len(self.proof) == MAC_BYTES, "server_proof.proof: wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer(Message):
    """Client -> server after mutual auth: identity, interface MTU and SDP, MAC-bound."""

    TYPE: ClassVar[str] = "offer"
    node_id: str
    mtu: int
    sdp: str
    mac: bytes

    def _validate(self) -> None:
        _validate_description(self.node_id, self.mtu, self.sdp, self.mac)


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer(Message):
    """Server -> client: the answer, MAC-bound to the offer."""

    TYPE: ClassVar[str] = "answer"
    node_id: str
    mtu: int
    sdp: str
    mac: bytes

    def _validate(self) -> None:
        _validate_description(self.node_id, self.mtu, self.sdp, self.mac)


def _validate_description(node_id: str, mtu: int, sdp: str, mac: bytes) -> None:
    _check(0 < len(node_id) <= MAX_NODE_ID and node_id.isprintable(), "node_id: bad")
    _check(576 <= mtu <= 65536, "mtu: out of range")
    _check(0 < len(sdp) <= MAX_SDP, "sdp: bad length")
    _check(len(mac) == MAC_BYTES, "mac: wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(Message):
    """Either side: the handshake ends here, with a code (no other detail for the unauthenticated)."""

    TYPE: ClassVar[str] = "reject"
    code: int
    reason: str

    def _validate(self) -> None:
        _check(self.code in ErrorCode._value2member_map_, "reject.code: unknown")
        _check(len(self.reason) <= MAX_REASON, "reject.reason: too long")


# -- control channel (ordered, reliable, after the peer connection is up) -------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Message):
    TYPE: ClassVar[str] = "req"
    id: int
    method: str
    body: dict[str, Any]

    def _validate(self) -> None:
        _check(0 <= self.id <= _U63, "req.id: out of range")
        _check(0 < len(self.method) <= MAX_METHOD, "req.method: bad length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Response(Message):
    TYPE: ClassVar[str] = "resp"
    id: int
    body: dict[str, Any]

    def _validate(self) -> None:
        _check(0 <= self.id <= _U63, "resp.id: out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """The answer to a request or blob request that failed on the remote side."""

    TYPE: ClassVar[str] = "err"
    id: int
    code: int
    reason: str

    def _validate(self) -> None:
        _check(0 <= self.id <= _U63, "err.id: out of range")
        # Any code is taken: a newer peer may know codes we do not (see as_exception).
        _check(0 <= self.code <= _U32, "err.code: out of range")
        _check(len(self.reason) <= MAX_REASON, "err.reason: too long")

    @classmethod
    def of(cls, request_id: int, exc: ProtocolError) -> Error:
        """The Error answering *request_id* with *exc*, its reason cut to what the wire takes."""
        return cls(id=request_id, code=exc.code, reason=exc.reason[:MAX_REASON])

    def as_exception(self, origin: str) -> ProtocolError:
        """What the remote error means here; a code this build does not know reads as INTERNAL."""
        if self.code in ErrorCode._value2member_map_:
            return ProtocolError(ErrorCode(self.code), f"{origin}: {self.reason}")
        return ProtocolError(ErrorCode.INTERNAL, f"{origin}: error code {self.code}: {self.reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Message):
    """Heartbeat; ``sent`` is the sender's own clock, echoed back in the Pong for the RTT."""

    TYPE: ClassVar[str] = "ping"
    seq: int
    sent: float

    def _validate(self) -> None:
        _check(0 <= self.seq <= _U63, "ping.seq: out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int
    sent: float

    def _validate(self) -> None:
        _check(0 <= self.seq <= _U63, "pong.seq: out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRequest(Message):
    TYPE: ClassVar[str] = "blob_req"
    id: int
    key: bytes
    level: str

    def _validate(self) -> None:
        _check(0 <= self.id <= _U32, "blob_req.id: out of range")
        _check(0 < len(self.key) <= MAX_KEY, "blob_req.key: bad length")
        _check(len(self.level) <= MAX_LEVEL, "blob_req.level: too long")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobStart(Message):
    """Sender -> receiver: which chunk this is (key, level), its size, frame count and digest;
    frames follow on bulk. The receiver checks key and level against what it asked for."""

    TYPE: ClassVar[str] = "blob_start"
    id: int
    key: bytes
    level: str
    size: int
    frames: int
    frame_payload: int
    digest: bytes

    def _validate(self) -> None:
        _check(0 <= self.id <= _U32, "blob_start.id: out of range")
        _check(0 < len(self.key) <= MAX_KEY, "blob_start.key: bad length")
        _check(len(self.level) <= MAX_LEVEL, "blob_start.level: too long")
        _check(0 < self.frame_payload <= 1 << 20, "blob_start.frame_payload: out of range")
        _check(0 <= self.size <= _U63, "blob_start.size: out of range")
        _check(self.frames == frames_for(self.size, self.frame_payload), "blob_start: frames")
        _check(len(self.digest) == DIGEST_BYTES, "blob_start.digest: wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobDone(Message):
    """Receiver -> sender: every frame arrived and the digest matched (delivery confirmed)."""

    TYPE: ClassVar[str] = "blob_done"
    id: int

    def _validate(self) -> None:
        _check(0 <= self.id <= _U32, "blob_done.id: out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobCancel(Message):
    """Receiver -> sender: stop sending this blob (the receiver gave up on it)."""

    TYPE: ClassVar[str] = "blob_cancel"
    id: int

    def _validate(self) -> None:
        _check(0 <= self.id <= _U32, "blob_cancel.id: out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(Message):
    """Graceful close: the sender has nothing in flight; the peer answers ByeAck."""

    TYPE: ClassVar[str] = "bye"


@dataclass(frozen=True, slots=True, kw_only=True)
class ByeAck(Message):
    TYPE: ClassVar[str] = "bye_ack"


SIGNALLING_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Challenge, ClientProof, ServerProof, Offer, Answer, Reject)
}
CONTROL_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Request, Response, Error, Ping, Pong, BlobRequest, BlobStart, BlobDone, BlobCancel,
        Bye, ByeAck,
    )
}  # fmt: skip


def encode(message: Message, limit: int) -> bytes:
    """msgpack bytes of *message*; ProtocolError TOO_LARGE above *limit*, INVALID for a map key
    that :func:`decode` would refuse (the peer would drop the whole message) or a value msgpack
    cannot pack."""
    payload: dict[str, Any] = {"v": VERSION, "t": message.TYPE}
    for f in fields(message):  # type: ignore[arg-type]
        value = getattr(message, f.name)
        if isinstance(value, dict | list):
            _check_map_keys(value, f"{message.TYPE}.{f.name}")
        payload[f.name] = value
    try:
        data: bytes = msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # a set, an int past 64 bits, ...
        raise ProtocolError(ErrorCode.INVALID, f"{message.TYPE}: cannot encode: {exc}") from None
    if len(data) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{message.TYPE}: {len(data)} > {limit} bytes")
    return data


def decode(data: bytes, types: dict[str, type[Message]], limit: int) -> Message:
    """The message in *data*, one of *types*; ProtocolError for anything else."""
    if len(data) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(data)} > {limit} bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        # Valid msgpack is refused too (an int map key): say what msgpack objected to.
        detail = f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL]
        raise ProtocolError(ErrorCode.MALFORMED, f"undecodable message: {detail}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "message is not a map")
    if obj.pop("v", None) != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, "unsupported message version")
    kind = obj.pop("t", None)
    # A peer controls the type field: anything but a string (a list is unhashable) is unknown.
    cls = types.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown message type")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if set(obj) != names:
        raise ProtocolError(ErrorCode.INVALID, f"{cls.TYPE}: fields {sorted(map(str, obj))}")
    return cls(**obj)


def _check_map_keys(value: dict[Any, Any] | list[Any], where: str) -> None:
    """Refuse map keys other than str and bytes anywhere in *value* (decode's strict_map_key)."""
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str | bytes):
                    raise ProtocolError(
                        ErrorCode.INVALID,
                        f"{where}: map key {key!r:.40} ({type(key).__name__}); only str or bytes",
                    )
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)


#: How much of a refused message :func:`peek_type_and_id` reads: "t" and "id" come first when
#: we encode, and a refused message may be megabytes the peer made costly to parse.
PEEK_BYTES = 4096


def peek_type_and_id(data: bytes) -> tuple[str, int] | None:
    """Type and id of a control message that :func:`decode` refused, when the start of its outer
    map still reads (values are skipped, not built): which request or blob a bad answer was
    meant for. Reads at most PEEK_BYTES, and no string or array longer than that."""
    limit = PEEK_BYTES
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=limit,
        max_str_len=limit, max_bin_len=limit, max_array_len=limit, max_map_len=limit, max_ext_len=limit,
    )  # fmt: skip
    unpacker.feed(data[:limit])  # never more than max_buffer_size: no BufferFull
    kind: object = None
    ident: object = None
    try:
        for _ in range(unpacker.read_map_header()):
            name = unpacker.unpack()
            if name == "t":
                kind = unpacker.unpack()
            elif name == "id":
                ident = unpacker.unpack()
            else:
                unpacker.skip()
            if kind is not None and ident is not None:
                break
    except Exception:  # msgpack raises several unrelated types on garbage, or past the prefix
        pass
    if not isinstance(kind, str) or not isinstance(ident, int) or isinstance(ident, bool):
        return None
    return kind, ident


# -- bulk frames -----------------------------------------------------------------------------

DIGEST_BYTES = 32
FRAME_VERSION = 1
#: version, 3 pad bytes, blob id, frame index, CRC-32 of the payload
FRAME_HEADER = struct.Struct("!B3xIII")


def frames_for(size: int, frame_payload: int) -> int:
    """Number of frames a blob of *size* bytes takes (an empty blob still sends one)."""
    return max(1, -(-size // frame_payload))


def encode_frame(blob_id: int, index: int, payload: bytes | memoryview) -> bytes:
    crc = zlib.crc32(payload)
    return FRAME_HEADER.pack(FRAME_VERSION, blob_id, index, crc) + bytes(payload)


def decode_frame_header(frame: bytes) -> tuple[int, int]:
    """(blob id, frame index) of a bulk frame, its payload CRC checked."""
    if len(frame) < FRAME_HEADER.size:
        raise ProtocolError(ErrorCode.MALFORMED, "frame shorter than its header")
    version, blob_id, index, crc = FRAME_HEADER.unpack_from(frame)
    if version != FRAME_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"frame version {version}")
    if zlib.crc32(memoryview(frame)[FRAME_HEADER.size :]) != crc:
        raise ProtocolError(ErrorCode.INTEGRITY, f"frame {index} of blob {blob_id}: bad CRC")
    return blob_id, index
