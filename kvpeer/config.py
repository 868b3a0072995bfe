"""The daemon's configuration: one TOML file, then ``KVPEER_*`` environment overrides.

Owns :class:`Config` (frozen nested dataclasses, one section per subsystem, every field with a
type, a default and a doc string), :func:`load_config`, and the renderers behind
``kvpeerd --check-config`` (:meth:`Config.as_toml`) and ``systemd/kvpeer.example.toml``
(:func:`example_toml`). Unknown keys and bad values raise ConfigError naming the key.

Sources, lowest precedence first:

1. the defaults below;
2. the TOML file (``/etc/kvpeer/kvpeer.toml`` by default; a missing *default* file is fine, a
   missing explicit ``--config`` file is an error);
3. environment variables ``KVPEER_<SECTION>__<KEY>`` (double underscore between the section and
   the key, case-insensitive), e.g. ``KVPEER_TRANSPORT__PORT=7500`` or
   ``KVPEER_STORE__RAM_BYTES=4GiB``. Lists are comma-separated (``a,b``) or a TOML array
   (``["a", "b"]``). Variables without a double underscore set nothing here: ``KVPEER_SOCKET``
   belongs to the client CLI, any other is warned of (:func:`config_warnings`), with the setting
   a single underscore misspelt.

Value syntax: sizes are integers of bytes or strings like ``"512MiB"``/``"2GB"``; durations are
seconds (int or float); paths are absolute, or start with ``{state_dir}`` or ``{runtime_dir}``,
filled in from the ``[node]`` section. The loader is generic over nested frozen dataclasses, so a section grows by
adding a field here (and regenerating the example with ``python -m kvpeer.config --example``).
This module reads files and the environment only; it opens no sockets (a
``metrics.host`` that is a name is looked up, as its bind would).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from kvpeer.errors import ConfigError
from kvpeer.files import write_text_atomically

log = logging.getLogger(__name__)

# api.spare_bytes, also the API server's keyword default: one number.
SPARE_BYTES_DEFAULT = 1 << 30

DEFAULT_CONFIG_PATH = Path("/etc/kvpeer/kvpeer.toml")
ENV_PREFIX = "KVPEER_"
MACHINE_ID_PATH = Path("/etc/machine-id")
NODE_ID_FILE = "node_id"  # under state_dir, when the id had to be generated

T = TypeVar("T")

# ----------------------------------------------------------------------------- field helpers
# Doc strings live in field metadata (not attribute doc strings) so the example file and
# --check-config can print them.


def setting(default: T, doc: str, *, kind: str = "", example: Any = None, lo: float | None = None,
            hi: float | None = None, choices: tuple[Any, ...] = ()) -> T:
    """A config field: its default, its documentation and how to read and check its value.

    ``kind`` is "size" (bytes, accepts "512MiB"), "mode" (file mode, accepts "0660"),
    "auto_int" (an int, "auto" meaning 0), "table" (a TOML table of lists of strings, kept as
    sorted ``(key, (str, ...))`` pairs so the section stays frozen) or "". ``example`` is shown (commented out) in the
    example file for optional fields. Typed as returning the default so sections type-check.
    """
    meta = {"doc": doc, "kind": kind, "example": example, "lo": lo, "hi": hi, "choices": choices}
    spec: T = field(default=default, metadata=meta)
    return spec


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# A node id is the DNS label of its service instance (kvpeer.discovery.advert): no dots.
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_LEVEL_RE = re.compile(r"^[a-z0-9_]{1,16}$")


def _check_level(key: str, value: str, *, allow_empty: bool) -> None:
    if allow_empty and not value:
        return
    if not _LEVEL_RE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a codec level name")
    try:  # the codec package imports torch; a broken codec must not stop --check-config
        from kvpeer.codec import LEVELS
    except ImportError:  # pragma: no cover - only while the codec is missing
        return
    if value not in LEVELS:
        raise ConfigError(f"{key}: unknown codec level {value!r}; known: {', '.join(LEVELS)}")


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSection:
    """[node]: who this node is and where it keeps its files."""

    node_id: str = setting(
        "",
        "Name of this node on the LAN (letters, digits, '_', '-'; at most 63). Empty: a stable "
        "id derived from /etc/machine-id and the host name, else a random one saved in state_dir.",
    )
    state_dir: Path = setting(
        Path("/var/lib/kvpeer"), "Persistent state: the disk store, a generated node id."
    )
    runtime_dir: Path = setting(Path("/run/kvpeer"), "Runtime files: the local API socket.")

    def __post_init__(self) -> None:
        if self.node_id and not _NODE_ID_RE.match(self.node_id):
            raise ConfigError(
                f"node.node_id: {self.node_id!r} must be 1-63 letters, digits, '_' or '-', "
                "starting with a letter or digit (it is a DNS label: no dots)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSection:
    """[api]: the local Unix socket that engines talk to."""

    socket_path: Path = setting(
        Path("{runtime_dir}/kvpeer.sock"), "Unix socket of the local API."
    )
    socket_mode: int = setting(
        0o660, "Permissions of the socket (octal: 0o660 or \"0660\").", kind="mode", lo=0, hi=0o777
    )
    socket_group: str = setting(
        "", "Group owning the socket (engines in it may connect). Empty: the daemon's group."
    )
    allowed_uids: tuple[int, ...] = setting(
        (), "Only these user ids may use the API (checked with SO_PEERCRED). Empty: anyone the "
        "socket permissions let in.", lo=0,
    )
    namespaces: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (), "Namespaces are cooperative unless [api] namespaces is set: while it is empty, "
        "every user the socket lets in may put into and read any namespace. Set, it says who may "
        "use each: namespace = [members], a member being a user name or uid, \"@\" and a group "
        "name or gid (the client's primary group, or /etc/group membership read at start), or "
        "\"*\" (every user the socket lets in); e.g. { team-a = [\"alice\", \"@engines\"], "
        "default = [\"*\"] }. A hello for a namespace not listed for the client is refused "
        "(FORBIDDEN), and so are the put, lookup and fetch requests of a client that sent none "
        "(it is in \"default\") unless \"default\" lists it; status, stats and peers need no "
        "namespace; evict (every namespace's chunks) is then for root and the daemon's own user, "
        "who may also use every namespace.",
        kind="table",
    )
    lease_s: float = setting(
        60.0, "Seconds a client may hold a fetched shared-memory segment before the daemon "
        "reclaims it.", lo=0.001
    )
    spare_bytes: int = setting(
        SPARE_BYTES_DEFAULT, "Once idle after a fetch, the daemon maps the next fetch's shared memory ahead "
        "(making it during a fetch delayed its first chunk on a small machine), if at most this "
        "large: memory held in /dev/shm while idle. 0: never.", kind="size", lo=0,
    )
    max_connections: int = setting(
        256, "API connections served at once; one more is answered BUSY and closed (root and "
        "the daemon's own user get 8 more, so `kvpeer status` still answers).", lo=1, hi=65536,
    )
    max_connections_per_uid: int = setting(
        128, "API connections one client user may hold at once (so one user's leak or flood "
        "leaves room for the others; not root or the daemon's own user).", lo=1, hi=65536,
    )
    max_shm_bytes_per_uid: int = setting(
        64 << 30, "Shared memory one client user's connections may hold at once, all together "
        "(segments of fetches and puts), and never more than half of /dev/shm; past it a request "
        "is answered BUSY (TOO_LARGE for one segment larger than that). Clients that should not "
        "share a cap should run as different users.",
        kind="size", lo=1,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSection:
    """[store]: encoded chunks in RAM (LRU) and on disk (LRU, survives restarts)."""

    ram_bytes: int = setting(
        2 << 30, "Byte budget of the RAM tier. Budgets count every level a chunk is held at: a "
        "put at q8 makes q7 .. q3 too (about 1.4x the chunk's fp16 size in all).", kind="size", lo=0,
    )
    disk_bytes: int = setting(
        20 << 30, "Byte budget of the disk tier; 0 turns the disk tier off. Keep it below the "
        "free space of the file system: when others fill it first, puts are kept in RAM "
        "(ram_only_puts) and our oldest files are evicted to make room.",
        kind="size", lo=0,
    )
    dir: Path = setting(Path("{state_dir}/store"), "Directory of the disk tier.")


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecSection:
    """[codec]: how chunks are cut and compressed."""

    level: str = setting(
        "q8", "Level at which put chunks are stored (exact, q8, q7, q6, q5, q4, q3)."
    )
    chunk_tokens: int = setting(
        256,
        "Tokens per chunk. Every node of a cluster must use the same value. At least 64: a "
        "lookup or fetch answers at most 65,536 chunks, for prompts of up to 4M tokens.",
        lo=64, hi=1 << 16,
    )

    def __post_init__(self) -> None:
        _check_level("codec.level", self.level, allow_empty=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSection:
    """[transport]: authenticated WebRTC sessions with the peers."""

    host: str | None = setting(
        None, "IP address of the signalling listener (never 0.0.0.0: only the LAN interface). "
        "Unset: the first address discovery advertises.", example="192.168.1.20",
    )
    port: int = setting(
        7457, "Port of the signalling listener (TCP) and of the discovery beacons (UDP, the same "
        "number): open both between the nodes (0: any free port).", lo=0, hi=65535,
    )
    advertise_addresses: tuple[str, ...] = setting(
        (), "Addresses put in this node's advertisement. Empty: those of discovery.interfaces."
    )
    psk_file: Path | None = setting(
        None, "File holding the cluster's pre-shared key: at least 64 hex digits (openssl rand -hex "
        "32), mode 0600. Peers without it are refused.",
        example="/etc/kvpeer/cluster.key",
    )
    next_psk_file: Path | None = setting(
        None, "The next cluster key (same format) while keys are rotated: accepted, and used with "
        "peers that hold it too. Once `kvpeer peers` shows key \"next\" for every peer, all "
        "hold it: make it psk_file and drop the old key (sessions by key: "
        "kvpeer_transport_events_total{event=\"sessions_key_next\"}).",
        example="/etc/kvpeer/cluster.next.key",
    )
    mtu: int = setting(
        0, "MTU toward the peers, to size SCTP packets: bytes (576-65536), or 0 or \"auto\": read "
        "from the interface that owns host.", kind="auto_int", lo=0, hi=65536,
    )
    connect_timeout_s: float = setting(10.0, "Seconds to open an authenticated session.", lo=0.001)
    request_timeout_s: float = setting(10.0, "Seconds to answer one peer request.", lo=0.001)
    heartbeat_interval_s: float = setting(0.5, "Seconds between session heartbeats.", lo=0.001)
    peer_dead_after_s: float = setting(
        2.0, "A session silent this long is closed and its peer reported down.", lo=0.001
    )
    allow_loopback: bool = setting(
        False, "Allow sessions over 127.0.0.0/8 (single-host setups only)."
    )
    max_message_bytes: int = setting(
        256 << 10, "Largest control message sent or accepted (at most 256KiB, the largest "
        "data-channel message aiortc accepts).", kind="size", lo=4096, hi=256 << 10,
    )
    max_blob_bytes: int = setting(
        256 << 20, "Largest encoded chunk served to or fetched from a peer.", kind="size", lo=1
    )
    max_transfers_per_peer: int = setting(
        16, "Blob transfers served to one peer at a time; more are answered BUSY.", lo=1, hi=1024
    )
    max_incoming_blob_bytes: int = setting(
        0, "Bytes of blobs arriving over one session at once (what a peer can make us buffer; "
        "at most two sessions per peer); a blob past it is refused BUSY and asked again. 0: 1GiB, "
        "or max_blob_bytes if larger.",
        kind="size", lo=0,
    )
    congestion_control: str = setting(
        "rate", "SCTP congestion control: \"rate\" (window from the measured delivery rate and "
        "min RTT; random loss does not shrink it) or \"reno\" (aiortc's: halves on every loss).",
        choices=("rate", "reno"),
    )

    def __post_init__(self) -> None:
        if 0 < self.mtu < 576:
            raise ConfigError(f"transport.mtu: must be 0 (auto) or 576-65536, got {self.mtu}")
        if self.heartbeat_interval_s * 2 > self.peer_dead_after_s:
            raise ConfigError("transport.heartbeat_interval_s: must be at most peer_dead_after_s / 2")
        for address in self.advertise_addresses:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ConfigError(
                    f"transport.advertise_addresses: {address!r} is not an IPv4 address"
                ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoverySection:
    """[discovery]: how peers are found (mapped onto kvpeer.discovery.DiscoveryConfig)."""

    backend: str = setting(
        "zeroconf", "zeroconf (mDNS on the LAN), static (static_peers) or etcd.",
        choices=("zeroconf", "static", "etcd"),
    )
    interfaces: tuple[str, ...] = setting(
        (), "Interface names or IPv4 addresses to advertise and listen on. Empty: every up "
        "interface except loopback and container bridges (those only when named)."
    )
    static_peers: tuple[str, ...] = setting((), "\"host:port\" of each peer (backend static).")
    etcd_endpoints: tuple[str, ...] = setting(
        ("http://127.0.0.1:2379",), "etcd client URLs (backend etcd)."
    )
    etcd_prefix: str = setting("/kvpeer/nodes/", "Key prefix of the advertisements in etcd.")
    etcd_lease_ttl_s: int = setting(
        10, "Seconds an etcd advertisement outlives a node that stopped refreshing it.", lo=2
    )
    update_min_interval_s: float = setting(
        1.0, "Advertisement updates are coalesced to at most one per this many seconds.", lo=0
    )
    peer_timeout_s: float = setting(
        10.0, "A peer not heard from for this long is dropped.", lo=0.001
    )
    heartbeat_interval_s: float = setting(
        2.5, "Seconds between discovery heartbeats (at most peer_timeout_s / 2; 0: off, static and etcd only).", lo=0
    )
    request_timeout_s: float = setting(
        3.0, "Seconds for one discovery request (zeroconf resolve, etcd call).", lo=0.001
    )

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s * 2 > self.peer_timeout_s:
            raise ConfigError("discovery.heartbeat_interval_s: must be at most peer_timeout_s / 2")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchSection:
    """[fetch]: defaults of the fetch pipeline (clients may ask for less per request)."""

    deadline_s: float = setting(
        0.0, "Default deadline of a fetch; what is not there by then is left to recompute. "
        "0: no deadline.", lo=0
    )
    min_level: str = setting(
        "q5", "Lowest codec level a fetch accepts unless the client asks otherwise. q5 keeps "
        "0.98 top-1 (next-token) agreement on SmolLM2 (README's codec table: 0.978 coded whole, "
        "0.982 as the daemon stores it); lower levels are for slow links. Empty: any level."
    )
    recompute_tokens_per_s: float = setting(
        0.0, "Local prefill speed, to judge fetch against recompute (a client's fetch may state "
        "its own). 0: learned from puts that state their prefill time; until then always fetch.",
        lo=0,
    )

    policy: str = setting(
        "adaptive", "How each chunk's level is chosen: \"adaptive\" (from measured bandwidth and "
        "the deadline) or \"fixed:LEVEL\" (always that level, e.g. \"fixed:q8\")."
    )

    def __post_init__(self) -> None:
        _check_level("fetch.min_level", self.min_level, allow_empty=True)
        if self.policy != "adaptive":
            if not self.policy.startswith("fixed:"):
                raise ConfigError(
                    f"fetch.policy: expected 'adaptive' or 'fixed:LEVEL', got {self.policy!r}"
                )
            _check_level("fetch.policy", self.policy.removeprefix("fixed:"), allow_empty=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSection:
    """[metrics]: Prometheus /metrics and /healthz over HTTP."""

    enabled: bool = setting(True, "Serve /metrics and /healthz.")
    host: str = setting(
        "127.0.0.1", "Listen address: an IP address, or a host name this machine resolves "
        "(\"localhost\"). Keep it on localhost unless scraped remotely.",
    )
    port: int = setting(9457, "Listen port (0: any free port).", lo=0, hi=65535)

    def __post_init__(self) -> None:
        # A padded env value (KVPEER_METRICS__HOST=" 127.0.0.1") resolves to nothing as given.
        object.__setattr__(self, "host", self.host.strip())
        if not self.enabled:
            return
        # An empty host (KVPEER_METRICS__HOST= left blank) binds every interface: say so
        # rather than expose /metrics to the LAN by accident.
        if not self.host:
            raise ConfigError(
                'metrics.host: empty; it would listen on every interface. Give "127.0.0.1" '
                '(this host only) or, to be scraped remotely, "0.0.0.0" or "::"'
            )
        # A bad address ("999.1.1.1", a typo'd name) passed, and the start only logged that it
        # runs without /metrics: a scrape target silently gone.
        _check_listen_host("metrics.host", self.host)


#: Seconds a host name's lookup may take at config load; a resolver that does not answer
#: (glibc waits ~20 s per nameserver) is taken as "not known yet", like EAI_AGAIN.
NAME_LOOKUP_S = 2.0


def _resolves_ipv4(host: str) -> bool:
    """Whether ``host`` resolves to an IPv4 address (what the metrics server binds for a
    name); False when the lookup did not end within :data:`NAME_LOOKUP_S`. Raises the
    lookup's error (gaierror, UnicodeError)."""
    outcome: list[BaseException | None] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=look_up, name="kvpeer-config-lookup", daemon=True)
    thread.start()
    thread.join(NAME_LOOKUP_S)
    if not outcome:
        return False
    if outcome[0] is not None:
        raise outcome[0]
    return True


