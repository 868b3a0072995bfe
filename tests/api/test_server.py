"""The API server and the blocking client over a real Unix socket, against a fake backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch

from kvpeer import shm
from kvpeer.api import messages as m
from kvpeer.api.client import KVPeerClient
from kvpeer.api.server import SPARE_IDLE_S
from kvpeer.errors import ApiError, ErrorCode, ProtocolError
from kvpeer.hashing import ModelFingerprint
from tests.api.fakes import (
    CHUNK,
    FP,
    FakeBackend,
    ServerThread,
    kv,
    our_segments,
    serving,
    wait_until,
)


def raw_frames(path: object, payloads: list[bytes]) -> list[m.Message]:
    """Send raw frames on a fresh connection; read one answer per frame."""
    answers: list[m.Message] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        decoder = m.FrameDecoder()
        for payload in payloads:
            if payload:  # b"": only read (the server may already have closed its side)
                sock.sendall(payload)
            while True:
                frames = list(decoder.frames())
                if frames:
                    assert isinstance(frames[0], bytes)
                    answers.append(m.decode_body(frames[0]))
                    break
                decoder.feed(sock.recv(65536))
    return answers


def test_put_lookup_fetch_round_trip(api: ServerThread) -> None:
    tokens = list(range(10))  # two full chunks of 4 and a partial one
    k, v = kv(10)
    with KVPeerClient(api.socket_path, namespace="team-a") as client:
        put = client.put(tokens, k, v, FP)
        assert (put.chunks, put.stored, put.chunk_tokens) == (2, 2, CHUNK)
        again = client.put(tokens, k, v, FP)
        assert again.stored == 0

        found = client.lookup(tokens + [99, 98], FP)
        assert found.matched_tokens == 8 and found.sources == ["local", "local"]

        with client.fetch(tokens, FP) as result:
            assert result.matched_tokens == 8
            assert result.levels == ["exact", "exact"]
            assert result.recompute_from == 8
            assert torch.equal(result.k, k[:, :, :8])
            assert torch.equal(result.v, v[:, :, :8])
            assert result.zero_copy()
            name = result.segment.name if result.segment else ""
            assert name in our_segments()
        assert name not in our_segments(), "leaving the with block releases the segment"


def test_one_users_connections_share_the_shared_memory_cap(api: ServerThread) -> None:
    """The cap was per connection: one user opening more connections held that many times it."""
    tokens = list(range(8))
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(tokens, k, v, FP)
        with client.fetch(tokens, FP) as result:
            assert result.segment is not None
            size = os.stat(f"/dev/shm/{result.segment.name}").st_size  # one fetch's segment
    with serving(max_shm_bytes_per_uid=size + size // 2) as capped:
        with KVPeerClient(capped.socket_path) as first, KVPeerClient(capped.socket_path) as second:
            first.put(tokens, k, v, FP)
            with first.fetch(tokens, FP) as held:
                assert held.matched_tokens == 8
                with pytest.raises(ApiError) as info, second.fetch(tokens, FP) as refused:
                    refused.wait()
                assert info.value.code == ErrorCode.BUSY and "this user's clients" in info.value.reason
            with second.fetch(tokens, FP) as again:  # released: room again
                assert again.matched_tokens == 8


def test_prefill_time_and_recompute_speed_reach_the_backend(api: ServerThread) -> None:
    tokens = list(range(8))
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(tokens, k, v, FP, prefill_s=1.5)
        with client.fetch(tokens, FP, recompute_tokens_per_s=300.0) as result:
            assert result.matched_tokens == 8
        with client.fetch(tokens, FP) as result:
            result.wait()  # leaving at once would cancel it, maybe before the backend got it
    put, fetch, plain = api.backend.requests[-3:]
    assert isinstance(put, m.PutRequest) and put.prefill_s == 1.5
    assert isinstance(fetch, m.FetchRequest) and fetch.recompute_tokens_per_s == 300.0
    assert isinstance(plain, m.FetchRequest) and plain.recompute_tokens_per_s is None


def test_namespaces_are_isolated(api: ServerThread) -> None:
    k, v = kv(8)
    with KVPeerClient(api.socket_path, namespace="a") as a, KVPeerClient(api.socket_path, namespace="b") as b:
        a.put(list(range(8)), k, v, FP)
        assert b.lookup(list(range(8)), FP).matched_tokens == 0
        with b.fetch(list(range(8)), FP) as result:
            assert result.matched_tokens == 0
            assert result.k.shape == (FP.layers, FP.kv_heads, 0, FP.head_dim)
            assert result.segment is None


def test_streaming_progress_lets_chunk_zero_be_used_first(api: ServerThread) -> None:
    k, v = kv(12)
    api.backend.stall_after = 1  # chunk 0 is restored, chunk 1 waits for us
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(12)), k, v, FP)
        with client.fetch(list(range(12)), FP) as result:
            assert result.wait_for_chunk(0)
            k0, v0 = result.chunk(0)
            assert torch.equal(k0, k[:, :, :CHUNK]) and torch.equal(v0, v[:, :, :CHUNK])
            api.loop.call_soon_threadsafe(api.backend.release_stall.set)
            assert result.matched_tokens == 12


def test_deadline_reports_the_prefix_restored_so_far(api: ServerThread) -> None:
    k, v = kv(12)
    api.backend.stall_after = 2  # never released: the deadline must end the fetch
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(12)), k, v, FP)
        with client.fetch(list(range(12)), FP, deadline_s=0.3) as result:
            assert result.matched_tokens == 8
            assert torch.equal(result.k, k[:, :, :8])


def test_backend_error_becomes_an_error_answer_and_the_client_keeps_working(api: ServerThread) -> None:
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(8)), k, v, FP)
        api.backend.fail_fetch = True
        with pytest.raises(ApiError) as info:
            with client.fetch(list(range(8)), FP) as result:
                result.wait()
        assert info.value.code == ErrorCode.NOT_FOUND
        assert client.lookup(list(range(8)), FP).matched_tokens == 8


def test_failure_after_the_segment_was_announced_raises_the_real_error(api: ServerThread) -> None:
    k, v = kv(8)
    before = our_segments()
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(8)), k, v, FP)
        api.backend.fail_after_allocate = True
        with pytest.raises(ApiError) as info:
            with client.fetch(list(range(8)), FP) as result:
                result.wait()
        assert info.value.code == ErrorCode.INTEGRITY
        assert our_segments() <= before
        assert client.stats()["api"]["live_segments"] == 0


def test_a_fetch_that_fails_while_handing_its_segment_over_leaves_no_segment(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment, unleased until the hand-over, stayed held until the client disconnected."""
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(8)), k, v, FP)

        def broken_lease(*args: object) -> None:
            raise ProtocolError(ErrorCode.INTERNAL, "the registry broke")

        monkeypatch.setattr(api.server.registry, "lease", broken_lease)
        with pytest.raises(ApiError) as info:
            with client.fetch(list(range(8)), FP) as result:
                result.wait()
        assert info.value.code == ErrorCode.INTERNAL
        assert client.stats()["api"]["live_segments"] == 0


