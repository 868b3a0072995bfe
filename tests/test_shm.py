"""Shared-memory segments: layout, zero-copy views, registry ownership, leases, stale sweeps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpeer import shm
from kvpeer.errors import ErrorCode, ProtocolError

LAYOUT = shm.SegmentLayout(dtype="float16", layers=2, kv_heads=3, tokens=10, head_dim=8, chunk_tokens=4)


def test_layout_is_page_aligned_and_round_trips() -> None:
    assert LAYOUT.chunks == 3
    assert LAYOUT.k_offset % shm.PAGE == 0 and LAYOUT.v_offset % shm.PAGE == 0
    assert LAYOUT.v_offset >= LAYOUT.k_offset + LAYOUT.tensor_bytes
    header = LAYOUT.pack_header()
    assert shm.SegmentLayout.parse_header(header, LAYOUT.size) == LAYOUT
    with pytest.raises(ProtocolError):
        shm.SegmentLayout.parse_header(header, LAYOUT.size - 1)
    with pytest.raises(ProtocolError):
        shm.SegmentLayout.parse_header(b"XXXX" + header[4:], LAYOUT.size)


def _segment_files(directory: Path) -> list[str]:
    """Segment and spare files (a live registry's instance file aside)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("kvpeer"))


def _kv(layout: shm.SegmentLayout = LAYOUT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape, generator=g).half(), torch.randn(layout.shape, generator=g).half()


def _write_chunks(segment: shm.DaemonSegment, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write ``k``/``v`` chunk by chunk, each through a chunk-sized buffer, as a fetch does."""
    shape = (LAYOUT.layers, LAYOUT.kv_heads, LAYOUT.chunk_tokens, LAYOUT.head_dim)
    k_buf, v_buf = torch.full(shape, 99.0).half(), torch.full(shape, 99.0).half()
    for index in range(segment.layout.chunks):
        start, stop = segment.chunk_span(index)
        k_buf[:, :, : stop - start] = k[:, :, start:stop]
        v_buf[:, :, : stop - start] = v[:, :, start:stop]
        segment.write_chunk_blocking(index, k_buf, v_buf)


def test_the_daemon_writes_and_reads_a_segment_an_opener_maps_zero_copy(tmp_path: Path) -> None:
    owner = shm.DaemonSegment.create(LAYOUT, directory=tmp_path)
    try:
        k, v = _kv()
        _write_chunks(owner, k, v)
        owner.set_level(0, "exact")
        owner.set_level(2, "q8")
        owner.set_matched_tokens(4)
        reader = shm.Segment.open(owner.name, directory=tmp_path)
        assert reader.layout == LAYOUT
        assert reader.levels() == ["exact", None, "q8"] and reader.matched_tokens == 4
        assert torch.equal(reader.k, k) and torch.equal(reader.v, v)
        assert reader.holds(reader.k) and reader.holds(reader.v[:, :, 4:8])
        assert not reader.holds(reader.k.clone())
        reader.k[0, 0, 0, 0] = 7.0  # what the client writes (a put), the daemon reads
        read_k, read_v = owner.read_kv_blocking()
        assert read_k[0, 0, 0, 0] == 7.0 and torch.equal(read_v, v)
        reader.k[0, 0, 0, 0] = 8.0  # ... into its own memory: later writes do not reach it
        assert read_k[0, 0, 0, 0] == 7.0
        assert reader.close()
    finally:
        owner.unlink()
        owner.close()
    assert not any(tmp_path.iterdir())


def test_a_put_is_read_a_few_tokens_at_a_time_into_the_daemons_memory(tmp_path: Path) -> None:
    """The daemon reads only the chunks it encodes, one at a time (a whole put copied at once
    held GBs in the daemon); what it reads is exactly what the client wrote."""
    segment = shm.DaemonSegment.create(LAYOUT, directory=tmp_path)
    try:
        k, v = _kv()
        reader = shm.Segment.open(segment.name, directory=tmp_path)
        reader.k.copy_(k)
        reader.v.copy_(v)
        for start, stop in ((0, 4), (4, 8), (3, 9), (0, LAYOUT.tokens)):
            got_k, got_v = segment.read_rows_blocking(start, stop)
            assert got_k.is_contiguous() and got_k.shape == k[:, :, start:stop].shape
            assert torch.equal(got_k, k[:, :, start:stop]) and torch.equal(got_v, v[:, :, start:stop])
        with pytest.raises(ProtocolError):
            segment.read_rows_blocking(4, LAYOUT.tokens + 1)
        reader.close()
    finally:
        segment.unlink()
        segment.close()


def test_the_daemon_never_maps_a_segment(tmp_path: Path) -> None:
    """A client may shrink its segment; a mapping of the daemon's would then SIGBUS it."""
    segment = shm.DaemonSegment.create(LAYOUT, directory=tmp_path)
    _write_chunks(segment, *_kv())
    segment.read_kv_blocking()
    assert str(segment.path) not in Path("/proc/self/maps").read_text()
    segment.unlink()
    segment.close()


def test_a_shrunk_segment_is_an_error_for_its_request_not_a_crash(tmp_path: Path) -> None:
    """The client truncates its segment: reading the put or writing a fetch chunk is INVALID
    (in a child process: before the fix, the daemon's side died of SIGBUS)."""
    script = f"""
import os, sys
from pathlib import Path
import torch
from kvpeer import shm
from kvpeer.errors import ProtocolError
layout = shm.SegmentLayout(dtype="float16", layers=2, kv_heads=3, tokens=10, head_dim=8, chunk_tokens=4)
registry = shm.SegmentRegistry(directory=Path({str(tmp_path)!r}))
for step in ("read", "write"):
    segment = registry.create(layout, owner=1, now=0.0)
    client = os.open(segment.path, os.O_RDWR)
    os.ftruncate(client, shm.PAGE)
    os.close(client)
    try:
        if step == "read":
            segment.read_kv_blocking()
        else:
            chunk = torch.zeros(2, 3, 4, 8, dtype=torch.float16)
            segment.write_chunk_blocking(2, chunk, chunk)
    except ProtocolError as exc:
        print(step, exc.code.name, "truncated" in exc.reason)
registry.close()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.split() == ["read", "INVALID", "True", "write", "INVALID", "True"]


def test_a_released_segment_waits_for_a_write_still_running(tmp_path: Path) -> None:
    """Released (client gone) while a thread writes a chunk: the file is closed after the
    write, never under it (a reused descriptor number would take the write elsewhere)."""
    segment = shm.DaemonSegment.create(LAYOUT, directory=tmp_path)
    with segment._using():  # a write in flight
        segment.close()
        assert segment.closed
        os.fstat(segment._fd)  # still open
    with pytest.raises(OSError):
        os.fstat(segment._fd)
    with pytest.raises(ProtocolError) as info:
        segment.set_matched_tokens(4)
    assert info.value.code == ErrorCode.NOT_FOUND and "released" in info.value.reason
    segment.unlink()


def test_close_never_unmaps_under_a_live_tensor(tmp_path: Path) -> None:
    owner = shm.DaemonSegment.create(LAYOUT, directory=tmp_path)
    segment = shm.Segment.open(owner.name, directory=tmp_path)
    owner.unlink()
    owner.close()
    kept = segment.k[0]
    kept.fill_(3.0)
    assert segment.close() is False  # the tensor still uses the mapping
    assert torch.all(kept == 3.0)


def test_names_are_unguessable_and_only_ours_open(tmp_path: Path) -> None:
    names = {shm.new_name() for _ in range(100)}
    assert len(names) == 100 and all(shm.valid_name(n) for n in names)
    for bad in ("../etc/passwd", "kvpeer-1-short", "other", f"kvpeer-1-{'a' * 30}/x"):
        with pytest.raises(ProtocolError) as info:
            shm.Segment.open(bad, directory=tmp_path)
        assert info.value.code == ErrorCode.INVALID


def test_registry_owner_release_lease_and_limit(tmp_path: Path) -> None:
    registry = shm.SegmentRegistry(directory=tmp_path, lease_s=10.0, max_bytes_per_owner=3 * LAYOUT.size)
    a = registry.create(LAYOUT, owner=1, now=0.0)
    b = registry.create(LAYOUT, owner=1, now=5.0)
    c = registry.create(LAYOUT, owner=2, now=0.0)
    with pytest.raises(ProtocolError) as info:
        registry.release(a.name, owner=2)
    assert info.value.code == ErrorCode.NOT_FOUND
    registry.release(a.name, owner=1)
    assert not (tmp_path / a.name).exists()
    registry.create(LAYOUT, owner=1, now=5.0)
    registry.create(LAYOUT, owner=1, now=5.0)
    with pytest.raises(ProtocolError) as info:
        registry.create(LAYOUT, owner=1, now=5.0)
    assert info.value.code == ErrorCode.BUSY
    assert registry.expire(now=10.0) == [c.name]
    assert registry.release_owner(1) == 3
    assert not (tmp_path / b.name).exists() and len(registry) == 0
    assert _segment_files(tmp_path) == []
    # Segments being made at once (off the event loop) count from admission on.
    for _ in range(3):
        registry.admit(LAYOUT, owner=3)
    with pytest.raises(ProtocolError):
        registry.admit(LAYOUT, owner=3)
    registry.withdraw(LAYOUT, owner=3)  # one failed to be made
    registry.adopt(registry.make(LAYOUT), owner=3, now=0.0)
    registry.admit(LAYOUT, owner=3)
    with pytest.raises(ProtocolError):
        registry.admit(LAYOUT, owner=3)


def test_one_users_connections_share_one_shared_memory_cap(tmp_path: Path) -> None:
    """The cap was per connection: one user with N connections held N times it, and could fill
    /dev/shm for every other client."""
    registry = shm.SegmentRegistry(directory=tmp_path, max_bytes_per_owner=2 * LAYOUT.size)
    for connection in (1, 2, 3):
        registry.set_account(connection, ("uid", 1000))
    registry.set_account(4, ("uid", 1001))
    registry.create(LAYOUT, owner=1, now=0.0)
    registry.admit(LAYOUT, owner=2)  # being made: counts already
    with pytest.raises(ProtocolError) as info:
        registry.create(LAYOUT, owner=3, now=0.0)
    assert info.value.code == ErrorCode.BUSY and "this user's clients" in info.value.reason
    registry.create(LAYOUT, owner=4, now=0.0)  # another user: a cap of its own
    registry.withdraw(LAYOUT, owner=2)
    registry.create(LAYOUT, owner=3, now=0.0)
    assert registry.release_owner(1) == 1 and registry.release_owner(3) == 1
    registry.create(LAYOUT, owner=5, now=0.0)  # no account set: its own
    registry.close()


def test_a_released_segments_pages_are_freed_off_the_thread_that_releases_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing a released segment's last descriptor frees its pages (~200 ms per GiB): it ran
    on the event loop, for every release, put commit, disconnect and lease end."""
    import threading

    registry = shm.SegmentRegistry(directory=tmp_path)
    segments = [registry.create(LAYOUT, owner=owner, now=0.0) for owner in (1, 1, 2)]
    descriptors = {segment._fd for segment in segments}
    closed_in: dict[int, str] = {}
    close = os.close

    def recording_close(fd: int) -> None:
        if fd in descriptors:
            closed_in[fd] = threading.current_thread().name
        close(fd)

    monkeypatch.setattr(shm.os, "close", recording_close)
    registry.release(segments[0].name, owner=1)
    registry.release_owner(2)
    assert registry.expire(now=1e9) == [segments[1].name]
    registry.close()  # waits for the frees
    assert len(closed_in) == 3 and all(name.startswith("kvpeer-shm-free") for name in closed_in.values())
    assert all(segment.closed for segment in segments) and _segment_files(tmp_path) == []


def test_registry_makes_the_next_segment_from_a_spare_of_fresh_pages(tmp_path: Path) -> None:
    registry = shm.SegmentRegistry(directory=tmp_path)
    assert registry.reserve_spare(LAYOUT.size, max_bytes=LAYOUT.size - 1) is False
    assert registry.spare_bytes == 0 and _segment_files(tmp_path) == []
    assert registry.reserve_spare(LAYOUT.size + shm.PAGE, max_bytes=1 << 20)
    (spare_file,) = (tmp_path / name for name in _segment_files(tmp_path))
    assert spare_file.stat().st_mode & 0o777 == 0o600  # no client can open a spare...
    assert not shm.valid_name(spare_file.name)  # ... nor name it
    inode = spare_file.stat().st_ino
    segment = registry.create(LAYOUT, owner=1, now=0.0)
    assert shm.valid_name(segment.name) and registry.spare_bytes == 0
    assert _segment_files(tmp_path) == [segment.name]
    assert segment.path.stat().st_ino == inode  # the spare's pages, renamed
    assert segment.path.stat().st_size == LAYOUT.size  # the pages past the layout given back
    assert all(torch.all(t == 0) for t in segment.read_kv_blocking())
    reader = shm.Segment.open(segment.name, directory=tmp_path)
    assert reader.layout == LAYOUT and reader.levels() == [None, None, None]
    reader.close()
    # A released segment never becomes a spare (its client may still map it): the next one
    # is made anew.
    _write_chunks(segment, *_kv())
    registry.release(segment.name, owner=1)
    again = registry.create(LAYOUT, owner=1, now=0.0)
    assert again.name != segment.name and all(torch.all(t == 0) for t in again.read_kv_blocking())
    # One over twice the size is kept for a fetch of its own size; close() removes it.
    assert registry.reserve_spare(4 * LAYOUT.size, max_bytes=1 << 20)
    small = registry.create(LAYOUT, owner=2, now=0.0)
    assert registry.spare_bytes == 4 * LAYOUT.size
    registry.close()
    assert not (tmp_path / small.name).exists() and not any(tmp_path.iterdir())


def test_a_spare_reserved_while_the_registry_closed_is_not_left_behind(tmp_path: Path) -> None:
    """The reservation runs in a thread: one finishing after close() unlinks its own file."""
    registry = shm.SegmentRegistry(directory=tmp_path)
    registry.close()
    assert registry.reserve_spare(LAYOUT.size, max_bytes=1 << 20) is False
    assert registry.spare_bytes == 0 and not any(tmp_path.iterdir())


def _instance_file(directory: Path, instance: str) -> Path:
    return directory / f"{shm.INSTANCE_PREFIX}{instance}"


def test_sweep_removes_what_registries_no_longer_running_left_and_keeps_the_rest(tmp_path: Path) -> None:
    """A registry is live while its instance file is locked, whatever its pid says: a daemon
    in another pid namespace has a pid we cannot see (the old pid check swept its live
    segments). A crashed one's file is unlocked, or gone."""
    crashed, vanished, elsewhere = shm.new_instance(), shm.new_instance(), shm.new_instance()
    _instance_file(tmp_path, crashed).write_bytes(b"")
    held = os.open(_instance_file(tmp_path, elsewhere), os.O_RDWR | os.O_CREAT, 0o600)
    shm.fcntl.flock(held, shm.fcntl.LOCK_SH)  # a live daemon, its pid invisible to us
    invisible_pid = 4_000_000  # over pid_max: no process here has it
    names = {
        "crashed": f"kvpeer-{invisible_pid}-{crashed}-{'c' * 40}",
        "crashed spare": f"kvpeer.spare-{invisible_pid}-{crashed}-{'c' * 40}",
        "vanished": f"kvpeer-{os.getpid()}-{vanished}-{'d' * 40}",
        "live elsewhere": f"kvpeer-{invisible_pid}-{elsewhere}-{'e' * 40}",
        "older version": f"kvpeer-{invisible_pid}-{'o' * 32}",
        "unrelated": "unrelated",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    try:
        assert sorted(shm.sweep_stale(tmp_path)) == sorted(
            [names["crashed"], names["crashed spare"], names["vanished"]]
        )
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([
            names["live elsewhere"], names["older version"], "unrelated",
            _instance_file(tmp_path, elsewhere).name,
        ])  # fmt: skip
    finally:
        os.close(held)


def test_a_live_daemon_in_another_pid_namespace_keeps_its_segments(tmp_path: Path) -> None:
    """The review's case: a second daemon starts in its own pid namespace (containers sharing
    /dev/shm) and sweeps. Needs root for unshare."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    registry = shm.SegmentRegistry(directory=tmp_path)
    registry.sweep_stale()
    live = registry.create(LAYOUT, owner=1, now=0.0)
    sweep = ("from pathlib import Path; from kvpeer import shm; "
             f"print(shm.SegmentRegistry(directory=Path({str(tmp_path)!r})).sweep_stale())")
    run = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", sweep],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]" and live.path.exists()
    registry.close()


def test_an_earlier_run_is_swept_and_two_registries_of_one_pid_keep_each_others(tmp_path: Path) -> None:
    """pid 1 in two containers sharing /dev/shm, or a restart that got its old pid back: a
    pid tells neither apart, an instance does."""
    first = shm.SegmentRegistry(directory=tmp_path)
    first.sweep_stale()
    live = first.create(LAYOUT, owner=1, now=0.0)
    second = shm.SegmentRegistry(directory=tmp_path)
    assert second.sweep_stale() == [] and live.path.exists()
    other = second.create(LAYOUT, owner=1, now=0.0)
    # The first one dies without closing (kill -9): its lock goes with its descriptor.
    assert first._instance_fd is not None
    os.close(first._instance_fd)
    restarted = shm.SegmentRegistry(directory=tmp_path)
    assert restarted.sweep_stale() == [live.name] and other.path.exists()
    restarted.close()
    second.close()
    assert not any(tmp_path.iterdir())


def _sweep_in_a_child(directory: Path) -> str:
    """What a new registry's sweep of ``directory`` removes, run in a child with a timeout:
    a sweep that blocks must fail the test, not hang it."""
    sweep = ("from pathlib import Path; from kvpeer import shm; "
             f"print(shm.SegmentRegistry(directory=Path({str(directory)!r})).sweep_stale())")
    run = subprocess.run([sys.executable, "-c", sweep], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_a_sweep_never_blocks_on_a_lock_another_user_holds(tmp_path: Path) -> None:
    """/dev/shm is world-writable: a user who created and held the old registry lock file
    (exclusive) hung every daemon start, on the event loop, before the API socket existed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(tmp_path / ".kvpeer-registry.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert _sweep_in_a_child(tmp_path) == "[]"
    finally:
        holder.kill()
        holder.wait()


def test_a_sweep_never_blocks_on_a_fifo_planted_as_an_instance_file(tmp_path: Path) -> None:
    fifo_instance = shm.new_instance()
    os.mkfifo(_instance_file(tmp_path, fifo_instance))
    (tmp_path / f"kvpeer-1-{fifo_instance}-{'f' * 40}").write_bytes(b"x")
    assert _sweep_in_a_child(tmp_path) == "[]"  # its "segment" stays: we cannot tell


def _resident_bytes(path: Path) -> int:
    """Rss of this process's mapping of ``path`` (from /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.endswith(str(path)):
            for detail in lines[index + 1 :]:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1]) * 1024
    raise AssertionError(f"{path} is not mapped")


def test_map_populated_maps_every_page_now_and_changes_nothing(tmp_path: Path) -> None:
    """The page tables are made at map time (by reads in numpy, which release the GIL, not by
    MAP_POPULATE inside mmap.mmap, which holds it), and what the pages hold is untouched."""
    size = 64 * shm.PAGE
    path = tmp_path / "segment"
    pattern = os.urandom(size)
    path.write_bytes(pattern)
    fd = os.open(path, os.O_RDWR)
    try:
        lazy = shm.mmap.mmap(fd, size, shm.mmap.MAP_SHARED)
        assert _resident_bytes(path) < size  # a plain mapping faults its pages in later
        lazy.close()
        mapping = shm.map_populated(fd, size)
    finally:
        os.close(fd)
    assert _resident_bytes(path) == size
    assert mapping[:] == pattern
    mapping.close()  # no export of the buffer outlives the call


def test_a_segment_adopted_unleased_expires_only_after_its_lease_starts(tmp_path: Path) -> None:
    registry = shm.SegmentRegistry(directory=tmp_path, lease_s=10.0)
    fetching = registry.adopt(registry.make(LAYOUT), owner=1, now=None)  # a fetch still writes it
    assert registry.next_expiry() is None and registry.expire(now=1e9) == []
    registry.lease(fetching.name, owner=1, now=100.0)  # handed to its client
    assert registry.next_expiry() == 110.0
    assert registry.expire(now=109.0) == [] and registry.expire(now=110.0) == [fetching.name]
    registry.close()


def test_one_user_may_hold_at_most_half_of_the_segments_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configured cap (64 GiB by default) is more than many hosts' /dev/shm: one user's
    one-token puts of a model with huge dimensions reserved 8 GiB of it (RAM) in 3 s."""
    registry = shm.SegmentRegistry(directory=tmp_path)  # the default cap, far above the share
    monkeypatch.setattr(registry, "_capacity", lambda: 5 * LAYOUT.size)
    registry.set_account(1, ("uid", 1000))
    registry.set_account(2, ("uid", 1000))
    registry.create(LAYOUT, owner=1, now=0.0)
    registry.admit(LAYOUT, owner=2)
    with pytest.raises(ProtocolError) as info:
        registry.create(LAYOUT, owner=1, now=0.0)
    assert info.value.code == ErrorCode.BUSY and "50% of" in info.value.reason
    registry.create(LAYOUT, owner=3, now=0.0)  # another user: a share of its own
    monkeypatch.setattr(registry, "_capacity", lambda: LAYOUT.size)  # one segment is past half
    for owner in (1, 4):  # whether the user holds segments or not
        with pytest.raises(ProtocolError) as info:
            registry.create(LAYOUT, owner=owner, now=0.0)
        assert info.value.code == ErrorCode.TOO_LARGE  # BUSY said to release segments: no help
    registry.close()


def test_a_segment_past_the_users_cap_is_too_large_not_busy(tmp_path: Path) -> None:
    registry = shm.SegmentRegistry(directory=tmp_path, max_bytes_per_owner=LAYOUT.size - 1)
    with pytest.raises(ProtocolError) as info:
        registry.create(LAYOUT, owner=1, now=0.0)
    assert info.value.code == ErrorCode.TOO_LARGE and "api.max_shm_bytes_per_uid" in info.value.reason
    registry.close()


def test_the_segments_file_system_size_is_read() -> None:
    registry = shm.SegmentRegistry()
    st = os.statvfs(shm.SHM_DIR)
    assert registry._capacity() == st.f_blocks * st.f_frsize > 0
