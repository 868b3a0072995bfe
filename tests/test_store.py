"""ChunkStore: RAM and disk tiers, LRU budgets, corruption, restarts, kill -9 and a full disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest

from kvpeer import aio, cli
from kvpeer import store as store_mod
from kvpeer.errors import StoreError, StoreInUse
from kvpeer.store import FORMAT_DIR, ChunkStore, record_size

LEVELS = ("exact", "q8", "q4")


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def blob(i: int, size: int = 1000) -> bytes:
    return (key(i) * (size // 32 + 1))[:size]


def files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / FORMAT_DIR).rglob("*") if p.is_file())


class Events:
    def __init__(self) -> None:
        self.added: list[bytes] = []
        self.removed: list[bytes] = []

    def __call__(self, added: list[bytes], removed: list[bytes]) -> None:
        self.added += added
        self.removed += removed


def test_ram_only_lru_in_bytes() -> None:
    store = ChunkStore(ram_bytes=3000, level_order=LEVELS)
    events = Events()
    store.subscribe(events)
    for i in range(3):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.get_blocking(key(0)) == blob(0)  # 0 is now the most recently used
    store.put_blocking(key(3), "q8", blob(3))
    assert not store.has(key(1)) and store.has(key(0)) and store.has(key(3))
    assert store.stats()["ram_bytes"] <= 3000
    assert events.added == [key(0), key(1), key(2), key(3)] and events.removed == [key(1)]
    with pytest.raises(StoreError, match="exceeds the store's budgets"):
        store.put_blocking(key(9), "q8", blob(9, 4000))
    assert store.get_blocking(key(9)) is None


def test_levels_most_faithful_first_and_validation() -> None:
    store = ChunkStore(ram_bytes=1 << 20, level_order=LEVELS)
    store.put_blocking(key(1), "q4", b"small")
    store.put_blocking(key(1), "exact", b"big" * 10)
    assert store.levels(key(1)) == ["exact", "q4"]
    assert store.get_blocking(key(1)) == b"big" * 10
    assert store.get_blocking(key(1), "q4") == b"small"
    assert store.get_blocking(key(1), "q8") is None
    for bad_key, level in ((b"short", "q8"), (key(1), "q9"), (key(1), "../x")):
        with pytest.raises(StoreError):
            store.put_blocking(bad_key, level, b"x")
    assert store.delete(key(1)) and not store.has(key(1)) and store.keys() == []


def test_disk_tier_survives_restart_and_keeps_lru_order(tmp_path: Path) -> None:
    size = record_size("q8", 1000)
    store = ChunkStore(ram_bytes=1500, disk_bytes=4 * size, directory=tmp_path, level_order=LEVELS)
    for i in range(4):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    assert store.stats()["ram_entries"] == 1 and store.stats()["disk_entries"] == 4
    assert store.get_blocking(key(0)) == blob(0)  # read from disk, checksum verified
    store.close()

    reopened = ChunkStore(ram_bytes=1500, disk_bytes=4 * size, directory=tmp_path, level_order=LEVELS)
    assert sorted(reopened.keys()) == sorted(key(i) for i in range(4))
    assert all(reopened.get_blocking(key(i)) == blob(i) for i in (1, 2, 3, 0))
    reopened.put_blocking(key(4), "q8", blob(4))  # evicts the least recently used: key(1)
    assert not reopened.has(key(1)) and reopened.has(key(0))
    assert reopened.flush(timeout_s=30)
    assert len(files(tmp_path)) == 4 and reopened.stats()["disk_bytes"] == 4 * size
    reopened.close()

    smaller = ChunkStore(ram_bytes=0, disk_bytes=2 * size, directory=tmp_path, level_order=LEVELS)
    assert len(smaller.keys()) == 2 and len(files(tmp_path)) == 2  # budget shrank: LRU dropped
    smaller.close()


def test_a_prefix_used_together_is_evicted_from_its_end(tmp_path: Path) -> None:
    """A prompt's chunks are put and read first to last, which left its first chunk the least
    recently used: eviction took it first, and the chunks after it, still held and counted,
    could never be matched again (each key hashes the chunks before it)."""
    size = record_size("q8", 1000)
    store = ChunkStore(ram_bytes=0, disk_bytes=3 * size, directory=tmp_path, level_order=LEVELS)
    prompt = [key(0), key(1), key(2)]
    for i, k in enumerate(prompt):
        store.put_blocking(k, "q8", blob(i))
    assert store.flush(timeout_s=30)  # queued writes are not evicted
    store.used_as_prefix(prompt)
    store.put_blocking(key(3), "q8", blob(3))  # another prompt: room for one chunk is made
    assert store.flush(timeout_s=30)
    assert [store.has(k) for k in prompt] == [True, True, False]
    for k in prompt[:2]:  # a fetch reads its chunks first to last
        store.get_blocking(k)
    store.used_as_prefix(prompt)  # key(2), missing, ends the run: nothing after it is marked
    store.put_blocking(key(4), "q8", blob(4))
    assert store.flush(timeout_s=30)
    assert [store.has(k) for k in prompt[:2]] == [True, True] and not store.has(key(3))
    store.close()


def test_a_prefix_used_together_keeps_its_order_across_a_restart(tmp_path: Path) -> None:
    """The order lives on in the files' mtimes, which a start sorts by."""
    size = record_size("q8", 1000)
    store = ChunkStore(ram_bytes=0, disk_bytes=3 * size, directory=tmp_path, level_order=LEVELS)
    prompt = [key(0), key(1), key(2)]
    for i, k in enumerate(prompt):
        store.put_blocking(k, "q8", blob(i))
    assert store.flush(timeout_s=30)
    store.used_as_prefix(prompt)
    _wait_for_mtimes_last_to_first(tmp_path, prompt)  # touched off the caller's thread
    store.close()
    _assert_a_restart_evicts_the_last(tmp_path, prompt, 3 * size)


def _wait_for_mtimes_last_to_first(directory: Path, prompt: list[bytes]) -> None:
    def mtimes() -> list[int]:
        by_name = {p.name.split(".")[0]: p.stat().st_mtime_ns for p in files(directory)}
        return [by_name[k.hex()] for k in prompt]

    deadline = time.monotonic() + 10
    while not mtimes()[0] > mtimes()[1] > mtimes()[2]:
        assert time.monotonic() < deadline, mtimes()
        time.sleep(0.01)


