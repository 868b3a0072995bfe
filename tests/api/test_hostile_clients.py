"""Clients that misbehave, by bug or on purpose: the daemon answers them with an error, or drops
them, and goes on serving everyone else."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpeer.api import messages as m
from kvpeer.api import server as server_module
from kvpeer.api.client import KVPeerClient
from kvpeer.errors import ErrorCode
from tests.api.fakes import FP, kv, serving, wait_until

# A server in a child process: a SIGBUS (the bug this guards against) would kill the test run.
_SERVER = """
import sys
from tests.api.fakes import serving
with serving() as api:
    api.backend.stall_after = 1  # fetches write chunk 0, then wait for "release" on stdin
    print(api.socket_path, flush=True)
    for line in sys.stdin:
        api.loop.call_soon_threadsafe(api.backend.release_stall.set)
"""


@pytest.fixture
def server_process() -> Iterator[tuple[subprocess.Popen[str], Path]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout is not None
    try:
        yield proc, Path(proc.stdout.readline().strip())
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the server closes and exits
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(str(path))
    return sock


def _answers(sock: socket.socket, decoder: m.FrameDecoder) -> Iterator[m.Message]:
    while True:
        for frame in decoder.frames():
            assert isinstance(frame, bytes)
            yield m.decode_body(frame)
        data = sock.recv(1 << 16)
        if not data:
            return
        decoder.feed(data)


def _final(sock: socket.socket, decoder: m.FrameDecoder) -> m.Message:
    """The answer that ends a request (a fetch's progress messages skipped)."""
    for message in _answers(sock, decoder):
        if not isinstance(message, m.FetchStarted | m.FetchProgress):
            return message
    raise AssertionError("the daemon closed the connection")


def _truncate(segment: str) -> None:
    fd = os.open(f"/dev/shm/{segment}", os.O_RDWR)
    try:
        os.ftruncate(fd, 4096)
    finally:
        os.close(fd)


def test_a_client_that_truncates_its_segment_cannot_crash_the_daemon(
    server_process: tuple[subprocess.Popen[str], Path],
) -> None:
    """The client shrinks its put segment before committing, and its fetch segment while the
    fetch writes: each request fails (INVALID), the daemon lives on and serves."""
    proc, path = server_process
    tokens = list(range(8))
    k, v = kv(8)
    with KVPeerClient(path) as client:
        client.put(tokens, k, v, FP)  # for the fetch below
    with _connect(path) as sock:
        decoder = m.FrameDecoder()
        sock.sendall(m.encode(m.PutRequest(id=1, tokens=list(range(100, 108)), fingerprint=FP, dtype=FP.dtype)))
        ready = _final(sock, decoder)
        assert isinstance(ready, m.SegmentReady)
        _truncate(ready.segment)
        sock.sendall(m.encode(m.PutCommit(id=2, segment=ready.segment)))
        answer = _final(sock, decoder)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.INVALID, answer
        assert "truncated" in answer.reason and proc.poll() is None

        sock.sendall(m.encode(m.FetchRequest(id=3, tokens=tokens, fingerprint=FP)))
        started = next(_answers(sock, decoder))
        assert isinstance(started, m.FetchStarted)
        _truncate(started.segment)
        assert proc.stdin is not None
        proc.stdin.write("release\n")
        proc.stdin.flush()
        answer = _final(sock, decoder)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.INVALID, answer
    assert proc.poll() is None, f"the daemon died (exit {proc.returncode})"
    with KVPeerClient(path) as client, client.fetch(tokens, FP) as result:
        assert result.matched_tokens == 8


def _wait_answer_then_close(sock: socket.socket) -> m.Message | None:
    """The daemon's one answer before it closes the connection (None: closed without one)."""
    answers = list(_answers(sock, m.FrameDecoder()))
    assert len(answers) <= 1, answers
    return answers[0] if answers else None


def test_a_frame_trickled_a_byte_at_a_time_times_out_as_a_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """FRAME_TIMEOUT_S bounds the frame, not each read: each byte came in time, and 40 such
    clients held 640 MiB of frame buffers in the daemon for as long as they liked."""
    monkeypatch.setattr(server_module, "FRAME_TIMEOUT_S", 0.5)
    with serving() as api, _connect(api.socket_path) as sock:
        sock.sendall(m.encode(m.Hello(id=1)))
        assert isinstance(next(_answers(sock, m.FrameDecoder())), m.HelloOk)
        sock.sendall(struct.pack(">I", 1000))  # a frame of 1000 bytes begins
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the daemon may close between two bytes
            for _ in range(40):  # 4 s at 0.1 s a byte: each read well within the timeout
                sock.sendall(b"\0")
                time.sleep(0.1)
                if select.select([sock], [], [], 0)[0]:
                    break
        answer = _wait_answer_then_close(sock)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.TIMEOUT, answer
        assert time.monotonic() - started < 2.0
        wait_until(lambda: api.server.stats()["connected"] == 0)


def test_a_connection_that_sends_nothing_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "FIRST_FRAME_TIMEOUT_S", 0.3)
    with serving() as api, _connect(api.socket_path) as sock:
        answer = _wait_answer_then_close(sock)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.TIMEOUT
        assert "no request" in answer.reason
        with KVPeerClient(api.socket_path) as client:  # a client that speaks stays served
            assert client.stats()["api"]["connected"] == 1


