"""Command lines: ``kvpeerd`` (the daemon) and ``kvpeer`` (a client of the local daemon).

Owns argument parsing, process set-up (logging, event loop, signals, systemd notification) and
printing. No logic of the daemon or of the protocol lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import faulthandler
import functools
import importlib.util
import json
import logging
import os
import pickle
import re
import resource
import socket
import stat
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kvpeer import __version__, aio
from kvpeer.config import LOG_LEVELS
from kvpeer.errors import ApiError, ConfigError, ErrorCode, KVPeerError, NotReadyError

if TYPE_CHECKING:
    from kvpeer.transport.config import TransportConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

DAEMON_EPILOG = """\
examples:
  kvpeerd                                   run with /etc/kvpeer/kvpeer.toml (if present)
  kvpeerd --config ./kvpeer.toml            run with another config file
  kvpeerd --check-config                    validate and print the effective config, then exit
  KVPEER_TRANSPORT__PORT=7500 kvpeerd       override one key from the environment

Settings are documented in systemd/kvpeer.example.toml. Under systemd (Type=notify) the daemon
reports READY=1 once its socket, store and discovery are up, and pings the watchdog.
"""

CLIENT_EPILOG = """\
examples:
  kvpeer status                             is the local daemon up, how many peers and chunks
  kvpeer peers --json                       peers discovered on the LAN, as JSON
  kvpeer lookup --tokens prompt.tokens --model model.json
  kvpeer fetch --tokens prompt.tokens --model model.json --out kv.pt
  kvpeer put --tokens prompt.tokens --model model.json --kv kv.pt
  kvpeer stats                              every counter of the local daemon
  kvpeer evict --all                        delete every cached chunk, in RAM and on disk

--tokens: a file of token ids (whitespace-separated integers, or .npy).
--model: a JSON file with the model fingerprint fields (name, layers, kv_heads, head_dim,
dtype, ...); `kvpeer fingerprint [MODEL.gguf] > model.json` writes one for a local model.
The socket is --socket, else $KVPEER_SOCKET (unless empty), else /run/kvpeer/kvpeer.sock.
"""


# ---------------------------------------------------------------------------- kvpeerd
def daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpeerd",
        description="kvpeer daemon: shares the KV cache of prompt prefixes with the peers of a LAN.",
        epilog=DAEMON_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML config file (default /etc/kvpeer/kvpeer.toml)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config, print it, and exit"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    parser.add_argument(
        "--log-level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
        help=f"override log.level ({', '.join(LOG_LEVELS)})",
    )
    parser.add_argument("--version", action="version", version=f"kvpeerd {__version__}")
    return parser


def daemon_main(argv: Sequence[str] | None = None) -> int:
    from kvpeer.config import config_source, config_warnings, load_config
    from kvpeer.service import configure_logging

    args = daemon_parser().parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        _say("ERROR", f"config error: {exc}")
        return EXIT_CONFIG
    source = config_source(args.config, os.environ)
    if args.check_config:
        try:
            transport = check_start_config(config)
        except ConfigError as exc:
            _say("ERROR", f"config error: {exc}")
            return EXIT_CONFIG
        if not address_is_here(transport.host):  # valid: at boot it may come later
            _say(
                "WARNING",
                f"WARNING: transport.host {transport.host} is not an address of this machine "
                "(yet): a start exits 1 and systemd tries again until it is",
            )
        if config.store.disk_bytes and on_read_only_fs(config.store.dir):
            _say(
                "WARNING",
                f"WARNING: store.dir {config.store.dir} is on a read-only file system: the "
                "daemon would run on the RAM tier only (under the kvpeer unit, a store.dir "
                "outside /var/lib/kvpeer needs ReadWritePaths=)",
            )
        too_big = store_larger_than_disk(config.store.dir, config.store.disk_bytes)
        if too_big:
            _say("WARNING", f"WARNING: {too_big}")
        if transport.keyless_risk is not None:  # a valid config: still exit 0
            from kvpeer.transport.config import KEYLESS_RISK

            level = logging.getLevelName(transport.keyless_risk)
            _say(level, f"{level}: {KEYLESS_RISK}")
        for warning in config_warnings(config, os.environ):
            _say("WARNING", f"WARNING: {warning}")
        print(config.as_toml(source), end="")
        return 0
    try:
        preflight(config)
    except ConfigError as exc:
        _say("ERROR", f"config error: {exc}")
        return EXIT_CONFIG
    enable_faulthandler()
    configure_logging(args.log_level or config.log.level, json_lines=config.log.json)
    log.info("config: %s", source)
    for warning in config_warnings(config, os.environ):
        log.warning("%s", warning)
    too_big = store_larger_than_disk(config.store.dir, config.store.disk_bytes)
    if too_big:
        log.warning("%s", too_big)
    limit_torch_threads(config.daemon.torch_threads)
    raise_open_file_limit()
    use_uvloop = config.daemon.uvloop and not args.no_uvloop
    try:
        return _run(_serve(config), use_uvloop)
    except NotReadyError as exc:  # right config, machine not there yet: systemd starts again
        log.error("not ready: %s", exc)
        return 1
    except ConfigError as exc:  # found while building or starting the daemon: as bad as at load
        log.error("config error: %s", exc)
        return EXIT_CONFIG
    except KVPeerError as exc:
        log.error("kvpeerd failed: %s", exc)
        return 1


def _say(level: str, text: str) -> None:
    """A line to stderr before logging is set up: under journald it starts with the syslog
    priority, as the log lines after it do (``journalctl -p err`` showed none of these)."""
    from kvpeer.service import journal_prefix

    print(f"{journal_prefix(level)}kvpeerd: {text}", file=sys.stderr)


def check_start_config(config: Any) -> TransportConfig:
    """Make the config checks that building and starting the daemon make, and start nothing;
    returns the transport's config (with its keys).

    Reads the psk files, resolves discovery.interfaces to addresses and looks up
    api.socket_group and the users and groups of api.namespaces, with the daemon's own
    functions, so --check-config fails on what start would. Raises ConfigError naming the key.
    """
    from kvpeer.api.server import resolve_namespaces
    from kvpeer.config import check_listeners_apart
    from kvpeer.daemon import discovery_config, transport_config
    from kvpeer.discovery.config import advertisable_addresses, check_advertised

    # As Discovery.start does, whatever transport.advertise_addresses says: with those set, a
    # typo'd interface passed here and the start failed on it, again and again.
    allowed = advertisable_addresses(config.discovery.interfaces)
    check_advertised(config.transport.advertise_addresses, allowed)
    # As Daemon.__init__ does: the first address is the signalling host's default.
    addresses = config.transport.advertise_addresses or allowed
    transport = transport_config(config, default_host=addresses[0])
    # Again with the host chosen: at load an unset transport.host was not known yet.
    check_listeners_apart(config.metrics, transport.host, transport.port)
    discovery_config(config)
    preflight(config)
    resolve_namespaces(config.api.namespaces)
    if config.store.disk_bytes:
        check_store_dir(config.store.dir, config.node.state_dir)
    check_socket_dir(config.api.socket_path, config.node.runtime_dir)
    return transport


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what creating ``path`` writes into)."""
    while path.parent != path:
        try:
            os.stat(path)
        except OSError:  # missing, or under a directory this user may not search
            path = path.parent
        else:
            break
    return path