def _assert_a_restart_evicts_the_last(directory: Path, prompt: list[bytes], disk_bytes: int) -> None:
    reopened = ChunkStore(ram_bytes=0, disk_bytes=disk_bytes, directory=directory, level_order=LEVELS)
    reopened.put_blocking(key(3), "q8", blob(3))
    assert reopened.flush(timeout_s=30)
    assert [reopened.has(k) for k in prompt] == [True, True, False]
    reopened.close()


def test_a_prompt_marked_while_queued_for_disk_keeps_its_order_across_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marked right after a put, its chunks still queued: close() shut the read pool before its
    flush, so the order set as they were written was never touched into the files' mtimes."""
    size = record_size("q8", 1000)
    store = ChunkStore(ram_bytes=0, disk_bytes=3 * size, directory=tmp_path, level_order=LEVELS, writers=1)
    gate = threading.Event()
    write_batch = store._write_batch

    def held_back(batch: Any) -> None:  # the disk is slow: the prompt is marked while queued
        gate.wait(10)
        write_batch(batch)

    monkeypatch.setattr(store, "_write_batch", held_back)
    prompt = [key(0), key(1), key(2)]
    for i, k in enumerate(prompt):
        store.put_blocking(k, "q8", blob(i))
    store.used_as_prefix(prompt)
    threading.Timer(0.2, gate.set).start()
    store.close()
    _wait_for_mtimes_last_to_first(tmp_path, prompt)  # touched as the flush wrote them
    _assert_a_restart_evicts_the_last(tmp_path, prompt, 3 * size)


def test_prompts_waiting_for_their_writes_are_bounded_and_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every put and its warming added the prompt again (and each turn its history), each
    scanned from the first chunk under the lock at every write batch: 482 ms a batch at 64
    prompts of 4,096 chunks."""
    monkeypatch.setattr(store_mod, "ORDER_WHEN_WRITTEN", 3)
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS, writers=1)
    gate = threading.Event()
    write_batch = store._write_batch
    monkeypatch.setattr(store, "_write_batch", lambda batch: (gate.wait(10), write_batch(batch)))
    try:
        turns = [key(i) for i in range(6)]
        for i, k in enumerate(turns):
            store.put_blocking(k, "q8", blob(i))
            store.used_as_prefix(turns[: i + 1])  # a conversation: each turn extends the last
            store.used_as_prefix(turns[: i + 1])  # ... and its warming marks it again
        assert store._order_when_written == [turns]
        for n in range(5):  # other prompts, each queued
            other = [key(100 + n)]
            store.put_blocking(other[0], "q8", blob(100 + n))
            store.used_as_prefix(other)
        assert len(store._order_when_written) == 3
    finally:
        gate.set()
        store.close()


def test_a_prefix_used_together_is_evicted_from_its_end_in_a_ram_only_store() -> None:
    store = ChunkStore(ram_bytes=3000, level_order=LEVELS)
    prompt = [key(0), key(1), key(2)]
    for i, k in enumerate(prompt):
        store.put_blocking(k, "q8", blob(i))
    store.used_as_prefix(prompt)
    store.put_blocking(key(3), "q8", blob(3))
    assert [store.has(k) for k in prompt] == [True, True, False]


def test_chunks_of_another_payload_format_are_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a codec upgrade the old blobs are unreadable: the store must not serve them."""
    size = record_size("q8", 1000)
    old = ChunkStore(ram_bytes=0, disk_bytes=4 * size, directory=tmp_path, level_order=LEVELS,
                     payload_format="codec1")
    old.put_blocking(key(0), "q8", blob(0))
    assert old.flush(timeout_s=30)
    old.close()
    with caplog.at_level(logging.WARNING, logger="kvpeer.store"):
        new = ChunkStore(ram_bytes=0, disk_bytes=4 * size, directory=tmp_path, level_order=LEVELS,
                         payload_format="codec2")
    assert new.keys() == [] and not new.has(key(0))
    assert "ignoring v1-codec1" in caplog.text
    new.close()
    again = ChunkStore(ram_bytes=0, disk_bytes=4 * size, directory=tmp_path, level_order=LEVELS,
                       payload_format="codec1")
    assert again.get_blocking(key(0)) == blob(0)  # the same format still reads them
    again.close()
    with pytest.raises(StoreError, match="payload format"):
        ChunkStore(ram_bytes=0, payload_format="../x")


def test_chunk_files_are_private_to_the_daemon_even_in_a_store_an_older_version_made(
    tmp_path: Path,
) -> None:
    """Engine users join the daemon's group for its API socket; group-readable chunk files let
    them read every namespace's KV off the disk, past the API's namespace checks."""
    old_format_dir = tmp_path / FORMAT_DIR
    (old_format_dir / "00").mkdir(parents=True, mode=0o750)
    old_format_dir.chmod(0o750)
    other_format_dir = tmp_path / f"{FORMAT_DIR}-codec1"  # an older codec's chunks, kept
    other_format_dir.mkdir(mode=0o750)
    other_format_dir.chmod(0o750)
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    store.put_blocking(key(1), "q8", blob(1))
    assert store.flush(timeout_s=30)
    store.close()
    (chunk,) = files(tmp_path)
    assert old_format_dir.stat().st_mode & 0o777 == 0o700
    assert other_format_dir.stat().st_mode & 0o777 == 0o700
    assert chunk.stat().st_mode & 0o777 == 0o600
    assert chunk.parent.stat().st_mode & 0o077 == 0
    assert (tmp_path / store_mod.LOCK_FILE).stat().st_mode & 0o077 == 0


