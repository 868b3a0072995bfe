"""Drive `python -m kvpeer.discovery` agent processes (cluster tests and the benchmark).

An `AgentProcess` wraps one agent started by the caller (usually inside a network namespace):
it sends stdin commands and collects the JSON events the agent prints, from a reader thread,
so a test can wait for an event with a timeout instead of sleeping. Not used by the daemon.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Event = dict[str, Any]


def agent_argv(node_id: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "kvpeer.discovery", "--node-id", node_id, *options]


class AgentProcess:
    """One running agent; every event it printed is kept in ``events``."""

    def __init__(self, node_id: str, process: subprocess.Popen[str]) -> None:
        self.node_id = node_id
        self.process = process
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"agent {node_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._queue.put(event)
        self._queue.put(None)

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def wait_for(self, match: Callable[[Event], bool], timeout_s: float) -> Event:
        """First event (already seen or coming) that matches; TimeoutError after timeout_s."""
        for event in self.events:
            if match(event):
                return event
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.node_id}: no matching event in {timeout_s}s: {self.events[-5:]}")
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self._queue.put(None)  # keep "ended" visible to later waits
                raise RuntimeError(f"agent {self.node_id} exited: {self.events[-5:]}")
            self.events.append(item)
            if match(item):
                return item

    def wait_event(self, kind: str, timeout_s: float, **fields: Any) -> Event:
        return self.wait_for(
            lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in fields.items()),
            timeout_s,
        )

    def quit(self, timeout_s: float = 20.0) -> int:
        """Graceful stop: end of input; returns the exit code."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_agents(
    popen: Callable[..., subprocess.Popen[str]],
    specs: Sequence[tuple[Any, str, Sequence[str]]],
    ready_timeout_s: float = 60.0,
    log_dir: Path | None = None,
) -> list[AgentProcess]:
    """Start agents ``(where, node_id, options)`` with ``popen(where, argv, **kw)``; wait ready.

    With ``log_dir``, each agent's stderr (its log) goes to ``log_dir/<node_id>.log``.
    """
    agents = []
    for where, node_id, options in specs:
        stderr: Any = None
        if log_dir is not None:
            stderr = (log_dir / f"{node_id}.log").open("w")
        proc = popen(
            where,
            agent_argv(node_id, *options),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
        )
        if stderr is not None:
            stderr.close()
        agents.append(AgentProcess(node_id, proc))
    for agent in agents:
        agent.wait_event("ready", ready_timeout_s)
    return agents
