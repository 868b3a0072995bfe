"""Segments never leak: a client killed with SIGKILL mid-fetch or mid-put leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvpeer.api.client import KVPeerClient
from tests.api.fakes import FP, ServerThread, kv, our_segments, wait_until

CLIENT = textwrap.dedent(
    """
    import sys, time, torch
    from kvpeer.api import messages as m
    from kvpeer.api.client import KVPeerClient
    from kvpeer.hashing import ModelFingerprint

    fp = ModelFingerprint(name="tiny", layers=2, kv_heads=3, head_dim=8, dtype="float32")
    client = KVPeerClient(sys.argv[1])
    tokens = list(range(8))
    if sys.argv[2] == "fetch":
        handle = client.fetch(tokens, fp)
        print(handle.matched_tokens, handle.segment.name, flush=True)
    else:  # stop between "segment ready" and "commit"
        ready = client._call(m.PutRequest(id=client._new_id(), tokens=tokens, fingerprint=fp,
                                          dtype="float32"), m.SegmentReady)
        print(0, ready.segment, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("stage", ["fetch", "put"])
def test_killed_client_leaks_no_segment(api: ServerThread, stage: str) -> None:
    k, v = kv(8)
    with KVPeerClient(api.socket_path) as client:
        client.put(list(range(8)), k, v, FP)
    before = set(os.listdir("/dev/shm"))
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(api.socket_path), stage],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert len(line) == 2, "the client did not get its segment"
        name = line[1]
        assert name in our_segments()
        assert name not in before
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    wait_until(lambda: name not in our_segments())
    # Only segments of our server count: other test runs may share this /dev/shm.
    assert not (our_segments() - before)