def test_a_new_store_makes_its_directories_durable_and_names_files_it_ignores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file a flush called durable sat in directories whose own entries were not fsynced;
    and files of a level this version does not know were skipped without a word, outside the
    disk budget."""
    synced: list[Path] = []
    fsync_dir = store_mod.fsync_dir
    monkeypatch.setattr(store_mod, "fsync_dir", lambda path: (synced.append(Path(path)), fsync_dir(path)))
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    store.close()
    assert {tmp_path, tmp_path / FORMAT_DIR} <= set(synced)
    (tmp_path / FORMAT_DIR / "00" / f"{key(1).hex()}.q2").write_bytes(b"x" * 100)
    synced.clear()
    with caplog.at_level(logging.WARNING, logger="kvpeer.store"):
        again = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    again.close()
    assert synced == []  # nothing new to make durable
    assert "levels this version does not know (q2)" in caplog.text

    def refused(path: Path) -> None:  # some FUSE and network mounts
        raise OSError(errno.EINVAL, "Invalid argument", str(path))

    monkeypatch.setattr(store_mod, "fsync_dir", refused)
    with caplog.at_level(logging.WARNING, logger="kvpeer.store"):
        fresh = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path / "fresh", level_order=LEVELS)
    assert fresh.stats()["disk_limit"] == 1 << 20 and "cannot fsync" in caplog.text  # said, and runs
    fresh.close()


def test_corrupt_file_is_deleted_and_a_miss(tmp_path: Path) -> None:
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    events = Events()
    store.subscribe(events)
    store.put_blocking(key(1), "q8", blob(1))
    store.put_blocking(key(1), "q4", blob(1, 10))
    assert store.flush(timeout_s=30)
    (path_q8,) = [p for p in files(tmp_path) if p.name.endswith(".q8")]
    data = bytearray(path_q8.read_bytes())
    data[-1] ^= 1
    path_q8.write_bytes(bytes(data))
    assert store.get_blocking(key(1)) == blob(1, 10)  # q8 failed its checksum: falls back to q4
    assert not path_q8.exists() and store.levels(key(1)) == ["q4"]
    assert store.stats()["corrupt"] == 1 and events.removed == []
    (path_q4,) = files(tmp_path)
    path_q4.write_bytes(path_q4.read_bytes()[:-3])  # truncated
    assert store.get_blocking(key(1)) is None and events.removed == [key(1)]


def test_a_store_directory_let_go_within_the_wait_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart's predecessor may still hold the directory for a moment as it exits (a writer
    thread finishing a slow write): the new daemon waits for it rather than refusing at once."""
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 10.0)
    holder = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    threading.Timer(0.3, holder.close).start()
    started = time.monotonic()
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    assert 0.2 <= time.monotonic() - started < 10.0
    store.close()


def test_a_file_system_without_locks_is_not_taken_for_another_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flock error read as "in use by another process" (then "another kvpeerd uses it",
    exit 2), an NFS mount without lockd (ENOLCK) too."""
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(store_mod.fcntl, "flock", no_locks)
    with pytest.raises(OSError) as raised:
        ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    assert not isinstance(raised.value, StoreInUse) and raised.value.errno == errno.ENOLCK
    assert str(tmp_path) in str(raised.value) and "No locks available" in str(raised.value)


def test_leftover_temp_files_removed_and_directory_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 0.2)
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    store.put_blocking(key(1), "q8", blob(1))
    store.flush(timeout_s=30)
    with pytest.raises(StoreInUse, match=rf"in use by another process \(pid {os.getpid()}\)"):
        ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path)
    store.close()
    tmp = files(tmp_path)[0].parent / ".half-written.tmp"
    tmp.write_bytes(b"partial")
    reopened = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    assert not tmp.exists() and reopened.keys() == [key(1)]
    reopened.close()


def test_async_wrappers_notify_on_the_loop(tmp_path: Path) -> None:
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 20, directory=tmp_path)
    events = Events()
    store.subscribe(events)

    async def main() -> bytes | None:
        await asyncio.gather(*(store.put(key(i), "q8", blob(i)) for i in range(20)))
        return await store.get(key(7))

    assert asyncio.run(main()) == blob(7)
    assert sorted(events.added) == sorted(key(i) for i in range(20))
    assert store.flush(timeout_s=30) and len(files(tmp_path)) == 20
    assert store.clear() == 20 and files(tmp_path) == [] and len(events.removed) == 20
    store.close()


def test_writes_are_queued_readable_and_flushed_by_close(tmp_path: Path) -> None:
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 30, directory=tmp_path,
                       max_pending_bytes=256 << 10)
    for i in range(64):  # 64 x 64 KiB through a 256 KiB queue: puts wait for the writer
        store.put_blocking(key(i), "q8", blob(i, 64 << 10))
        assert store.get_blocking(key(i)) == blob(i, 64 << 10)  # queued or written: readable
        assert store.stats()["pending_bytes"] <= 256 << 10
    store.delete(key(63))
    store.close()
    assert len(files(tmp_path)) == 63 and not list(tmp_path.rglob("*.tmp"))


def test_writer_thread_notifies_on_the_subscribing_loop(tiny_tmpfs: Path) -> None:
    async def main() -> list[bytes]:
        store = ChunkStore(ram_bytes=0, disk_bytes=1 << 30, directory=tiny_tmpfs / "s")
        removed = asyncio.Queue[bytes]()
        loop_thread = threading.get_ident()

        def listener(added: list[bytes], gone: list[bytes]) -> None:
            assert threading.get_ident() == loop_thread
            for k in gone:
                removed.put_nowait(k)

        store.subscribe(listener)
        for i in range(40):  # the RAM tier is 0: a chunk the disk refuses is gone
            with contextlib.suppress(StoreError):
                await store.put(key(i), "q8", blob(i, 64 << 10))
        first = await asyncio.wait_for(removed.get(), timeout=30)
        await store.aclose()
        return [first]

    (first,) = asyncio.run(main())
    assert first in {key(i) for i in range(40)}


WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from kvpeer.store import ChunkStore

    def key(i):
        return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()

    directory, start = Path(sys.argv[1]), int(sys.argv[2])
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=directory)
    i = start
    while True:
        size = 2000 + (i * 7919) % 60000
        store.put_blocking(key(i), "q8", (key(i) * (size // 32 + 1))[:size])
        if i % 8 == 7:
            store.flush()
            print(i, flush=True)  # everything up to i is durable: must survive the kill
        i += 1
    """
)