def _check_listen_host(key: str, host: str) -> None:
    """ConfigError unless ``host`` is an IP address or a name this machine resolves now
    ("localhost", "vm", "ip6-localhost" from /etc/hosts: what a bind takes)."""
    if host.lower() == "localhost":
        return
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return
    try:
        if not _resolves_ipv4(host):  # a resolver that does not answer: as EAI_AGAIN
            return
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # no resolver yet (at boot): the name may be good
            return
        raise ConfigError(
            f"{key}: {host!r} is neither an IP address nor a name this machine resolves "
            f"({exc.strerror})"
        ) from None
    except UnicodeError:  # a label longer than 63: not a host name at all
        raise ConfigError(f"{key}: {host!r} is neither an IP address nor a host name") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSection:
    """[log]: what the daemon writes to stderr (the journal under systemd)."""

    level: str = setting("info", "debug, info, warning, error or critical.", choices=LOG_LEVELS)
    json: bool = setting(False, "One JSON object per line instead of text.")


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSection:
    """[daemon]: the process itself."""

    uvloop: bool = setting(True, "Use uvloop's event loop when it is installed.")
    shutdown_grace_s: float = setting(
        10.0, "Seconds a graceful shutdown may take before the rest is cancelled.", lo=0.001
    )
    watchdog: bool = setting(
        True, "Ping systemd's watchdog (when the unit sets WatchdogSec=). It is pinged even when "
        "false, with a warning: systemd kills a unit whose watchdog goes unpinged. To turn it "
        "off, set WatchdogSec=0 in the unit (systemctl edit kvpeer).",
    )
    torch_threads: int = setting(
        1, "Threads each torch operation may use (torch.set_num_threads); 0: torch's default, one "
        "per core. Chunks decode one after another beside the event loop, so on a small host "
        "more threads only contend with it (2 cores, 1 Gbit/s fetch: the daemon's CPU per fetch "
        "0.50 -> 0.38 s with 1, medians).", lo=0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration of one kvpeerd. Build it with :func:`load_config`."""

    node: NodeSection = field(default_factory=NodeSection)
    api: ApiSection = field(default_factory=ApiSection)
    store: StoreSection = field(default_factory=StoreSection)
    codec: CodecSection = field(default_factory=CodecSection)
    transport: TransportSection = field(default_factory=TransportSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    fetch: FetchSection = field(default_factory=FetchSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)

    def __post_init__(self) -> None:
        # Fill {state_dir}/{runtime_dir} in every path, so no consumer has to know the rule.
        places = {"{state_dir}": str(self.node.state_dir), "{runtime_dir}": str(self.node.runtime_dir)}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            changes = {}
            for sf in dataclasses.fields(section):
                value = getattr(section, sf.name)
                if isinstance(value, Path) and "{" in str(value):
                    value = changes[sf.name] = Path(_fill(str(value), places, f"{f.name}.{sf.name}"))
                if isinstance(value, Path) and not value.is_absolute():
                    home = " (~ is not expanded)" if str(value).startswith("~") else ""
                    raise ConfigError(
                        f"{f.name}.{sf.name}: {str(value)!r} is a relative path{home}, which would "
                        "depend on the directory kvpeerd starts in (/ under systemd): write it "
                        "absolute"
                    )
            if changes:
                object.__setattr__(self, f.name, dataclasses.replace(section, **changes))
        check_listeners_apart(self.metrics, self.transport.host, self.transport.port)

    def as_dict(self) -> dict[str, Any]:
        """The effective config as TOML-ready values (paths as strings, None left out)."""
        return _to_plain(self)

    def as_toml(self, source: str = "") -> str:
        """The effective config as TOML, documented, for ``kvpeerd --check-config``; ``source``
        (:func:`config_source`) becomes a comment under the header."""
        # A path may hold anything: one comment line of printable ASCII, as TOML takes back.
        said = "".join(c if c.isprintable() else repr(c)[1:-1] for c in source)
        said = said.encode("ascii", "backslashreplace").decode()
        header = "# kvpeer effective configuration" + (f"\n# {said}" if said else "")
        return _render(type(self), self, header=header)


# Hosts a listener takes a port on every address with ("::" too: Linux binds it dual-stack).
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _bind_address(host: str) -> str:
    """``host`` as a bind reads it, for comparing two listeners: an IP address in its canonical
    spelling ("localhost" is 127.0.0.1, as the metrics server binds it), else as written."""
    host = "127.0.0.1" if host.lower() == "localhost" else host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def check_listeners_apart(metrics: MetricsSection, transport_host: str | None,
                          transport_port: int) -> None:
    """ConfigError when /metrics would listen on the peers' signalling port and address.

    The metrics server starts first and took the port; the transport's bind then failed with
    "address already in use" blamed on transport.port alone. ``transport_host`` None (not
    chosen yet: the first advertised address) clashes only with a wildcard metrics.host.
    """
    if not metrics.enabled or not metrics.port or metrics.port != transport_port:
        return
    ours = _bind_address(metrics.host)
    theirs = None if transport_host is None else _bind_address(transport_host)
    if ours not in _WILDCARD_HOSTS and theirs not in _WILDCARD_HOSTS and ours != theirs:
        return
    where = transport_host if transport_host is not None else "unset: an address of this machine"
    raise ConfigError(
        f"metrics.port: {metrics.port} is transport.port too, and metrics.host {metrics.host!r} "
        f"overlaps transport.host ({where}): /metrics would take the port the peers connect to "
        "and the start fail with 'address already in use'; give metrics.port another port"
    )


def _fill(text: str, places: Mapping[str, str], key: str) -> str:
    for name, value in places.items():
        text = text.replace(name, value)
    if "{" in text or "}" in text:
        raise ConfigError(f"{key}: unknown placeholder in {text!r} (use {{state_dir}} or {{runtime_dir}})")
    return text


# ----------------------------------------------------------------------------- value parsing
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
MAX_SIZE = 1 << 62  # 4 EiB: past any disk or RAM, and still an int64
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
    "ti": 1 << 40, "tib": 1 << 40, "pi": 1 << 50, "pib": 1 << 50,
}


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "512MiB", "2GB", "1.5GiB"; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative size")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            size = float(match.group(1)) * _SIZE_UNITS[unit] if unit in _SIZE_UNITS else math.inf
            if size < MAX_SIZE:
                return int(size)
    raise ValueError("not a size")


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling of ``n`` bytes ("2GiB", "1536KiB", "100")."""
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _describe(tp: Any, kind: str) -> str:
    if kind == "size":
        return "a size like '2GiB'"
    if kind == "mode":
        return "a file mode like 0o660 or '0660'"
    if kind == "auto_int":
        return "an integer or 'auto'"
    if kind == "table":
        return "a table of lists of names, like { name = [\"a\", \"b\"] }"
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a, "") for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0], '')}s"
    names = {bool: "true or false", int: "an integer", float: "a finite number",
             str: "a string", Path: "a path"}
    return names.get(tp, str(tp))


