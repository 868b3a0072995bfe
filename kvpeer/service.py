"""Running kvpeerd as a service: systemd notification, the watchdog, signals and logging set-up.

Owns :class:`SystemdNotifier` (the sd_notify datagram protocol: READY=1, STATUS=, WATCHDOG=1,
STOPPING=1; a no-op without ``NOTIFY_SOCKET``), its watchdog pinger, :class:`ShutdownSignals`
(SIGTERM/SIGINT/SIGHUP -> a graceful-shutdown event; a second SIGINT forces the exit; SIGHUP
ignored in a systemd service's main process) and
:func:`configure_logging` (one ``dictConfig`` for the whole process: text or JSON lines, no
timestamps under journald). It knows nothing of the daemon's parts: the CLI wires them.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import logging.config
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# Libraries that log every packet at DEBUG; kept at WARNING unless kvpeer itself logs at DEBUG.
NOISY_LIBRARIES = ("aioice", "aiortc", "zeroconf", "av", "urllib3")


# ----------------------------------------------------------------------------- systemd
class SystemdNotifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset.

    Failures to send are logged once and otherwise ignored: a notification is never worth
    stopping the daemon for (systemd's own timeouts handle a daemon that cannot reach it).
    """

    def __init__(self, env: Mapping[str, str] = os.environ, *, watchdog: bool = True) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address if address.startswith(("/", "\0")) else ""
        if address and not self._address:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a Unix socket path", address)
        self._socket: socket.socket | None = None
        self._warned = False
        self.watchdog_interval_s = _watchdog_interval(env)
        if not watchdog and self.watchdog_interval_s is not None:
            # systemd kills a unit whose watchdog goes unpinged; not pinging cannot turn it off.
            log.warning(
                "daemon.watchdog = false is overridden: systemd set a %gs watchdog for this "
                "process (WatchdogSec=), so it is pinged anyway; set WatchdogSec=0 in the unit "
                "to turn it off",
                self.watchdog_interval_s,
            )

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was sent."""
        if not self._address:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)  # never stall the event loop on a full queue
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s", self._address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def ping_watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def watchdog_loop(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog every WATCHDOG_USEC / 2 from the event loop, until cancelled.

        Driven by the loop on purpose: a loop that stops turning stops the pings, and systemd
        restarts the daemon. ``healthy`` can veto a ping. Returns at once when systemd set no
        watchdog for this process.
        """
        if not self.enabled or not self.watchdog_interval_s:
            return
        period = self.watchdog_interval_s / 2
        log.debug("pinging the systemd watchdog every %.2fs", period)
        while True:
            if healthy is None or healthy():
                self.ping_watchdog()
            else:
                log.warning("not pinging the systemd watchdog: unhealthy")
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds of systemd's watchdog timeout for this process, or None if there is none."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):  # meant for another process
        return None
    return usec / 1e6


# ----------------------------------------------------------------------------- signals
class ShutdownSignals:
    """SIGTERM, SIGINT or SIGHUP starts a graceful shutdown; a second SIGINT forces the exit.

    SIGHUP is what a foreground kvpeerd gets when its terminal or ssh session goes: without a
    handler it died on the spot (no goodbye to peers, queued store writes not drained).
    Run as a service (see :func:`is_service_main_process`) there is no terminal to lose, so a
    SIGHUP is a ``kill -HUP`` meant as a reload: it is ignored with a WARNING. Stopping on it
    exited 0, which ``Restart=on-failure`` takes for a wanted stop: the node stayed down.
    There is no reload; the log line says so either way.

    ``force_exit`` defaults to ``os._exit``: when the graceful path is stuck, nothing that still
    runs Python code (``sys.exit`` unwinding into the same stuck awaits) can be trusted.
    """

    def __init__(
        self,
        force_exit: Callable[[int], Any] = os._exit,
        *,
        env: Mapping[str, str] = os.environ,
        has_terminal: Callable[[], bool] | None = None,
    ) -> None:
        self._event = asyncio.Event()
        self._force_exit = force_exit
        self.as_service = is_service_main_process(env, has_terminal)
        self._installed: list[signal.Signals] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received: signal.Signals | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup: a hang-up is meant to pass it by
            loop.add_signal_handler(sig, self._on_signal, sig)
            self._installed.append(sig)

    def uninstall(self) -> None:
        if self._loop is not None:
            for sig in self._installed:
                self._loop.remove_signal_handler(sig)
        self._installed.clear()

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def trigger(self) -> None:
        """Start a graceful shutdown from code (as SIGTERM would)."""
        self._event.set()

    async def wait(self) -> signal.Signals | None:
        """Wait for the first shutdown request; returns its signal (None: :meth:`trigger`)."""
        await self._event.wait()
        return self.received

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._event.is_set():
            if sig == signal.SIGINT:
                log.warning("second SIGINT: exiting now")
                logging.shutdown()
                self._force_exit(128 + sig)
            else:
                # Silence read as "ignored, stuck": say the stop goes on, and how to force it.
                log.info("%s: already shutting down gracefully (within daemon.shutdown_grace_s; "
                         "SIGINT forces the exit)", sig.name)
            return
        if sig == signal.SIGHUP and self.as_service:
            log.warning("SIGHUP ignored: kvpeerd has no reload; restart it to apply config "
                        "changes (systemctl restart kvpeer)")
            return
        if sig == signal.SIGHUP:
            log.info("SIGHUP: shutting down gracefully (kvpeerd has no reload: restart it to apply "
                     "a changed configuration)")
        else:
            log.info("%s: shutting down gracefully", sig.name)
        self.received = sig
        self._event.set()