@pytest.mark.slow
def test_kill_9_during_heavy_puts_leaves_a_clean_store(tmp_path: Path) -> None:
    acknowledged: set[int] = set()
    start = 0
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(start)],
            stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        target = 5 + _round * 2  # kill at a different point of the writes each round
        for _ in range(target):
            line = proc.stdout.readline()
            assert line, "writer died"
            acknowledged.update(range(start, int(line) + 1))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:  # acknowledged before the kill landed
            acknowledged.update(range(start, int(line) + 1))
        start = max(acknowledged) + 1 + 64  # past anything the killed writer may have queued

        store = ChunkStore(ram_bytes=0, disk_bytes=1 << 30, directory=tmp_path)
        held = set(store.keys())
        assert {key(i) for i in acknowledged} <= held, "an acknowledged put was lost"
        for k in held:  # every file on disk is complete and verifies
            got = store.get_blocking(k)
            assert got is not None and got == (k * (len(got) // 32 + 1))[: len(got)]
        assert store.stats()["corrupt"] == 0
        assert not [p for p in (tmp_path / FORMAT_DIR).rglob("*.tmp")]
        assert len(files(tmp_path)) == len(held)
        store.close()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _gate_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the store's file writes until the returned event is set."""
    gate = threading.Event()
    write = store_mod._write_file_blocking

    def gated_write(*args: object) -> None:
        gate.wait(30)
        write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "_write_file_blocking", gated_write)
    return gate


def _fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    with contextlib.suppress(OSError), open(path, "wb") as filler:
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()


def test_disk_full_is_a_clear_error_and_ram_keeps_working(
    tiny_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "DISK_RETRY_S", 3600.0)  # failing until the test says (a loaded CI)
    store = ChunkStore(ram_bytes=64 << 20, disk_bytes=1 << 30, directory=tiny_tmpfs / "store")
    _fill(tiny_tmpfs / "filler")  # another program filled the file system: no file of ours to evict
    for i in range(64):
        with contextlib.suppress(StoreError):
            store.put_blocking(key(i), "q8", blob(i, 64 << 10))
    store.flush(timeout_s=30)
    # The writer found the disk full: puts are held in RAM, stored all the same, and counted.
    store.put_blocking(key(64), "q8", blob(64, 64 << 10))
    assert all(store.get_blocking(key(i)) == blob(i, 64 << 10) for i in range(65))
    stats = store.stats()
    assert stats["disk_errors"] >= 1 and stats["chunks"] == 65 and stats["ram_only_puts"] >= 1
    assert stats["disk_failing"] is True
    assert stats["last_disk_error"] == "no space left on device"
    assert not list((tiny_tmpfs / "store").rglob("*.tmp"))
    (tiny_tmpfs / "filler").unlink()  # room again: after the retry delay the disk tier works
    monkeypatch.setattr(store_mod, "DISK_RETRY_S", 0.0)
    store.put_blocking(key(100), "q8", blob(100, 64 << 10))
    assert store.flush(timeout_s=30) and store.stats()["disk_entries"] == 1
    store.close()


def test_disk_full_keeps_acknowledged_puts_and_frees_room_from_the_oldest_files(
    tiny_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put is acknowledged before its write; when the write then finds the file system full
    (filled by someone else), the chunk stays readable from RAM and our oldest files make room."""
    size = 64 << 10
    store = ChunkStore(ram_bytes=2 * size + 4096, disk_bytes=1 << 30,
                       directory=tiny_tmpfs / "store", writers=1)
    for i in range(2):
        store.put_blocking(key(i), "q8", blob(i, size))
    assert store.flush(timeout_s=30)
    _fill(tiny_tmpfs / "filler")  # another program fills the file system
    gate = _gate_writes(monkeypatch)
    for i in (10, 11):  # acknowledged, queued behind the gate
        store.put_blocking(key(i), "q8", blob(i, size))
    for i in range(2):  # reads pull the older chunks into RAM: the queued ones leave it
        assert store.get_blocking(key(i)) == blob(i, size)
    gate.set()
    assert store.flush(timeout_s=30)
    assert [store.get_blocking(key(i)) == blob(i, size) for i in (10, 11)] == [True, True]
    stats = store.stats()
    assert stats["disk_errors"] == 2 and stats["disk_evictions"] == 2 and stats["disk_entries"] == 0
    monkeypatch.setattr(store_mod, "DISK_RETRY_S", 0.0)
    store.put_blocking(key(12), "q8", blob(12, size))  # the room freed takes the next put
    assert store.flush(timeout_s=30) and store.stats()["disk_entries"] == 1
    store.close()


def test_delete_and_put_again_while_the_first_write_is_in_flight_keeps_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evict-all, then the same prefix put again, while the first write still fsyncs: the
    first writer's clean-up must not unlink the second writer's file."""
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", slow_fsync)
    batches: list[int] = []
    write_batch = ChunkStore._write_batch

    def counting(self: ChunkStore, batch: list[Any]) -> None:
        batches.append(len(batch))
        write_batch(self, batch)

    monkeypatch.setattr(ChunkStore, "_write_batch", counting)
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, writers=2)
    store.put_blocking(key(1), "q8", blob(1))
    time.sleep(0.1)  # a writer has it in hand
    store.delete(key(1))
    store.put_blocking(key(1), "q8", blob(1))
    assert store.flush(timeout_s=30)
    time.sleep(0.5)
    assert store.get_blocking(key(1), "q8") == blob(1)
    assert files(tmp_path) and store.stats()["disk_entries"] == 1
    assert 0 not in batches  # the idle writer waited for the slot; it did not spin on it
    store.close()


def test_clear_drops_everything_batch_by_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "CLEAR_BATCH", 3)
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 20, directory=tmp_path)
    for i in range(10):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    assert store.clear() == 10
    assert not store.keys() and not files(tmp_path) and store.stats()["disk_bytes"] == 0
    store.close()


def test_put_if_held_does_not_bring_back_a_deleted_key(tmp_path: Path) -> None:
    """A lower level made from a held one (a transcode) lands after an evict: the key stays gone."""
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    store.put_blocking(key(1), "q8", blob(1))
    assert store.put_if_held_blocking(key(1), "q4", blob(2))
    assert store.levels(key(1)) == ["q8", "q4"]
    store.clear()
    assert not store.put_if_held_blocking(key(1), "q4", blob(2))
    assert not store.has(key(1)) and store.stats()["puts"] == 2
    store.close()