def test_a_fetch_of_more_chunks_than_an_answer_carries_is_refused_saying_why(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a small codec.chunk_tokens, the daemon's own progress and result failed validation:
    the client got INVALID about a list it never sent, and the segment stayed held."""
    monkeypatch.setattr(m, "MAX_CHUNKS", 2)
    k, v = kv(12)
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(12)), k, v, FP)
        with pytest.raises(ApiError) as info:
            with client.fetch(list(range(12)), FP) as result:
                result.wait()
        assert info.value.code == ErrorCode.TOO_LARGE and "codec.chunk_tokens" in info.value.reason
        assert client.stats()["api"]["live_segments"] == 0
        with client.fetch(list(range(8)), FP) as result:  # two chunks: served
            assert result.matched_tokens == 8


def test_stats_peers_evict(api: ServerThread) -> None:
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(8)), k, v, FP)
        stats = client.stats()
        assert stats["chunks"] == 2 and stats["api"]["connected"] == 1
        assert client.peers() == [{"node_id": "peer-1", "chunks": 3}]
        assert client.evict_all() == {"evicted": 2}
        assert client.lookup(list(range(8)), FP).matched_tokens == 0


def test_put_and_fetch_segments_are_made_off_the_event_loop(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reserving a segment's pages zero-fills them (~0.3 s per GiB): on the loop, every other
    client and every peer would wait that long."""
    made_in: list[threading.Thread] = []
    make = api.server.registry.make

    def recording_make(*args: Any, **kwargs: Any) -> Any:
        made_in.append(threading.current_thread())
        return make(*args, **kwargs)

    monkeypatch.setattr(api.server.registry, "make", recording_make)
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(8)), k, v, FP)
        with client.fetch(list(range(8)), FP) as result:
            assert result.matched_tokens == 8
    assert len(made_in) == 2 and api._thread not in made_in