def is_service_main_process(
    env: Mapping[str, str] = os.environ, has_terminal: Callable[[], bool] | None = None
) -> bool:
    """Whether this process is the main process of a systemd service (no terminal to lose).

    ``SYSTEMD_EXEC_PID`` (systemd >= 248) names the service's main process: only our own pid
    counts. ``INVOCATION_ID`` and ``NOTIFY_SOCKET`` are no proof: both are inherited by every
    process a service starts (a CI runner's shells, ``systemd-run -t``), where a foreground
    kvpeerd must still stop when its terminal hangs up. Without ``SYSTEMD_EXEC_PID`` (an older
    systemd), ``NOTIFY_SOCKET`` and no controlling terminal count as a service.
    """
    exec_pid = env.get("SYSTEMD_EXEC_PID")
    if exec_pid:
        return exec_pid == str(os.getpid())
    if not env.get("NOTIFY_SOCKET"):
        return False
    return not (has_terminal or has_controlling_terminal)()


def has_controlling_terminal() -> bool:
    """Whether this process has a controlling terminal (one whose hang-up sends it SIGHUP)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:  # ENXIO: none
        return False
    os.close(fd)
    return True


# ----------------------------------------------------------------------------- logging
def under_journald(env: Mapping[str, str] = os.environ) -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = env.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        dev, ino = (int(part) for part in stream.split(":"))
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# syslog priorities, which journald reads from a "<N>" line prefix
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


def journal_prefix(level: str, env: Mapping[str, str] = os.environ) -> str:
    """``<N>``, the syslog priority of ``level`` ("ERROR", ...), when stderr is the journal;
    else "". For the lines written before :func:`configure_logging` runs."""
    return f"<{_PRIORITY.get(level, 6)}>" if under_journald(env) else ""


class JournalFormatter(logging.Formatter):
    """Text without a timestamp (journald adds its own), prefixed with the syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = _PRIORITY.get(record.levelname, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines()) or f"<{priority}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (unless under journald), level, logger, message, extras."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {}
        if self.timestamps:
            out["ts"] = datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            )
        out.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage())
        for name, value in vars(record).items():  # fields passed with extra={...}
            if name not in self._STANDARD and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(
    level: str = "info",
    json_lines: bool = False,
    journald: bool | None = None,
    stream: Any = None,
) -> None:
    """Configure the root logger once for the whole process (stderr).

    ``journald`` None: detected from JOURNAL_STREAM. Under journald lines carry no timestamp
    and start with the syslog priority, so ``journalctl -p warning`` works.
    """
    if journald is None:
        journald = under_journald()
    level_name = level.upper()
    if level_name not in _PRIORITY:
        raise ValueError(f"unknown log level {level!r}")
    if json_lines:
        formatter: dict[str, Any] = {"()": JsonFormatter, "timestamps": not journald}
    elif journald:
        formatter = {"()": JournalFormatter, "format": "%(levelname)s %(name)s: %(message)s"}
    else:
        formatter = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    numeric = logging.getLevelNamesMapping()[level_name]
    library_level = logging.INFO if numeric == logging.DEBUG else max(numeric, logging.WARNING)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"main": formatter},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "main",
                    "stream": stream if stream is not None else sys.stderr,
                }
            },
            "root": {"level": level_name, "handlers": ["stderr"]},
            "loggers": {name: {"level": library_level} for name in NOISY_LIBRARIES},
        }
    )