def test_a_disk_that_is_down_at_start_leaves_the_store_on_its_ram_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only (or full, or failing) file system under store.dir: the daemon still serves
    from RAM, rather than failing its start (and systemd restarting it in a loop)."""
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(store_mod.LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(store_mod.os, "open", read_only)
    with caplog.at_level(logging.ERROR, logger="kvpeer.store"):
        store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 20, directory=tmp_path / "store")
    assert "running on the RAM tier only" in caplog.text
    # ProtectSystem=strict without ReadWritePaths= is the usual cause: the line says the fix
    assert f"add ReadWritePaths={tmp_path / 'store'}" in caplog.text
    store.put_blocking(key(1), "q8", blob(1))
    assert store.get_blocking(key(1)) == blob(1)
    stats = store.stats()
    assert stats["disk_unavailable"] == "read-only file system" and stats["disk_dir"] is None
    store.close()


def test_a_store_dir_the_configuration_got_wrong_fails_start_with_its_errno(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError) as info:
        ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 20, directory=tmp_path / "file" / "store")
    assert info.value.errno == errno.ENOTDIR and "store directory" in str(info.value)
    message, status = cli.start_failure(info.value)  # one line, and no restart loop
    assert message.startswith("cannot open the disk store (store.dir)") and status == cli.EXIT_CONFIG


def test_reading_one_level_keeps_the_keys_other_levels_from_eviction(tmp_path: Path) -> None:
    """A hot prefix must not lose its lower levels on disk first because only one level is read
    (its levels are made and served together)."""
    budget = 2 * record_size("q8", 1000) + 2 * record_size("q4", 1000)
    store = ChunkStore(ram_bytes=0, disk_bytes=budget, directory=tmp_path, level_order=LEVELS, writers=1)
    for k in (1, 2):
        store.put_blocking(key(k), "q8", blob(k))
        store.put_blocking(key(k), "q4", blob(k + 10))
    assert store.flush(timeout_s=30)
    assert store.get_blocking(key(1), "q8") == blob(1)  # key 1 is the recently used one
    store.put_blocking(key(3), "q8", blob(3))  # room for it: one file goes
    assert store.flush(timeout_s=30)
    assert store.levels(key(1)) == ["q8", "q4"]
    assert store.levels(key(2)) == ["q4"]
    store.close()


def test_put_if_held_that_waited_for_the_writer_does_not_bring_back_a_key_cleared_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The put waits (back-pressure) without the lock; clear() empties the queue and so wakes
    it: it must look again before it stores."""
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 20, directory=tmp_path,
                       level_order=LEVELS, max_pending_bytes=1500, writers=1)
    store.put_blocking(key(2), "q8", blob(2))
    assert store.flush(timeout_s=30)
    gate = _gate_writes(monkeypatch)
    store.put_blocking(key(1), "q8", blob(1))  # the queue is now full behind the gate
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(store.put_if_held_blocking(key(2), "q4", blob(3))))
    waiting.start()
    time.sleep(0.2)  # it waits for the writer (no hook: the wait is inside the store's lock)
    assert waiting.is_alive()
    store.clear()
    waiting.join(10)
    gate.set()
    assert result == [False] and not store.has(key(2))
    store.close()


def test_a_file_that_cannot_be_looked_at_is_skipped_not_the_whole_disk_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    for i in (1, 2):
        store.put_blocking(key(i), "q8", blob(i))
    store.close()
    bad = files(tmp_path)[0]
    stat = os.DirEntry.stat

    def failing_stat(entry: os.DirEntry[str], *args: Any, **kwargs: Any) -> os.stat_result:
        if entry.path == str(bad):
            raise OSError(errno.EIO, "Input/output error")
        return stat(entry, *args, **kwargs)

    monkeypatch.setattr(os.DirEntry, "stat", failing_stat, raising=False)
    reopened = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    assert len(reopened.keys()) == 1 and reopened.stats()["disk_unavailable"] == ""
    reopened.close()


def test_a_file_that_cannot_be_read_leaves_the_index_is_counted_and_logged_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It stayed listed: lookups answered "local" and every fetch failed on it again, with a
    warning per read (hundreds a second under load) and no counter."""
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    for i in (1, 2):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    for path in files(tmp_path):  # unreadable: a directory where the file was
        path.unlink()
        path.mkdir()
    with caplog.at_level(logging.DEBUG, logger="kvpeer.store"):
        assert store.get_blocking(key(1)) is None and store.get_blocking(key(2)) is None
    assert not store.has(key(1)) and not store.has(key(2))
    assert store.stats()["disk_read_errors"] == 2 and store.stats()["disk_bytes"] == 0
    assert len(list((tmp_path / FORMAT_DIR).rglob("*"))) > 2  # left where they are
    loud = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot read" in r.getMessage()]
    assert len(loud) == 1
    store.close()


def test_a_read_error_of_the_process_not_the_file_keeps_the_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors under load (EMFILE): the file is fine, it must not be dropped."""
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    store.put_blocking(key(1), "q8", blob(1))
    assert store.flush(timeout_s=30)
    read = store_mod.read_record_blocking

    def out_of_descriptors(*args: object) -> bytes:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(store_mod, "read_record_blocking", out_of_descriptors)
    assert store.get_blocking(key(1)) is None
    monkeypatch.setattr(store_mod, "read_record_blocking", read)
    assert store.has(key(1)) and store.get_blocking(key(1)) == blob(1)
    assert store.stats()["disk_read_errors"] == 1 and len(files(tmp_path)) == 1
    store.close()


