"""The local API: how an engine on this node talks to its kvpeer daemon.

Public surface: :class:`KVPeerClient` and :class:`AsyncKVPeerClient` for engines, and the result
messages they return. The daemon side lives in :mod:`kvpeer.api.server`.
"""

from kvpeer.api.client import AsyncFetchHandle, AsyncKVPeerClient, FetchHandle, KVPeerClient
from kvpeer.api.messages import FetchResult, LookupResult, PutResult

__all__ = [
    "AsyncFetchHandle",
    "AsyncKVPeerClient",
    "FetchHandle",
    "FetchResult",
    "KVPeerClient",
    "LookupResult",
    "PutResult",
]