def _coerce(tp: Any, kind: str, value: Any) -> Any:
    """``value`` (from TOML, or a str from the environment) as type ``tp``; ValueError if not."""
    if kind == "size":
        return parse_size(value)
    if kind == "auto_int":
        return 0 if value == "auto" else _coerce(int, "", value)
    if kind == "table":
        if not isinstance(value, Mapping):
            raise ValueError("not a table")
        pairs = []
        for name, members in value.items():
            members = _coerce(tuple[str, ...], "", members)
            if not name or not members or not all(member.strip() for member in members):
                raise ValueError("an empty name or list")
            pairs.append((name, members))
        return tuple(sorted(pairs))
    if kind == "mode":
        if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value):
            return int(value.removeprefix("0o"), 8)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("not a mode")
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, "", value)
            except ValueError:
                continue
        raise ValueError("no member of the union matches")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError("not one of the literals")
    if origin is tuple:
        if isinstance(value, str):  # from the environment: "a,b" (a TOML array is parsed earlier)
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError("not a list")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(item_tp, "", v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError("not a bool")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ValueError("not an int")
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        # TOML and the environment both spell nan and inf; no setting means either (a nan lease
        # made the reaper spin: every comparison with it is False).
        if number is not None and math.isfinite(number):
            return number
        raise ValueError("not a finite float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("not a string")
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise ValueError("not a path")
    raise TypeError(f"config type {tp!r} is not supported")  # a bug in a section, not in input


def _check_range(key: str, meta: Mapping[str, Any], value: Any, hint: str = "") -> None:
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, int | float):
            continue
        if lo is not None and number < lo:
            raise ConfigError(f"{key}: must be >= {lo:g}, got {number!r}{hint}")
        if hi is not None and number > hi:
            raise ConfigError(f"{key}: must be <= {hi:g}, got {number!r}{hint}")


def _mode_hint(raw: Any) -> str:
    """For a file mode out of range: TOML reads ``socket_mode = 777`` as decimal, not as chmod."""
    if isinstance(raw, int) and re.fullmatch(r"[0-7]{3}", str(raw)):
        return f' (a file mode is octal: write it as 0o{raw} or "0{raw}")'
    return ' (a file mode is octal, like 0o660 or "0660")'


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str, origin: Mapping[str, str]) -> T:
    """An instance of dataclass ``cls`` from ``raw``; ConfigError names the first bad key.

    ``origin`` maps dotted keys to where their value came from (an environment variable), for
    messages.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {raw!r}")
    hints = _hints(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        f = fields_by_name.get(name)
        if f is None:
            source = origin.get(key) or next(
                (name for dotted, name in origin.items() if dotted.startswith(key + ".")), None
            )
            where = f" (from {source})" if source else ""
            known = ", ".join(fields_by_name)
            raise ConfigError(f"{key}: unknown key{where}; known keys here: {known}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(typing.cast(type, tp), value, f"{key}.", origin)
            continue
        kind = f.metadata.get("kind", "")
        try:
            coerced = _coerce(tp, kind, value)
        except ValueError:
            where = f" (from {origin[key]})" if key in origin else ""
            raise ConfigError(f"{key}: expected {_describe(tp, kind)}, got {value!r}{where}") from None
        _check_range(key, f.metadata, coerced, _mode_hint(value) if kind == "mode" else "")
        values[name] = coerced
    return cls(**values)


# ----------------------------------------------------------------------------- loading
def load_config(path: Path | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Defaults, then the TOML file at ``path`` (default /etc/kvpeer/kvpeer.toml), then ``env``.

    Raises ConfigError (naming the key) for an unreadable or invalid file, an unknown key or a
    bad value. A node id left empty is derived here (see :func:`default_node_id`).
    """
    explicit = path is not None
    path = path if path is not None else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the decoder's error through
        raise ConfigError(
            f"config file {path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}): save it as UTF-8"
        ) from None
    origin: dict[str, str] = {}
    _apply_env(raw, env, origin)
    config = _build(Config, raw, "", origin)
    if not config.node.node_id:
        node = dataclasses.replace(config.node, node_id=default_node_id(config.node.state_dir))
        config = dataclasses.replace(config, node=node)
    return config