def test_put_rejects_a_shape_that_does_not_match_the_fingerprint(api: ServerThread) -> None:
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client, pytest.raises(ApiError) as info:
        client.put(list(range(8)), k[:1], v[:1], FP)
    assert info.value.code == ErrorCode.INVALID


def test_malformed_oversized_and_unknown_frames_get_errors_and_serving_goes_on(api: ServerThread) -> None:
    garbage = b"\xc1\xc1\xc1"
    oversized_len = m.MAX_FRAME_BYTES + 1
    unknown = msgpack.packb({"v": m.API_VERSION, "t": "launch_missiles", "id": 7})
    old = msgpack.packb({"v": 99, "t": "stats", "id": 8})
    not_request = m.encode(m.Released(id=9))
    bad_field = msgpack.packb({"v": m.API_VERSION, "t": "lookup", "id": 10, "tokens": b"abc", "fingerprint": {}})
    ok = m.encode(m.StatsRequest(id=11))
    answers = raw_frames(api.socket_path, [
        struct.pack(">I", len(garbage)) + garbage,
        struct.pack(">I", oversized_len) + b"\0" * oversized_len,
        struct.pack(">I", len(unknown)) + unknown,
        struct.pack(">I", len(old)) + old,
        not_request,
        struct.pack(">I", len(bad_field)) + bad_field,
        ok,
    ])
    codes = [a.code if isinstance(a, m.ErrorResponse) else a.TYPE for a in answers]
    assert codes == [
        ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_TYPE,
        ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNKNOWN_TYPE, ErrorCode.INVALID, "stats_result",
    ]
    assert [a.id for a in answers][2:] == [7, 8, 9, 10, 11]


def test_release_of_someone_elses_segment_is_refused(api: ServerThread) -> None:
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as a, KVPeerClient(api.socket_path) as b:
        a.put(list(range(8)), k, v, FP)
        with a.fetch(list(range(8)), FP) as result:
            assert result.segment is not None
            with pytest.raises(ApiError) as info:
                b._call(m.Release(id=b._new_id(), segment=result.segment.name), m.Released)
            assert info.value.code == ErrorCode.NOT_FOUND
            assert torch.equal(result.k, k)


def test_disconnect_releases_segments() -> None:
    before = our_segments()
    with serving() as api:
        k, v = kv(8)
        client = KVPeerClient(api.socket_path)
        client.put(list(range(8)), k, v, FP)
        handle = client.fetch(list(range(8)), FP)
        assert handle.matched_tokens == 8
        assert len(our_segments() - before) == 1
        client.close()  # no release: the connection closing must free it
        wait_until(lambda: not (our_segments() - before))


def test_a_client_gone_while_its_fetch_segment_is_being_made_leaves_no_segment() -> None:
    """The segment is reserved in a thread; the fetch is cancelled meanwhile (the client
    closed): the segment made after that must be unlinked, not left in /dev/shm."""
    before = our_segments()
    with serving() as api:
        k, v = kv(8)
        with KVPeerClient(api.socket_path) as client:
            client.put(list(range(8)), k, v, FP)
        making, release = threading.Event(), threading.Event()
        make = api.server.registry.make

        def slow_make(*args: Any, **kwargs: Any) -> Any:
            making.set()
            assert release.wait(10)
            return make(*args, **kwargs)

        api.server.registry.make = slow_make  # type: ignore[method-assign]
        client = KVPeerClient(api.socket_path)
        client._send(m.FetchRequest(id=7, tokens=list(range(8)), fingerprint=FP))
        assert making.wait(10)
        client.close()
        wait_until(lambda: api.server.stats()["connected"] == 0)
        release.set()
        wait_until(lambda: not (our_segments() - before))
        assert len(api.server.registry) == 0


def test_lease_expiry_releases_segments() -> None:
    before = our_segments()
    with serving(lease_s=0.2) as api:
        k, v = kv(8)
        with KVPeerClient(api.socket_path) as client:
            client.put(list(range(8)), k, v, FP)
            handle = client.fetch(list(range(8)), FP)
            kept = handle.k.clone()
            assert handle.matched_tokens == 8
            wait_until(lambda: not (our_segments() - before))
            assert torch.equal(handle.k, kept), "our mapping stays valid after the name is gone"
            handle.release()  # nothing left to release: not an error
            assert client.lookup(list(range(8)), FP).matched_tokens == 8


