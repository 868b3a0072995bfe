"""Throw-away clusters of Linux network namespaces for cluster tests and benchmarks.

A :class:`Cluster` builds one namespace per host plus one namespace holding a bridge; every
host gets a veth pair whose host end is ``eth0`` (with ``lo`` up) and whose other end is a port
of the bridge. Nothing is created in the root namespace, so interface names never collide and
no traffic can leave the cluster. Multicast (mDNS for zeroconf) is flooded across the bridge.

With ``relay=True`` (two hosts) the hosts sit on two subnets instead, routed through a third
namespace in which :mod:`kvpeer.testing.relay` carries every packet, so delay, loss and
reordering can be added (this kernel has no netem); multicast does not cross that router.

Names are unique per process and cluster (prefix + pid + counter). :meth:`Cluster.close` kills
the processes started through the cluster and deletes every namespace, also when set-up fails
half way, when the ``with`` block raises, and at interpreter exit. Needs root and iproute2.

This module owns namespace set-up and teardown and process launching inside namespaces; it
does not know anything about kvpeer itself.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_counter = itertools.count()
_counter_lock = threading.Lock()
_live: weakref.WeakSet[Cluster] = weakref.WeakSet()
_IP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One simulated machine: a network namespace with one interface on the cluster LAN."""

    index: int
    netns: str
    ip: str
    ifname: str
    mtu: int
    prefix_len: int = 24


def _next_id() -> int:
    with _counter_lock:
        return next(_counter)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ``ip`` command; raise with its stderr when it fails and *check* is set."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _tc(netns: str, *args: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "tc", *args],
        capture_output=True,
        text=True,
        timeout=_IP_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {netns} failed: {proc.stderr.strip()}")


def _sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    subprocess.run(
        ["ip", "netns", "exec", netns, "sh", "-c", f"echo {value} > {path}"],
        capture_output=True,
        timeout=_IP_TIMEOUT_S,
        check=True,
    )


def parse_rate(rate: str) -> int:
    """Bits per second from a tc-style rate such as ``100mbit``, ``1gbit`` or ``500kbit``."""
    text = rate.strip().lower()
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            try:
                value = float(number)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * factor)
    raise ValueError(f"bad rate {rate!r}: expected e.g. '100mbit', '1gbit', '500kbit'")


