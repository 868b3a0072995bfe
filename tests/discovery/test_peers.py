from kvpeer.discovery.advert import PeerInfo
from kvpeer.discovery.peers import PeerTable, RateLimit, UpdateThrottle


def info(node_id: str = "b", epoch: int = 1) -> PeerInfo:
    return PeerInfo(
        node_id=node_id,
        addresses=("10.0.0.2",),
        port=7457,
        fingerprints=(),
        epoch=epoch,
        chunk_count=1,
    )


def kinds(events: list) -> list[str]:  # type: ignore[type-arg]
    return [e.kind for e in events]


def test_lifecycle_with_fake_clock() -> None:
    table = PeerTable("a", timeout_s=10.0)
    assert table.observe(info("a"), 0.0) == []  # never ourselves
    assert kinds(table.observe(info(), 0.0)) == ["added"]
    assert table.observe(info(), 1.0) == []
    (event,) = table.observe(info(epoch=2), 2.0)
    assert event.kind == "updated" and event.epoch_changed
    assert table.heard("b", 11.0) == []
    assert table.expire(20.9) == []
    assert kinds(table.expire(21.1)) == ["removed"] and "b" not in table.alive()
    assert kinds(table.heard("b", 22.0)) == ["added"]  # back from the dead by heartbeat
    assert kinds(table.mark_dead("b")) == ["removed"]
    assert table.mark_dead("b") == []
    assert kinds(table.observe(info(epoch=3), 23.0)) == ["added"]
    assert kinds(table.withdraw("b")) == ["removed"]
    assert table.heard("b", 24.0) == []  # a goodbye forgets: heartbeats cannot revive
    assert table.next_expiry() is None


def test_dead_peers_are_forgotten_after_a_while() -> None:
    table = PeerTable("a", timeout_s=10.0, forget_after_s=30.0)
    table.observe(info(), 0.0)
    assert kinds(table.expire(11.0)) == ["removed"]
    assert table.expire(29.0) == [] and table.known("b") is not None
    assert table.expire(31.0) == [] and table.known("b") is None
    assert table.heard("b", 32.0) == []  # forgotten: only a new advertisement brings it back


def test_no_timeout_means_no_expiry() -> None:
    table = PeerTable("a", timeout_s=None)
    table.observe(info(), 0.0)
    assert table.expire(1e9) == []


def test_throttle_coalesces() -> None:
    throttle = UpdateThrottle(1.0)
    assert throttle.delay(0.0) == 0.0
    throttle.published(0.0)
    assert throttle.delay(0.25) == 0.75
    assert throttle.delay(1.5) == 0.0


def test_the_table_is_bounded() -> None:
    """Any host can announce fresh node ids: beyond the cap new peers are refused, counted."""
    table = PeerTable("a", timeout_s=10.0, max_peers=2)
    assert kinds(table.observe(info("b"), 0.0)) == ["added"]
    assert kinds(table.observe(info("c"), 0.0)) == ["added"]
    assert table.observe(info("d"), 0.0) == [] and table.refused == 1
    assert "d" not in table.alive()
    assert kinds(table.observe(info("b", epoch=2), 1.0)) == ["updated"]  # known peers still change
    table.withdraw("b")
    assert kinds(table.observe(info("d"), 2.0)) == ["added"]


def test_rate_limit_with_fake_clock() -> None:
    limit = RateLimit(2.0, burst=3)
    assert [limit.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow(0.25) is False
    assert limit.allow(0.5) is True  # one token back after 1/rate seconds
    assert [limit.allow(100.0) for _ in range(4)] == [True, True, True, False]


def at(node_id: str, address: str) -> PeerInfo:
    return PeerInfo(node_id=node_id, addresses=(address,), port=7457, fingerprints=(), epoch=1,
                    chunk_count=1)


def test_a_full_table_makes_room_by_evicting_the_entry_dead_the_longest() -> None:
    """One burst of made-up ids filled the table, and their dead entries kept every new or
    restarted peer out until forgotten (6 peer timeouts)."""
    table = PeerTable("a", timeout_s=10.0, max_peers=3)
    for i, node_id in enumerate(["x", "y", "z"]):
        table.observe(at(node_id, f"10.0.0.{i + 1}"), float(i))
    table.mark_dead("y")
    table.expire(12.5)  # x and z too; y died first
    assert kinds(table.observe(info("b"), 13.0)) == ["added"]
    assert table.known("y") is None and table.evicted == 1 and table.refused == 0
    assert kinds(table.observe(info("c"), 13.0)) == ["added"]
    assert table.known("x") is None
    assert table.heard("z", 14.0) != []  # still there to be revived


def test_one_address_holds_a_bounded_share_of_the_table() -> None:
    table = PeerTable("a", timeout_s=10.0, max_per_address=2)
    assert kinds(table.observe(at("x", "10.0.0.9"), 0.0)) == ["added"]
    assert kinds(table.observe(at("y", "10.0.0.9"), 0.0)) == ["added"]
    assert table.observe(at("z", "10.0.0.9"), 0.0) == [] and table.crowded == 1
    assert kinds(table.observe(at("z", "10.0.0.8"), 0.0)) == ["added"]  # another address
    table.mark_dead("x")
    assert kinds(table.observe(at("w", "10.0.0.9"), 1.0)) == ["added"]  # x made room
    assert table.known("x") is None


def test_a_listed_peer_is_taken_into_a_full_table() -> None:
    table = PeerTable("a", timeout_s=10.0, max_peers=1)
    table.observe(at("x", "10.0.0.9"), 0.0)
    assert table.observe(info("b"), 0.0) == [] and table.refused == 1
    assert kinds(table.observe(info("b"), 0.0, listed=True)) == ["added"]
