"""Property: syncing by deltas converges to the same table as a full sync."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpeer.discovery import InventoryLog, InventoryTable, PeerInfo, StaleDeltaError, sync_peer

POOL = [bytes([i]) * 32 for i in range(40)]

op = st.one_of(
    st.tuples(st.just("add"), st.lists(st.sampled_from(POOL), max_size=8)),
    st.tuples(st.just("remove"), st.lists(st.sampled_from(POOL), max_size=8)),
    st.tuples(st.just("sync"), st.just([])),
    st.tuples(st.just("drop"), st.just([])),  # the peer was marked dead, then came back
    st.tuples(st.just("late"), st.just([])),  # an old answer arrives after a newer one
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op, max_size=60), history=st.integers(min_value=1, max_value=64))
def test_delta_sync_converges_to_full_sync(ops: list[tuple[str, list[bytes]]], history: int) -> None:
    log = InventoryLog(epoch=1_000, history_keys=history)
    table = InventoryTable()
    old_answers: list[dict[str, Any]] = []
    for kind, keys in ops:
        if kind == "add":
            log.add(keys)
        elif kind == "remove":
            log.remove(keys)
        elif kind == "sync":
            answer = log.since(table.epoch("peer"))
            old_answers.append(answer)
            try:
                table.apply("peer", answer)
            except StaleDeltaError:
                table.apply("peer", log.since(None))
        elif kind == "drop":
            table.drop("peer")
        elif kind == "late" and old_answers:
            try:
                table.apply("peer", old_answers[0])
            except StaleDeltaError:
                pass  # refused: the table keeps what it had
    table.apply("peer", log.since(table.epoch("peer")))
    reference = InventoryTable()
    reference.apply("peer", log.since(None))
    assert table.snapshot() == reference.snapshot() == {"peer": log.keys()}
    assert table.epoch("peer") == log.epoch


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.lists(st.sampled_from(POOL), max_size=6)), max_size=30))
def test_sync_helper_converges(ops: list[tuple[bool, list[bytes]]]) -> None:
    """`sync_peer` over an in-memory request function reaches the peer's set."""
    log = InventoryLog(epoch=0, history_keys=16)
    table = InventoryTable()
    fp = "ab" * 16

    async def request(peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        assert (peer_id, method) == ("peer", "inventory")
        return log.since(body["since"])

    async def main() -> None:
        for adding, keys in ops:
            (log.add if adding else log.remove)(keys)
            info = PeerInfo(
                node_id="peer", addresses=("10.0.0.9",), port=1, fingerprints=(fp,),
                epoch=log.epoch, chunk_count=len(log),
            )
            assert await sync_peer(table, request, info, timeout_s=5) == log.epoch
            assert table.keys_of("peer") == log.keys()
        if ops and log.keys():
            assert table.peers_for(next(iter(log.keys())), fp) == {"peer"}

    asyncio.run(main())