def test_a_fetch_longer_than_the_lease_keeps_its_segment_leased_from_the_handover() -> None:
    """The lease is the client's time to use the segment: it starts when the fetch hands the
    segment over. Counted from the allocation, a fetch slower than api.lease_s lost its
    segment mid-way (and stopped with a misleading INTERNAL error)."""
    before = our_segments()
    with serving(lease_s=0.5, spare_bytes=0) as api:
        k, v = kv(16)
        with KVPeerClient(api.socket_path) as client:
            client.put(list(range(16)), k, v, FP)  # 4 chunks
            api.backend.stall_after = 2  # a slow link: chunks 2 and 3 come after the lease
            go = threading.Timer(1.0, lambda: api.loop.call_soon_threadsafe(api.backend.release_stall.set))
            go.start()
            handle = client.fetch(list(range(16)), FP)
            handed_over = time.monotonic()
            assert handle.matched_tokens == 16 and torch.equal(handle.k, k)
            assert handle.segment is not None and handle.segment.name in our_segments()
            wait_until(lambda: not (our_segments() - before))  # the lease still runs out
            assert time.monotonic() - handed_over >= 0.4
            handle.release()
            go.join()


def test_a_put_never_committed_is_forgotten_when_its_segment_expires() -> None:
    """Its request (up to 16 MiB of tokens) would otherwise stay for the connection's life."""
    with serving(lease_s=0.2) as api, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(api.socket_path))
        sock.sendall(m.encode(m.PutRequest(id=1, tokens=list(range(8)), fingerprint=FP, dtype=FP.dtype)))
        decoder = m.FrameDecoder()
        while not (frames := list(decoder.frames())):
            decoder.feed(sock.recv(65536))
        ready = m.decode_body(frames[0])
        assert isinstance(ready, m.SegmentReady)
        (conn,) = api.server._connections.values()
        assert len(conn.pending_puts) == 1
        wait_until(lambda: not conn.pending_puts)
        # A commit too late says why (it said "no put is waiting for this segment", no more).
        sock.sendall(m.encode(m.PutCommit(id=2, segment=ready.segment)))
        while not (frames := list(decoder.frames())):
            decoder.feed(sock.recv(65536))
        late = m.decode_body(frames[0])
        assert isinstance(late, m.ErrorResponse) and late.code == int(ErrorCode.NOT_FOUND)
        assert "api.lease_s" in late.reason


def test_bfloat16_and_float16_round_trip(api: ServerThread) -> None:
    for offset, dtype in ((1000, torch.bfloat16), (2000, torch.float16)):
        k, v = kv(4, seed=3, dtype=dtype)
        tokens = [offset + i for i in range(4)]
        fp = ModelFingerprint(name=FP.name, layers=FP.layers, kv_heads=FP.kv_heads,
                              head_dim=FP.head_dim, dtype=str(dtype).removeprefix("torch."))
        with KVPeerClient(api.socket_path) as client:
            client.put(tokens, k, v, fp)
            with client.fetch(tokens, fp) as result:
                assert result.k.dtype == dtype
                assert torch.equal(result.k, k) and torch.equal(result.v, v)


def test_start_replaces_a_stale_socket_and_refuses_a_live_one(api: ServerThread) -> None:
    from kvpeer.api.server import ApiServer
    from kvpeer.errors import ConfigError
    from tests.api.fakes import FakeBackend

    with pytest.raises(ConfigError):
        api.call(ApiServer(api.socket_path, FakeBackend()).start())
    stale = api.dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # bound, never listening: what a crashed daemon leaves
    second = ApiServer(stale, FakeBackend())
    api.call(second.start())
    try:
        with KVPeerClient(stale) as client:
            assert client.stats()["api"]["connected"] == 1
    finally:
        api.call(second.close())
    assert not stale.exists()