def config_source(path: Path | None = None, env: Mapping[str, str] = os.environ) -> str:
    """Where :func:`load_config` with these arguments takes its settings from, in words (for
    ``kvpeerd --check-config`` and the start log: a missing default file was silent)."""
    path = path if path is not None else DEFAULT_CONFIG_PATH
    where = f"from {path}" if path.exists() else f"no file at {path}: defaults"
    names = [n for n in sorted(env) if n.upper().startswith(ENV_PREFIX) and "__" in n]
    return where + (f"; from the environment: {', '.join(names)}" if names else "")


def config_warnings(config: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """Settings that are valid but have no effect as set, and ``KVPEER_*`` variables of ``env``
    that set nothing, one sentence each."""
    warnings = []
    if config.discovery.static_peers and config.discovery.backend != "static":
        warnings.append(
            f"discovery.static_peers is ignored: it only applies to backend = \"static\" "
            f'(backend is "{config.discovery.backend}")'
        )
    warnings.extend(_unused_env_warnings(env or {}))
    return warnings


#: ``KVPEER_*`` variables that are kvpeer's but no setting (the client's socket).
OTHER_ENV_NAMES = frozenset({"KVPEER_SOCKET"})


def _unused_env_warnings(env: Mapping[str, str]) -> list[str]:
    """A ``KVPEER_*`` variable without the double underscore (``KVPEER_STORE_RAM_BYTES``) was
    ignored without a word, the default kept; one with it is a key, checked at load."""
    warnings = []
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or "__" in name or name in OTHER_ENV_NAMES:
            continue
        meant = _setting_spelt_with_one_underscore(name[len(ENV_PREFIX):])
        hint = f"; did you mean {meant}?" if meant else ""
        warnings.append(
            f"{name} is not a kvpeer setting and is ignored (settings are "
            f"KVPEER_<SECTION>__<KEY>, two underscores after the section){hint}"
        )
    return warnings


def _setting_spelt_with_one_underscore(rest: str) -> str:
    """``KVPEER_STORE__RAM_BYTES`` for ``rest`` "STORE_RAM_BYTES"; "" if it spells no setting."""
    rest = rest.lower()
    for section in dataclasses.fields(Config):
        prefix = section.name + "_"
        if not rest.startswith(prefix):
            continue
        key = rest[len(prefix):]
        if key in {f.name for f in dataclasses.fields(_hints(Config)[section.name])}:
            return f"{ENV_PREFIX}{section.name.upper()}__{key.upper()}"
    return ""


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: dict[str, str]) -> None:
    """Merge ``KVPEER_SECTION__KEY`` variables into ``raw`` (in place)."""
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if any(not p for p in parts) or len(parts) < 2:
            raise ConfigError(f"{name}: expected KVPEER_<SECTION>__<KEY>")
        table = raw
        for part in parts[:-1]:
            nested = table.setdefault(part, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"{name}: {'.'.join(parts[:-1])} is not a section")
            table = nested
        table[parts[-1]] = _env_value(env[name])
        origin[".".join(parts)] = name


