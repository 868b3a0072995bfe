"""The daemon's side of the codec: which calibration profile a put encodes with."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvpeer import codec
from kvpeer.codec import profile as profiles
from kvpeer.codec.profile import CodecProfile
from kvpeer.hashing import ModelFingerprint

daemon = pytest.importorskip("kvpeer.daemon")

FP32 = ModelFingerprint(name="tiny", layers=2, kv_heads=2, head_dim=16, dtype="float32", rope_theta=1e4)


def _kv(tokens: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    shape = (2, 2, tokens, 16)
    return (torch.randn(shape, generator=gen).to(torch.bfloat16), torch.randn(shape, generator=gen).to(torch.bfloat16))


def test_a_bf16_engine_encodes_with_its_models_float32_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(profiles, "_DIR", tmp_path)
    calibrated = CodecProfile.from_sensitivities(FP32.hex, [1.0, 50.0, 1.0, 50.0], [1.0, 1.0, 50.0, 1.0], heads=2)
    profiles.save(calibrated, tmp_path)
    node = SimpleNamespace(_profiles_reported=set())
    bf16 = dataclasses.replace(FP32, dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="kvpeer.daemon"):
        profile = daemon.Daemon._codec_profile(node, bf16)
        daemon.Daemon._codec_profile(node, bf16)
    assert profile == calibrated
    said = [r.getMessage() for r in caplog.records if "calibration profile" in r.getMessage()]
    assert len(said) == 1 and FP32.hex in said[0] and "bfloat16" in said[0]  # once per model
    k, v = _kv()
    kv = SimpleNamespace(read_blocking=lambda start, stop: (k[:, :, start:stop], v[:, :, start:stop]))
    blob = daemon.encode_chunk_blocking(kv, 0, 64, "q5", profile, False)
    plain = daemon.encode_chunk_blocking(kv, 0, 64, "q5", None, False)
    assert blob == codec.encode(k, v, "q5", profile=calibrated, tail=False)
    assert blob != plain


def test_an_unreadable_profile_leaves_puts_on_the_plain_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(profiles, "_DIR", tmp_path)
    profiles.path_for(FP32.hex, tmp_path).write_text("{ not json")
    node = SimpleNamespace(_profiles_reported=set())
    with caplog.at_level(logging.INFO, logger="kvpeer.daemon"):
        assert daemon.Daemon._codec_profile(node, FP32) is None
    assert any(r.levelno == logging.WARNING and "unreadable" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="kvpeer.daemon"):
        assert daemon.Daemon._codec_profile(node, dataclasses.replace(FP32, name="unknown")) is None
    assert any("no calibration profile" in r.getMessage() for r in caplog.records)


def _header(layers: int, heads: int, head_dim: int) -> codec.Header:
    k = torch.zeros(layers, heads, 4, head_dim, dtype=torch.float16)
    return codec.read_header(codec.encode(k, k, "exact"))


def test_lower_levels_made_on_demand_use_the_chunks_models_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store keeps the put level; a peer asking for less gets a transcode, which must encode
    as a put at that level would (the profile, the RoPE layout), not with the plain rules."""
    monkeypatch.setattr(profiles, "_DIR", tmp_path)
    calibrated = CodecProfile.from_sensitivities(FP32.hex, [1.0, 9.0, 1.0, 9.0], [9.0, 1.0, 1.0, 1.0], heads=2)
    profiles.save(calibrated, tmp_path)
    gpt2_like = ModelFingerprint(name="learned-positions", layers=3, kv_heads=2, head_dim=16, dtype="float32")
    node = SimpleNamespace(_profiles_reported=set(), fingerprints={FP32.hex: FP32, gpt2_like.hex: gpt2_like})
    node._codec_profile = lambda fp: daemon.Daemon._codec_profile(node, fp)
    options = daemon.Daemon._transcode_options
    assert options(node, _header(2, 2, 16)) == {"profile": calibrated, "rotate_half": True}
    assert options(node, _header(3, 2, 16)) == {"rotate_half": False}  # no RoPE, no profile
    assert options(node, _header(2, 4, 16)) == {}  # no model of this shape: the plain rules
    # Two models of one shape with different profiles: the blob does not say which it is.
    twin = dataclasses.replace(FP32, name="twin")
    profiles.save(CodecProfile.from_sensitivities(twin.hex, [9.0, 1.0, 9.0, 1.0], [1.0] * 4, heads=2), tmp_path)
    node.fingerprints[twin.hex] = twin
    assert options(node, _header(2, 2, 16)) == {"rotate_half": True}


