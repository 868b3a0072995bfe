"""Prometheus metrics of one daemon, and the HTTP endpoint serving /metrics and /healthz.

Owns :class:`Metrics` (every kvpeer metric, in a registry of its own per daemon so tests and
several daemons in one process never share counters) and :class:`HttpEndpoint` (a small
threaded HTTP server: ``/metrics`` in the Prometheus text format, ``/healthz`` 200 once the
daemon is ready and 503 before). It measures nothing itself: the daemon, fetcher, codec calls
and transport record into it. Label values that peers control are bounded (see
:data:`MAX_PEER_LABELS`) so a busy LAN cannot grow the registry without limit.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MAX_PEER_LABELS = 256  # distinct peer label values; later peers are counted as "other"
# The fetcher's reasons (complete, recompute, deadline, unavailable, error), "miss": nothing of
# the prefix was held anywhere, and "cancelled": the client went away or the API gave up on it.
FETCH_OUTCOMES = ("complete", "recompute", "deadline", "unavailable", "error", "miss", "cancelled")
# Why a chunk some node held was not restored (a fetch's reason, when it left chunks out).
SKIP_REASONS = ("recompute", "deadline", "unavailable", "error", "split")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _StoreCollector(Collector):
    """Store gauges and counters read from ``ChunkStore.stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            s = self._stats()
        except Exception:  # a scrape must not fail because the store is closing
            log.debug("store stats unavailable", exc_info=True)
            return []
        used = GaugeMetricFamily("kvpeer_store_bytes", "Bytes held by the chunk store", labels=["tier"])
        limit = GaugeMetricFamily("kvpeer_store_limit_bytes", "Byte budget of each store tier", labels=["tier"])
        entries = GaugeMetricFamily("kvpeer_store_entries", "Chunk files/blobs held per tier", labels=["tier"])
        for tier in ("ram", "disk"):
            used.add_metric([tier], s.get(f"{tier}_bytes", 0))
            limit.add_metric([tier], s.get(f"{tier}_limit", 0))
            entries.add_metric([tier], s.get(f"{tier}_entries", 0))
        chunks = GaugeMetricFamily("kvpeer_store_chunks", "Distinct chunk keys held", value=s.get("chunks", 0))
        events = CounterMetricFamily(
            "kvpeer_store_events", "Store events since start", labels=["event"]
        )
        for event in ("hits", "misses", "puts", "ram_evictions", "disk_evictions", "corrupt",
                      "disk_errors", "disk_read_errors", "ram_only_puts"):
            events.add_metric([event], s.get(event, 0))
        down = GaugeMetricFamily(
            "kvpeer_store_disk_unavailable",
            "1 when the configured disk tier could not be opened at start (running on RAM only)",
            value=1 if s.get("disk_unavailable") else 0,
        )
        failing = GaugeMetricFamily(
            "kvpeer_store_disk_failing",
            "1 while puts skip a disk whose last write failed (they are kept in RAM meanwhile)",
            value=1 if s.get("disk_failing") else 0,
        )
        stuck = GaugeMetricFamily(
            "kvpeer_store_disk_stuck_files",
            "Chunk files eviction could not remove on a working disk (passed over, tried again later)",
            value=s.get("disk_stuck_files", 0),
        )
        return [used, limit, entries, chunks, events, down, failing, stuck]


class _EventsCollector(Collector):
    """A subsystem's own counters (a name -> count mapping) as ``kvpeer_<name>_events_total``."""

    def __init__(self, subsystem: str, counters: Callable[[], Mapping[str, int]]) -> None:
        self._name = f"kvpeer_{subsystem}_events"
        self._help = f"Event counters of the {subsystem} since start"
        self._counters = counters

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._help, labels=["event"])
        try:
            items = sorted(dict(self._counters()).items())
        except Exception:  # a scrape must not fail because a subsystem is closing
            log.debug("%s unavailable", self._name, exc_info=True)
            items = []
        for event, count in items:
            family.add_metric([str(event)], float(count))
        return [family]


def _tolerant(name: str, read: Callable[[], int]) -> Callable[[], float]:
    """A gauge function that reads NaN, not an exception, when ``read`` fails: it runs in the
    HTTP thread while the event loop changes what it reads, and one failing gauge must not turn
    the whole scrape into a 500 (as :class:`_StoreCollector` does for the store)."""

    def value() -> float:
        try:
            return float(read())
        except Exception:
            log.debug("%s unavailable", name, exc_info=True)
            return float("nan")

    return value


