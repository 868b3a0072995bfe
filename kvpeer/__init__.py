"""kvpeer: share LLM KV caches of prompt prefixes between the nodes of a LAN.

The public surface is small: the client library in :mod:`kvpeer.api.client`, the codec in
:mod:`kvpeer.codec`, chunk keys in :mod:`kvpeer.hashing` and the error types below.
"""

from kvpeer.errors import (
    ApiError,
    AuthError,
    CodecError,
    ConfigError,
    ErrorCode,
    KVPeerError,
    ProtocolError,
    StoreError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AuthError",
    "CodecError",
    "ConfigError",
    "ErrorCode",
    "KVPeerError",
    "ProtocolError",
    "StoreError",
    "TransportError",
    "__version__",
]
