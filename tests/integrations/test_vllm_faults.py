"""vLLM connector against a daemon that is down, hung or failing: vLLM must start, and its
scheduler and forward pass must not wait on the daemon longer than the connector's keys say."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvpeer import shm
from kvpeer.api import messages as m
from kvpeer.api.client import KVPeerClient
from kvpeer.errors import ApiError, ConfigError, ErrorCode
from kvpeer.integrations import _daemon
from kvpeer.integrations import vllm as vllm_mod
from kvpeer.integrations._daemon import Backoff, DaemonConnection, RefusedFields
from kvpeer.integrations.vllm import KVPeerConnector
from tests.api.fakes import FakeBackend, ScriptedDaemon, ServerThread, send
from tests.integrations.test_vllm import (
    DIM,
    HEADS,
    LAYERS,
    LAYOUTS,
    daemon_client,
    paged,
    request,
    scheduler_output,
    vllm_config,
)

PROMPT = list(range(1000, 1040))  # 40 tokens: 2 whole chunks of 16
HUNG_DAEMON_S = 60.0  # the client's default timeout: what the engine waited before
GENEROUS_S = 5.0  # well past the short waits configured below, far below HUNG_DAEMON_S


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CACHES = {f"model.layers.{i}.self_attn.attn": paged(LAYOUTS[0]) for i in range(LAYERS)}


def connector(socket_path: object, **keys: Any) -> tuple[KVPeerConnector, FakeClock]:
    config = vllm_config(socket_path)
    config.kv_transfer_config.kv_connector_extra_config.update(keys)
    conn = KVPeerConnector(config, SimpleNamespace(name="BOTH"))
    conn.register_kv_caches(CACHES)
    conn.clock = clock = FakeClock()
    return conn, clock


def plan_loads(conn: KVPeerConnector, blocks: dict[str, list[int]], new: int = 32) -> None:
    """What vLLM's scheduler does once lookups said ``new`` tokens of each request can be loaded."""
    outputs = [scheduler_output(req_id, PROMPT, ids, 0) for req_id, ids in blocks.items()]
    for req_id in blocks:
        conn.update_state_after_alloc(request(req_id, PROMPT), None, new)
    batch = outputs[0]
    batch.scheduled_new_reqs = [o.scheduled_new_reqs[0] for o in outputs]
    batch.num_scheduled_tokens = {req_id: len(PROMPT) for req_id in blocks}
    conn.bind_connector_metadata(conn.build_connector_meta(batch))


class HelloOnly(ScriptedDaemon):
    """A hung daemon: its socket accepts and it said hello, but no request is ever answered."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.Hello):
            super().handle(conn, index, message)


class FetchesHang(ScriptedDaemon):
    """A daemon whose fetches never end (a stuck transfer) but that answers a probe."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.StatsRequest):
            send(conn, m.StatsResult(id=message.id, stats={}))
        elif not isinstance(message, m.FetchRequest):
            super().handle(conn, index, message)


# --------------------------------------------------------------------------- backing off


def test_backoff_skips_calls_for_its_period_then_lets_one_try() -> None:
    backoff = Backoff(10.0)
    assert backoff.allows(0.0) and not backoff.retrying(0.0)
    assert backoff.failed(1.0) is True  # the first failure is worth a warning
    assert not backoff.allows(10.9)
    assert backoff.allows(11.0) and backoff.retrying(11.0)
    assert backoff.failed(11.0) is False  # still failing: said already
    assert not backoff.allows(20.0)
    assert backoff.succeeded() is True and backoff.allows(20.0) and not backoff.retrying(30.0)
    assert backoff.succeeded() is False


def test_a_refused_field_is_left_out_for_a_while_then_asked_again() -> None:
    """A field an older daemon refused was never sent again for the engine's life, even to
    the upgraded daemon that replaced it (clients reconnect after a restart unnoticed)."""
    refused = RefusedFields()
    assert refused.takes("kv_from", 0.0) and refused.takes("split", 0.0)
    assert refused.refused("kv_from", 1.0) is True  # the first refusal is worth saying
    assert not refused.takes("kv_from", 1.0 + _daemon.ASK_AGAIN_S - 0.1)
    assert refused.takes("split", 2.0)  # each field on its own
    assert refused.takes("kv_from", 1.0 + _daemon.ASK_AGAIN_S)
    assert refused.refused("kv_from", 400.0) is False  # refused again: said already
    assert not refused.takes("kv_from", 400.0 + _daemon.ASK_AGAIN_S - 0.1)
    assert not refused.confirmed("kv_from") and refused.confirmed("split")  # no try for those
    refused.accepted("kv_from")  # a try was answered: the daemon takes it now
    assert refused.confirmed("kv_from") and refused.takes("kv_from", 401.0)
    assert refused.refused("kv_from", 500.0) is True  # refused after being taken: worth saying