def test_puts_waiting_for_a_slow_disk_hold_up_neither_the_default_executor_nor_ram_hits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetcher starts a cache put per decoded chunk, unbounded: puts waiting for the writers
    (back-pressure) filled the loop's default executor, and its decodes and transcodes waited
    for the disk too."""
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=tmp_path,
                       max_pending_bytes=1500, writers=1)
    store.put_blocking(key(0), "q8", blob(0))
    assert store.flush(timeout_s=30)
    gate = _gate_writes(monkeypatch)  # the disk stalls: puts wait for the writer's queue

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(2) as default:
            loop.set_default_executor(default)
            puts = [asyncio.create_task(store.put(key(i), "q8", blob(i))) for i in range(1, 9)]
            try:
                # Neither waits for the gate: the timeouts only keep a regression from hanging.
                assert await aio.wait_for(loop.run_in_executor(None, lambda: "decoded"), 30) == "decoded"
                assert await aio.wait_for(store.get(key(0)), 30) == blob(0)
                assert not all(put.done() for put in puts)  # back-pressure as before
            finally:
                gate.set()
                await asyncio.gather(*puts)

    asyncio.run(main())
    assert store.flush(timeout_s=30) and store.stats()["disk_entries"] == 9
    store.close()

    async def after_close() -> None:
        with pytest.raises(StoreError, match="closed"):
            await store.get(key(0))

    asyncio.run(after_close())


def test_store_subdirectories_removed_under_a_running_store_are_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tmpfiles cleaner or an rm -rf of the cache left the disk tier broken until a restart
    (the directories were made only at start), and its error named the store directory."""
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=tmp_path / "store")
    for sub in (tmp_path / "store" / FORMAT_DIR).iterdir():
        sub.rmdir()
    for i in range(1, 5):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    shutil.rmtree(tmp_path / "store" / FORMAT_DIR)  # the whole tree this time, files and all
    for i in range(5, 10):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    stats = store.stats()
    assert stats["disk_entries"] == 9 and stats["disk_errors"] == 0
    store.close()
    reopened = ChunkStore(ram_bytes=0, disk_bytes=1 << 30, directory=tmp_path / "store")
    assert sorted(reopened.keys()) == sorted(key(i) for i in range(5, 10))
    assert reopened.get_blocking(key(5)) == blob(5)
    # The store directory itself is the configuration's: not made again, and the error says
    # which file could not be written.
    (tmp_path / "store").rename(tmp_path / "elsewhere")
    with caplog.at_level(logging.ERROR, logger="kvpeer.store"):
        reopened.put_blocking(key(20), "q8", blob(20))
        reopened.close()  # the writer has logged
    assert not (tmp_path / "store").exists() and reopened.stats()["disk_errors"] == 1
    assert f"cannot write {tmp_path / 'store' / FORMAT_DIR / key(20)[:1].hex()}/" in caplog.text


@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "no space left on device"),
                                            (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_quota_frees_room_from_the_oldest_files_like_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, said: str
) -> None:
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=tmp_path, writers=1)
    for i in range(4):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)

    def no_room(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store_mod, "_write_file_blocking", no_room)
    store.put_blocking(key(9), "q8", blob(9))
    assert store.flush(timeout_s=30)
    stats = store.stats()
    assert stats["disk_evictions"] == 1 and stats["disk_entries"] == 3
    assert stats["last_disk_error"] == said and store.get_blocking(key(9)) == blob(9)
    store.close()


def _store_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvpeer.store" and r.levelno == level]


def test_a_long_disk_outage_logs_one_error_its_retries_at_debug_and_its_end_at_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry window's failure was logged at ERROR as if it were the first: 360 lines an
    hour on a read-only file system."""
    monkeypatch.setattr(store_mod, "DISK_RETRY_S", 0.0)  # every put retries the disk
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=tmp_path, writers=1)
    write = store_mod._write_file_blocking
    failure = [errno.EROFS]

    def failing(*args: Any) -> None:
        if failure:
            raise OSError(failure[0], os.strerror(failure[0]))
        write(*args)

    monkeypatch.setattr(store_mod, "_write_file_blocking", failing)

    def put(i: int) -> None:
        store.put_blocking(key(i), "q8", blob(i))
        assert store.flush(timeout_s=30)

    with caplog.at_level(logging.DEBUG, logger="kvpeer.store"):
        for i in range(5):
            put(i)
        failure[0] = errno.EIO  # another error: worth an ERROR of its own
        put(5)
        put(6)
        failure.clear()
        put(7)
        failure.append(errno.EROFS)  # a new outage
        put(8)
        store.close()  # the writer has logged (it logs after flush() returns)
    errors = _store_log(caplog, logging.ERROR)
    assert [("read-only" in e, "Input/output" in e) for e in errors] == [
        (True, False), (False, True), (True, False)
    ]
    assert len([m for m in _store_log(caplog, logging.DEBUG) if "(still;" in m]) == 5
    assert len([m for m in _store_log(caplog, logging.INFO) if "writing again" in m]) == 1
    assert store.stats()["disk_errors"] == 8 and store.stats()["disk_entries"] == 1


def test_eviction_on_a_read_only_disk_keeps_the_files_it_cannot_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A put at the disk budget evicted the oldest file from the index although its unlink
    failed (still there, still readable), then its own write failed too: each retry window of
    a read-only remount lost one more good chunk from the index."""
    monkeypatch.setattr(store_mod, "DISK_RETRY_S", 0.0)
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=4 * record_size("q8", 1000),
                       directory=tmp_path, writers=1)
    for i in range(4):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    unlink = Path.unlink

    def read_only(*args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    def read_only_unlink(path: Path, missing_ok: bool = False) -> None:
        if tmp_path in path.parents:
            read_only()
        unlink(path, missing_ok)

    monkeypatch.setattr(store_mod, "_write_file_blocking", read_only)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    with caplog.at_level(logging.DEBUG, logger="kvpeer.store"):
        for i in range(10, 16):
            store.put_blocking(key(i), "q8", blob(i))
        assert store.flush(timeout_s=30)
    stats = store.stats()
    assert stats["disk_entries"] == 4 and stats["disk_evictions"] == 0
    assert stats["ram_only_puts"] == 6 and len(files(tmp_path)) == 4
    assert all(store.get_blocking(key(i)) == blob(i) for i in (*range(4), *range(10, 16)))
    assert len(_store_log(caplog, logging.ERROR)) == 1 and not _store_log(caplog, logging.WARNING)
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.undo()  # writable again: the next put evicts and lands
    monkeypatch.setattr(store_mod, "DISK_RETRY_S", 0.0)
    store.put_blocking(key(20), "q8", blob(20))
    assert store.flush(timeout_s=30)
    assert store.stats()["disk_entries"] == 4 and store.stats()["disk_evictions"] == 1
    assert len(files(tmp_path)) == 4
    store.close()


def test_a_disk_read_holds_one_copy_of_the_blob(tmp_path: Path) -> None:
    """The file was read whole and its payload copied out of it: two blobs' worth of memory for
    each read from disk."""
    size = 4 << 20
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 30, directory=tmp_path)
    store.put_blocking(key(1), "q8", blob(1, size))
    assert store.flush(timeout_s=30)
    tracemalloc.start()
    try:
        got = store.get_blocking(key(1))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == blob(1, size)
    assert peak < size * 1.5, peak
    store.close()