def as_user(uid: int, check: Callable[[], bool]) -> bool:
    """Run ``check`` in a forked child that became ``uid``; True if it returned True (a
    traceback from the child goes to stderr)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setuid(uid)
            code = 0 if check() else 2
        except BaseException:
            import traceback

            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_uids_outside_allowed_uids_are_refused() -> None:
    nobody = 65534
    with serving(allowed_uids=[os.geteuid() + 4242], mode=0o666) as api:
        with KVPeerClient(api.socket_path) as client:  # the daemon's own uid is always served
            assert client.peers()
        os.chmod(api.dir, 0o755)  # mkdtemp made it 0700: let the other user reach the socket

        def refused() -> bool:
            # Read, do not write first: the daemon answers the connection itself and closes
            # it, so a request could meet a closed socket (EPIPE).
            answers = raw_frames(api.socket_path, [b""])
            return isinstance(answers[0], m.ErrorResponse) and answers[0].code == ErrorCode.FORBIDDEN

        assert as_user(nobody, refused)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_client_of_another_uid_maps_its_segment_and_only_it_can() -> None:
    """Segments stay the daemon's own (0600): a client gets a descriptor with the answer, so
    it maps its segment without being able to open any segment by name, its own included."""
    nobody = 65534
    k, v = kv(8)
    with serving(mode=0o666) as api:
        with KVPeerClient(api.socket_path) as client:
            client.put(list(range(8)), k, v, FP)
        os.chmod(api.dir, 0o755)

        def maps_its_segment() -> bool:
            with KVPeerClient(api.socket_path) as other, other.fetch(list(range(8)), FP) as result:
                assert result.segment is not None
                path = shm.SHM_DIR / result.segment.name
                stat = os.stat(path)
                assert stat.st_uid == 0 and stat.st_mode & 0o077 == 0
                with pytest.raises(PermissionError):
                    os.open(path, os.O_RDONLY)
                return result.zero_copy() and torch.equal(result.k, k)

        assert as_user(nobody, maps_its_segment)


def test_the_next_fetch_takes_the_segment_reserved_while_idle() -> None:
    """After a fetch, once idle, the server reserves the next fetch's pages (a spare no client
    can name); the next fetch of that size is made from them, the one after from a new spare."""
    before = our_segments()
    with serving() as api:
        registry = api.server.registry
        taken: list[bool] = []
        take = registry._take_spare

        def recording_take(size: int) -> Any:
            spare = take(size)
            taken.append(spare is not None)
            return spare

        registry._take_spare = recording_take  # type: ignore[method-assign]
        k, v = kv(8)
        with KVPeerClient(api.socket_path) as client:
            client.put(list(range(8)), k, v, FP)
            taken.clear()  # the put's segment is not a fetch's
            with client.fetch(list(range(8)), FP) as first:
                assert first.segment is not None
                size = first.segment.layout.size
            assert taken == [False]
            wait_until(lambda: registry.spare_bytes >= size)
            assert not (our_segments() - before)  # a spare is not a segment
            # ... but its pages are in /dev/shm: stats say how many (they showed none)
            assert client.stats()["api"]["spare_segment_bytes"] == registry.spare_bytes
            with client.fetch(list(range(8)), FP) as second:
                assert torch.equal(second.k, k) and torch.equal(second.v, v)
            assert taken == [False, True]
            wait_until(lambda: registry.spare_bytes >= size)
    assert registry.spare_bytes == 0 and not (our_segments() - before)


def test_no_segment_is_reserved_ahead_with_spare_bytes_zero() -> None:
    """``api.spare_bytes = 0``: fetches make their own segments and nothing is held while idle."""
    before = our_segments()
    with serving(spare_bytes=0) as api:
        registry = api.server.registry
        reserved: list[int] = []
        reserve = registry.reserve_spare

        def recording_reserve(size: int, *, max_bytes: int) -> bool:
            reserved.append(size)
            return reserve(size, max_bytes=max_bytes)

        registry.reserve_spare = recording_reserve  # type: ignore[method-assign]
        k, v = kv(8)
        with KVPeerClient(api.socket_path) as client:
            client.put(list(range(8)), k, v, FP)
            for _ in range(2):
                with client.fetch(list(range(8)), FP) as result:
                    assert torch.equal(result.k, k)
            # The idle wait the spare would start after (SPARE_IDLE_S) passes with none made.
            time.sleep(3 * SPARE_IDLE_S)
            assert reserved == [] and registry.spare_bytes == 0
            assert not (our_segments() - before)


def test_closing_with_clients_connected_logs_no_asyncio_error() -> None:
    """A SIGTERM with engines connected cancels their handlers; on Python 3.11/3.12 asyncio's
    stream callback then logged the cancel at ERROR with a traceback (journalctl -p err)."""
    errors: list[dict[str, Any]] = []
    with ServerThread(FakeBackend()) as api:
        api.loop.set_exception_handler(lambda loop, context: errors.append(context))
        clients = [KVPeerClient(api.socket_path) for _ in range(3)]
        for client in clients:
            client.stats()  # connected, its handler waiting for the next request
        api.call(api.server.close())
        api.call(asyncio.sleep(0.2))  # the stream callbacks run after the handlers end
        for client in clients:
            client.close()
    assert errors == []


class DecodesOutOfOrder(FakeBackend):
    """Restores chunk 0 last, as a fetch does when its first peer is slow, and hands each chunk
    to the sink as the fetcher's decoding thread does."""

    def __init__(self) -> None:
        super().__init__()
        self.staged_after_decode: list[int] = []

    async def fetch(self, ctx: Any, req: m.FetchRequest, sink: Any) -> None:
        keys = self._keys(ctx, req.tokens, req.fingerprint)
        await sink.allocate(layers=FP.layers, kv_heads=FP.kv_heads, head_dim=FP.head_dim,
                            tokens=len(keys) * CHUNK, dtype="float32", chunk_tokens=CHUNK)
        loop = asyncio.get_running_loop()
        for index in [*range(1, len(keys)), 0]:
            k_view, v_view = sink.chunk_view(index)
            k_view.copy_(self.chunks[keys[index]][0])
            v_view.copy_(self.chunks[keys[index]][1])
            await loop.run_in_executor(None, sink.chunk_decoded_blocking, index)
            self.staged_after_decode.append(len(sink._staged))
        for index in range(len(keys)):
            await sink.chunk_done(index, "exact")