class Cluster:
    """Hosts in their own network namespaces on one bridged LAN; a context manager.

    ``mtu`` is one MTU for every host or one per host (a host's veth pair gets its MTU; the
    bridge forwards only frames that both ends carry, like a real mixed-MTU LAN).
    ``rate`` (e.g. ``"100mbit"``) shapes every host's egress with a token bucket.
    ``relay=True`` (exactly two hosts) routes them through the impairment relay; see
    :meth:`set_impairment`.
    """

    def __init__(
        self,
        n_hosts: int = 2,
        mtu: int | Sequence[int] = 1500,
        rate: str | None = None,
        *,
        prefix: str = "kvp",
        relay: bool = False,
    ) -> None:
        if n_hosts < 1 or n_hosts > 200:
            raise ValueError(f"n_hosts must be 1..200, got {n_hosts}")
        mtus = [mtu] * n_hosts if isinstance(mtu, int) else list(mtu)
        if len(mtus) != n_hosts:
            raise ValueError(f"got {len(mtus)} MTUs for {n_hosts} hosts")
        if any(m < 1280 or m > 65535 for m in mtus):
            raise ValueError(f"MTUs must be 1280..65535, got {mtus}")
        if relay and n_hosts != 2:
            raise ValueError("relay=True needs exactly two hosts")
        self.relay = relay
        self.id = _next_id()
        self.name = f"{prefix}{os.getpid()}c{self.id}"
        # Namespaces are isolated from each other, so the subnet only needs to be readable.
        self.subnet = f"10.213.{self.id % 250}"
        self.bridge_netns = f"{self.name}br"
        # Routed: host i on its own /26 (10.213.k.2 and 10.213.k.66), the router on .1 / .65.
        self.hosts: list[Host] = [
            Host(
                index=i,
                netns=f"{self.name}h{i}",
                ip=f"{self.subnet}.{64 * i + 2}" if relay else f"{self.subnet}.{i + 2}",
                ifname="eth0",
                mtu=mtus[i],
                prefix_len=26 if relay else 24,
            )
            for i in range(n_hosts)
        ]
        self._relay_proc: subprocess.Popen[str] | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False
        _live.add(self)
        try:
            if relay:
                self._build_routed()
                self.set_impairment()
            else:
                self._build()
            if rate is not None:
                for host in self.hosts:
                    self.set_rate(host, rate)
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------------

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_netns(self.bridge_netns)
        br = self.bridge_netns
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        # mDNS is link-local and flooded anyway; snooping off keeps other groups flowing too.
        _ip("-n", br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "mtu", str(max(h.mtu for h in self.hosts)))
        _ip("-n", br, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_netns(host.netns)
            port = f"p{host.index}"
            _ip(
                "-n", br, "link", "add", port, "mtu", str(host.mtu), "type", "veth",
                "peer", "name", host.ifname, "netns", host.netns, "mtu", str(host.mtu),
            )  # fmt: skip
            _ip("-n", br, "link", "set", port, "master", "br0")
            _ip("-n", br, "link", "set", port, "up")
            self._add_host_side(host)
            # No default route exists in the namespace: give multicast one explicitly.
            _ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", host.ifname)
        logger.debug("cluster %s up: %s", self.name, [h.ip for h in self.hosts])

    def _add_host_side(self, host: Host) -> None:
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/{host.prefix_len}", "dev", host.ifname)
        # Skip IPv6 duplicate address detection: a "tentative" address cannot be bound
        # for a second or so, which ICE gathering and zeroconf would otherwise race.
        _sysctl(host.netns, f"net.ipv6.conf.{host.ifname}.accept_dad", "0")
        _ip("-n", host.netns, "link", "set", host.ifname, "up")

    def _build_routed(self) -> None:
        rt = self.bridge_netns  # the router takes the bridge's place
        self._add_netns(rt)
        _sysctl(rt, "net.ipv4.ip_forward", "1")
        # Packets re-enter from a TUN device with a source routed elsewhere: no rp_filter.
        for scope in ("all", "default"):
            _sysctl(rt, f"net.ipv4.conf.{scope}.rp_filter", "0")
        for host, tun in zip(self.hosts, ("tuna", "tunb"), strict=True):
            self._add_netns(host.netns)
            port = f"r{host.index}"
            gateway = f"{self.subnet}.{64 * host.index + 1}"
            _ip(
                "-n", rt, "link", "add", port, "mtu", str(host.mtu), "type", "veth",
                "peer", "name", host.ifname, "netns", host.netns, "mtu", str(host.mtu),
            )  # fmt: skip
            _ip("-n", rt, "addr", "add", f"{gateway}/26", "dev", port)
            _ip("-n", rt, "link", "set", port, "up")
            self._add_host_side(host)
            _ip("-n", host.netns, "route", "add", "default", "via", gateway)
            _ip("-n", rt, "tuntap", "add", "dev", tun, "mode", "tun")
            _ip("-n", rt, "link", "set", tun, "mtu", "65535", "txqueuelen", "10000", "up")
            # Whatever arrives from this host goes to the relay, not straight to the other.
            table = str(100 + host.index)
            _ip("-n", rt, "rule", "add", "iif", port, "table", table)
            _ip("-n", rt, "route", "add", "default", "dev", tun, "table", table)
        logger.debug("routed cluster %s up: %s", self.name, [h.ip for h in self.hosts])

    def set_impairment(
        self,
        *,
        delay_ms: float = 0.0,
        loss_pct: float = 0.0,
        reorder_pct: float = 0.0,
        seed: int = 1,
    ) -> None:
        """(Re)start the relay with this one-way delay, loss and reordering per direction."""
        self._check_open()
        if not self.relay:
            raise RuntimeError("set_impairment needs Cluster(relay=True)")
        self.stop_relay()
        router = Host(index=-1, netns=self.bridge_netns, ip="", ifname="", mtu=0)
        argv = [
            sys.executable, "-m", "kvpeer.testing.relay", "--delay-ms", str(delay_ms),
            "--loss", str(loss_pct), "--reorder", str(reorder_pct), "--seed", str(seed),
        ]  # fmt: skip
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.netns_argv(router, argv), stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        self._relay_proc = proc
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("impairment relay did not start")

    @property
    def relay_pid(self) -> int | None:
        """The running relay's process id (``ip netns exec`` execs it), for CPU accounting."""
        return self._relay_proc.pid if self._relay_proc is not None else None

    def stop_relay(self) -> dict[str, Any] | None:
        """Stop the relay; its counters and CPU seconds (None if none ran)."""
        proc, self._relay_proc = self._relay_proc, None
        if proc is None:
            return None
        _signal_group(proc, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
            return None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None

    # -- use ------------------------------------------------------------------------------

    def netns_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """The command line that runs *argv* inside *host*'s namespace."""
        return ["ip", "netns", "exec", host.netns, *argv]

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start *argv* in *host*'s namespace; the cluster kills it on close."""
        self._check_open()
        # Its own process group, so kill_all() reaches children the command forks.
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.netns_argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self,
        host: Host,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* to completion in *host*'s namespace and capture its output as text."""
        self._check_open()
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.netns_argv(host, argv), check=check, timeout=timeout, **kwargs)

    def set_rate(self, host: Host, rate: str | None) -> None:
        """Shape *host*'s egress with a token bucket (``None`` removes the shaping)."""
        self._check_open()
        if rate is None:
            subprocess.run(
                self.netns_argv(host, ["tc", "qdisc", "del", "dev", host.ifname, "root"]),
                capture_output=True,
                timeout=_IP_TIMEOUT_S,
                check=False,
            )
            return
        bits = parse_rate(rate)
        # The bucket must hold a few full frames and ~4 ms of traffic, or tbf under-delivers
        # at high rates (timer granularity); the queue holds ~50 ms so TCP/SCTP see loss late.
        burst = max(4 * host.mtu + 64, bits // 8 // 250)
        # A new qdisc, not "replace": tbf keeps its queue across a change, and a queued UDP GSO
        # packet that fit the old bucket but is larger than the new one can never be sent:
        # the link stalls for good (100 -> 10 Mbit/s with 50 KB GSO packets queued did).
        self.set_rate(host, None)
        _tc(
            host.netns, "qdisc", "add", "dev", host.ifname, "root", "tbf",
            "rate", str(bits), "burst", str(burst), "latency", "50ms",
        )  # fmt: skip

    def qdisc_drops(self, host: Host) -> int | None:
        """Packets *host*'s egress qdisc dropped so far (tbf: its queue was full); None when
        unshaped or unreadable."""
        self._check_open()
        out = subprocess.run(
            self.netns_argv(host, ["tc", "-s", "qdisc", "show", "dev", host.ifname]),
            capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False,
        )  # fmt: skip
        match = re.search(r"qdisc tbf .*?dropped (\d+)", out.stdout, re.S)
        return int(match.group(1)) if match else None

    def kill_all(self, timeout: float = 5.0) -> None:
        """Stop every process started through :meth:`popen` (SIGTERM, then SIGKILL)."""
        for proc in self._procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
        self._procs.clear()

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill the cluster's processes and delete its namespaces; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_relay()
            self.kill_all()
        finally:
            # Deleting a namespace deletes its veth ends and the bridge with it.
            for name in reversed(self._created):
                proc = _ip("netns", "del", name, check=False)
                if proc.returncode != 0:
                    logger.warning("could not delete netns %s: %s", name, proc.stderr.strip())
            self._created.clear()
            _live.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"cluster {self.name} is closed")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        # Not a group leader (start_new_session=False): signal the process alone.
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


@atexit.register
def _close_all() -> None:
    for cluster in list(_live):
        cluster.close()