def test_concurrent_saves_of_new_models_leave_a_whole_fingerprints_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Puts of new models at once each save the served list: one at a time, each whole."""
    import asyncio
    import time

    save = daemon.save_fingerprints_blocking

    def slow_save(path: Path, fingerprints: list[ModelFingerprint]) -> None:
        time.sleep(0.005)  # threads would interleave their temp files here
        save(path, fingerprints)

    monkeypatch.setattr(daemon, "save_fingerprints_blocking", slow_save)
    node = SimpleNamespace(
        fingerprints={}, fingerprints_path=tmp_path / "state" / "fingerprints.json",
        _fingerprints_saving=asyncio.Lock(),
    )
    models = [dataclasses.replace(FP32, name=f"model-{i}") for i in range(12)]

    async def put(fp: ModelFingerprint) -> None:
        node.fingerprints[fp.hex] = fp
        await daemon.Daemon._save_fingerprints(node)

    async def main() -> None:
        await asyncio.gather(*(put(fp) for fp in models))

    asyncio.run(main())
    assert set(daemon.load_fingerprints(node.fingerprints_path)) == {fp.hex for fp in models}
    node.fingerprints_path = tmp_path / "not-a-dir" / "fingerprints.json"
    (tmp_path / "not-a-dir").write_text("")
    with caplog.at_level(logging.WARNING, logger="kvpeer.daemon"):
        asyncio.run(put(dataclasses.replace(FP32, name="one-more")))  # logged, not raised
    assert any("cannot save" in r.getMessage() for r in caplog.records)


def test_planning_asks_unsynced_peers_at_once_and_goes_on_without_a_silent_one() -> None:
    """A peer discovery still lists but that does not answer must not hold every fetch for
    the request timeouts: peers are asked together, for at most the planning limit."""
    import asyncio

    keys = [bytes([i]) * 32 for i in range(3)]
    cancelled: list[str] = []

    async def peer_request(peer_id: str, method: str, body: dict[str, object]) -> dict[str, object]:
        assert method == "has" and body["keys"] == keys
        if peer_id == "silent":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(peer_id)
                raise
        return {"have": [True, True, False]}

    def peer(node_id: str) -> SimpleNamespace:
        return SimpleNamespace(node_id=node_id, fingerprints={FP32.hex}, epoch=1)

    node = SimpleNamespace(
        store=SimpleNamespace(has=lambda key: False),
        peer_table=SimpleNamespace(longest_prefix=lambda wanted, model: (0, []), epoch=lambda node_id: 0),
        discovery=SimpleNamespace(peers=lambda: {"silent": peer("silent"), "fast": peer("fast")}),
        _peer_request=peer_request,
    )
    plan = asyncio.run(daemon.Daemon._plan(node, keys, FP32, 0.2))
    assert plan.sources == ["fast", "fast"] and plan.holders == [{"fast"}, {"fast"}]
    assert cancelled == ["silent"]

    async def client_gone() -> None:  # the fetch is cancelled while peers are being asked
        planning = asyncio.create_task(daemon.Daemon._plan(node, keys, FP32, None))
        await asyncio.sleep(0.1)
        planning.cancel()
        await asyncio.gather(planning, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert cancelled == ["silent", "silent"]  # not left asking on its own

    asyncio.run(client_gone())


def test_one_bad_saved_fingerprint_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version saved fingerprints that are refused now (rope_theta [1]): the others
    are still advertised after the upgrade."""
    import json

    path = tmp_path / "fingerprints.json"
    good = dataclasses.asdict(FP32)
    path.write_text(json.dumps([good, {**good, "rope_theta": [1]}, {**good, "rope_theta": 10**400}, "junk"]))
    with caplog.at_level(logging.WARNING, logger="kvpeer.daemon"):
        assert daemon.load_fingerprints(path) == {FP32.hex: FP32}
    assert sum("ignoring a fingerprint" in r.getMessage() for r in caplog.records) == 3