@pytest.mark.parametrize("value", [0, -1, "soon", None, float("nan"), float("inf")])
def test_a_bad_wait_stops_the_connector_naming_the_key(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError, match="kvpeer_lookup_timeout_s"):
        connector(tmp_path / "kvpeer.sock", kvpeer_lookup_timeout_s=value)


# --------------------------------------------------------------------------- daemon down


def test_connector_constructs_while_daemon_down_and_uses_it_once_up(caplog: pytest.LogCaptureFixture) -> None:
    server = ServerThread(FakeBackend(16))  # made, not started: nothing listens on its socket yet
    conn, clock = connector(server.socket_path)
    with caplog.at_level(logging.WARNING, "kvpeer.integrations.vllm"):
        assert conn.get_num_new_matched_tokens(request("r1", PROMPT), 0) == (0, False)
        assert conn.get_num_new_matched_tokens(request("r2", PROMPT), 0) == (0, False)
    assert len(caplog.records) == 1 and "did not answer a lookup" in caplog.records[0].getMessage()

    with server:
        with daemon_client(server) as client:
            client.put(PROMPT, torch.randn(LAYERS, HEADS, 40, DIM), torch.randn(LAYERS, HEADS, 40, DIM),
                       conn.fingerprint)
        clock.now = conn.waits.backoff_s - 1  # still backing off: not asked
        assert conn.get_num_new_matched_tokens(request("r3", PROMPT), 0) == (0, False)
        clock.now = conn.waits.backoff_s
        assert conn.get_num_new_matched_tokens(request("r4", PROMPT), 0) == (32, False)
        conn.shutdown()


# --------------------------------------------------------------------------- daemon hung


def test_lookup_against_a_hung_daemon_returns_within_the_configured_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with HelloOnly() as daemon:
        conn, clock = connector(daemon.socket_path, kvpeer_lookup_timeout_s=0.2)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "kvpeer.integrations.vllm"):
            assert conn.get_num_new_matched_tokens(request("r1", PROMPT), 0) == (0, False)
            assert time.monotonic() - started < GENEROUS_S
            # Backing off: the next requests are computed at once, without asking.
            for rid in ("r2", "r3"):
                assert conn.get_num_new_matched_tokens(request(rid, PROMPT), 0) == (0, False)
            assert len(daemon.received(m.LookupRequest)) == 1
            # A timed-out lookup was probed (slow or hung?) before backing off.
            assert len(daemon.received(m.StatsRequest)) == 1
            clock.now = conn.waits.backoff_s  # then a probe goes first, and finds it still hung
            started = time.monotonic()
            assert conn.get_num_new_matched_tokens(request("r4", PROMPT), 0) == (0, False)
            assert time.monotonic() - started < GENEROUS_S
            assert len(daemon.received(m.StatsRequest)) == 2
            assert len(daemon.received(m.LookupRequest)) == 1
        assert [r.levelno for r in caplog.records] == [logging.WARNING]  # said once
        conn.shutdown()


def test_load_from_a_hung_daemon_stops_after_its_deadline_without_a_second_wait() -> None:
    with FetchesHang() as daemon:
        conn, clock = connector(daemon.socket_path, kvpeer_load_deadline_s=0.2)
        blocks = list(range(10))
        plan_loads(conn, {"r1": blocks})
        started = time.monotonic()
        conn.start_load_kv(None)
        assert time.monotonic() - started < GENEROUS_S
        assert conn.get_block_ids_with_load_errors() == set(blocks[:8])  # vLLM recomputes them
        [fetch] = daemon.received(m.FetchRequest)
        assert fetch.deadline_s == 0.2
        # The connection that timed out was dropped, not waited on for the release: the next
        # load (after backing off, and a probe the daemon answers) comes on a new one.
        clock.now = conn.waits.backoff_s
        conn.start_load_kv(None)
        daemon.wait_for(m.FetchRequest, 2)
        fetched_on = [index for index, message in daemon.seen if isinstance(message, m.FetchRequest)]
        assert len(set(fetched_on)) == 2
        assert not daemon.received(m.Release)
        conn.shutdown()


def test_loads_in_the_batch_after_a_timeout_are_not_waited_for() -> None:
    with FetchesHang() as daemon:
        conn, _ = connector(daemon.socket_path, kvpeer_load_deadline_s=0.2)
        plan_loads(conn, {"r1": list(range(10)), "r2": list(range(10, 20))})
        started = time.monotonic()
        conn.start_load_kv(None)
        assert time.monotonic() - started < GENEROUS_S
        assert conn.get_block_ids_with_load_errors() == set(range(8)) | set(range(10, 18))
        assert len(daemon.received(m.FetchRequest)) == 1
        conn.shutdown()


# --------------------------------------------------------------------------- failed saves


