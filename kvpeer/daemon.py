"""kvpeerd: the daemon of one node, and the glue between its parts.

The daemon owns the lifecycle (start in dependency order, stop in reverse) and implements two
small interfaces: the local API backend (what engines call: put, lookup, fetch, ...) and the
transport's request handler (what peers call: has, inventory, blobs). Everything else lives in
its own module: chunk keys in hashing, bytes in codec, chunks in store, peers in discovery and
transport, the fetch pipeline in fetcher. This module must stay glue: no protocol logic here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvpeer import __version__, aio, codec
from kvpeer.activity import Activity
from kvpeer.api.server import ApiServer, ClientContext, FetchSink, PutKV
from kvpeer.codec import container as codec_container
from kvpeer.codec import nvenc
from kvpeer.codec import profile as codec_profiles
from kvpeer.codec.profile import CodecProfile
from kvpeer.config import Config
from kvpeer.discovery import (
    Advertisement,
    DiscoveryConfig,
    InventoryLog,
    InventorySync,
    InventoryTable,
    PeerEvent,
    make_discovery,
)
from kvpeer.discovery.advert import MAX_FINGERPRINTS
from kvpeer.discovery.config import advertisable_addresses
from kvpeer.errors import ConfigError, ErrorCode, KVPeerError, ProtocolError, StoreError, StoreInUse
from kvpeer.fetcher import Fetcher, FetcherConfig, FetchOutcome, LevelServer, total_bytes_per_token
from kvpeer.files import write_text_atomically
from kvpeer.hashing import ModelFingerprint, chunk_keys
from kvpeer.metrics import Metrics
from kvpeer.store import ChunkStore
from kvpeer.transport import PeerTransport, TransportConfig
from kvpeer.transport.peer import PeerBackingOff

log = logging.getLogger(__name__)

STOP_NETWORK_SHARE = 0.6  # of daemon.shutdown_grace_s, for closing the API, peers and discovery
# Without a deadline (a lookup, a fetch without one), how long peers not synced yet may take to
# say what they hold: a peer that accepts and never answers would hold each request for the
# whole connect timeout.
PLAN_ASK_S = 3.0
ACTIVITY_LOG_S = 60.0  # the served requests are summed up in one INFO line this often
# Models remembered (fingerprints.json; transcoding a peer's request needs its model's shape),
# the most recently put or fetched; an advertisement names the latest MAX_FINGERPRINTS of them.
MAX_REMEMBERED_MODELS = 64
MAX_HAS_KEYS = 4096  # a "has" request names at most this many keys (about 4k chunks = 1M tokens)
# Threads decoding fetched chunks (and handing them over), apart from the loop's default
# executor: a decode queued there behind puts' encodes and transcodes held its fetch seconds
# past the deadline. One fetch decodes one chunk at a time; this many fetches at once.
DECODE_THREADS = max(2, min(4, os.cpu_count() or 1))


@dataclass(slots=True)
class _Plan:
    """Where each chunk of a requested prefix can come from, up to the first gap."""

    keys: list[bytes]
    sources: list[str | None] = field(default_factory=list)  # None = local store, else peer id
    holders: list[set[str]] = field(default_factory=list)  # every peer holding each chunk


def _leading_held(store: ChunkStore, keys: Sequence[bytes]) -> int:
    """How many of ``keys``, from the first, ``store`` holds."""
    return next((i for i, key in enumerate(keys) if not store.has(key)), len(keys))


def encode_chunk_blocking(
    kv: PutKV, index: int, chunk_tokens: int, level: str,
    profile: CodecProfile | None, last: bool, rotary: bool = True,
) -> bytes:
    """Encode tokens [index*chunk, (index+1)*chunk) of a prefix's KV (runs in an executor).

    ``profile``: the model's calibration profile (:func:`codec_profiles.for_fingerprint`), None
    for the plain rules (decoding never needs it). ``last``: the last full chunk of the prefix, the only
    one that gets the codec's finer tail steps: what follows (the prefix's partial rest, then
    the question) reads the end of the cached KV most, not the end of every chunk. ``rotary``: the
    model's keys carry RoPE (its fingerprint has a theta), so the codec's rotary-index prior
    applies; a model without RoPE (GPT-2's learned positions) has no slow and fast key channels.
    """
    start = index * chunk_tokens
    k, v = kv.read_blocking(start, start + chunk_tokens)  # read here: one chunk in memory
    return codec.encode(k, v, level=level, profile=profile, tail=last, rotate_half=rotary)


def open_store(config: Config) -> ChunkStore:
    """The configured store, opened: its lock taken (waiting up to ``store.LOCK_WAIT_S`` for a
    predecessor to let go) and its files listed. Blocking: seconds for a large store."""
    try:
        return ChunkStore(
            ram_bytes=config.store.ram_bytes,
            disk_bytes=config.store.disk_bytes,
            directory=config.store.dir,
            level_order=codec.LEVELS,
            # Blobs of another codec format are not loaded after an upgrade (unreadable now).
            payload_format=f"codec{codec_container.FORMAT_VERSION}",
        )
    except StoreInUse as exc:  # as a taken port or socket: this config cannot start here
        raise ConfigError(
            f"store.dir: {exc}: another kvpeerd uses it; give each daemon its own store.dir "
            "(or node.state_dir), or stop the other one"
        ) from None


class Daemon:
    """One node's kvpeerd: store + discovery + transport + local API."""

    def __init__(self, config: Config, store: ChunkStore | None = None) -> None:
        """``store``: already opened by :func:`open_store` (kvpeerd opens it off the event loop,
        so that a SIGTERM meanwhile is heard); opened here when not given."""
        self.config = config
        self.node_id = config.node.node_id
        self.chunk_tokens = config.codec.chunk_tokens
        self.store = store if store is not None else open_store(config)
        self.inventory = InventoryLog()
        self.fingerprints_path = config.node.state_dir / "fingerprints.json"
        self.fingerprints = load_fingerprints(self.fingerprints_path)
        self._fingerprints_saving = asyncio.Lock()
        self._save_queued = False
        self._said_unadvertised: set[str] = set()  # models whose leaving the advert was logged
        self._profiles_reported: set[tuple[str, str]] = set()  # (fingerprint, what was said)
        self.discovery = make_discovery(discovery_config(config))
        # What each peer holds, kept current by pulling inventory deltas when epochs move.
        self.peer_table = InventoryTable()
        self.inventory_sync = InventorySync(
            self.peer_table, self._peer_request, timeout_s=config.transport.request_timeout_s
        )
        self.addresses = config.transport.advertise_addresses or advertisable_addresses(
            config.discovery.interfaces
        )
        self.transport = PeerTransport(
            self.node_id,
            transport_config(config, default_host=self.addresses[0]),
            handler=self,
            on_peer_down=self._peer_down,
        )
        # Peers dial the first address advertised: the one the transport listens on.
        listening = self.transport.config.host
        if listening in self.addresses:
            self.addresses = (listening, *(a for a in self.addresses if a != listening))
        self.decode_executor = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="kvpeer-decode")
        self.fetcher = Fetcher(
            sessions=self.transport.session,
            cache=self.store,
            levels=codec.LEVELS,
            chunk_tokens=self.chunk_tokens,
            config=FetcherConfig(request_timeout_s=config.transport.request_timeout_s),
            executor=self.decode_executor,
        )
        self.level_server = LevelServer(self.store, transcode_options=self._transcode_options)
        self.api = ApiServer(
            config.api.socket_path,
            self,
            mode=config.api.socket_mode,
            group=config.api.socket_group,
            allowed_uids=config.api.allowed_uids,
            namespaces=config.api.namespaces,
            lease_s=config.api.lease_s,
            spare_bytes=config.api.spare_bytes,
            max_connections=config.api.max_connections,
            max_connections_per_uid=config.api.max_connections_per_uid,
            max_shm_bytes_per_uid=config.api.max_shm_bytes_per_uid,
        )
        self.ready = False
        self.metrics = Metrics(node_id=self.node_id, version=__version__)
        self.metrics.watch_store(self.store.stats)
        self.metrics.watch_peers(
            lambda: len(self.discovery.peers()),
            sessions=lambda: len(self.transport.sessions()),
            unreachable=lambda: len(self.transport.backing_off()),
        )
        self.metrics.watch_counters("transport", lambda: self.transport.counters)
        self.metrics.watch_counters("api", lambda: self.api.counters)
        self.metrics.watch_counters("discovery", lambda: self.discovery.counters)
        self.metrics.watch_counters("inventory", lambda: self.peer_table.counters)
        self.metrics.watch_counters("fetcher", lambda: self.fetcher.counters)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self._advertise_lock = asyncio.Lock()
        self._puts_running = 0
        self._changes_unsaid = False  # store changes during puts that no advertisement said yet
        self._advertise_queued = False
        self._background: set[asyncio.Task[None]] = set()  # advertisement updates, the summary
        self._markings: set[asyncio.Task[None]] = set()  # fetched prompts to mark (_mark_prompt_soon)
        self.activity = Activity(events=lambda: self.fetcher.counters)
        self.codec_backends: list[str] = []  # probed at start
        self.metrics_unavailable: str | None = None  # why /metrics is not served (kvpeerd's to set)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # The GPU probe runs a subprocess (up to ~20 s); a stop meanwhile kills it.
        await nvenc.probe_async()
        self.codec_backends = codec.available_backends(probe=False)
        for key in self.store.keys():
            self.inventory.add([key])
        self.store.subscribe(self._store_changed)
        await self.transport.start()
        await self.api.start()
        self.discovery.subscribe(self._peer_event)  # before the sync, which connects
        self.discovery.subscribe(self.inventory_sync.on_event)
        first = self._advertisement()
        await self.discovery.start(first)
        self.ready = True
        if self._advertisement() != first:  # puts served while discovery started
            self._advertise_soon()
        self._in_background(self._log_activity())
        log.info(
            "kvpeerd %s ready: api %s, signalling port %d, %d chunks in store",
            self.node_id, self.config.api.socket_path, self.transport.port, len(self.inventory),
        )

    async def stop(self) -> None:
        self.ready = False
        log.info("kvpeerd %s stopping", self.node_id)
        for task in list(self._background):
            task.cancel()
        self._save_queued = False  # a queued save was just cancelled: the next call makes one
        # The network side shares part of the grace period, so that the store's drain of
        # acknowledged puts is never the step the caller's timeout cuts.
        ends = time.monotonic() + STOP_NETWORK_SHARE * self.config.daemon.shutdown_grace_s
        for close in (
            self.api.close, self.discovery.close, self.inventory_sync.close, self.fetcher.close,
            self.level_server.close, self.transport.close,
        ):  # fmt: skip
            try:
                await aio.wait_for(close(), max(0.1, ends - time.monotonic()))
            except TimeoutError:
                log.warning("stopping: %s took too long; going on", close.__qualname__)
            except Exception:
                log.exception("stopping: %s failed", close.__qualname__)
        # Work the API's close left behind (a cut put's model to save, a fetch's prompt to
        # mark), within the network's share; the store is still open for it.
        left = [task for task in (*self._background, *self._markings) if not task.done()]
        if left:
            await asyncio.wait(left, timeout=max(0.1, ends - time.monotonic()))
        # Fetches ended with the API; a decode a cancel left queued is dropped, not run.
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        await self.store.aclose()  # drains queued disk writes off the event loop
        log.info("kvpeerd %s stopped", self.node_id)

    async def _log_activity(self) -> None:
        """One INFO line per ``ACTIVITY_LOG_S`` with what was served (requests log at DEBUG)."""
        while True:
            await asyncio.sleep(ACTIVITY_LOG_S)
            line = self.activity.take_summary(ACTIVITY_LOG_S)
            if line is not None:
                log.info("%s", line)

    def _advertisement(self) -> Advertisement:
        return Advertisement(
            node_id=self.node_id,
            addresses=tuple(self.addresses),
            port=self.transport.port,
            fingerprints=tuple(sorted(self._advertised_fingerprints())),
            epoch=self.inventory.epoch,
            chunk_count=len(self.inventory),
            first_chunk_keys=self.inventory.first_chunk_keys(),
            # The digest of those keys is keyed with the cluster key (none without one): keys
            # are hashes of public inputs, so an unkeyed digest tells any LAN host whether a
            # guessed prompt is cached here.
            digest_key=next((k for k in self.transport.config.keys if k), None),
        )

    def _advertised_fingerprints(self) -> list[str]:
        """The models peers are told this node serves: the most recently put ones, as many as
        an advertisement carries (``self.fingerprints`` is kept in order of use)."""
        return list(self.fingerprints)[-MAX_FINGERPRINTS:]

    def _model_used(self, fp: ModelFingerprint) -> bool:
        """``fp``'s chunks were put or fetched here: it becomes the most recently used model.
        An advertisement names at most MAX_FINGERPRINTS; when that set changes (a new model, or
        one back after others pushed it out) it is advertised, and True says to save the list."""
        advertised = self._advertised_fingerprints()
        self.fingerprints.pop(fp.hex, None)
        self.fingerprints[fp.hex] = fp
        while len(self.fingerprints) > MAX_REMEMBERED_MODELS:  # bounded: the oldest go
            self._said_unadvertised.discard(self.fingerprints.pop(next(iter(self.fingerprints))).hex)
        if fp.hex in advertised:
            return False  # the order changed, not the set: nothing to save or say
        if len(self.fingerprints) > MAX_FINGERPRINTS:  # the least recently used one left
            gone = self.fingerprints[advertised[0]]
            # Said once per model: more models in use than an advert names swap on every use.
            log.log(
                logging.DEBUG if gone.hex in self._said_unadvertised else logging.INFO,
                "model %s is no longer advertised (%d models at most, the most recently used): "
                "peers stop fetching its chunks from here until it is put or fetched again",
                gone.name, MAX_FINGERPRINTS,
            )
            self._said_unadvertised.add(gone.hex)
        self._say_changes()
        return True

    def _store_changed(self, added: list[bytes], removed: list[bytes]) -> None:
        # Changes made in other threads (an evict, a full disk) reach the loop by another
        # path than a put's, so a removal may overtake an earlier addition: the store says
        # what is true now.
        before = self.inventory.epoch
        self.inventory.add([key for key in added if self.store.has(key)])
        self.inventory.remove([key for key in removed if not self.store.has(key)])
        if self.inventory.epoch != before:  # a put, what it evicted, an evict, a fetch cached
            self._say_changes()

    def _say_changes(self) -> None:
        """Advertise what changed: now, or when the puts running end (said at a put's first
        chunk, the rest would wait for the discovery's next slot, update_min_interval_s)."""
        if not self.ready:
            return
        if self._puts_running:
            self._changes_unsaid = True
        else:
            self._advertise_soon()

    def _advertise_soon(self) -> None:
        """Publish what this node holds now, soon: one advertisement for every call made until
        it is built (a fetch caches its chunks one by one)."""
        if self._advertise_queued:
            return
        self._advertise_queued = True
        self._in_background(self._advertise())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task the daemon owns (stop cancels it)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _advertise(self) -> None:
        async with self._advertise_lock:
            self._advertise_queued = False
            await self.discovery.update(self._advertisement())

    async def _peer_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """A request to a peer over its (possibly new) authenticated session."""
        peer = self.discovery.peers().get(peer_id)
        session = self.transport.session(peer_id)
        if session is None or session.closed:
            if peer is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"peer {peer_id} is not known")
            if not peer.addresses:  # discovery refuses such adverts; a bug must not IndexError
                raise ProtocolError(ErrorCode.NOT_FOUND, f"peer {peer_id} has no address")
            session = await self.transport.connect(peer_id, peer.addresses[0], peer.port)
        timeout = self.config.transport.request_timeout_s
        answer: dict[str, Any] = await session.request(method, body, timeout=timeout)
        return answer

    def _peer_event(self, event: PeerEvent) -> None:
        # A peer that (re)appears (restarted, back after an outage) is worth a connect at once,
        # whatever the backoff of its failed connects says; one that left is forgotten.
        if event.kind in ("added", "removed"):
            self.transport.forget_failures(event.peer.node_id)

    def _peer_down(self, peer_id: str) -> None:
        log.info("peer %s is down", peer_id)
        self.discovery.mark_dead(peer_id)

    # ----------------------------------------------------------------- local API backend
    def _codec_profile(self, fp: ModelFingerprint) -> CodecProfile | None:
        """The model's calibration profile for encoding (blocking: reads a small file), None for
        the plain rules; a profile that cannot be read is logged and skipped, not fatal to puts."""
        level = logging.INFO
        try:
            profile = codec_profiles.for_fingerprint(fp)
            said = f"calibration profile {profile.model}" if profile else "no calibration profile: plain steps"
        except (codec.CodecError, OSError) as exc:
            profile, said, level = None, f"calibration profile unreadable ({exc}): plain steps", logging.WARNING
        if (fp.hex, said) not in self._profiles_reported:  # once per model and outcome
            if len(self._profiles_reported) >= MAX_REMEMBERED_MODELS:
                self._profiles_reported.clear()  # bounded: said again, at worst
            self._profiles_reported.add((fp.hex, said))
            log.log(level, "codec: model %s (%s, %s): %s", fp.name, fp.dtype, fp.hex[:12], said)
        return profile

    def _transcode_options(self, header: codec.Header) -> dict[str, Any]:
        """Encode keywords for a lower level made from a held chunk (runs in an executor): the
        profile and RoPE layout of its model, as a put at that level would use. A blob names no
        model, so it is the model this node has served with the blob's shape; if several such
        models disagree, the plain rules."""
        shape = (header.layers, header.kv_heads, header.head_dim)
        known = list(self.fingerprints.values())  # puts add to it on the event loop
        models = [fp for fp in known if (fp.layers, fp.kv_heads, fp.head_dim) == shape]
        if not models:
            return {}
        profiles = [self._codec_profile(fp) for fp in models]
        rotary = {fp.rope_theta > 0 for fp in models}
        options: dict[str, Any] = {}
        if all(p == profiles[0] for p in profiles) and profiles[0] is not None:
            options["profile"] = profiles[0]
        if len(rotary) == 1:
            options["rotate_half"] = rotary.pop()
        return options

    def _save_fingerprints_soon(self) -> None:
        """Save the list in the background: one save for every call made until it starts."""
        if self._save_queued:
            return
        self._save_queued = True
        self._in_background(self._save_fingerprints(queued=True))

    async def _save_fingerprints(self, *, queued: bool = False) -> None:
        """Persist the served models (one save at a time; each writes the list as it is now).
        A failure is logged: the file only lets a restart advertise them, the put goes on."""
        async with self._fingerprints_saving:
            if queued:
                self._save_queued = False  # changes from here on need a save of their own
            snapshot = list(self.fingerprints.values())
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, save_fingerprints_blocking, self.fingerprints_path, snapshot
                )
            except OSError as exc:
                log.warning("cannot save %s: %s", self.fingerprints_path, exc)

    def _keys(self, ctx: ClientContext, tokens: np.ndarray, fp: ModelFingerprint) -> list[bytes]:
        return chunk_keys(tokens, fp.digest(), ctx.namespace, self.chunk_tokens)

    async def put(self, ctx: ClientContext, req: Any, kv: PutKV) -> Any:
        self._puts_running += 1
        try:
            return await self._put(ctx, req, kv)
        finally:
            self._puts_running -= 1
            if self._changes_unsaid and self.ready:
                self._changes_unsaid = False
                self._advertise_soon()

    def check_put(self, req: Any) -> None:
        """Refuse a put before its client fills a segment (the API server asks)."""
        _check_level("level", req.level or self.config.codec.level)

    async def _put(self, ctx: ClientContext, req: Any, kv: PutKV) -> Any:
        from kvpeer.api.messages import PutResult

        fp: ModelFingerprint = req.fingerprint
        level = req.level or self.config.codec.level
        _check_level("level", level)  # before anything: chunks held already hid a bad one
        keys = self._keys(ctx, req.tokens, fp)
        if req.prefill_s:
            self.fetcher.learn_recompute_rate(req.kv_tokens, req.prefill_s, model=fp.hex)
        loop = asyncio.get_running_loop()
        stored: list[bytes] = []  # the chunks this put added (the others were held already)
        started = time.perf_counter()
        # Chunks before the put's KV starts (kv_from) are keyed, not stored: the client said
        # this node holds them; one it no longer holds stays missing until a full put.
        first = -(-req.kv_from // self.chunk_tokens)
        profile = None
        if not all(map(self.store.has, keys[first:])):
            profile = await loop.run_in_executor(None, self._codec_profile, fp)
        try:
            for index, key in enumerate(keys):
                if index < first or self.store.has(key):
                    continue
                encode_started = time.perf_counter()
                blob = await loop.run_in_executor(
                    None, encode_chunk_blocking, kv, index, self.chunk_tokens, level, profile,
                    index == len(keys) - 1, fp.rope_theta > 0,
                )
                self.metrics.encode_seconds.labels(level).observe(time.perf_counter() - encode_started)
                try:
                    await self.store.put(key, level, blob)
                except StoreError as exc:
                    log.warning("put: chunk %d not cached: %s", index, exc)
                    continue
                stored.append(key)
        except asyncio.CancelledError:  # the daemon stopping, or a put its client left too long
            log.info(
                "put ns=%s: cut short after storing %d new chunks (of %d)", ctx.namespace, len(stored),
                len(keys),
            )
            if stored and self._model_used(fp):  # what it stored is served after a restart too
                self._save_fingerprints_soon()
            raise
        self.activity.put(len(keys), len(stored))
        # Once something of it is held: a put that stored nothing (its client cut its segment
        # short) made its model the most recent one, and a client naming a new model per put
        # pushed the served models out of the advertisement. (A crash before this save leaves
        # the chunks unadvertised until the model's next put or fetch.)
        if any(map(self.store.has, keys)) and self._model_used(fp):
            await self._save_fingerprints()
        log.debug(
            "put ns=%s tokens=%d kv_from=%d chunks=%d new=%d missing_before_kv=%d level=%s in %.3fs",
            ctx.namespace, len(req.tokens), req.kv_from, len(keys), len(stored),
            sum(not self.store.has(key) for key in keys[:first]), level,
            time.perf_counter() - started,
        )
        if keys:
            self.inventory.add([k for k in keys if self.store.has(k)], first=keys[:1])
            self.store.used_as_prefix(keys)  # evicted from its end, not its (useful) head
        if stored:
            # Lower levels are made now, in the background, so that peers never wait for them;
            # only the chunks this put added (a conversation's every turn re-puts its history,
            # whose levels were made then: warming it again read every level of it from disk).
            self.level_server.warm([k for k in stored if self.store.has(k)], prefix=keys)
        return PutResult(chunks=len(keys), stored=len(stored), chunk_tokens=self.chunk_tokens)

    async def lookup(self, ctx: ClientContext, req: Any) -> Any:
        from kvpeer.api.messages import LookupResult

        fp: ModelFingerprint = req.fingerprint
        keys = self._keys(ctx, req.tokens, fp)
        if req.local_only:
            held = _leading_held(self.store, keys)
            return LookupResult(
                matched_tokens=held * self.chunk_tokens, chunk_tokens=self.chunk_tokens,
                sources=["local"] * held,
            )
        plan = await self._plan(keys, fp, with_local_holders=False)
        return LookupResult(
            matched_tokens=len(plan.sources) * self.chunk_tokens,
            chunk_tokens=self.chunk_tokens,
            sources=[s or "local" for s in plan.sources],
        )

    async def fetch(self, ctx: ClientContext, req: Any, sink: FetchSink) -> None:
        if req.min_level:  # the client's mistake: answered, not counted as a failed fetch
            _check_level("min_level", req.min_level)
        started = time.monotonic()
        plan: _Plan | None = None
        ended: list[FetchOutcome] = []  # the fetcher's outcome, however the fetch ended
        prompt_keys: list[bytes] = []
        try:
            fp: ModelFingerprint = req.fingerprint
            deadline_s = req.deadline_s or self.config.fetch.deadline_s or None
            prompt_keys = self._keys(ctx, req.tokens, fp)
            # The chunks from the one holding token kv_from on (the client has those before);
            # the sink numbers them from there for the client.
            keys = prompt_keys[req.kv_from // self.chunk_tokens :]
            # A quarter of the deadline at most to find the holders: the rest is the fetch's.
            plan = await self._plan(keys, fp, deadline_s / 4 if deadline_s else None)
            if plan.sources:
                if self._model_used(fp):  # what it caches is served from here as well
                    self._save_fingerprints_soon()
                deadline = started + deadline_s if deadline_s else None
                await self._fetch(req, plan, sink, deadline, ended.append)
        except BaseException as exc:
            if not ended:  # it ended before the fetcher had an outcome (planning, say)
                ended.append(FetchOutcome(
                    chunks=0, requested=len(plan.sources) if plan else 0, levels=(), bytes_moved=0,
                    elapsed_s=time.monotonic() - started,
                    reason="cancelled" if isinstance(exc, asyncio.CancelledError) else "error",
                ))  # fmt: skip
            raise
        finally:
            # Counted however it ended: a cancelled fetch (client gone, API backstop) did move
            # bytes and take time.
            self._fetch_ended(ctx, req, plan, ended[0] if ended else None, time.monotonic() - started)
            # Read first to last, and what came from peers reaches the store in the background,
            # newest last: once it is in, the first chunk is made the most recent again, so that
            # eviction takes this prefix from its end.
            self._mark_prompt_soon(prompt_keys)

    def _mark_prompt_soon(self, keys: list[bytes]) -> None:
        """:meth:`_used_as_prefix_once_cached` in a task the stop waits for but does not cancel
        (cancelled before its first step, a task runs none of its code, finally included)."""
        task = asyncio.get_running_loop().create_task(self._used_as_prefix_once_cached(keys))
        self._markings.add(task)
        task.add_done_callback(self._markings.discard)

    async def _used_as_prefix_once_cached(self, keys: list[bytes]) -> None:
        try:
            await self.fetcher.cached()
        finally:  # a stop cancels the wait, not the marking: the order outlives the restart
            self.store.used_as_prefix(keys)

    def _fetch_ended(
        self, ctx: ClientContext, req: Any, plan: _Plan | None, outcome: FetchOutcome | None,
        seconds: float,
    ) -> None:
        wanted = len(plan.keys) if plan is not None else 0
        if outcome is None:
            log.debug("fetch ns=%s tokens=%d: no chunk available", ctx.namespace, len(req.tokens))
            self.metrics.record_miss(wanted_chunks=wanted, chunk_tokens=self.chunk_tokens, seconds=seconds)
            self.activity.fetch("miss", seconds)
            return
        self.metrics.record_fetch(
            outcome, wanted_chunks=wanted, chunk_tokens=self.chunk_tokens, seconds=seconds
        )
        self.activity.fetch(outcome.reason, seconds, outcome.bytes_moved)
        log.debug(
            "fetch ns=%s tokens=%d head=%d chunks=%d/%d (%s) sources=%s levels=%s wire_bytes=%d in %.3fs",
            ctx.namespace, len(req.tokens), outcome.head, outcome.chunks, outcome.requested, outcome.reason,
            sorted({s or "local" for s in plan.sources}) if plan is not None else [],
            ",".join(outcome.levels), outcome.bytes_moved, seconds,
        )

    async def _fetch(
        self, req: Any, plan: _Plan, sink: FetchSink, deadline: float | None,
        on_end: Callable[[FetchOutcome], None],
    ) -> None:
        """Fetch the planned chunks; the fetcher tells ``on_end`` its outcome."""
        fp: ModelFingerprint = req.fingerprint
        defaults = self.config.fetch
        await self.fetcher.fetch(
            plan.keys[: len(plan.sources)],
            plan.holders,
            sink,
            deadline=deadline,
            min_level=req.min_level or defaults.min_level or None,
            # The client's own statement first, then the operator's, then what puts showed.
            recompute_rate=req.recompute_tokens_per_s or defaults.recompute_tokens_per_s or None,
            model=fp.hex,
            kv_bytes_per_token=total_bytes_per_token(
                fp.layers, fp.kv_heads, fp.head_dim, 4 if fp.dtype == "float32" else 2
            ),
            kv_dtype=fp.dtype,
            policy=defaults.policy,
            chunk_shape=(fp.layers, fp.kv_heads, fp.head_dim),
            on_end=on_end,
            leave_head=sink.leave_head if req.split else None,
        )

    async def _plan(
        self, keys: Sequence[bytes], fp: ModelFingerprint, limit_s: float | None = None,
        *, with_local_holders: bool = True,
    ) -> _Plan:
        """Longest prefix of ``keys`` held locally or by some peer, and who holds each chunk.
        ``limit_s``: how long peers not synced yet may take to say what they hold (None:
        ``PLAN_ASK_S``; a connect that takes longer goes on for the next request).
        ``with_local_holders``: which peers also hold the chunks held here (a fetch's fallback;
        a lookup does not need them)."""
        plan = _Plan(keys=list(keys))
        local = _leading_held(self.store, keys)
        plan.sources = [None] * local
        if local and with_local_holders:
            # Peers holding them too: a local copy that cannot be read (corrupt, evicted since)
            # is then fetched from one of them instead of ending the fetch there.
            plan.holders = self.peer_table.holders(keys[:local], fp.hex)
        else:
            plan.holders = [set() for _ in range(local)]
        wanted = list(keys[local : local + MAX_HAS_KEYS])
        if not wanted:
            return plan
        _, known = self.peer_table.longest_prefix(wanted, fp.hex)
        holders: list[set[str]] = [set(known[i]) if i < len(known) else set() for i in range(len(wanted))]
        # Peers not synced yet (just appeared, or their epoch moved a moment ago): ask them
        # directly, all at once, and go on without those that take longer than ``limit_s``.
        unsynced = [
            peer.node_id for peer in list(self.discovery.peers().values())
            if fp.hex in peer.fingerprints and self.peer_table.epoch(peer.node_id) != peer.epoch
        ]  # fmt: skip
        asking = {
            asyncio.create_task(self._peer_request(peer_id, "has", {"keys": wanted})): peer_id
            for peer_id in unsynced
        }
        answered: set[asyncio.Task[dict[str, Any]]] = set()
        try:
            if asking:
                limit = PLAN_ASK_S if limit_s is None else limit_s
                answered, late = await asyncio.wait(asking, timeout=limit)
                for task in late:  # per request: DEBUG (a failing connect is said once)
                    log.debug("peer %s not asked: no answer within %.2fs", asking[task], limit)
        finally:  # late answers, or the fetch itself cancelled: nobody waits for the rest
            for task in asking:
                task.cancel()
        for task in answered:
            peer_id = asking[task]
            try:
                have = task.result().get("have", [])
            except PeerBackingOff:
                continue  # its failed connect was said once, by the transport
            except (KVPeerError, OSError, AttributeError) as exc:  # AttributeError: not a dict
                log.info("peer %s not asked: %r", peer_id, exc)
                continue
            except Exception as exc:
                # A bug of ours or a library's met with this one peer: the others still answer,
                # so skip it rather than fail the whole lookup or fetch as INTERNAL.
                log.warning("peer %s not asked, unexpected error: %r", peer_id, exc)
                continue
            if not isinstance(have, list):
                continue
            for index, held in enumerate(have[: len(wanted)]):
                if held is True:
                    holders[index].add(peer_id)
        for peers in holders:
            if not peers:
                break
            plan.sources.append(min(peers))
            plan.holders.append(peers)
        return plan

    def degraded(self) -> list[str]:
        """What works less well than configured, one line each (``/healthz``, ``kvpeer status``).

        Read from the metrics thread too: it only reads state, never waits on the event loop.
        """
        return degraded_reasons(
            self.store.stats(),
            keyless=self.transport.config.keyless_risk == logging.ERROR,
            unreachable=len(self.transport.backing_off()),
            peers=len(self.discovery.peers()),
            metrics=self.metrics_unavailable,
        )

    async def stats(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "ready": self.ready,
            "degraded": self.degraded(),
            "store": self.store.stats(),
            "inventory_epoch": self.inventory.epoch,
            "chunks": len(self.inventory),
            "peers": len(self.discovery.peers()),
            "bytes_from_peers": self.fetcher.bytes_from_peers,
            "peer_inventories": self.peer_table.sizes(),
            "codec_backends": self.codec_backends,
            # The counters /metrics has (since start), for a host that does not scrape it.
            "fetches": self.metrics.fetch_counts(),
            "fetcher": dict(self.fetcher.counters),
            "transport": dict(self.transport.counters),
            "discovery": dict(self.discovery.counters),
            "inventory_sync": dict(self.peer_table.counters),
        }

    async def evict(self, ctx: ClientContext, all: bool = True) -> dict[str, Any]:
        """Drop every cached chunk (the local API's evict; peers learn it from the epoch)."""
        dropped = await asyncio.get_running_loop().run_in_executor(None, self.store.clear)
        log.info("evicted %d chunks on request of uid %s", dropped, ctx.uid)
        return {"evicted_chunks": dropped}

    async def peers(self) -> list[dict[str, Any]]:
        return [
            {
                "node_id": p.node_id,
                "addresses": list(p.addresses),
                "port": p.port,
                "fingerprints": sorted(p.fingerprints),
                "chunks": p.chunk_count,
                "epoch": p.epoch,
                # which cluster key our session with it uses ("current", "next", "none"); None:
                # no session open. A key rotation is over once every peer says "next".
                "key": self.transport.session_key(p.node_id),
            }
            for p in self.discovery.peers().values()
        ]

    # ----------------------------------------------------------------- peer requests
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "has":
            keys = body.get("keys")
            if not isinstance(keys, list) or len(keys) > MAX_HAS_KEYS:
                raise ProtocolError(ErrorCode.INVALID, "has: keys must be a list of <= 4096 keys")
            return {"have": [isinstance(k, bytes) and self.store.has(k) for k in keys]}
        if method == "inventory":
            since, page, at = body.get("since"), body.get("page", 0), body.get("at")
            if not isinstance(page, int) or isinstance(page, bool):
                raise ProtocolError(ErrorCode.INVALID, "inventory: page must be an integer")
            return self.inventory.since(
                since if isinstance(since, int) else None, page,
                at if isinstance(at, int) and not isinstance(at, bool) else None,
            )
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown method {method!r}")

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return await self.level_server.open_blob(key, level)

    def blob_sent(self, peer_id: str, blob: bytes) -> None:
        """The peer confirmed it received ``blob`` whole: count it as sent."""
        try:
            sent_level = codec.read_header(blob).level
        except KVPeerError:
            sent_level = "unknown"
        self.metrics.sent(peer_id, sent_level, len(blob))
        self.activity.served(peer_id, len(blob))


def _check_level(field: str, level: str) -> None:
    if level not in codec.LEVELS:
        raise ProtocolError(
            ErrorCode.INVALID, f"{field}: unknown codec level {level!r}; known: {', '.join(codec.LEVELS)}"
        )


def load_fingerprints(path: Path) -> dict[str, ModelFingerprint]:
    """Fingerprints of the models this node served before, least recently put first (so a
    restart advertises the latest of them)."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    if not isinstance(entries, list):
        log.warning("ignoring %s: not a list of fingerprints", path)
        return {}
    fingerprints: dict[str, ModelFingerprint] = {}
    for entry in entries:  # one bad entry (an older version wrote some) costs only itself
        try:
            fp = ModelFingerprint(**entry)
        except (TypeError, ValueError) as exc:
            log.warning("ignoring a fingerprint in %s: %s", path, exc)
            continue
        fingerprints[fp.hex] = fp
    return fingerprints


def degraded_reasons(
    store: dict[str, Any], *, keyless: bool, unreachable: int, peers: int, metrics: str | None = None
) -> list[str]:
    """The ways a serving daemon is worse off than its configuration asks, in words.

    None of them stops it serving, so ``/healthz`` stays 200 (restarting would not mend a full
    disk or a peer that is down) and says them in its body; the gauges carry each as a number.
    """
    reasons = []
    if store.get("disk_unavailable"):
        reasons.append(
            f"store: the disk tier did not open ({store['disk_unavailable']}); "
            "running on the RAM tier only"
        )
    elif store.get("disk_failing"):
        why = store.get("last_disk_error") or "write errors"
        reasons.append(f"store: disk writes failing ({why}); new chunks are held in RAM only")
    if keyless:
        reasons.append("transport: no cluster key (transport.psk_file): any host on the LAN joins")
    if unreachable:
        reasons.append(f"peers: {unreachable} of {peers} listed peers cannot be connected to")
    if metrics:  # only `kvpeer status` can say this one: there is no /healthz to say it
        reasons.append(f"metrics: {metrics}; no /metrics or /healthz")
    return reasons


# One writer of the file at a time: a save cancelled on the event loop (a stop) goes on in its
# thread, and the next save's thread wrote the same temporary file beside it.
_SAVING_FINGERPRINTS = threading.Lock()


def save_fingerprints_blocking(path: Path, fingerprints: Sequence[ModelFingerprint]) -> None:
    """Write the served fingerprints atomically (a crash leaves the old file or the new)."""
    with _SAVING_FINGERPRINTS:
        write_text_atomically(path, json.dumps([dataclasses.asdict(fp) for fp in fingerprints]))


def transport_config(config: Config, default_host: str) -> TransportConfig:
    """Map the [transport] config section onto the transport's runtime config."""
    section = config.transport
    values: dict[str, Any] = {
        "host": section.host or default_host,
        "port": section.port,
        "psk_file": section.psk_file,
        "next_psk_file": section.next_psk_file,
        "allow_loopback": section.allow_loopback,
        "connect_timeout_s": section.connect_timeout_s,
        "request_timeout_s": section.request_timeout_s,
        "heartbeat_interval_s": section.heartbeat_interval_s,
        "peer_dead_after_s": section.peer_dead_after_s,
        "max_message_bytes": section.max_message_bytes,
        "max_blob_bytes": section.max_blob_bytes,
        "max_transfers_per_peer": section.max_transfers_per_peer,
        "congestion_control": section.congestion_control,
    }
    if section.mtu != "auto":
        values["mtu"] = section.mtu
    if section.max_incoming_blob_bytes:
        values["max_incoming_blob_bytes"] = section.max_incoming_blob_bytes
    try:
        return TransportConfig.from_section(values)
    except ConfigError as exc:
        if section.host or not str(exc).startswith("transport.host"):
            raise
        # The operator set no host: name the keys the address came from.
        source = (
            "transport.advertise_addresses" if section.advertise_addresses
            else "discovery.interfaces"
        )
        raise ConfigError(
            f"{exc} (transport.host is unset, so it is {default_host}, the first address of "
            f"{source})"
        ) from None


def discovery_config(config: Config) -> DiscoveryConfig:
    """Map the [discovery] config section onto the discovery's runtime config."""
    return DiscoveryConfig.from_section(config.discovery)