def test_stop_drains_the_store_even_when_a_network_part_hangs() -> None:
    """The caller gives stop() the grace period: a hung close must not use it all, or the
    store's acknowledged, queued writes would be cut at exit."""
    import asyncio

    from kvpeer import aio

    drained: list[bool] = []

    async def hangs() -> None:
        await asyncio.sleep(3600)

    async def closes() -> None:
        return None

    async def drain() -> None:
        drained.append(True)

    node = SimpleNamespace(
        ready=True, node_id="n", _background=set(), _markings=set(),
        config=SimpleNamespace(daemon=SimpleNamespace(shutdown_grace_s=1.0)),
        api=SimpleNamespace(close=hangs), discovery=SimpleNamespace(close=closes),
        inventory_sync=SimpleNamespace(close=closes), fetcher=SimpleNamespace(close=closes),
        level_server=SimpleNamespace(close=hangs), transport=SimpleNamespace(close=closes),
        store=SimpleNamespace(aclose=drain), decode_executor=SimpleNamespace(shutdown=lambda **_: None),
    )  # fmt: skip
    asyncio.run(aio.wait_for(daemon.Daemon.stop(node), 1.0))
    assert drained == [True]


def test_degraded_names_each_state_that_serves_worse_than_configured() -> None:
    healthy = {"disk_unavailable": "", "disk_failing": False, "last_disk_error": ""}
    assert daemon.degraded_reasons(healthy, keyless=False, unreachable=0, peers=3) == []
    reasons = daemon.degraded_reasons(
        {**healthy, "disk_failing": True, "last_disk_error": "No space left on device"},
        keyless=True, unreachable=2, peers=3,
        metrics="cannot listen on 127.0.0.1:9457 (Address already in use)",
    )
    assert reasons == [
        "store: disk writes failing (No space left on device); new chunks are held in RAM only",
        "transport: no cluster key (transport.psk_file): any host on the LAN joins",
        "peers: 2 of 3 listed peers cannot be connected to",
        "metrics: cannot listen on 127.0.0.1:9457 (Address already in use); no /metrics or /healthz",
    ]
    # A disk that never opened is said as that, not also as failing.
    [reason] = daemon.degraded_reasons(
        {**healthy, "disk_unavailable": "read-only file system", "disk_failing": True},
        keyless=False, unreachable=0, peers=0,
    )
    assert "did not open (read-only file system)" in reason


def test_a_daemon_reads_its_degraded_state_from_store_transport_and_discovery() -> None:
    import logging as logging_mod

    from kvpeer.store import ChunkStore

    store = ChunkStore(ram_bytes=1 << 20)
    node = SimpleNamespace(
        store=store,
        transport=SimpleNamespace(
            config=SimpleNamespace(keyless_risk=logging_mod.WARNING),  # loopback: not degraded
            backing_off=lambda: ["b"],
        ),
        discovery=SimpleNamespace(peers=lambda: {"a": None, "b": None}),
        metrics_unavailable=None,
    )
    assert daemon.Daemon.degraded(node) == ["peers: 1 of 2 listed peers cannot be connected to"]
    node.transport.config.keyless_risk = logging_mod.ERROR
    assert len(daemon.Daemon.degraded(node)) == 2
    node.metrics_unavailable = "cannot listen on 127.0.0.1:9457 (Address already in use)"  # kvpeerd's
    assert daemon.Daemon.degraded(node)[-1].startswith("metrics: cannot listen on 127.0.0.1:9457")
    store.close()