class SegmentGone(ScriptedDaemon):
    """Names a put segment but sends no descriptor with it (a daemon older than the connector)."""

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.PutRequest):
            send(conn, m.SegmentReady(id=message.id, segment=shm.new_name(), size=1 << 12))
        else:
            super().handle(conn, index, message)


def save(conn: KVPeerConnector, req_id: str) -> None:
    """One step that computes a whole prompt: vLLM hands each layer over, then waits for the save."""
    conn.update_state_after_alloc(request(req_id, PROMPT), None, 0)
    meta = conn.build_connector_meta(scheduler_output(req_id, PROMPT, list(range(10)), 0))
    assert [s.req_id for s in meta.saves] == [req_id]
    conn.bind_connector_metadata(meta)
    for name, cache in CACHES.items():
        conn.save_kv_layer(name, cache, None)
    conn.wait_for_save()
    conn.clear_connector_metadata()


def save_and_flush(conn: KVPeerConnector, req_id: str) -> None:
    save(conn, req_id)
    assert conn.flush_saves(GENEROUS_S)


def test_a_put_that_raises_a_raw_os_error_does_not_stop_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    with SegmentGone() as daemon:
        conn, _ = connector(daemon.socket_path)
        with caplog.at_level(logging.WARNING, "kvpeer.integrations.vllm"):
            save_and_flush(conn, "r1")
        assert "kvpeer put for r1 failed" in caplog.text
        conn.shutdown()


def test_saves_to_a_hung_daemon_wait_once_then_only_for_a_quick_probe() -> None:
    with HelloOnly() as daemon:
        conn, clock = connector(daemon.socket_path, kvpeer_save_timeout_s=0.3,
                                kvpeer_lookup_timeout_s=0.2)
        started = time.monotonic()
        save_and_flush(conn, "r1")  # waits its timeout once
        save_and_flush(conn, "r2")  # backing off: not sent
        clock.now = conn.waits.backoff_s
        save_and_flush(conn, "r3")  # the probe finds the daemon still hung: not sent either
        assert time.monotonic() - started < GENEROUS_S
        assert len(daemon.received(m.PutRequest)) == 1
        assert len(daemon.received(m.StatsRequest)) == 1
        conn.shutdown()


class PutsWait(ScriptedDaemon):
    """A daemon that answers a put only once ``go`` is set (it is encoding a long prompt)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.PutRequest):
            self.go.wait(30)
            send(conn, m.ErrorResponse(id=message.id, code=int(ErrorCode.BUSY), reason="test"))
        else:
            super().handle(conn, index, message)

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        super().__exit__(*exc)


def test_a_save_does_not_hold_the_forward_pass_while_the_daemon_takes_it() -> None:
    """wait_for_save used to put the prompt itself: every batch that saved waited for the daemon
    to take and encode it. Now the step returns while the put is still unanswered."""
    with PutsWait() as daemon:
        conn, _ = connector(daemon.socket_path)
        save(conn, "r1")  # returns although the daemon has not answered
        assert daemon.wait_for(m.PutRequest) and not daemon.go.is_set()
        assert not conn.flush_saves(0.05)  # still in flight
        daemon.go.set()
        assert conn.flush_saves(GENEROUS_S)
        conn.shutdown()


def test_saves_past_the_pending_bytes_are_dropped_not_queued_without_end(caplog: pytest.LogCaptureFixture) -> None:
    with PutsWait() as daemon:
        one_save = 2 * LAYERS * HEADS * 32 * DIM * 4  # K and V of 32 tokens in float32
        conn, _ = connector(daemon.socket_path, kvpeer_max_pending_save_bytes=2 * one_save)
        with caplog.at_level(logging.WARNING, "kvpeer.integrations.vllm"):
            for req_id in ("r1", "r2", "r3", "r4"):
                save(conn, req_id)
        assert conn.saves_dropped == 2  # r1 is being put, r2 waits, r3 and r4 find no room
        assert caplog.text.count("dropped") == 1  # warned once, not per save
        daemon.go.set()
        assert conn.flush_saves(GENEROUS_S)
        assert [p.tokens.size for p in daemon.received(m.PutRequest)] == [32, 32]
        conn.shutdown()


@pytest.mark.parametrize("value", [0, -1, 1.5, "1GiB", True])
def test_a_bad_pending_save_bytes_stops_the_connector_naming_the_key(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError, match="kvpeer_max_pending_save_bytes"):
        connector(tmp_path / "no.sock", kvpeer_max_pending_save_bytes=value)


def send_unless_closed(conn: socket.socket, message: m.Message) -> None:
    with contextlib.suppress(OSError):  # a late answer may find the test over
        send(conn, message)


class FirstLookupSlow(ScriptedDaemon):
    """A healthy daemon whose first lookup takes 0.6 s (it may take up to ~3 s asking peers it
    has not synced with yet), every other request answered at once."""

    lookups = 0

    def handle(self, conn: socket.socket, index: int, message: m.Message) -> None:
        if isinstance(message, m.LookupRequest):
            FirstLookupSlow.lookups += 1
            answer = m.LookupResult(id=message.id, matched_tokens=32, chunk_tokens=16,
                                    sources=["local", "local"])
            delay = 0.6 if FirstLookupSlow.lookups == 1 else 0.0
            threading.Timer(delay, send_unless_closed, (conn, answer)).start()  # concurrent, as the daemon
        elif isinstance(message, m.StatsRequest):
            send(conn, m.StatsResult(id=message.id, stats={}))
        else:
            super().handle(conn, index, message)


def test_one_slow_lookup_of_a_healthy_daemon_does_not_start_the_back_off() -> None:
    with FirstLookupSlow() as daemon:
        conn, clock = connector(daemon.socket_path)  # lookup timeout 0.5 s, back-off 10 s
        assert conn.get_num_new_matched_tokens(request("r1", PROMPT), 0) == (0, False)  # given up
        clock.now = 1.0  # a second later: the next request is asked
        assert conn.get_num_new_matched_tokens(request("r2", PROMPT), 0) == (32, False)
        conn.shutdown()


def test_a_save_without_room_makes_no_copies(caplog: pytest.LogCaptureFixture) -> None:
    """The pending-bytes bound was checked after every layer had been copied out of the paged
    cache: a save bound to be dropped still cost the step all its copies."""
    with PutsWait() as daemon:
        one_save = 2 * LAYERS * HEADS * 32 * DIM * 4
        conn, _ = connector(daemon.socket_path, kvpeer_max_pending_save_bytes=one_save)
        save(conn, "r1")  # being put: the daemon holds it
        conn.update_state_after_alloc(request("r2", PROMPT), None, 0)
        conn.bind_connector_metadata(conn.build_connector_meta(scheduler_output("r2", PROMPT, list(range(10)), 0)))
        for name, cache in CACHES.items():
            conn.save_kv_layer(name, cache, None)
        assert not conn._staged  # no room: nothing copied
        with caplog.at_level(logging.WARNING, "kvpeer.integrations.vllm"):
            conn.wait_for_save()
        conn.clear_connector_metadata()
        assert conn.saves_dropped == 1 and "dropped" in caplog.text
        daemon.go.set()
        assert conn.flush_saves(GENEROUS_S)
        save_and_flush(conn, "r3")  # the room came back
        assert conn.saves_dropped == 1 and len(daemon.received(m.PutRequest)) == 2
        conn.shutdown()


def test_shutdown_does_not_wait_out_the_timeout_of_a_put_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The saving thread held the saves connection's lock for the put's whole timeout (60 s by
    default), and shutdown waited for that lock."""
    monkeypatch.setattr(vllm_mod, "SHUTDOWN_SAVE_WAIT_S", 0.3)
    with HelloOnly() as daemon:  # never answers a put
        conn, _ = connector(daemon.socket_path, kvpeer_save_timeout_s=HUNG_DAEMON_S)
        save(conn, "r1")
        daemon.wait_for(m.PutRequest)
        started = time.monotonic()
        conn.shutdown()
        assert time.monotonic() - started < GENEROUS_S


def test_a_staging_copy_that_cannot_be_made_gives_its_room_back(monkeypatch: pytest.MonkeyPatch) -> None:
    with PutsWait() as daemon:
        conn, _ = connector(daemon.socket_path)
        conn.update_state_after_alloc(request("r1", PROMPT), None, 0)
        conn.bind_connector_metadata(conn.build_connector_meta(scheduler_output("r1", PROMPT, list(range(10)), 0)))

        def no_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

        monkeypatch.setattr(torch, "empty", no_memory)
        name, cache = next(iter(CACHES.items()))
        conn.save_kv_layer(name, cache, None)  # the save is dropped, vLLM's step goes on
        monkeypatch.undo()
        assert conn._saver.waiting_bytes == 0 and "r1" in conn._save_failed
        conn.shutdown()


def test_an_abort_landing_while_a_connector_connection_is_made_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    with HelloOnly() as daemon:
        connection = DaemonConnection(str(daemon.socket_path), "default", timeout_s=10, client_name="t")
        init = KVPeerClient.__init__

        def aborted_meanwhile(self: KVPeerClient, *args: Any, **kwargs: Any) -> None:
            connection.abort()  # shutdown() aborts while the saving thread connects
            init(self, *args, **kwargs)

        monkeypatch.setattr(KVPeerClient, "__init__", aborted_meanwhile)
        with pytest.raises(ApiError) as info:
            connection.client()
        assert info.value.code == ErrorCode.SHUTTING_DOWN and connection._client is None