class Metrics:
    """Every metric of one kvpeerd, in its own registry."""

    def __init__(self, *, node_id: str = "", version: str = "", process: bool = True) -> None:
        # No `_created` series: a twin of every counter and histogram, with the same help text,
        # that dashboards do not use and operators read as more counters. (Process-wide in
        # prometheus_client: only kvpeerd builds these metrics.)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge("kvpeer_info", "Constant 1, labelled with the node id and version",
                          ["node_id", "version"], registry=r)
        self.info.labels(node_id, version).set(1)
        self.ready = Gauge("kvpeer_ready", "1 once the daemon serves requests", registry=r)
        self.fetches = Counter("kvpeer_fetches", "Fetch requests by outcome", ["outcome"], registry=r)
        for outcome in FETCH_OUTCOMES:
            self.fetches.labels(outcome)  # export zeros, so rate() works from the start
        self.chunk_hits = Counter(
            "kvpeer_chunk_hits", "Chunks served to local clients, by source (local, peer)",
            ["source"], registry=r,
        )
        self.chunk_misses = Counter(
            "kvpeer_chunk_misses", "Chunks asked for that no node held (left to recompute)",
            registry=r,
        )
        self.chunk_skips = Counter(
            "kvpeer_chunk_skips",
            "Chunks some node held that a fetch left to recompute, by why: recompute (faster than "
            "fetching), deadline, unavailable (their holders failed), error, split (the client "
            "prefilled them while the rest was fetched)",
            ["reason"], registry=r,
        )
        for reason in SKIP_REASONS:
            self.chunk_skips.labels(reason)
        self.prefix_tokens = Counter(
            "kvpeer_prefix_tokens", "Prefix tokens by result (matched, recompute)", ["result"],
            registry=r,
        )
        self.bytes_in = Counter(
            "kvpeer_peer_received_bytes", "Encoded bytes received from peers", ["peer", "level"],
            registry=r,
        )
        self.bytes_out = Counter(
            "kvpeer_peer_sent_bytes", "Encoded bytes sent to peers", ["peer", "level"], registry=r
        )
        self.encode_seconds = Histogram(
            "kvpeer_codec_encode_seconds", "Time to encode one chunk", ["level"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decode_seconds = Histogram(
            "kvpeer_codec_decode_seconds", "Time to decode one chunk", ["level"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.transfer_seconds = Histogram(
            "kvpeer_transfer_seconds", "Time to receive one chunk from a peer", ["level"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.fetch_seconds = Histogram(
            "kvpeer_fetch_seconds",
            "Time to answer one fetch request, finding the holders included (misses and "
            "cancelled fetches too)",
            buckets=FETCH_BUCKETS, registry=r,
        )
        self.peers_up = Gauge("kvpeer_peers_up", "Peers currently known and alive", registry=r)
        self.peer_sessions = Gauge(
            "kvpeer_peer_sessions", "Peers with an open authenticated session", registry=r
        )
        self.peers_unreachable = Gauge(
            "kvpeer_peers_unreachable",
            "Known peers whose last connect failed (not dialled again until their backoff ends)",
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._peers: set[str] = set()
        self._peers_lock = threading.Lock()

    # ------------------------------------------------------------------ recording helpers
    def peer_label(self, peer_id: str) -> str:
        """``peer_id`` as a label value, or "other" once MAX_PEER_LABELS peers were seen."""
        with self._peers_lock:
            if peer_id in self._peers:
                return peer_id
            if len(self._peers) < MAX_PEER_LABELS:
                self._peers.add(peer_id)
                return peer_id
        return "other"

    def received(self, peer_id: str, level: str, n_bytes: int) -> None:
        self.bytes_in.labels(self.peer_label(peer_id), level).inc(n_bytes)

    def sent(self, peer_id: str, level: str, n_bytes: int) -> None:
        self.bytes_out.labels(self.peer_label(peer_id), level).inc(n_bytes)

    def record_fetch(
        self, outcome: Any, *, wanted_chunks: int, chunk_tokens: int, seconds: float | None = None
    ) -> None:
        """Count one finished fetch from the fetcher's ``FetchOutcome`` and its event timeline.

        ``wanted_chunks``: full chunks of the client's prefix, whether held anywhere or not; the
        fetch set out to restore ``outcome.requested`` of them (those some node held). The rest
        are misses; held ones not restored are skips, by the fetch's reason. ``seconds``: the
        request's time, from its arrival (default: the fetcher's own time).

        A cancelled fetch answered nobody: its bytes and its time count, its chunks do not.
        """
        self.fetches.labels(outcome.reason).inc()
        self.fetch_seconds.observe(outcome.elapsed_s if seconds is None else seconds)
        requested: dict[int, float] = {}
        decoding: dict[int, float] = {}
        from_peers: set[int] = set()
        for event in outcome.events:
            if event.kind == "request":
                requested[event.index] = event.t
            elif event.kind == "received" and event.peer:
                from_peers.add(event.index)
                self.received(event.peer, event.level, event.nbytes)
                if event.index in requested:
                    self.transfer_seconds.labels(event.level).observe(event.t - requested[event.index])
            elif event.kind == "decode_start":
                decoding[event.index] = event.t
            elif event.kind == "decode_end" and event.index in decoding:
                self.decode_seconds.labels(event.level or "unknown").observe(event.t - decoding[event.index])
        if outcome.reason == "cancelled":
            return
        restored_from_peers = len([i for i in from_peers if 0 <= i < outcome.chunks])
        self.chunk_hits.labels("peer").inc(restored_from_peers)
        self.chunk_hits.labels("local").inc(max(0, outcome.chunks - restored_from_peers))
        head = outcome.head  # a split fetch's chunks, left to the client
        if head:
            self.chunk_skips.labels("split").inc(head)
        self.chunk_misses.inc(max(0, wanted_chunks - head - max(outcome.requested, outcome.chunks)))
        skipped = outcome.requested - outcome.chunks
        if skipped > 0:
            self.chunk_skips.labels(outcome.reason).inc(skipped)
        self.prefix_tokens.labels("matched").inc(outcome.chunks * chunk_tokens)
        self.prefix_tokens.labels("recompute").inc(max(0, wanted_chunks - outcome.chunks) * chunk_tokens)

    def record_miss(self, *, wanted_chunks: int, chunk_tokens: int, seconds: float | None = None) -> None:
        """Count a fetch of which no chunk was held anywhere (``seconds``: the time it took to
        find that out, if known)."""
        self.fetches.labels("miss").inc()
        if seconds is not None:
            self.fetch_seconds.observe(seconds)
        self.chunk_misses.inc(wanted_chunks)
        self.prefix_tokens.labels("recompute").inc(wanted_chunks * chunk_tokens)

    def watch_store(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export the store's ``stats()`` (bytes per tier, entries, events) at each scrape."""
        self.registry.register(_StoreCollector(stats))

    def watch_counters(self, subsystem: str, counters: Callable[[], Mapping[str, int]]) -> None:
        """Export a subsystem's counters (e.g. the transport's auth_failures) at each scrape."""
        self.registry.register(_EventsCollector(subsystem, counters))

    def watch_peers(
        self, count: Callable[[], int], sessions: Callable[[], int] | None = None,
        unreachable: Callable[[], int] | None = None,
    ) -> None:
        """Read the number of live peers (and of open sessions, and of peers whose connects
        fail) at each scrape: a peer discovery lists is not one that can be reached."""
        self.peers_up.set_function(_tolerant("kvpeer_peers_up", count))
        if sessions is not None:
            self.peer_sessions.set_function(_tolerant("kvpeer_peer_sessions", sessions))
        if unreachable is not None:
            self.peers_unreachable.set_function(_tolerant("kvpeer_peers_unreachable", unreachable))

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def fetch_counts(self) -> dict[str, int]:
        """Fetches since start, by outcome (``kvpeer stats``)."""
        return {
            outcome: int(self.registry.get_sample_value("kvpeer_fetches_total", {"outcome": outcome}) or 0)
            for outcome in FETCH_OUTCOMES
        }

    def start_http(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        degraded: Callable[[], list[str]] | None = None,
    ) -> HttpEndpoint:
        return start_http(self, host, port, ready, degraded)


# ----------------------------------------------------------------------------- HTTP endpoint
class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper must not hold up shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s: " + format, self.client_address[0], *args)


def _health_text(degraded: Callable[[], list[str]] | None) -> str:
    try:
        reasons = degraded() if degraded is not None else []
    except Exception as exc:  # a failing probe of the details must not fail the health check
        reasons = [f"health details unavailable: {exc!r}"]
    if not reasons:
        return "ok\n"
    return "ok, degraded:\n" + "".join(f"- {reason}\n" for reason in reasons)


class HttpEndpoint:
    """The running /metrics + /healthz server; :meth:`close` stops it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = server.server_address[:2]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_http(
    metrics: Metrics,
    host: str,
    port: int,
    ready: Callable[[], bool],
    degraded: Callable[[], list[str]] | None = None,
) -> HttpEndpoint:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` (port 0: any free port) in a thread.

    The server runs in its own thread so a scrape never waits on the event loop; ``ready`` and
    ``degraded`` are called from that thread. ``/healthz`` is 503 until ready, then 200 with
    "ok" or "ok, degraded:" and one reason a line. OSError if the port is taken.
    """
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            try:
                ok = bool(ready())
            except Exception:  # a failing readiness probe means "not ready", not a 500
                ok = False
            body = (_health_text(degraded) if ok else "not ready\n").encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return iter([body])
        if path in ("/metrics", "/"):
            return iter(metrics_app(environ, start_response))
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return iter([b"not found: try /metrics or /healthz\n"])

    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="kvpeer-metrics", daemon=True)
    thread.start()
    endpoint = HttpEndpoint(server, thread)
    # Judged on the address bound, not the one asked for: "" and host names bind too, and ""
    # means every interface.
    if not ipaddress.ip_address(str(endpoint.host)).is_loopback:
        log.warning("metrics listen on %s, beyond localhost: firewall the port", endpoint.host)
    log.info("metrics on http://%s:%d/metrics, health on /healthz", endpoint.host, endpoint.port)
    return endpoint
