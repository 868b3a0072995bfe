"""The one exception hierarchy of kvpeer.

Every error kvpeer raises on purpose derives from :class:`KVPeerError`. Errors are raised deep
down and caught once where data enters (a socket, a data channel, the local API), where they
become a wire error, a cache miss or a log line. This module imports nothing but the stdlib.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried on the wire (peer control channel and local API)."""

    INTERNAL = 1
    MALFORMED = 2  # could not decode the message at all
    UNSUPPORTED_VERSION = 3
    TOO_LARGE = 4
    UNKNOWN_TYPE = 5
    INVALID = 6  # decoded, but a field is out of range
    NOT_FOUND = 7
    UNAUTHENTICATED = 8
    FORBIDDEN = 9
    BUSY = 10  # a limit on concurrent work was reached
    TIMEOUT = 11
    INTEGRITY = 12  # checksum or digest mismatch
    SHUTTING_DOWN = 13


class KVPeerError(Exception):
    """Base of every error kvpeer raises on purpose."""


class ConfigError(KVPeerError):
    """A configuration key is unknown or has a bad value; the message names the key."""


class NotReadyError(ConfigError):
    """The config names something this machine has, but not yet in a usable state (an
    interface still without its address at boot): worth starting again later."""


class CodecError(KVPeerError):
    """A blob is malformed, truncated, corrupted or uses an unsupported format or backend.

    Treat as a cache miss: the chunk is not stored and not handed to an engine.
    """


class StoreError(KVPeerError):
    """The chunk store could not read or write (disk full, permissions, corrupt file).

    Treat as a cache miss on read; on write the chunk is simply not cached.
    """


class StoreInUse(StoreError):
    """Another process holds the store directory's lock (another daemon on the same store.dir)."""


class ProtocolError(KVPeerError):
    """A peer or client sent something that breaks the protocol."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class AuthError(ProtocolError):
    """A peer failed authentication (wrong or missing cluster key, bad transcript)."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.UNAUTHENTICATED, reason)


class TransportError(KVPeerError):
    """A peer connection failed, timed out or closed before the work was done."""


class ApiError(KVPeerError):
    """The local daemon answered a request with an error (client side)."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason
