import pytest

from kvpeer.discovery.config import (
    DiscoveryConfig,
    HostInterface,
    advertisable_addresses,
    check_advertised,
)
from kvpeer.errors import ConfigError

HOST = [
    HostInterface("lo", ("127.0.0.1",)),
    HostInterface("eth0", ("192.168.1.5",)),
    HostInterface("docker0", ("172.17.0.1",)),
    HostInterface("veth1234", ("172.18.0.1",)),
    HostInterface("br-abc", ("172.19.0.1",)),
    HostInterface("virbr0", ("192.168.122.1",)),
]


def test_default_skips_loopback_and_bridges() -> None:
    assert advertisable_addresses([], HOST) == ("192.168.1.5",)


def test_explicit_loopback_or_bridge_is_allowed() -> None:
    assert advertisable_addresses(["lo"], HOST) == ("127.0.0.1",)
    assert advertisable_addresses(["127.0.0.1", "docker0"], HOST) == ("127.0.0.1", "172.17.0.1")


def test_nothing_usable_is_an_error() -> None:
    with pytest.raises(ConfigError):
        advertisable_addresses([], HOST[:1])
    with pytest.raises(ConfigError, match="wlan9"):
        advertisable_addresses(["wlan9"], HOST)


def test_an_interface_without_its_address_or_not_there_yet_is_not_ready() -> None:
    """At boot DHCP or a floating address may come later, and a NIC's driver may not be loaded
    yet: the start is worth retrying (exit 1). A missing name was exit 2, never retried."""
    from kvpeer.errors import NotReadyError

    with pytest.raises(NotReadyError, match="eth1"):
        advertisable_addresses(["eth1"], [*HOST, HostInterface("eth1", ())])
    with pytest.raises(NotReadyError, match="no interface 'wlan9' .yet"):
        advertisable_addresses(["wlan9"], HOST)


def test_at_boot_an_interface_still_down_is_not_ready_not_unknown() -> None:
    """ifaddr lists only interfaces with an address: a NIC still down at boot was "no
    interface" (exit 2, never retried), and so was the default with DHCP pending."""
    from kvpeer.errors import NotReadyError

    names = ["lo", "eth0", "d0"]
    with pytest.raises(NotReadyError, match="'d0'"):
        advertisable_addresses(["d0"], HOST[:1], names)
    with pytest.raises(NotReadyError, match="eth0"):
        advertisable_addresses([], HOST[:1], names)
    # a host whose only address is on a bridge: waiting, and the message says how to use it
    with pytest.raises(NotReadyError, match="bridges count only when named"):
        advertisable_addresses([], [HOST[0], HOST[2]], names)
    with pytest.raises(ConfigError) as raised:  # only loopback and bridges: nothing to wait for
        advertisable_addresses([], HOST[:1], ["lo", "docker0"])
    assert not isinstance(raised.value, NotReadyError)
    with pytest.raises(NotReadyError, match="wlan9"):  # not listed at all: a driver loading
        advertisable_addresses(["wlan9"], HOST, names)


def test_the_host_lists_its_interfaces_down_ones_too() -> None:
    from kvpeer.discovery import config as discovery_config

    assert "lo" in discovery_config._interface_names()


def test_advertised_addresses_must_be_on_configured_interfaces() -> None:
    assert check_advertised((), ("10.0.0.1",)) == ("10.0.0.1",)
    with pytest.raises(ConfigError, match="127.0.0.1"):
        check_advertised(("127.0.0.1",), ("10.0.0.1",))


def test_from_section() -> None:
    cfg = DiscoveryConfig.from_section({"backend": "static", "static_peers": ["h:1", "[::1]:2"]})
    assert cfg.static_peers == ("h:1", "[::1]:2") and cfg.peer_timeout_s == 10.0
    with pytest.raises(ConfigError, match="bogus"):
        DiscoveryConfig.from_section({"bogus": 1})
    with pytest.raises(ConfigError, match="backend"):
        DiscoveryConfig(backend="consul")
    with pytest.raises(ConfigError, match="static_peers"):
        DiscoveryConfig(static_peers=("nohost",))


def test_zeroconf_without_heartbeats_is_refused() -> None:
    """With heartbeats off, a zeroconf peer the transport marked dead once (one lost session)
    came back only when its advertisement changed: a live peer was gone for good."""
    with pytest.raises(ConfigError, match="discovery.heartbeat_interval_s.*zeroconf"):
        DiscoveryConfig(heartbeat_interval_s=0)
    with pytest.raises(ConfigError, match="discovery.heartbeat_interval_s"):
        DiscoveryConfig.from_section({"backend": "zeroconf", "heartbeat_interval_s": 0})
    for backend in ("static", "etcd"):  # static beacons anyway; etcd has its lease
        assert DiscoveryConfig(backend=backend, heartbeat_interval_s=0).heartbeat_interval_s == 0