def test_a_request_to_a_peer_without_an_address_is_not_found_not_an_index_error() -> None:
    import asyncio

    from kvpeer.errors import ErrorCode, ProtocolError

    node = SimpleNamespace(
        discovery=SimpleNamespace(peers=lambda: {"v6only": SimpleNamespace(addresses=(), port=1)}),
        transport=SimpleNamespace(session=lambda peer_id: None),
    )
    with pytest.raises(ProtocolError) as info:
        asyncio.run(daemon.Daemon._peer_request(node, "v6only", "has", {}))
    assert info.value.code == ErrorCode.NOT_FOUND and "no address" in str(info.value)


def _local_daemon(tmp_path: Path, extra: str = "", transport: str = "") -> daemon.Daemon:
    """A daemon built from a loopback config, not started (its store is open: close it);
    ``transport``: more lines of its [transport] section."""
    from kvpeer.config import load_config

    config_file = tmp_path / "kvpeer.toml"
    config_file.write_text(
        f'[node]\nnode_id = "caps"\nstate_dir = "{tmp_path / "state"}"\n'
        f'runtime_dir = "{tmp_path / "run"}"\n'
        '[transport]\nhost = "127.0.0.1"\nallow_loopback = true\nport = 0\n' + transport
        + '[discovery]\nbackend = "static"\ninterfaces = ["127.0.0.1"]\n' + extra
    )
    return daemon.Daemon(load_config(config_file, env={}))


def test_the_api_connection_caps_reach_the_api_server(tmp_path: Path) -> None:
    node = _local_daemon(
        tmp_path, '[api]\nmax_connections = 7\nmax_connections_per_uid = 3\nmax_shm_bytes_per_uid = "1GiB"\n'
    )
    try:
        assert (node.api.max_connections, node.api.max_connections_per_uid) == (7, 3)
        assert node.api.registry.max_bytes_per_owner == 1 << 30
    finally:
        node.store.close()


def test_a_node_that_served_more_models_than_an_advert_names_advertises_the_latest(
    tmp_path: Path,
) -> None:
    """Every model ever put was advertised: the ninth made each advertisement invalid, so
    puts failed and the daemon could not start again."""
    import asyncio

    import numpy as np

    from kvpeer.discovery.advert import MAX_FINGERPRINTS

    models = [dataclasses.replace(FP32, name=f"model-{i}") for i in range(MAX_FINGERPRINTS + 2)]

    def put(node: daemon.Daemon, fp: ModelFingerprint) -> None:  # one chunk: a model counts once held
        tokens = np.arange(node.chunk_tokens, dtype=np.uint32)
        request = SimpleNamespace(fingerprint=fp, tokens=tokens, level="", prefill_s=0.0, kv_from=0)
        shape = (fp.layers, fp.kv_heads, node.chunk_tokens, fp.head_dim)
        kv = SimpleNamespace(read_blocking=lambda start, stop: (torch.randn(shape), torch.randn(shape)))
        asyncio.run(node.put(SimpleNamespace(namespace="default"), request, kv))  # type: ignore[arg-type]

    def advertised(node: daemon.Daemon) -> set[str]:
        node.transport = SimpleNamespace(port=4000, config=SimpleNamespace(keys=()))  # type: ignore[assignment]  # not started
        return set(node._advertisement().fingerprints)

    node = _local_daemon(tmp_path)
    said: list[set[str]] = []  # what each advertisement made since would name
    node.ready = True
    node._advertise_soon = lambda: said.append(advertised(node))  # type: ignore[method-assign]
    try:
        for fp in models:
            put(node, fp)
        assert advertised(node) == {fp.hex for fp in models[-MAX_FINGERPRINTS:]}
        # A model put again is the most recent, even while advertised: the next new model
        # pushes out the least recently used one, not the one put first.
        hot = models[2]
        put(node, hot)
        said.clear()
        put(node, hot)
        assert said == []  # nothing new to say
        put(node, models[0])  # back after others pushed it out: said at once, put or not
        latest = {fp.hex for fp in [*models[4:], hot, models[0]]}  # models[3]: least recent
        assert advertised(node) == latest and said == [latest]
    finally:
        node.store.close()
    restarted = _local_daemon(tmp_path)
    try:
        assert advertised(restarted) == latest
    finally:
        restarted.store.close()