def on_read_only_fs(path: Path) -> bool:
    """Whether ``path`` (or, if it does not exist yet, the ancestor it would be created in) is
    on a read-only file system: a store.dir there leaves the store on its RAM tier (EROFS)."""
    try:
        return bool(os.statvfs(_nearest_existing(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def store_larger_than_disk(store_dir: Path, disk_bytes: int) -> str:
    """A warning when ``disk_bytes`` exceeds the whole file system holding ``store_dir`` (the
    20 GiB default on a small disk): the budget is never reached, a full disk comes first. ""
    when it fits, or the file system cannot be read."""
    try:
        found = os.statvfs(_nearest_existing(store_dir))
    except OSError:
        return ""
    total = found.f_blocks * found.f_frsize
    if not disk_bytes or not total or disk_bytes <= total:
        return ""
    return (
        f"store.disk_bytes ({_approx_size(disk_bytes)}) is larger than the file system holding "
        f"store.dir {store_dir} ({_approx_size(total)} in all): the store will hit a full disk "
        "before its budget (puts then stay in RAM and its oldest files are evicted); lower "
        "store.disk_bytes below the space it may use"
    )


def _approx_size(n: int) -> str:
    """``n`` bytes to one decimal in the largest binary unit it reaches ("19.5 GiB")."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_store_dir(store_dir: Path, state_dir: Path | None = None) -> None:
    """ConfigError when this user cannot create or write ``store_dir`` where the file system
    is writable: the store's start then fails with EACCES, exit 2. (A read-only file system
    is not an error: the store runs on its RAM tier, see :func:`on_read_only_fs`.) Not
    checked while ``state_dir`` itself does not exist yet: on a fresh install the unit's
    StateDirectory= makes it, the daemon's own, at the first start."""
    target = _nearest_existing(store_dir)
    if state_dir is not None and target in state_dir.parents:
        return
    if os.access(target, os.W_OK | os.X_OK) or on_read_only_fs(store_dir):
        return
    where = "" if target == store_dir else f" ({target}, where it would be created, is not writable by this user)"
    raise ConfigError(
        f"store.dir: cannot open the disk store: store directory {store_dir}: permission "
        f"denied{where}; a start exits 2 (give the directory to the daemon's user, or choose "
        "another store.dir)"
    )


def check_socket_dir(socket_path: Path, runtime_dir: Path) -> None:
    """ConfigError when this user cannot create the API socket's directory or make files in it:
    the start then failed with EACCES (exit 2), naming neither the key nor the path. Unlike the
    store's, a read-only file system is an error too: the API has no fallback. Not checked while
    ``runtime_dir``, which holds it, does not exist yet: the unit's RuntimeDirectory= makes it,
    the daemon's own, at each start."""
    directory = socket_path.parent
    target = _nearest_existing(directory)
    if directory.is_relative_to(runtime_dir) and target in runtime_dir.parents:
        return
    if os.access(target, os.W_OK | os.X_OK):
        return
    why = "is on a read-only file system" if on_read_only_fs(target) else "is not writable by this user"
    if target == directory:
        problem = f"{directory} {why}"
    else:
        problem = f"{directory} does not exist, and {target}, where it would be created, {why}"
    raise ConfigError(
        f"api.socket_path: cannot create the local API socket {socket_path}: {problem}; a start "
        "exits 2 (give the directory to the daemon's user, or choose another api.socket_path)"
    )


def preflight(config: Any) -> None:
    """What the config asks of this install and this user, checked before anything starts (by
    --check-config and by a real start alike): each used to fail half-way through the start with
    a traceback or a message naming the wrong key, exit 1, and systemd restarting it forever."""
    from kvpeer.api.server import resolve_group

    if config.discovery.backend == "etcd":
        if not _has_module("aetcd"):
            raise ConfigError(
                'discovery.backend = "etcd" needs the etcd extra: pip install "kvpeer[etcd]"'
            )
        from kvpeer.discovery.etcd import parse_endpoint

        for endpoint in config.discovery.etcd_endpoints:
            parse_endpoint(endpoint)
    socket_path = os.fsencode(config.api.socket_path)
    if len(socket_path) > UNIX_PATH_MAX:  # the bind failed with "AF_UNIX path too long"
        raise ConfigError(
            f"api.socket_path: {config.api.socket_path} is {len(socket_path)} bytes long; a Unix "
            f"socket's path may have at most {UNIX_PATH_MAX}"
        )
    gid = resolve_group(config.api.socket_group)
    if gid is not None and os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(
            f"api.socket_group: this user is not in group {config.api.socket_group!r}, so it "
            "cannot give the socket to it (add the user to the group; under systemd "
            "SupplementaryGroups= in `systemctl edit kvpeer`)"
        )


# sun_path of struct sockaddr_un is 108 bytes on Linux, the terminating NUL included.
UNIX_PATH_MAX = 107


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def address_is_here(host: str) -> bool:
    """Whether ``host`` is an address of this machine now (a bind to it works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def enable_faulthandler() -> None:
    """Have a fatal signal print every thread's stack to stderr (the journal). systemd's
    watchdog kills a stuck daemon with SIGABRT: without this, nothing said where it was stuck."""
    if sys.stderr is None:  # started with stderr closed (kvpeerd 2>&-): nowhere to print
        return
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (ValueError, OSError, RuntimeError) as exc:  # a stderr without a file descriptor
        log.debug("faulthandler not enabled: %s", exc)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now.
    Connections, segments and the descriptors handed to clients all count against it, and a
    daemon started by hand gets the shell's 1024 (the unit sets LimitNOFILE=65536)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.debug("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


def limit_torch_threads(threads: int) -> None:
    """Cap torch's intra-op threads for this process (0: leave torch's default)."""
    if threads:
        import torch  # the codec imported it already

        torch.set_num_threads(threads)


def _run(main: Coroutine[Any, Any, int], use_uvloop: bool) -> int:
    run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    if use_uvloop:
        # Only the import is guarded: an ImportError raised by the daemon itself is its own.
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using asyncio's event loop")
        else:
            run = uvloop.run
    return int(run(main))


# Exit status for a problem a restart cannot fix (config, or the machine not matching it); the
# unit's RestartPreventExitStatus= names it, so systemd stops retrying and says "failed".
EXIT_CONFIG = 2

# OSErrors at start that can clear by themselves: exit 1, and systemd's Restart= tries again.
# Any other (port taken, no permission) waits for a person.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.ENOBUFS, errno.ENOMEM, errno.ENETDOWN, errno.ENETUNREACH,
     errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}  # the last: an address not assigned *yet* at boot
)

# What the daemon was doing, by the module an OSError came from, and the keys that decide it.
_START_STEPS = (
    ("kvpeer.transport", "listen for peers (transport.host, transport.port)"),
    ("kvpeer.api", "open the local API socket (api.socket_path)"),
    ("kvpeer.discovery", "start discovery ([discovery])"),
    ("kvpeer.store", "open the disk store (store.dir)"),
    ("kvpeer.shm", "set up shared memory (/dev/shm)"),
)


# Steps' keys whose value the line shows, given the config: a bind's EACCES names no path.
_SHOWN_KEYS = ("api.socket_path",)


def start_failure(exc: OSError, config: Any = None) -> tuple[str, int]:
    """One line saying what the daemon could not do at start and why, and the exit status."""
    what = "start"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        for prefix, step in _START_STEPS:
            if module == prefix or module.startswith(prefix + "."):
                what = step  # the innermost kvpeer frame wins
    for key in _SHOWN_KEYS if config is not None else ():
        value = functools.reduce(getattr, key.split("."), config)
        what = what.replace(f"({key})", f"({key} = {value})")
    # A TimeoutError (an OSError without errno: zeroconf's registration, a slow network) is a
    # busy or slow LAN, not a config error; its text is often empty.
    transient = exc.errno in _TRANSIENT_ERRNOS or isinstance(exc, TimeoutError)
    return f"cannot {what}: {str(exc) or type(exc).__name__}", 1 if transient else EXIT_CONFIG


async def _serve(config: Any, make_daemon: Callable[[Any], Any] | None = None) -> int:
    from kvpeer.service import ShutdownSignals, SystemdNotifier

    notifier = SystemdNotifier(watchdog=config.daemon.watchdog)
    signals = ShutdownSignals()
    signals.install(asyncio.get_running_loop())
    try:
        if make_daemon is None:
            from kvpeer.daemon import Daemon, open_store

            # Listing a large store, or waiting for a predecessor's lock, takes seconds.
            store = await _in_thread_unless_stopped(lambda: open_store(config), signals)
            if store is None:
                notifier.stopping("stopped while starting")
                return 0
            daemon = Daemon(config, store=store)
        else:
            daemon = make_daemon(config)
    except OSError as exc:
        message, status = start_failure(exc, config)
        log.error("%s", message)
        return status
    chosen = getattr(getattr(daemon, "transport", None), "config", None)
    if chosen is not None:  # an unset transport.host is chosen now: load could not check it
        from kvpeer.config import check_listeners_apart

        check_listeners_apart(config.metrics, chosen.host, chosen.port)
    endpoint = _start_metrics(config, daemon)  # before start(): /healthz answers 503 meanwhile
    try:
        try:
            started = await _start_unless_stopped(daemon, signals)
        except OSError as exc:  # a one-line reason, not a traceback through the event loop
            message, status = start_failure(exc, config)
            log.error("%s", message)
            return status
        if not started:
            notifier.stopping("stopped while starting")
            return 0
        notifier.ready(f"serving {len(daemon.inventory)} chunks")
        async with asyncio.TaskGroup() as tasks:
            watchdog = tasks.create_task(notifier.watchdog_loop())
            await signals.wait()
            notifier.stopping()
            watchdog.cancel()
    finally:
        try:
            await aio.wait_for(daemon.stop(), timeout=config.daemon.shutdown_grace_s)
        except TimeoutError:
            log.warning("shutdown took longer than %.0fs; exiting anyway", config.daemon.shutdown_grace_s)
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
    return 0


async def _in_thread_unless_stopped(work: Callable[[], T], signals: Any) -> T | None:
    """``work()`` in a thread of its own, unless a shutdown request comes first: then None, at
    once (``work`` must not return None). The thread cannot be stopped: it is a daemon thread,
    left to end with the process, so ``work`` must leave nothing half-done that matters (opening
    the store: its lock wait, its listing, the removal of interrupted writes). Not the default
    executor: asyncio.run waits for that one's threads before it returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if done.done():  # cancelled: nobody waits for it
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)  # type: ignore[arg-type]  # work() returned it

    def run() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = work()
        except BaseException as exc:  # handed to the loop, raised there
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="kvpeerd-open", daemon=True).start()
    stop = asyncio.create_task(signals.wait(), name="kvpeerd-stop-request")
    try:
        await asyncio.wait((done, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if done.done():  # its value or error wins over a stop request that came with it
        return done.result()
    log.info("stopped while starting")
    done.cancel()  # a result that comes later is dropped: the process is ending
    return None


async def _start_unless_stopped(daemon: Any, signals: Any) -> bool:
    """Run ``daemon.start()`` unless a shutdown request comes first, which cancels it.

    True when the daemon started and no request came meanwhile (then, and only then, READY=1
    may be sent). A start can take a while (the GPU probe, a large store); SIGTERM must not
    wait for it, nor be followed by a READY that says the opposite.
    """
    start = asyncio.create_task(daemon.start(), name="kvpeerd-start")
    stop = asyncio.create_task(signals.wait(), name="kvpeerd-stop-request")
    try:
        await asyncio.wait((start, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (start, stop):
            task.cancel()
        await asyncio.wait((start, stop))
    if not start.cancelled() and start.exception() is not None:
        start.result()  # the start's own error wins over a stop request that came with it
    if signals.triggered:
        log.info("stopped while starting")
        return False
    return True


def _start_metrics(config: Any, daemon: Any) -> Any:
    """Serve /metrics and /healthz when [metrics] enabled; a taken port is logged, not fatal."""
    if not config.metrics.enabled:
        return None
    metrics = daemon.metrics
    try:
        return metrics.start_http(
            config.metrics.host, config.metrics.port, lambda: daemon.ready, daemon.degraded
        )
    except OSError as exc:
        reason = f"cannot listen on {config.metrics.host}:{config.metrics.port} ({exc.strerror or exc})"
        log.error("metrics: %s; running without /metrics and /healthz", reason)
        daemon.metrics_unavailable = reason  # `kvpeer status` lists it under degraded
        return None


# ---------------------------------------------------------------------------- kvpeer
# status, peers and stats only read counters: a daemon that does not answer them within a few
# seconds is stuck, and a shell or a health check should not wait the 60 s of a fetch.
READ_ONLY_TIMEOUT_S = 5.0
READ_ONLY_COMMANDS = ("status", "peers", "stats")
TIMEOUT_HELP = (
    f"seconds to wait for the daemon (default {READ_ONLY_TIMEOUT_S:g} for status, peers and "
    "stats; 60 for the others)"
)

SOCKET_HELP = (
    "the daemon's socket, its api.socket_path (default $KVPEER_SOCKET, unless unset or empty, "
    "else /run/kvpeer/kvpeer.sock)"
)
NAMESPACE_HELP = "tenant namespace (default: default)"
GLOBAL_NAMESPACE_HELP = (
    "tenant namespace of lookup, fetch and put (default: default); the other commands ignore it"
)
TOKENS_HELP = "file of token ids: whitespace-separated integers, or a NumPy .npy array"
MODEL_HELP = "JSON model fingerprint (`kvpeer fingerprint` writes one)"
# kvpeer.codec.LEVELS, most faithful first: importing kvpeer.codec imports torch, a second
# or more that `kvpeer status` should not wait. A test keeps the two the same.
CODEC_LEVELS = ("exact", "q8", "q7", "q6", "q5", "q4", "q3")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _socket_path(text: str) -> str:
    # An empty --socket (a variable that was not set) meant the default socket without a word.
    if not text:
        raise argparse.ArgumentTypeError(
            "an empty path (leave --socket out for $KVPEER_SOCKET or /run/kvpeer/kvpeer.sock)"
        )
    return text


def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpeer",
        description="Talk to the local kvpeer daemon over its Unix socket.",
        epilog=CLIENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", type=_socket_path, metavar="PATH", help=SOCKET_HELP)
    parser.add_argument("--namespace", help=GLOBAL_NAMESPACE_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--timeout", type=_seconds, metavar="S", help=TIMEOUT_HELP)
    parser.add_argument("--version", action="version", version=f"kvpeer {__version__}")
    # The same options after the command too (`kvpeer peers --json`); SUPPRESS keeps the one
    # given before. --namespace only after the commands it means something to.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", type=_socket_path, metavar="PATH", default=argparse.SUPPRESS, help=SOCKET_HELP
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    common.add_argument(
        "--timeout", type=_seconds, metavar="S", default=argparse.SUPPRESS, help=TIMEOUT_HELP
    )
    tenant = argparse.ArgumentParser(add_help=False, parents=[common])
    tenant.add_argument("--namespace", default=argparse.SUPPRESS, help=NAMESPACE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # description=: `kvpeer NAME --help` says what NAME does, as `kvpeer --help` does
        return sub.add_parser(name, parents=parents, help=text, description=text)

    command("status", "is the daemon up: ready, degraded reasons, peers, chunks (--json: all of "
            "stats)", common)
    command("peers", "peers the daemon knows, one a line", common)
    command("stats", "all of the daemon's counters", common)
    lookup = command("lookup", "how many of a prompt's first tokens have their KV cached, here or "
                     "at a peer", tenant)
    fetch = command("fetch", "fetch the KV of a prompt's longest cached prefix into a file", tenant)
    put = command("put", "store a prompt's KV, read from a file, for this node and its peers",
                  tenant)
    for cmd in (lookup, fetch, put):
        cmd.add_argument("--tokens", type=Path, required=True, help=TOKENS_HELP)
        cmd.add_argument("--model", type=Path, required=True, help=MODEL_HELP)
    fetch.add_argument("--out", type=Path, required=True, help="write k, v here (torch.save)")
    fetch.add_argument(
        "--deadline", type=float, metavar="S",
        help="seconds before falling back to recompute (default: the daemon's fetch.deadline_s, "
        "none unless set)",
    )
    fetch.add_argument(
        "--min-level", choices=CODEC_LEVELS, metavar="LEVEL",
        help=f"least faithful codec level to accept: {', '.join(CODEC_LEVELS)} (most faithful "
        "first; default: the daemon's fetch.min_level, q5 unless set)",
    )
    fetch.add_argument(
        "--recompute-rate", type=float, metavar="TOKENS_PER_S",
        help="how fast this client prefills; the daemon stops fetching where recomputing "
        "is quicker",
    )
    put.add_argument("--kv", type=Path, required=True, help="torch.save'd (k, v) tensors")
    put.add_argument(
        "--level", choices=CODEC_LEVELS, metavar="LEVEL",
        help=f"codec level to store: {', '.join(CODEC_LEVELS)} (default: the daemon's "
        "codec.level, q8 unless set)",
    )
    fingerprint = command(
        "fingerprint", "print a local model's fingerprint JSON (for --model); no daemon needed"
    )
    fingerprint.add_argument(
        "model_path", nargs="?", help="GGUF file or transformers directory (default: SmolLM2)"
    )
    fingerprint.add_argument(
        "--revision", default="",
        help="keeps this model apart from others of its name and shape (as kvpeer_revision does "
        "for the engines; the same on every engine of the model)",
    )
    evict = command(
        "evict", "delete this node's cached chunks, of every namespace: from memory, and their "
        "files from the disk store (peers learn they are gone)", common,
    )
    evict.add_argument(
        "--all", action="store_true", required=True, help="delete every chunk, its disk files too"
    )
    return parser


def _read_tokens(path: Path) -> Any:
    import numpy as np

    try:
        if path.suffix == ".npy":
            return np.load(path).astype(np.int64)
        return np.array(path.read_text().split(), dtype=np.int64)
    except (OSError, ValueError, TypeError, OverflowError) as exc:
        raise SystemExit(f"kvpeer: bad tokens file {path} (token ids, whitespace apart, or .npy): {exc}") from exc


def _read_kv(path: Path) -> tuple[Any, Any]:
    import torch

    try:
        kv = torch.load(path, weights_only=True)  # a KV file is tensors: nothing else unpickled
    except OSError as exc:
        raise SystemExit(f"kvpeer: bad KV file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch.load raises what its unpickler meets: all mean a bad file
        raise SystemExit(f"kvpeer: bad KV file {path}: {NOT_KV} ({_why_unloadable(exc)})") from exc
    try:
        k, v = kv
    except (TypeError, ValueError):
        k = v = None
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        raise SystemExit(f"kvpeer: bad KV file {path}: {NOT_KV} ({_what_it_holds(kv)})")
    return k, v


NOT_KV = "not a torch.save'd (k, v) pair of tensors"


def _why_unloadable(exc: Exception) -> str:
    """Why torch.load refused a file, in a few words. Its own message is a paragraph advising a
    load with weights_only=False: unsafe for a file of unknown origin, and no option of ours."""
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)  # a NumPy array, say
    if refused:
        return f"it holds {refused.group(1)}, which is not a tensor"
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if "weights_only" in text or isinstance(exc, pickle.UnpicklingError):
        return "not a file that torch.save wrote"
    return _one_line(exc).split(". ")[0]


def _what_it_holds(obj: Any) -> str:
    """What a loaded KV file holds instead of (k, v): "a dict", "a tuple of Tensor, int"."""
    kind = type(obj).__name__
    if not isinstance(obj, tuple | list):
        return f"it holds a {kind}"
    if not obj:
        return f"it holds an empty {kind}"
    items = ", ".join(type(item).__name__ for item in obj[:4]) + (", ..." if len(obj) > 4 else "")
    return f"it holds a {kind} of {items}"


def _check_writable(path: Path) -> None:
    """Before a fetch, not after it: the output's directory exists and takes files."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SystemExit(f"kvpeer: cannot write {path}: {parent} is not a writable directory")


def _read_fingerprint(path: Path) -> Any:
    from kvpeer.hashing import ModelFingerprint

    try:
        fields = json.loads(path.read_text())
        _check_fingerprint_fields(fields)
        return ModelFingerprint(**fields)
    except (OSError, ValueError, TypeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SystemExit(f"kvpeer: bad model fingerprint file {path}: {why}") from exc


def _check_fingerprint_fields(fields: Any) -> None:
    """The fields a fingerprint file lacks or has too many, named (the dataclass said "__init__()
    missing 1 required keyword-only argument")."""
    from kvpeer.hashing import ModelFingerprint

    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object, got {type(fields).__name__} (`kvpeer fingerprint` writes one)")
    known = {f.name: f for f in dataclasses.fields(ModelFingerprint)}
    missing = [name for name, f in known.items()
               if name not in fields and f.default is dataclasses.MISSING]
    unknown = sorted(set(fields) - set(known))
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"unknown {', '.join(unknown)}"] if unknown else [])
    if problems:
        raise ValueError(f"{'; '.join(problems)} (`kvpeer fingerprint` writes a complete one)")


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    elif isinstance(result, dict):
        lines = _text_lines(result)
        if lines:
            print("\n".join(lines))
    elif isinstance(result, list):
        for item in result:
            print(item)
    else:
        print(result)


def _text_lines(result: dict[str, Any], indent: str = "") -> list[str]:
    """``key: value`` lines; a nested dict as its own lines, indented under its key."""
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.extend(_text_lines(value, indent + "  "))
        elif isinstance(value, list | tuple) and any(" " in str(item) for item in value):
            lines.append(f"{indent}{key}:")  # sentences (degraded reasons): one a line
            lines.extend(f"{indent}  - {item}" for item in value)
        else:
            lines.append(f"{indent}{key}: {_text_value(value)}")
    return lines


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or (isinstance(value, dict | list | tuple | str) and not value):
        return "none"
    if isinstance(value, list | tuple):  # per chunk (sources, levels): runs, "local x3, b x2"
        runs: list[list[Any]] = []
        for item in value:
            if runs and runs[-1][0] == item:
                runs[-1][1] += 1
            else:
                runs.append([item, 1])
        return ", ".join(str(item) if count == 1 else f"{item} x{count}" for item, count in runs)
    return str(value)


# The keys of the stats that `kvpeer status` prints (`kvpeer stats` prints them all).
STATUS_KEYS = ("node_id", "ready", "degraded", "peers", "chunks")

# What a peer's "key" says (kvpeer.transport.peer.PeerTransport.session_key).
_KEY_STATES = {
    None: "no session yet",
    "none": "none (this node has no cluster key: unauthenticated)",
}


def _peer_line(peer: dict[str, Any]) -> str:
    """One line per peer: id, where, how much it holds, which cluster key our session uses."""
    port = peer.get("port", "?")
    addresses = ", ".join(f"{address}:{port}" for address in peer.get("addresses") or ()) or "?"
    # A daemon from before the key column says nothing of it: unknown, not "no session".
    key = _KEY_STATES.get(peer["key"], peer["key"]) if "key" in peer else "?"
    return f"{peer.get('node_id', '?')}  {addresses}  {peer.get('chunks', '?')} chunks  key: {key}"


def client_main(argv: Sequence[str] | None = None) -> int:
    from kvpeer.api.client import KVPeerClient, default_socket_path

    args = client_parser().parse_args(argv)
    if args.command == "fingerprint":
        return _fingerprint_command(args)
    # status, stats, peers and evict concern no namespace: no hello (a user whom api.namespaces
    # gives no "default" can still ask them, whatever --namespace says).
    namespace = None
    if args.command in ("lookup", "fetch", "put"):
        namespace = args.namespace or "default"
    timeout_s = args.timeout
    if timeout_s is None and args.command in READ_ONLY_COMMANDS:
        timeout_s = READ_ONLY_TIMEOUT_S
    options = {} if timeout_s is None else {"timeout_s": timeout_s}
    try:
        client = KVPeerClient(socket_path=args.socket, namespace=namespace, **options)
    except (OSError, KVPeerError) as exc:
        if isinstance(exc, ApiError) and exc.code == ErrorCode.FORBIDDEN:
            print(f"kvpeer: the daemon refused: {exc.reason}", file=sys.stderr)
        else:
            socket_path = args.socket or default_socket_path()
            print(f"kvpeer: cannot reach the daemon at {socket_path}: "
                  f"{_why_unreachable(exc, socket_path, args)}", file=sys.stderr)
        return 1
    try:
        with client:
            return _client_command(client, args)
    except (OSError, KVPeerError) as exc:
        print(f"kvpeer {args.command}: {exc}{_wait_longer(exc, args)}", file=sys.stderr)
        return 1


POINT_AT_THE_SOCKET = "set KVPEER_SOCKET or --socket to its api.socket_path"


def _why_unreachable(exc: BaseException, socket_path: str, args: argparse.Namespace) -> str:
    """Why connecting failed, and what to do about it."""
    found = _not_a_socket(socket_path) if isinstance(exc, OSError) else ""
    if found:  # connect() says "Connection refused", as if a daemon had died
        return f"it is {found}, not kvpeerd's socket ({POINT_AT_THE_SOCKET})"
    return f"{exc}{_wait_longer(exc, args)}{_not_there(exc)}{_not_allowed(exc, socket_path)}"


def _not_a_socket(path: str) -> str:
    """What is at ``path`` when that is not a socket ("a directory"); "" for a socket or nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISSOCK(mode):
        return ""
    return "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "a special file"


def _not_there(exc: BaseException) -> str:
    """For a socket that is missing or that nobody listens on: where the daemon may be."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return f" (is kvpeerd running? {POINT_AT_THE_SOCKET})"
    return ""


def _not_allowed(exc: BaseException, socket_path: str) -> str:
    """For EACCES: who may connect (the socket's group), and how to be one of them."""
    if not isinstance(exc, PermissionError):
        return ""
    try:
        found = os.stat(socket_path)
    except OSError:  # its directory is closed to this user
        return " (this user may not reach the socket's directory: run as the daemon's user or root)"
    group = _group_name(found.st_gid)
    return (
        f" (the socket is mode {stat.S_IMODE(found.st_mode):04o}, group {group}: this user must be "
        f"in group {group} (`sudo usermod -aG {group} $USER`, then log in again) or run as root)"
    )


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:  # a group without a name here: its number is all there is
        return str(gid)


def _wait_longer(exc: BaseException, args: argparse.Namespace) -> str:
    """For a timeout: how to wait longer (status, peers and stats give up after 5 s)."""
    timed_out = isinstance(exc, TimeoutError) or (
        isinstance(exc, ApiError) and exc.code == ErrorCode.TIMEOUT
    )
    if not timed_out:
        return ""
    return f" (a busy daemon may answer later: wait longer with `kvpeer {args.command} --timeout S`)"


def _client_command(client: Any, args: argparse.Namespace) -> int:
    if args.command == "stats" or (args.command == "status" and args.json):
        _print(client.stats(), args.json)  # status --json: every stat, as it always did
    elif args.command == "status":
        stats = client.stats()
        _print({key: stats[key] for key in STATUS_KEYS if key in stats}, False)
    elif args.command == "peers":
        peers = client.peers()
        if args.json:
            _print(peers, True)
        else:
            if peers:
                print("\n".join(map(_peer_line, peers)))
            else:  # for people; stdout stays one line per peer (`| wc -l`)
                print("no peers", file=sys.stderr)
    elif args.command == "lookup":
        tokens, fingerprint = _read_tokens(args.tokens), _read_fingerprint(args.model)
        result = client.lookup(tokens, fingerprint)
        _print(_answer(result, args.json), args.json)
    elif args.command == "fetch":
        import torch
        from tqdm import tqdm

        tokens = _read_tokens(args.tokens)
        fingerprint = _read_fingerprint(args.model)
        _check_writable(args.out)
        available = client.lookup(tokens, fingerprint)
        expected = available.matched_tokens // max(available.chunk_tokens, 1)
        show = not args.json and sys.stderr.isatty()
        with client.fetch(
            tokens, fingerprint, deadline_s=args.deadline, min_level=args.min_level,
            recompute_tokens_per_s=args.recompute_rate,
        ) as result, tqdm(total=expected, unit="chunk", disable=not show) as bar:
            for index in range(expected):
                if not result.wait_for_chunk(index):
                    break
                bar.update(1)
            try:
                torch.save((result.k.clone(), result.v.clone()), args.out)
            except (OSError, RuntimeError) as exc:  # RuntimeError: torch's own writer failing
                raise SystemExit(f"kvpeer: cannot write {args.out}: {exc}") from exc
            summary = {
                "matched_tokens": result.matched_tokens,
                "levels": list(result.levels),
                "recompute_from": result.recompute_from,
                "out": str(args.out),
            }
        _print(summary, args.json)
        if summary["matched_tokens"] < available.matched_tokens:  # 0 and rc 0 said nothing
            print(
                f"kvpeer fetch: {summary['matched_tokens']} of the {available.matched_tokens} "
                "tokens held were restored; the daemon's log says why (a --min-level no holder "
                "has, the deadline, holders failing)", file=sys.stderr,
            )
    elif args.command == "put":
        k, v = _read_kv(args.kv)
        tokens, fingerprint = _read_tokens(args.tokens), _read_fingerprint(args.model)
        result = client.put(tokens, k, v, fingerprint, level=args.level)
        _warn_of_kv_past_the_tokens(args.kv, k, len(tokens))
        _print(_answer(result, args.json), args.json)
    elif args.command == "evict":
        _print(client.evict_all(), args.json)
    return 0


def _warn_of_kv_past_the_tokens(path: Path, k: Any, tokens: int) -> None:
    """The put stores the KV of the given tokens only; the rest of a longer KV (an engine's may
    cover the tokens it generated too) was dropped without a word."""
    held = k.shape[2] if k.dim() == 4 else tokens
    if held > tokens:
        print(f"kvpeer put: warning: {path} holds the KV of {held} tokens, --tokens gives "
              f"{tokens}: only the first {tokens} tokens' KV is stored", file=sys.stderr)


def _answer(result: Any, as_json: bool) -> dict[str, Any]:
    """An answer's fields; the request id (which JSON has always carried) only in JSON."""
    fields = dataclasses.asdict(result)
    if not as_json:
        fields.pop("id", None)
    return fields


def _fingerprint_command(args: argparse.Namespace) -> int:
    """Print the fingerprint JSON of a local model (what --model takes)."""
    try:
        from kvpeer.models import load_model, model_fingerprint
    except ImportError as exc:
        print(f'kvpeer fingerprint: needs the transformers extra: pip install "kvpeer[transformers]" '
              f"({exc})", file=sys.stderr)
        return 1
    if args.model_path is not None and not os.path.exists(args.model_path):
        # transformers took it for a hub repository: a 15-line traceback about huggingface.co
        print(f"kvpeer fingerprint: no such file or directory: {args.model_path} (a model on the "
              "hub: download it first)", file=sys.stderr)
        return 1
    if args.model_path is not None and os.path.isdir(args.model_path) and not os.path.exists(
        os.path.join(args.model_path, "config.json")
    ):
        print(f"kvpeer fingerprint: {args.model_path} is not a transformers model directory (no "
              "config.json); give the directory a model was saved to, or a .gguf file", file=sys.stderr)
        return 1
    try:
        model, _ = load_model(args.model_path)
        fingerprint = model_fingerprint(model, revision=args.revision)
    except Exception as exc:  # not a model, or not one it can read (a truncated GGUF: struct.error)
        print(f"kvpeer fingerprint: cannot load {args.model_path or 'SmolLM2'}: {_one_line(exc)}",
              file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(fingerprint)))
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, without terminal colours (torch and transformers
    write essays)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(daemon_main())
