"""Splitting a blob into bulk frames and putting received frames back into their slots.

Sans-IO. The sender states size, frame count and BLAKE2b digest (:class:`BlobStart`) on the
control channel; frames travel on bulk channels and may arrive before that statement or out
of order (different SCTP streams, several channels). :class:`BlobAssembler` keeps each frame
in the slot its index names, rejects duplicates, strays and oversize input, and hands out the
blob only when every slot is filled and the digest matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from kvpeer.errors import ErrorCode, ProtocolError
from kvpeer.transport.messages import (
    DIGEST_BYTES,
    FRAME_HEADER,
    BlobStart,
    encode_frame,
    frames_for,
)

# A sender's frames carry at least this much (transport.frame_bytes is 1 KiB at the least),
# except a blob's last frame: tiny frames would cost the receiver far more in bookkeeping than
# the size cap counts.
MIN_FRAME_PAYLOAD = 1024 - FRAME_HEADER.size
# What one held frame costs beyond its payload (dict slot, bytes object): charged to the cap.
FRAME_OVERHEAD = 128


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def blob_start(
    blob_id: int, blob: bytes, frame_bytes: int, *, key: bytes, level: str
) -> BlobStart:
    payload = frame_bytes - FRAME_HEADER.size
    return BlobStart(
        id=blob_id,
        key=key,
        level=level,
        size=len(blob),
        frames=frames_for(len(blob), payload),
        frame_payload=payload,
        digest=digest(blob),
    )


def iter_frames(blob_id: int, blob: bytes, frame_bytes: int) -> Iterator[bytes]:
    """The bulk frames of *blob*, in index order."""
    payload = frame_bytes - FRAME_HEADER.size
    view = memoryview(blob)
    for index in range(frames_for(len(blob), payload)):
        yield encode_frame(blob_id, index, view[index * payload : (index + 1) * payload])


class BlobAssembler:
    """Collects the frames of one blob; frames may come before :meth:`start` (buffered, capped)."""

    def __init__(
        self, blob_id: int, max_blob_bytes: int, *, key: bytes | None = None, level: str = ""
    ) -> None:
        self.blob_id = blob_id
        self._max_blob_bytes = max_blob_bytes
        # What was asked for; the sender must state the same key (and level, if one was asked).
        self._key = key
        self._level = level
        self._start: BlobStart | None = None
        self._frames: dict[int, bytes] = {}
        self._buffered = 0
        self.received_bytes = 0

    def start(self, start: BlobStart) -> None:
        if self._start is not None:
            raise ProtocolError(ErrorCode.INVALID, f"blob {self.blob_id}: started twice")
        if start.size > self._max_blob_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"blob of {start.size} bytes")
        if start.frames > 1 and start.frame_payload < MIN_FRAME_PAYLOAD:
            raise ProtocolError(
                ErrorCode.INVALID, f"blob {self.blob_id}: frames of {start.frame_payload} bytes"
            )
        if self._key is not None and start.key != self._key:
            raise ProtocolError(ErrorCode.INTEGRITY, f"blob {self.blob_id}: another chunk's key")
        if self._level and start.level != self._level:
            raise ProtocolError(
                ErrorCode.INTEGRITY, f"blob {self.blob_id}: level {start.level!r}, asked {self._level!r}"
            )
        self._start = start
        for index, payload in self._frames.items():
            self._check_frame(index, payload)

    def add(self, frame: bytes) -> None:
        """One bulk frame whose header was already decoded and CRC-checked for this blob."""
        _, index = FRAME_HEADER.unpack_from(frame)[1:3]
        payload = frame[FRAME_HEADER.size :]
        if index in self._frames:
            raise ProtocolError(ErrorCode.INVALID, f"blob {self.blob_id}: frame {index} twice")
        if self._start is not None:
            self._check_frame(index, payload)
        elif (
            self._buffered + len(payload) + FRAME_OVERHEAD
            > self._max_blob_bytes + FRAME_OVERHEAD * (self._max_blob_bytes // MIN_FRAME_PAYLOAD + 1)
        ):  # before BlobStart: as much as the largest blob in the smallest frames may hold
            raise ProtocolError(ErrorCode.TOO_LARGE, f"blob {self.blob_id}: too many frames")
        self._frames[index] = payload
        self._buffered += len(payload) + FRAME_OVERHEAD
        self.received_bytes += len(frame)

    def _check_frame(self, index: int, payload: bytes) -> None:
        start = self._start
        assert start is not None
        if index >= start.frames:
            raise ProtocolError(
                ErrorCode.INVALID, f"blob {self.blob_id}: frame {index} of {start.frames}"
            )
        last = index == start.frames - 1
        expected = start.size - index * start.frame_payload if last else start.frame_payload
        if len(payload) != expected:
            raise ProtocolError(ErrorCode.INVALID, f"blob {self.blob_id}: frame {index} size")

    @property
    def reserved_bytes(self) -> int:
        """What this blob may hold: its stated size once started (at least what it holds), what
        it holds before that; frames count with their overhead. Never shrinks."""
        stated = 0 if self._start is None else self._start.size
        return max(self._buffered, stated)

    @property
    def complete(self) -> bool:
        return self._start is not None and len(self._frames) == self._start.frames

    def result(self) -> bytes:
        """The whole blob, digest checked (call when :attr:`complete`)."""
        start = self._start
        if start is None or not self.complete:
            raise ProtocolError(ErrorCode.INVALID, f"blob {self.blob_id}: incomplete")
        blob = b"".join(self._frames[i] for i in range(start.frames))
        self._frames.clear()
        if digest(blob) != start.digest:
            raise ProtocolError(ErrorCode.INTEGRITY, f"blob {self.blob_id}: digest mismatch")
        return blob