def test_a_record_is_read_back_only_as_written(tmp_path: Path) -> None:
    path = tmp_path / "record"
    payload = blob(1, 20_000)
    record = store_mod.encode_record(key(1), "q8", payload) + payload
    path.write_bytes(record)
    assert store_mod.read_record_blocking(path, key(1), "q8") == payload
    assert store_mod.decode_record(record, key(1), "q8") == payload
    damaged = {
        "truncated record": record[:40],
        "record length": record[:-1],
        "checksum mismatch": record[:-1] + bytes([record[-1] ^ 1]),
        "not a chunk record": b"X" + record[1:],
    }
    for why, data in damaged.items():
        path.write_bytes(data)
        with pytest.raises(StoreError, match=why):
            store_mod.read_record_blocking(path, key(1), "q8")
        with pytest.raises(StoreError, match=why):
            store_mod.decode_record(data, key(1), "q8")
    path.write_bytes(record + b"more")
    with pytest.raises(StoreError, match="record length"):
        store_mod.read_record_blocking(path, key(1), "q8")
    path.write_bytes(record)
    with pytest.raises(StoreError, match="another chunk"):
        store_mod.read_record_blocking(path, key(2), "q8")


def test_a_file_eviction_cannot_remove_is_passed_over_not_a_wedge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chunk file that cannot be removed (immutable, another owner's) stayed the eviction's
    first victim for good: every put needing room failed on it, and none reached the disk again
    although the file system was writable."""
    size = record_size("q8", len(blob(1)))
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=4 * size, directory=tmp_path)
    for i in range(1, 5):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    stuck = store._path((key(1), "q8"))
    unlink = Path.unlink

    def refusing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refusing_unlink)
    for i in range(5, 12):
        store.put_blocking(key(i), "q8", blob(i))
        assert store.flush(timeout_s=30)
    stats = store.stats()
    assert stats["ram_only_puts"] == 0 and stats["disk_entries"] == 4
    assert stuck.exists() and store.get_blocking(key(1), "q8") == blob(1)  # still offered
    assert all(store._path((key(i), "q8")).exists() for i in (9, 10, 11))  # the newest made it
    store.close()


def test_a_ram_hit_does_not_wait_behind_slow_disk_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ChunkStore(ram_bytes=len(blob(0)) + 10, disk_bytes=1 << 30, directory=tmp_path)
    for i in range(store_mod.READ_THREADS + 1):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)  # RAM holds only the last one
    gate = threading.Event()
    read = store_mod.read_record_blocking

    def slow_read(*args: Any) -> bytes:
        gate.wait(30)
        return read(*args)

    monkeypatch.setattr(store_mod, "read_record_blocking", slow_read)

    async def main() -> None:
        last = store_mod.READ_THREADS
        reads = [asyncio.create_task(store.get(key(i), "q8")) for i in range(last)]  # fill the pool
        await asyncio.sleep(0.1)
        try:
            assert await aio.wait_for(store.get(key(last), "q8"), 10) == blob(last)
            assert not any(r.done() for r in reads)
        finally:
            gate.set()
            await asyncio.gather(*reads)

    asyncio.run(main())
    store.close()


def test_puts_waiting_for_the_writer_at_close_are_refused_not_stranded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() lifted the back-pressure: puts waiting for room poured into a queue the writers
    no longer drained, acknowledged but never written."""
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=tmp_path,
                       max_pending_bytes=1500, writers=1)
    gate = _gate_writes(monkeypatch)
    outcomes: list[str] = []

    def put(i: int) -> None:
        try:
            store.put_blocking(key(i), "q8", blob(i))
            outcomes.append("stored")
        except StoreError:
            outcomes.append("refused")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(1, 6)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # one or two queued, the rest waiting for room
    closing = threading.Thread(target=store.close, kwargs={"timeout_s": 5})
    closing.start()
    time.sleep(0.2)
    gate.set()
    closing.join(30)
    for thread in threads:
        thread.join(30)
    assert "refused" in outcomes
    assert store.stats()["pending_entries"] == 0
    written = sum(store._path((key(i), "q8")).exists() for i in range(1, 6))
    assert written == outcomes.count("stored")  # every put acknowledged reached the disk


def test_a_mount_where_every_file_resists_costs_one_try_per_file_and_few_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every file resisting (a directory read-only to us, root_squash): each put tried to
    unlink the whole index under the store's lock, with a warning per file."""
    size = record_size("q8", len(blob(1)))
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=40 * size, directory=tmp_path)
    for i in range(1, 41):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    tries: list[Path] = []

    def refusing_unlink(self: Path, missing_ok: bool = False) -> None:
        tries.append(self)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refusing_unlink)
    with caplog.at_level(logging.DEBUG, "kvpeer.store"):
        for i in range(41, 51):
            store.put_blocking(key(i), "q8", blob(i))  # no room: in RAM only
    assert len(tries) == 40 and len(set(tries)) == 40  # each file tried once, not once per put
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert not store.stats()["disk_failing"]  # the disk works: there is just no room on it
    assert all(store.get_blocking(key(i), "q8") == blob(i) for i in (1, 41))
    monkeypatch.undo()
    store.close()