def _env_value(text: str) -> Any:
    """A TOML array or inline table if ``text`` is one ("[1, 2]", "{ a = [\"b\"] }"), else the text.

    The typed coercion that follows turns "7500" back into a string where a string is wanted.
    """
    if text.strip().startswith(("[", "{")):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return text


def default_node_id(state_dir: Path, *, machine_id_path: Path = MACHINE_ID_PATH,
                    hostname: Callable[[], str] = socket.gethostname) -> str:
    """A node id that stays the same across restarts.

    An id saved in ``state_dir`` wins; else one derived from /etc/machine-id and the host name
    (hashed: the machine id is meant to stay private); else a random id, saved in ``state_dir``
    when it is writable.
    """
    saved = state_dir / NODE_ID_FILE
    try:
        text = saved.read_text().strip()
        if _NODE_ID_RE.match(text):
            return text
        log.warning("ignoring malformed node id in %s", saved)
    except OSError:
        pass
    host = re.sub(r"[^A-Za-z0-9-]", "-", hostname().split(".")[0])[:40].strip("-") or "node"
    try:
        machine = machine_id_path.read_text().strip()
    except OSError:
        machine = ""
    if machine:
        digest = hashlib.blake2b(f"{machine}\0{host}".encode(), digest_size=4).hexdigest()
        return f"{host}-{digest}"
    node_id = f"{host}-{secrets.token_hex(4)}"
    try:
        # Atomically: a crash mid-write would leave an empty file, and the node a new identity.
        write_text_atomically(saved, node_id + "\n")
    except OSError as exc:
        log.warning("cannot save the generated node id in %s (%s); it will change on restart",
                    saved, exc.strerror or exc)
    return node_id


