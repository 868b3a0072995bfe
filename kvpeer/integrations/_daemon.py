"""How engine integrations wait for the local daemon: a connection of their own with its own
timeout (:class:`DaemonConnection`), and a back-off after the daemon failed to answer
(:class:`Backoff`). An engine must never wait on a daemon that is down, restarting or hung for
longer than it set out to: what the daemon does not give in time is recomputed.

No torch, no engine imports.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from kvpeer.api.client import KVPeerClient
from kvpeer.errors import ApiError, ErrorCode

# Past a fetch's deadline, how long the daemon may take to say what it restored before the engine
# stops waiting for it (the answer is due at the deadline; this covers a busy event loop).
ANSWER_GRACE_S = 1.0


@dataclass(slots=True)
class Backoff:
    """Whether to call the daemon now: after it failed to answer, not for ``backoff_s`` (a
    call would only wait for its timeout again), then one call tries. Time is passed in."""

    backoff_s: float
    _retry_at: float | None = None

    def allows(self, now: float) -> bool:
        return self._retry_at is None or now >= self._retry_at

    def retrying(self, now: float) -> bool:
        """True once the back-off is over but nothing has succeeded since: the next call is a trial."""
        return self._retry_at is not None and now >= self._retry_at

    def failed(self, now: float) -> bool:
        """Back off from ``now``; True if the daemon was answering until now (worth a warning)."""
        first = self._retry_at is None
        self._retry_at = now + self.backoff_s
        return first

    def succeeded(self) -> bool:
        """Stop backing off; True if it was (worth saying the daemon is back)."""
        was_backing_off = self._retry_at is not None
        self._retry_at = None
        return was_backing_off


# After a daemon refused a request field as unknown (it predates the field), how long calls go
# without it. Not for the engine's life: the daemon may be upgraded under it, and a client
# reconnects after a restart without a failure that would say so. A call that can fall back
# without the field (a fetch, a lookup, a save that copied the whole prompt) tries it again then;
# one that cannot (a save that copied only the rows past kv_from) waits until such a try shows
# the daemon takes it.
ASK_AGAIN_S = 300.0


class RefusedFields:
    """The request fields the daemon refused as unknown, and when. Shared by an integration's
    threads; time is passed in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused_at: dict[str, float] = {}

    def takes(self, name: str, now: float) -> bool:
        """Whether a call that can fall back without field ``name`` sends it: never refused (or
        taken since), or refused :data:`ASK_AGAIN_S` ago or more (a try)."""
        with self._lock:
            refused_at = self._refused_at.get(name)
        return refused_at is None or now - refused_at >= ASK_AGAIN_S

    def confirmed(self, name: str) -> bool:
        """Whether a call that cannot fall back sends ``name``: never refused, or taken since."""
        with self._lock:
            return name not in self._refused_at

    def accepted(self, name: str) -> None:
        """The daemon answered a call with ``name`` without refusing it."""
        with self._lock:
            self._refused_at.pop(name, None)

    def refused(self, name: str, now: float) -> bool:
        """The daemon refused ``name`` at ``now``; True unless it was refused already and not
        taken since (worth saying)."""
        with self._lock:
            first = name not in self._refused_at
            self._refused_at[name] = now
        return first


def refused_field(exc: ApiError, name: str) -> bool:
    """``exc`` is a daemon older than request field ``name`` refusing it (unknown fields)."""
    return exc.code == ErrorCode.INVALID and "unknown fields" in exc.reason and name in exc.reason


def daemon_away(exc: BaseException) -> bool:
    """Whether ``exc`` says the daemon is not answering (down, restarting, hung), rather than
    that it turned this one request down."""
    return isinstance(exc, ApiError) and exc.code in (ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN)


class DaemonConnection:
    """A client of the daemon with its own timeout, made on first use and again after
    :meth:`drop`: the daemon may be down when the engine starts, or restart. Hold ``lock`` to use it
    (the blocking client serves one call at a time)."""

    def __init__(self, socket_path: str, namespace: str, *, timeout_s: float, client_name: str) -> None:
        self.lock = threading.Lock()
        self._socket_path = socket_path
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._client_name = client_name
        self._client: KVPeerClient | None = None
        self._aborted = False

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def client(self) -> KVPeerClient:
        """The client, connected now if it is not (ApiError if the daemon cannot be reached)."""
        if self._aborted:
            raise ApiError(ErrorCode.SHUTTING_DOWN, "the connector is shutting down")
        if self._client is None:
            try:
                self._client = KVPeerClient(self._socket_path, namespace=self._namespace,
                                            timeout_s=self._timeout_s, client_name=self._client_name)
            except OSError as exc:
                raise ApiError(ErrorCode.SHUTTING_DOWN,
                               f"cannot reach the daemon at {self._socket_path}: {exc}") from None
            if self._aborted:  # abort() came while this connected, and found nothing to abort
                self.drop()
                raise ApiError(ErrorCode.SHUTTING_DOWN, "the connector is shutting down")
        return self._client

    def abort(self) -> None:
        """From another thread, without the lock, for good: a call blocked on this connection
        fails now (its thread then drops the connection), and none connects again."""
        self._aborted = True
        client = self._client
        if client is not None:
            client.abort()

    def drop(self) -> None:
        """Close the connection, giving up what is in flight on it (the daemon frees a fetch's
        segment when the connection goes); the next :meth:`client` connects again."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @contextlib.contextmanager
    def dropped_on_timeout(self) -> Iterator[None]:
        """Drop the connection when the daemon times out inside: a fetch handle's release would
        otherwise wait a second timeout for the fetch's answer."""
        try:
            yield
        except ApiError as exc:
            if exc.code == ErrorCode.TIMEOUT:
                self.drop()
            raise
