"""Peer transport: authenticated WebRTC data-channel sessions between kvpeer daemons.

Public surface (everything else in this package is private to it)::

    transport = PeerTransport(node_id, TransportConfig(host=lan_ip, psk=key), handler)
    await transport.start(); transport.port
    session = await transport.connect(peer_id, host, port)
    await session.request(method, body) ; await session.fetch_blob(key, level)
    await transport.close()
"""

from kvpeer.transport.config import TransportConfig, load_psk
from kvpeer.transport.estimator import BandwidthEstimator
from kvpeer.transport.peer import PeerTransport
from kvpeer.transport.session import PeerSession, RequestHandler

__all__ = [
    "BandwidthEstimator",
    "PeerSession",
    "PeerTransport",
    "RequestHandler",
    "TransportConfig",
    "load_psk",
]