# ----------------------------------------------------------------------------- rendering
def _plain(value: Any, kind: str) -> Any:
    if kind == "table":
        return {name: list(members) for name, members in value}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v, "") for v in value]
    if kind == "size" and isinstance(value, int):
        return format_size(value)
    return value


def _to_plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _to_plain(value)
        elif value is not None:
            out[f.name] = _plain(value, f.metadata.get("kind", ""))
    return out


def toml_value(value: Any, kind: str = "") -> str:
    """``value`` as a TOML literal (``kind="mode"`` writes an octal file mode)."""
    if kind == "mode" and isinstance(value, int):
        return f"0o{value:o}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _wrap(doc: str, width: int = 96) -> list[str]:
    lines: list[str] = []
    line = "#"
    for word in doc.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line += " " + word
    lines.append(line)
    return lines


def _render(cls: type, instance: Any | None, header: str) -> str:
    """TOML for dataclass ``cls``: values of ``instance``, or the raw defaults when None."""
    out = [header]
    for section_field in dataclasses.fields(cls):
        section_cls = _hints(cls)[section_field.name]
        section = getattr(instance, section_field.name) if instance is not None else None
        out.append("")
        doc = (section_cls.__doc__ or "").strip()
        doc = doc.split(": ", 1)[1] if doc.startswith("[") else doc
        out.extend(_wrap(doc[:1].upper() + doc[1:]))
        out.append(f"[{section_field.name}]")
        for f in dataclasses.fields(section_cls):
            kind = f.metadata.get("kind", "")
            value = getattr(section, f.name) if section is not None else f.default
            out.extend(_wrap(f.metadata.get("doc", "")))
            if value is None:
                out.append(f"# {f.name} = {toml_value(f.metadata.get('example') or '')}")
            else:
                out.append(f"{f.name} = {toml_value(_plain(value, kind), kind)}")
    return "\n".join(out) + "\n"