@pytest.mark.parametrize("retry_s", [60.0, 0.0])
def test_files_eviction_cannot_remove_are_passed_over_wherever_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, retry_s: float
) -> None:
    """Stuck files moved to the recent end bunched together; when the bunch came round to the
    front again, eight in a row read as a disk that is down (an ERROR, puts RAM-only). Tried
    again when due (0: at every put), they must still not keep a put from the files that go."""
    monkeypatch.setattr(store_mod, "STUCK_RETRY_S", retry_s)
    size = record_size("q8", len(blob(1)))
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=20 * size, directory=tmp_path, writers=1)
    for i in range(1, 21):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    stuck = {store._path((key(i), "q8")) for i in range(1, 11)}
    unlink = Path.unlink

    def refusing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self in stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refusing_unlink)
    with caplog.at_level(logging.WARNING, "kvpeer.store"):
        for i in range(21, 61):
            store.put_blocking(key(i), "q8", blob(i))
            assert store.flush(timeout_s=30)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    stats = store.stats()
    assert not stats["disk_failing"] and stats["ram_only_puts"] == 0 and stats["disk_entries"] == 20
    assert all(store._path((key(i), "q8")).exists() for i in range(51, 61))  # the newest made it
    monkeypatch.undo()
    store.close()


def test_a_put_queued_in_the_pool_at_close_gets_a_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() drops jobs still queued in its pools: their callers got CancelledError although
    nobody cancelled them, which no caller catches (they catch StoreError)."""
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=1 << 30, directory=tmp_path,
                       max_pending_bytes=1500, writers=1)
    gate = _gate_writes(monkeypatch)

    async def main() -> list[str]:
        count = 2 + store_mod.PUT_THREADS  # one for the writer, the pool's threads waiting, one queued
        puts = [asyncio.create_task(store.put(key(i), "q8", blob(i))) for i in range(1, count + 1)]
        await asyncio.sleep(0.3)
        closing = asyncio.create_task(asyncio.to_thread(store.close, 5))
        await asyncio.sleep(0.2)
        gate.set()
        await closing
        outcomes = []
        for put in puts:
            try:
                await put
                outcomes.append("stored")
            except StoreError:
                outcomes.append("refused")
        return outcomes

    outcomes = asyncio.run(main())
    assert "refused" in outcomes and set(outcomes) <= {"stored", "refused"}


def test_files_that_resisted_eviction_are_tried_again_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that failed to go once (EBUSY, an immutable flag since removed) was passed over
    until a restart: once only such files were left, every put went to RAM only, uncounted."""
    size = record_size("q8", len(blob(1)))
    store = ChunkStore(ram_bytes=1 << 20, disk_bytes=4 * size, directory=tmp_path, writers=1)
    for i in range(1, 5):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    unlink = Path.unlink

    def busy(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy", str(self))

    monkeypatch.setattr(store_mod, "STUCK_RETRY_S", 0.0)  # due again at once
    monkeypatch.setattr(Path, "unlink", busy)
    store.put_blocking(key(5), "q8", blob(5))
    stats = store.stats()
    assert stats["disk_stuck_files"] == 4 and stats["ram_only_puts"] == 1  # said, not silent
    monkeypatch.setattr(Path, "unlink", unlink)  # the cause is gone
    for i in range(6, 10):
        store.put_blocking(key(i), "q8", blob(i))
        assert store.flush(timeout_s=30)
    assert all(store._path((key(i), "q8")).exists() for i in range(6, 10))
    store.close()


def test_a_refused_put_is_not_counted_as_kept_in_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = record_size("q8", len(blob(1)))
    store = ChunkStore(ram_bytes=2 * len(blob(1)), disk_bytes=2 * size, directory=tmp_path)
    for i in (1, 2):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)

    def busy(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy", str(self))

    monkeypatch.setattr(Path, "unlink", busy)
    with pytest.raises(StoreError):
        store.put_blocking(key(3), "q8", blob(3, size=3 * len(blob(1))))  # fits neither tier now
    assert store.stats()["ram_only_puts"] == 0
    monkeypatch.undo()
    store.close()


def test_a_read_that_lost_its_file_leaves_the_chunk_put_again_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that met no file (or a corrupt one) removed whatever file the chunk had by the
    time it took the lock: one evicted, put again and flushed meanwhile was unlinked."""
    store = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    read = store_mod.read_record_blocking
    outcomes = iter([FileNotFoundError, StoreError("checksum mismatch")])

    def put_again_meanwhile(path: Path, chunk: bytes, level: str) -> bytes:
        failure = next(outcomes)
        store.delete(chunk)  # evicted by another thread...
        store.put_blocking(chunk, level, blob(1))  # ...and put again, its write acknowledged
        assert store.flush(timeout_s=30)
        raise failure

    store.put_blocking(key(1), "q8", blob(1))
    assert store.flush(timeout_s=30)
    monkeypatch.setattr(store_mod, "read_record_blocking", put_again_meanwhile)
    for _ in range(2):  # the missing file, then the corrupt one
        assert store.get_blocking(key(1)) is None
        assert store.has(key(1)) and len(files(tmp_path)) == 1
    monkeypatch.setattr(store_mod, "read_record_blocking", read)
    assert store.get_blocking(key(1)) == blob(1)
    store.close()


def test_reads_from_disk_do_not_push_out_chunks_held_only_in_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose write failed lives in RAM alone: caching copies of files read from disk
    pushed it out like any copy, and the acknowledged put was lost."""
    store = ChunkStore(ram_bytes=3000, disk_bytes=1 << 20, directory=tmp_path, level_order=LEVELS)
    for i in range(6):
        store.put_blocking(key(i), "q8", blob(i))
    assert store.flush(timeout_s=30)
    write = store_mod._write_file_blocking

    def failing_disk(path: Path, *args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(store_mod, "_write_file_blocking", failing_disk)
    store.put_blocking(key(9), "q8", blob(9))  # acknowledged; its write fails: RAM only
    assert store.flush(timeout_s=30)
    monkeypatch.setattr(store_mod, "_write_file_blocking", write)
    for i in range(4):  # files read back, cached in RAM as far as copies make room
        assert store.get_blocking(key(i)) == blob(i)
    assert store.get_blocking(key(9)) == blob(9)
    store.close()