def test_chunks_decoded_ahead_go_to_the_segment_at_once_not_held_in_daemon_memory() -> None:
    """A chunk decoded before an earlier one used to wait in a daemon buffer until its turn
    (GBs with a slow first chunk), then be copied in at the end, after the last decode."""
    backend = DecodesOutOfOrder()
    with ServerThread(backend) as api, KVPeerClient(api.socket_path) as client:
        k, v = kv(4 * CHUNK)
        client.put(list(range(4 * CHUNK)), k, v, FP)
        with client.fetch(list(range(4 * CHUNK)), FP) as result:
            assert result.matched_tokens == 4 * CHUNK
            assert torch.equal(result.k, k) and torch.equal(result.v, v)
    assert backend.staged_after_decode == [0, 0, 0, 0]


class SlowEncoder(FakeBackend):
    """Reads each chunk in an executor as Daemon.put does, then 'encodes' it for a while."""

    async def put(self, ctx: Any, req: m.PutRequest, put_kv: Any) -> m.PutResult:
        keys = self._keys(ctx, req.tokens, req.fingerprint)
        loop = asyncio.get_running_loop()
        for i, key in enumerate(keys):
            self.chunks[key] = await loop.run_in_executor(
                None, put_kv.read_blocking, i * self.chunk_tokens, (i + 1) * self.chunk_tokens
            )
            await asyncio.sleep(0.3)  # one chunk's encode: seconds, for a big put
        return m.PutResult(chunks=len(keys), stored=len(keys), chunk_tokens=self.chunk_tokens)


def test_a_put_that_encodes_longer_than_the_lease_keeps_its_segment() -> None:
    """The put is read a chunk at a time while it encodes: a lease ending meanwhile cut it
    off half-way (NOT_FOUND after storing a prefix)."""
    with ServerThread(SlowEncoder(), lease_s=0.3, spare_bytes=0) as api, \
            KVPeerClient(api.socket_path, timeout_s=10) as client:
        k, v = kv(4 * CHUNK)
        assert client.put(list(range(4 * CHUNK)), k, v, FP).stored == 4
        wait_until(lambda: api.server.stats()["live_segments"] == 0)