def example_toml() -> str:
    """The documented example file (systemd/kvpeer.example.toml): every setting, its default."""
    return _render(
        Config,
        None,
        header=(
            "# kvpeer configuration: /etc/kvpeer/kvpeer.toml (kvpeerd --config PATH to use another).\n"
            "# Every setting with its default. Any key can be overridden from the environment as\n"
            "# KVPEER_<SECTION>__<KEY>, e.g. KVPEER_STORE__RAM_BYTES=4GiB. Sizes: bytes or \"512MiB\";\n"
            "# durations: seconds. Paths are absolute, or start with {state_dir} or {runtime_dir}.\n"
            "# Generated by `python -m kvpeer.config --example`; `kvpeerd --check-config` prints\n"
            "# the effective configuration."
        ),
    )


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kvpeer.config",
        description="Print the effective kvpeer configuration (defaults, the file, then KVPEER_* "
        "variables) as documented TOML, or the example file. kvpeerd --check-config checks more: "
        "key files, interfaces, users and groups.",
    )
    parser.add_argument(
        "path", nargs="?", type=Path, help=f"TOML config file (default {DEFAULT_CONFIG_PATH}, if present)"
    )
    parser.add_argument(
        "--example", action="store_true",
        help="print every setting with its default (systemd/kvpeer.example.toml)",
    )
    args = parser.parse_args(argv)
    if args.example:
        sys.stdout.write(example_toml())
        return 0
    try:
        sys.stdout.write(load_config(args.path).as_toml(config_source(args.path)))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