def test_connections_past_the_caps_are_refused_and_engines_are_still_served() -> None:
    """Idle connections without a cap ran the daemon out of file descriptors."""
    with serving(max_connections=5, max_connections_per_uid=3) as api, contextlib.ExitStack() as held:
        api.server.operator_uids = frozenset()  # the tests run as root, whom the caps pass by
        idle = [held.enter_context(_connect(api.socket_path)) for _ in range(3)]
        wait_until(lambda: api.server.stats()["connected"] == 3)
        with _connect(api.socket_path) as one_too_many:
            answer = _wait_answer_then_close(one_too_many)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.BUSY
        assert "uid" in answer.reason
        idle.pop().close()
        wait_until(lambda: api.server.stats()["connected"] == 2)
        with KVPeerClient(api.socket_path) as client:
            assert client.stats()["api"]["connections_refused"] == 1
    # The total cap, whoever asks, with the per-user cap out of the way.
    with serving(max_connections=2, max_connections_per_uid=10) as api, contextlib.ExitStack() as held:
        api.server.operator_uids = frozenset()
        for _ in range(2):
            held.enter_context(_connect(api.socket_path))
        wait_until(lambda: api.server.stats()["connected"] == 2)
        with _connect(api.socket_path) as one_too_many:
            answer = _wait_answer_then_close(one_too_many)
        assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.BUSY


def test_root_and_the_daemons_user_have_a_reserve_past_the_caps_not_no_cap() -> None:
    """Tenants at their caps must not lock the operator's `kvpeer status` out; but an engine
    running as root must not escape the total cap either (its leaks would exhaust the fds)."""
    with serving(max_connections=2, max_connections_per_uid=1) as api, contextlib.ExitStack() as held:
        assert os.geteuid() in api.server.operator_uids and 0 in api.server.operator_uids
        for _ in range(2 + server_module.OPERATOR_RESERVE - 1):
            held.enter_context(_connect(api.socket_path))
        wait_until(lambda: api.server.stats()["connected"] == 1 + server_module.OPERATOR_RESERVE)
        with KVPeerClient(api.socket_path) as client:  # the last slot of the reserve
            assert client.stats()["api"]["connections_refused"] == 0
            with _connect(api.socket_path) as one_too_many:
                answer = _wait_answer_then_close(one_too_many)
            assert isinstance(answer, m.ErrorResponse) and answer.code == ErrorCode.BUSY