def test_a_socket_this_user_may_not_connect_to_is_not_taken_for_stale(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES (another user's daemon, maybe live) counted as stale: its socket was unlinked."""
    import errno
    import pwd

    from kvpeer.api.server import ApiServer
    from kvpeer.errors import ConfigError
    from tests.api.fakes import FakeBackend

    path = tmp_path / "kvpeer.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()

        async def denied(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(asyncio, "open_unix_connection", denied)
        with pytest.raises(ConfigError, match="api.socket_path.*permission denied") as error:
            asyncio.run(ApiServer(path, FakeBackend(), shm_dir=tmp_path).start())
        assert path.exists()
    # what to do about it: a dead daemon's socket of another user stopped the start for good
    assert f"owned by user {pwd.getpwuid(os.getuid()).pw_name}" in str(error.value)
    assert f"`ss -xlp | grep {path}`" in str(error.value)
    assert f"if none does, remove {path}" in str(error.value)


def test_a_stale_socket_this_user_cannot_remove_is_a_config_error_naming_its_owner(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EPERM (another user's file in a sticky directory): it logged "removing the stale socket"
    and then raised a bare PermissionError."""
    import errno
    import pwd

    from kvpeer.api.server import ApiServer
    from kvpeer.errors import ConfigError
    from tests.api.fakes import FakeBackend

    path = tmp_path / "kvpeer.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    real_unlink = os.unlink

    def unlink(target: Any, *args: Any, **kwargs: Any) -> None:
        if str(target) == str(path):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(target))
        real_unlink(target, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    owner = pwd.getpwuid(os.getuid()).pw_name
    with caplog.at_level("INFO", logger="kvpeer.api.server"), pytest.raises(
        ConfigError, match=f"api.socket_path: {path} is a stale socket .* cannot remove: "
        f"Operation not permitted; it belongs to user {owner}"
    ):
        asyncio.run(ApiServer(path, FakeBackend(), shm_dir=tmp_path).start())
    assert "stale socket" not in caplog.text  # no "removed" line for a socket still there
    assert path.exists()


def test_a_stale_socket_is_removed_with_a_log_line(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from kvpeer.api.server import ApiServer
    from tests.api.fakes import FakeBackend

    path = tmp_path / "kvpeer.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a crashed daemon leaves

    async def main() -> None:
        server = ApiServer(path, FakeBackend(), shm_dir=tmp_path)
        await server.start()
        await server.close()

    with caplog.at_level("INFO", logger="kvpeer.api.server"):
        asyncio.run(main())
    assert any("stale socket" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records if r.levelname == "INFO")


def test_close_leaves_a_socket_another_daemon_put_at_the_path(tmp_path: Any) -> None:
    """close() unlinked by path: the socket of a daemon started meanwhile went with it."""
    from kvpeer.api.server import ApiServer
    from tests.api.fakes import FakeBackend

    path = tmp_path / "kvpeer.sock"

    async def main() -> None:
        server = ApiServer(path, FakeBackend(), shm_dir=tmp_path)
        await server.start()
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
            newer.bind(str(path))
            newer.listen()
            await server.close()
            assert path.exists()
        mine = ApiServer(path, FakeBackend(), shm_dir=tmp_path)  # takes it for stale now
        await mine.start()
        await mine.close()
        assert not path.exists()

    asyncio.run(main())


def _socket_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("socket:"):
                out[int(name)] = target
    return out


def test_a_client_that_stops_reading_is_dropped_and_its_descriptor_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drop closed the writer, which waits to flush what the client never reads: the
    daemon's end stayed open (uncounted by the connection caps) as long as the client kept it."""
    from kvpeer.api import server as server_mod

    monkeypatch.setattr(server_mod, "SEND_TIMEOUT_S", 0.5)
    with serving() as api:
        before = _socket_fds()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(str(api.socket_path))
        try:
            wait_until(lambda: len(api.server._connections) == 1)
            opened = set(_socket_fds()) - set(before)
            assert client.fileno() in opened and len(opened) == 2  # ours and the daemon's end
            client.sendall(b"".join(m.encode(m.StatsRequest(id=i + 1)) for i in range(3000)))
            wait_until(lambda: not api.server._connections)
            wait_until(lambda: set(_socket_fds()) - set(before) == {client.fileno()})
        finally:
            client.close()


def test_a_put_whose_kv_is_not_in_the_models_dtype_is_refused_before_a_segment(api: ServerThread) -> None:
    """Fetches hand KV back in the model's dtype: float32 values past float16's range, put
    under a float16 fingerprint, came back as inf (the codec refuses non-finite KV, not this)."""
    fp16 = ModelFingerprint(name="half", layers=FP.layers, kv_heads=FP.kv_heads, head_dim=FP.head_dim,
                            dtype="float16")
    k, v = kv(4, seed=3, dtype=torch.float32)
    with KVPeerClient(api.socket_path) as client, pytest.raises(ApiError) as info:
        client.put([1, 2, 3, 4], k * 1e6, v, fp16)
    assert info.value.code == ErrorCode.INVALID and "float32" in info.value.reason
    assert not our_segments()