def _advertising_node(held: Any) -> tuple[SimpleNamespace, list[int]]:
    """The daemon's store-change path over ``held`` (a container of keys): each advertisement
    records how many chunks the inventory held when it was made."""
    from kvpeer.discovery import InventoryLog

    advertised: list[int] = []
    node = SimpleNamespace(
        store=SimpleNamespace(has=held.__contains__), inventory=InventoryLog(), ready=True,
        _advertise_soon=lambda: advertised.append(len(node.inventory)), _puts_running=0,
        _changes_unsaid=False,
    )  # fmt: skip
    node._say_changes = lambda: daemon.Daemon._say_changes(node)
    return node, advertised


def test_store_changes_reach_the_inventory_as_the_store_holds_them_and_are_advertised() -> None:
    """A removal made in another thread (an evict) could overtake an earlier put's addition,
    leaving a key advertised that the store had dropped; and chunks fetched from peers and
    cached here were never advertised (only removals were)."""
    held: set[bytes] = set()
    node, advertised = _advertising_node(held)
    fetched, evicted = b"f" * 32, b"e" * 32
    held.add(fetched)
    daemon.Daemon._store_changed(node, [fetched], [])  # a fetched chunk cached here
    assert fetched in node.inventory and advertised == [1]
    daemon.Daemon._store_changed(node, [], [evicted])  # the evict's news arrives first...
    daemon.Daemon._store_changed(node, [evicted], [])  # ...then the put it undid
    assert evicted not in node.inventory
    assert advertised == [1]  # nothing changed: nothing to say
    held.add(evicted)  # put again since: an old removal must not hide it
    daemon.Daemon._store_changed(node, [evicted], [])
    daemon.Daemon._store_changed(node, [], [evicted])
    assert evicted in node.inventory


def test_a_puts_chunks_are_advertised_once_when_it_ends_in_a_full_store_too() -> None:
    """Advertised at the put's first chunk, the rest waited for the discovery's next slot: peers
    learnt a whole prefix a second later (update_min_interval_s). In a full store each chunk
    stored evicts an older one: those removals wait for the put's end too."""
    import asyncio

    old = [bytes([100 + i]) * 32 for i in range(4)]
    keys = [bytes([i]) * 32 for i in range(4)]
    held = set(old)
    node, advertised = _advertising_node(held)
    node.inventory.add(old)

    async def put(ctx: object, req: object, kv: object) -> str:
        for key, evicted in zip(keys, old, strict=True):  # the store tells of each as it goes
            held.add(key)
            held.discard(evicted)
            daemon.Daemon._store_changed(node, [key], [evicted])
            await asyncio.sleep(0)
        return "stored"

    node._put = put
    assert asyncio.run(daemon.Daemon.put(node, None, None, None)) == "stored"  # type: ignore[arg-type]
    assert advertised == [4] and node.inventory.keys() == frozenset(keys) and node._puts_running == 0


def test_the_address_the_transport_listens_on_is_advertised_first(tmp_path: Path) -> None:
    """Peers dial the first address advertised; with transport.host another of the node's
    addresses, they dialled one where nothing listened."""
    node = _local_daemon(tmp_path, transport='advertise_addresses = ["127.0.0.2", "127.0.0.1"]\n')
    try:
        assert node.transport.config.host == "127.0.0.1"
        assert tuple(node.addresses) == ("127.0.0.1", "127.0.0.2")
    finally:
        node.store.close()


