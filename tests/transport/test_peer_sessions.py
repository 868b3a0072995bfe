"""PeerTransport.sessions() is read from the metrics thread (kvpeer_peer_sessions) while the event
loop opens and closes sessions: a change in the middle of the read must not break it."""

from __future__ import annotations

from typing import Any

from kvpeer.transport import PeerTransport, TransportConfig


class Handler:
    async def handle_request(self, peer_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def open_blob(self, peer_id: str, key: bytes, level: str) -> bytes | None:
        return None


class Session:
    """Stands in for a PeerSession whose ``closed`` is read while the loop thread, in between,
    adds a session and drops another (what a thread switch inside the read can show)."""

    def __init__(self, table: dict[str, Any], name: str, churn: bool = False) -> None:
        self._table = table
        self.name = name
        self._churn = churn

    @property
    def closed(self) -> bool:
        if self._churn:
            self._churn = False
            self._table["late"] = Session(self._table, "late")
            self._table.pop("gone", None)
        return False


def test_sessions_opening_and_closing_during_the_read_do_not_break_it() -> None:
    transport = PeerTransport("n", TransportConfig(host="127.0.0.1", allow_loopback=True), Handler())
    table: dict[str, Any] = transport._sessions  # type: ignore[assignment]
    table["a"] = Session(table, "a", churn=True)
    table["gone"] = Session(table, "gone")
    # The sessions open when the read began (the one dropped meanwhile was still open then).
    assert [s.name for s in transport.sessions()] == ["a", "gone"]
    assert sorted(s.name for s in transport.sessions()) == ["a", "late"]
