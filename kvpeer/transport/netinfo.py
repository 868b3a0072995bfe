"""Facts about the local interfaces the transport needs: the MTU toward peers, buffer limits."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import ifaddr

logger = logging.getLogger(__name__)

#: IPv6 + UDP headers (the larger of v4/v6) and a DTLS 1.2 AES-GCM record's overhead, rounded up.
_IP_UDP_OVERHEAD = 48
_DTLS_OVERHEAD = 40


def interface_of(address: str) -> str | None:
    """Name of the local interface that holds *address*, if any."""
    wanted = ipaddress.ip_address(address)
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            value = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                if ipaddress.ip_address(value) == wanted:
                    return str(adapter.name)
            except ValueError:
                continue
    return None


def interface_mtu(address: str) -> int:
    """MTU of the interface that holds *address* (1500 when it cannot be read)."""
    name = interface_of(address)
    if name is not None:
        try:
            return int(Path(f"/sys/class/net/{name}/mtu").read_text().strip())
        except (OSError, ValueError):
            pass
    logger.info("MTU of the interface holding %s unknown; assuming 1500", address)
    return 1500


def sctp_packet_size(local_mtu: int, remote_mtu: int, *, maximum: int, minimum: int) -> int:
    """Largest SCTP packet that fits one IP packet on both peers' links, within bounds."""
    fits = min(local_mtu, remote_mtu) - _IP_UDP_OVERHEAD - _DTLS_OVERHEAD
    return max(minimum, min(maximum, fits))


def sysctl_int(name: str) -> int | None:
    try:
        return int(Path("/proc/sys/" + name.replace(".", "/")).read_text().strip())
    except (OSError, ValueError):
        return None