def test_the_advertised_first_chunk_digest_is_keyed_with_the_cluster_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest is published keyed with the transport's cluster key (TXT k0...), never
    unkeyed (d0...: any LAN host could test a guessed prompt), and not at all without a key."""
    import os

    from kvpeer.discovery.advert import decode_fields, encode_fields
    from kvpeer.discovery.digest import key_id

    psk = tmp_path / "cluster.key"
    psk.write_text("ab" * 32)
    psk.chmod(0o600)
    chunk = os.urandom(32)
    for transport, keyed in ((f'psk_file = "{psk}"\n', True), ("", False)):
        (tmp_path / str(keyed)).mkdir()
        node = _local_daemon(tmp_path / str(keyed), transport=transport)
        monkeypatch.setattr(type(node.transport), "port", 7457)  # not started: no port yet
        try:
            node.inventory.add([chunk], first=[chunk])
            fields = encode_fields(node._advertisement(), node.addresses)
        finally:
            node.store.close()
        assert b"d0" not in fields and (b"k0" in fields) == keyed
        if keyed:
            peer = decode_fields(fields, node.addresses)
            key = bytes.fromhex("ab" * 32)
            assert peer.digest_key_id == key_id(key) and peer.might_hold_prefix(chunk, [key])


def test_more_models_in_use_than_an_advert_names_cost_one_save_and_one_line_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nine models fetched round robin swap the advertised set on every fetch: each fetch
    queued a save of its own (an unbounded queue of tasks) and logged an INFO line."""
    import asyncio

    from kvpeer.discovery.advert import MAX_FINGERPRINTS

    saves: list[int] = []
    monkeypatch.setattr(daemon, "save_fingerprints_blocking", lambda path, fps: saves.append(len(fps)))
    models = [dataclasses.replace(FP32, name=f"model-{i}") for i in range(MAX_FINGERPRINTS + 1)]
    node = _local_daemon(tmp_path)
    node.ready = True
    node._advertise_soon = lambda: None  # type: ignore[method-assign]

    async def fetches() -> None:
        for _ in range(5):
            for fp in models:
                if node._model_used(fp):
                    node._save_fingerprints_soon()
        await asyncio.gather(*node._background)

    try:
        with caplog.at_level(logging.INFO, logger="kvpeer.daemon"):
            asyncio.run(fetches())
    finally:
        node.store.close()
    assert saves == [len(models)]  # one save, of the list as it ended
    said = [r for r in caplog.records if "no longer advertised" in r.getMessage() and r.levelno == logging.INFO]
    assert len(said) == len(models)  # once per model


def test_advertisements_asked_for_before_one_is_built_make_one() -> None:
    """A fetch caches its chunks one by one: each asked for an advertisement of its own, each
    built from the whole inventory."""
    import asyncio

    built: list[int] = []

    async def update(advert: object) -> None:
        built.append(1)

    node = SimpleNamespace(
        _advertise_queued=False, _background=set(), _advertise_lock=asyncio.Lock(),
        discovery=SimpleNamespace(update=update), _advertisement=lambda: "advert",
    )  # fmt: skip
    for name in ("_advertise_soon", "_in_background", "_advertise"):
        setattr(node, name, getattr(daemon.Daemon, name).__get__(node))

    async def main() -> None:
        for _ in range(10):
            node._advertise_soon()
        await asyncio.gather(*node._background)
        node._advertise_soon()  # asked for after that one was built: one more
        await asyncio.gather(*node._background)

    asyncio.run(main())
    assert built == [1, 1]


def test_fingerprint_saves_never_write_the_file_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save cancelled by a stop goes on in its thread; the next one wrote the same temporary
    file beside it (broken JSON: a restart advertised no model)."""
    import threading
    import time

    writing: list[int] = [0, 0]  # now, most at once

    def slow_write(path: Path, text: str) -> None:
        writing[0] += 1
        writing[1] = max(writing)
        time.sleep(0.05)
        writing[0] -= 1

    monkeypatch.setattr(daemon, "write_text_atomically", slow_write)
    threads = [threading.Thread(target=daemon.save_fingerprints_blocking, args=(tmp_path / "f.json", [FP32]))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writing == [0, 1]
