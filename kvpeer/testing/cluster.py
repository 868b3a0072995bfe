"""Real kvpeerd daemons in network namespaces, for cluster tests, benchmarks and the demo.

`DaemonCluster(n)` builds a namespace cluster (kvpeer.testing.netns), writes one config file per
node, starts `kvpeerd` in each namespace with its own state and runtime directories, and waits for
each daemon's systemd READY=1 on a notification socket of its own (the same signal systemd
waits for). Clients run in the caller's namespace: Unix sockets and /dev/shm are shared across
network namespaces. Everything is torn down on exit, even after a failure.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpeer.config import toml_value
from kvpeer.testing.netns import Cluster, Host

READY_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Node:
    """One daemon of the cluster."""

    index: int
    node_id: str
    host: Host
    workdir: Path
    config_path: Path
    socket_path: Path
    notify_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None

    @property
    def ip(self) -> str:
        return self.host.ip

    def notifications(self, timeout_s: float) -> Iterator[str]:
        """Yield sd_notify lines the daemon sends until ``timeout_s`` passes without one."""
        assert self.notify is not None
        self.notify.settimeout(timeout_s)
        while True:
            try:
                data = self.notify.recv(4096)
            except TimeoutError:
                return
            yield from data.decode(errors="replace").splitlines()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def node_config(node: Node, psk_path: Path, extra: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML config of one node; ``extra`` overrides keys per section."""
    sections: dict[str, dict[str, Any]] = {
        "node": {
            "node_id": node.node_id,
            "state_dir": str(node.workdir / "state"),
            "runtime_dir": str(node.workdir / "run"),
        },
        "api": {"socket_path": str(node.socket_path)},
        "store": {"ram_bytes": "512MiB", "disk_bytes": "1GiB"},
        "transport": {"host": node.ip, "port": 7457, "psk_file": str(psk_path)},
        "discovery": {"backend": "zeroconf", "interfaces": [node.ip]},
        "metrics": {"enabled": False},
        "log": {"level": "debug"},
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


class DaemonCluster:
    """N kvpeerd daemons, one per network namespace, on one bridge.

    ``relay=True`` (two daemons) routes them through the impairment relay instead
    (``net.set_impairment(delay_ms=..., loss_pct=...)``); mDNS does not cross that router, so
    the daemons find each other with static discovery (each lists the other's address).
    """

    def __init__(
        self,
        n: int,
        *,
        workdir: Path,
        mtu: int = 1500,
        rate: str | None = None,
        config: Mapping[str, Mapping[str, Any]] | None = None,
        per_node_config: Callable[[int], Mapping[str, Mapping[str, Any]]] | None = None,
        start: bool = True,
        relay: bool = False,
    ) -> None:
        self.workdir = workdir
        self._stack = ExitStack()
        self.relay = relay
        self.net = Cluster(n_hosts=n, mtu=mtu, rate=rate, relay=relay)
        self.psk_path = workdir / "cluster.key"
        self._config = config or {}
        self._per_node = per_node_config
        self._start = start
        self.nodes: list[Node] = []
        for index in range(n):
            node_dir = workdir / f"node{index}"
            self.nodes.append(
                Node(
                    index=index,
                    node_id=f"node{index}-{secrets.token_hex(3)}",
                    host=self.net.hosts[index],
                    workdir=node_dir,
                    config_path=node_dir / "kvpeer.toml",
                    socket_path=node_dir / "run" / "kvpeer.sock",
                    notify_path=node_dir / "notify.sock",
                    log_path=node_dir / "kvpeerd.log",
                )
            )

    def __enter__(self) -> DaemonCluster:
        self._stack.enter_context(self.net)
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.psk_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as key_file:
                key_file.write(secrets.token_hex(32) + "\n")
            if self._start:
                for node in self.nodes:
                    self.start_node(node, wait=False)
                for node in self.nodes:
                    self.wait_ready(node)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for node in self.nodes:
                self.stop_node(node)
        finally:
            self.close_notify()
            self._stack.close()

    def start_node(
        self, node: Node, *, wait: bool = True, env: Mapping[str, str] | None = None
    ) -> None:
        (node.workdir / "run").mkdir(parents=True, exist_ok=True)
        extra: dict[str, dict[str, Any]] = {s: dict(v) for s, v in self._config.items()}
        if self.relay:
            # Routed subnets carry no multicast: every node lists the others' signalling ports.
            port = extra.get("transport", {}).get("port", 7457)
            static = {
                "backend": "static",
                "static_peers": [f"{other.ip}:{port}" for other in self.nodes if other is not node],
            }
            extra["discovery"] = {**static, **extra.get("discovery", {})}
        if self._per_node is not None:
            for section, values in self._per_node(node.index).items():
                extra.setdefault(section, {}).update(values)
        node.config_path.write_text(node_config(node, self.psk_path, extra))
        if node.notify is None:
            node.notify_path.unlink(missing_ok=True)
            node.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            node.notify.bind(str(node.notify_path))
        full_env = dict(os.environ)
        full_env.update({"NOTIFY_SOCKET": str(node.notify_path), "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        log_file = node.log_path.open("ab")
        node.process = self.net.popen(
            node.host,
            [sys.executable, "-m", "kvpeer.cli", "--config", str(node.config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        log_file.close()
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: Node, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in node.notifications(timeout_s=0.5):
                if line == "READY=1":
                    return
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(
                    f"kvpeerd {node.node_id} exited with {node.process.returncode}:\n{node.log_text()}"
                )
        raise TimeoutError(f"kvpeerd {node.node_id} not ready in {timeout_s}s:\n{node.log_text()}")

    def stop_node(
        self, node: Node, sig: int = signal.SIGTERM, timeout_s: float = 20.0
    ) -> int | None:
        """Stop one daemon (SIGTERM: graceful; SIGKILL: a crash). Returns its exit code."""
        process, node.process = node.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def close_notify(self) -> None:
        for node in self.nodes:
            if node.notify is not None:
                node.notify.close()
                node.notify = None

    def wait_until_peer_holds(self, node: Node, peer_id: str, timeout_s: float = 30.0) -> None:
        """Wait until ``node``'s daemon lists ``peer_id`` as a peer holding chunks."""
        from kvpeer.api.client import KVPeerClient

        deadline = time.monotonic() + timeout_s
        with KVPeerClient(socket_path=node.socket_path) as client:
            while time.monotonic() < deadline:
                for peer in client.peers():
                    if peer.get("node_id") == peer_id and peer.get("chunks", 0) > 0:
                        return
                time.sleep(0.2)
        raise TimeoutError(f"{node.node_id} did not see chunks on {peer_id} within {timeout_s}s")

