"""The command lines: help that helps, config errors that name the key, a clear error without a daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvpeer import cli
from kvpeer.config import Config, load_config
from kvpeer.errors import ConfigError
from kvpeer.hashing import ModelFingerprint


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from kvpeer.cli import {0}; sys.exit({0}(sys.argv[1:]))".format(argv[0]), *argv[1:]],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_help_shows_examples() -> None:
    daemon = run("daemon_main", "--help")
    client = run("client_main", "--help")
    assert daemon.returncode == 0 and "--check-config" in daemon.stdout and "examples:" in daemon.stdout
    assert client.returncode == 0 and "kvpeer fetch" in client.stdout


def test_fetch_takes_the_clients_recompute_speed() -> None:
    fetch = run("client_main", "fetch", "--help")
    assert fetch.returncode == 0 and "--recompute-rate" in fetch.stdout


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    config = tmp_path / "kvpeer.toml"
    config.write_text('[store]\nram_bytes = "64MiB"\n[node]\nnode_id = "edge-7"\n'
                      '[discovery]\ninterfaces = ["127.0.0.1"]\n'  # a host with only loopback too
                      '[transport]\nallow_loopback = true\n')
    result = run("daemon_main", "--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "edge-7" in result.stdout
    assert "64MiB" in result.stdout or str(64 << 20) in result.stdout


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "kvpeer.toml"
    config.write_text("[store]\nram_bytez = 1\n")
    result = run("daemon_main", "--config", str(config), "--check-config")
    assert result.returncode == 2
    assert "ram_bytez" in result.stderr


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    result = run("daemon_main", "--config", str(tmp_path / "nope.toml"), "--check-config")
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


def test_client_without_daemon_says_so_and_where_it_looked(tmp_path: Path) -> None:
    result = run("client_main", "--socket", str(tmp_path / "absent.sock"), "status")
    assert result.returncode == 1
    assert f"cannot reach the daemon at {tmp_path / 'absent.sock'}" in result.stderr


def test_read_only_commands_give_up_on_a_stuck_daemon_within_their_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvpeer status` against a daemon that accepts but never answers hung for 60 s."""
    path = tmp_path / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(str(path))
        stuck.listen()  # connects complete in the backlog; nothing reads or answers
        assert cli.client_main(["--socket", str(path), "--timeout", "0.2", "status"]) == 1
        err = capsys.readouterr().err
        assert "no answer from the daemon in 0.2s" in err
        assert "wait longer with `kvpeer status --timeout S`" in err  # the 5 s default is short
        assert cli.client_main(["--socket", str(path), "peers", "--timeout", "0.2"]) == 1
        err = capsys.readouterr().err
        assert "no answer from the daemon in 0.2s" in err and "`kvpeer peers --timeout S`" in err


@pytest.mark.parametrize(
    ("argv", "timeout_s"),
    [(["status"], 5.0), (["stats"], 5.0), (["peers"], 5.0), (["--timeout", "9", "stats"], 9.0),
     (["evict", "--all"], None), (["evict", "--all", "--timeout", "2"], 2.0)],
)
def test_read_only_commands_wait_a_few_seconds_by_default(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], timeout_s: float | None
) -> None:
    from kvpeer.api import client as client_mod

    made: list[dict[str, Any]] = []

    def fake_client(**kwargs: Any) -> Any:
        made.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(client_mod, "KVPeerClient", fake_client)
    assert cli.client_main(argv) == 1
    assert made[0].get("timeout_s") == timeout_s  # None: the client's own default (60 s)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(SystemExit):
        cli.client_parser().parse_args(["--timeout", value, "status"])


@pytest.mark.parametrize(
    "argv", [["--json", "stats"], ["stats", "--json"], ["peers", "--json"], ["evict", "--all", "--json"]]
)
def test_json_goes_before_or_after_the_command(argv: list[str]) -> None:
    assert cli.client_parser().parse_args(argv).json is True


def test_without_json_the_output_is_a_table() -> None:
    assert cli.client_parser().parse_args(["stats"]).json is False


def test_the_daemon_caps_torch_threads_as_configured() -> None:
    """``daemon.torch_threads``: N caps torch's intra-op threads, 0 leaves torch's default (in a
    child process, so this one keeps its own)."""
    code = (
        "import torch; from kvpeer.cli import limit_torch_threads; from kvpeer.config import Config\n"
        "before = torch.get_num_threads(); limit_torch_threads(0)\n"
        "assert torch.get_num_threads() == before\n"
        "limit_torch_threads(Config().daemon.torch_threads); print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_an_import_error_inside_the_daemon_is_not_taken_for_a_missing_uvloop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> int:
        raise ImportError("No module named 'an_optional_dependency'")

    with caplog.at_level(logging.INFO), pytest.raises(ImportError, match="an_optional_dependency"):
        cli._run(main(), use_uvloop=True)
    assert "uvloop is not installed" not in caplog.text


def test_without_uvloop_the_daemon_runs_on_asyncio(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError

    async def main() -> int:
        return 7

    with caplog.at_level(logging.INFO):
        assert cli._run(main(), use_uvloop=True) == 7
    assert "uvloop is not installed" in caplog.text


def daemon_config(tmp_path: Path, transport: str = "", discovery: str = "") -> Path:
    """A config for a daemon on loopback with a static peer list, no metrics, no GPU needed."""
    psk = tmp_path / "psk.key"
    psk.write_text("ab" * 32)
    psk.chmod(0o600)
    config = tmp_path / "kvpeer.toml"
    config.write_text(
        f'[node]\nnode_id = "cli-test"\nstate_dir = "{tmp_path / "state"}"\n'
        f'runtime_dir = "{tmp_path / "run"}"\n'
        '[store]\nram_bytes = "16MiB"\ndisk_bytes = "16MiB"\n'
        f'[transport]\npsk_file = "{psk}"\nallow_loopback = true\n'
        + (transport or 'host = "127.0.0.1"\nport = 0\n')
        + '[discovery]\nbackend = "static"\n'
        + (discovery or 'interfaces = ["127.0.0.1"]\n')
        + "[metrics]\nenabled = false\n"
    )
    return config


def test_metrics_on_the_transport_port_of_a_host_chosen_at_start_is_a_config_error(tmp_path: Path) -> None:
    """With transport.host unset (chosen at start: the first advertised address), the load
    could not see the clash: the start failed with 'address already in use' blamed on
    transport.port, /metrics having taken it first."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = daemon_config(tmp_path, transport=f"port = {port}\n")
    config.write_text(config.read_text().replace("[metrics]\nenabled = false\n", f"[metrics]\nport = {port}\n"))
    result = run("daemon_main", "--config", str(config), "--no-uvloop")
    assert result.returncode == 2, result.stderr
    assert "metrics.port" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_taken_port_is_one_line_and_no_restart(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, transport=f'host = "127.0.0.1"\nport = {port}\n')
        result = run("daemon_main", "--config", str(config), "--no-uvloop")
    assert result.returncode == 2, result.stderr  # the unit's RestartPreventExitStatus=
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "ERROR" in x]
    assert "cannot listen for peers (transport.host, transport.port)" in line
    assert str(port) in line and "in use" in line


def test_a_store_dir_another_daemon_holds_is_one_line_and_no_restart(tmp_path: Path) -> None:
    """Exit 1 before ("kvpeerd failed: ... in use by another process"): systemd started it again
    20 times, where a taken port or socket is exit 2; now it names the key and the holder."""
    from kvpeer.store import ChunkStore

    config = daemon_config(tmp_path)
    holder = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=tmp_path / "state" / "store")
    try:
        result = run("daemon_main", "--config", str(config), "--no-uvloop")
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "ERROR" in x]
    assert "config error: store.dir:" in line and f"(pid {os.getpid()})" in line


def test_a_taken_metrics_port_is_logged_and_listed_under_degraded(caplog: pytest.LogCaptureFixture) -> None:
    """Not fatal (the node still shares KV), but said only in the log: `kvpeer status` showed
    "degraded: none", and /healthz on that port was another process's answer."""
    from kvpeer.metrics import Metrics

    config = Config()
    node = SimpleNamespace(metrics=Metrics(process=False), ready=False, degraded=list, metrics_unavailable=None)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, port=port))
        assert cli._start_metrics(config, node) is None
    reason = f"cannot listen on 127.0.0.1:{port} (Address already in use)"
    assert node.metrics_unavailable == reason  # Daemon.degraded() lists it (test_daemon_codec)
    assert any(reason in r.message and r.levelname == "ERROR" for r in caplog.records)


def test_an_address_not_on_this_machine_is_one_line_and_retried(tmp_path: Path) -> None:
    """At boot an address may come later (DHCP, a floating address): exit 1, systemd retries."""
    config = daemon_config(tmp_path, transport='host = "192.0.2.1"\nport = 0\n')  # TEST-NET-1
    result = run("daemon_main", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "cannot listen for peers" in result.stderr and "192.0.2.1" in result.stderr


def test_a_config_error_found_when_the_daemon_is_built_exits_2(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, discovery='interfaces = ["fe80::1"]\n')
    result = run("daemon_main", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "discovery.interfaces" in result.stderr and "only IPv4" in result.stderr


def test_an_interface_not_there_at_start_exits_1_to_be_retried(tmp_path: Path) -> None:
    """At boot a NIC's driver may load after us: exit 2 (as for a bad config) left the node
    without kvpeer until someone started it by hand; --check-config still fails on a typo."""
    config = daemon_config(tmp_path, discovery='interfaces = ["kvpeer-no-such-if0"]\n')
    result = run("daemon_main", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "not ready: discovery.interfaces: no interface 'kvpeer-no-such-if0'" in result.stderr
    assert run("daemon_main", "--config", str(config), "--check-config").returncode == 2


def test_faulthandler_is_skipped_when_stderr_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvpeerd 2>&-`: sys.stderr is None, faulthandler.enable raised RuntimeError and kvpeerd
    exited 1 without a word."""
    monkeypatch.setattr(cli.sys, "stderr", None)
    cli.enable_faulthandler()  # raised RuntimeError

    def refuse(**kwargs: Any) -> None:
        raise RuntimeError("sys.stderr is None")

    monkeypatch.setattr(cli.sys, "stderr", sys.__stderr__)
    monkeypatch.setattr(cli.faulthandler, "enable", refuse)
    cli.enable_faulthandler()  # any other stderr it cannot use: logged at DEBUG, not raised


def test_kvpeerd_with_stderr_closed_gets_past_faulthandler(tmp_path: Path) -> None:
    """The daemon itself, stderr closed: it ran to the start (here: exit 2, a taken port)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, transport=f'host = "127.0.0.1"\nport = {port}\n')
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from kvpeer.cli import daemon_main; "
             "sys.exit(daemon_main(sys.argv[1:]))", "--config", str(config), "--no-uvloop"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=120,
            preexec_fn=lambda: os.close(2),
        )
    assert result.returncode == cli.EXIT_CONFIG  # 1 before: RuntimeError from faulthandler


def test_start_failure_transient_errors_may_be_retried() -> None:
    assert cli.start_failure(OSError(errno.ENOBUFS, "No buffer space available"))[1] == 1
    message, status = cli.start_failure(OSError(errno.EACCES, "Permission denied"))
    assert status == cli.EXIT_CONFIG and message == "cannot start: [Errno 13] Permission denied"


def test_start_failure_timeout_is_transient_and_named() -> None:
    """A builtin TimeoutError (zeroconf's registration timing out) was exit 2, "config error",
    with an empty reason: "cannot start discovery ([discovery]): "."""
    assert cli.start_failure(TimeoutError()) == ("cannot start: TimeoutError", 1)
    assert cli.start_failure(TimeoutError("no answer")) == ("cannot start: no answer", 1)


def test_sigterm_during_start_cancels_it_and_no_ready_follows(tmp_path: Path) -> None:
    """A slow start (the GPU probe: up to ~20 s) must not hold SIGTERM back, and READY=1 must not
    follow a stop request."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    config = Config()
    config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, enabled=False))
    seen: list[str] = []

    class SlowStart:
        inventory: list[bytes] = []

        def __init__(self, config: Config) -> None:
            self.starting = asyncio.Event()

        async def start(self) -> None:
            self.starting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("start cancelled")
                raise

        async def stop(self) -> None:
            seen.append("stopped")

    async def main() -> int:
        daemon = SlowStart(config)
        serving = asyncio.create_task(cli._serve(config, lambda _: daemon))
        await asyncio.wait_for(daemon.starting.wait(), 10)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serving, 10)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
            assert asyncio.run(main()) == 0
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(notify.recv(4096).decode())
    finally:
        notify.close()
    assert seen == ["start cancelled", "stopped"]
    assert not any("READY=1" in m for m in messages), messages
    assert any(m.startswith("STOPPING=1") for m in messages), messages


def test_sigterm_while_the_store_waits_for_its_lock_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store was opened on the event loop (its listing; up to store.LOCK_WAIT_S for a
    predecessor's lock): a SIGTERM then waited for it, and a lock still held ended the stop in
    exit 2 (a config error) though the stop came first."""
    from kvpeer import store as store_mod
    from kvpeer.store import ChunkStore

    config = load_config(daemon_config(tmp_path))
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 3.0)
    holder = ChunkStore(ram_bytes=0, disk_bytes=1 << 20, directory=config.store.dir)

    async def main() -> int:
        serving = asyncio.create_task(cli._serve(config))
        await asyncio.sleep(0.5)
        assert not serving.done()
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serving, 10)

    try:
        with caplog.at_level(logging.INFO, logger="kvpeer.cli"):
            assert asyncio.run(main()) == 0
        assert "stopped while starting" in caplog.text
    finally:
        for thread in threading.enumerate():  # the opening gives up when its wait ends
            if thread.name == "kvpeerd-open":
                thread.join(10)
        holder.close()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("psk_unreadable", "transport.psk_file"),
        ("interface", "discovery.interfaces"),
        ("group", "api.socket_group"),
        ("namespace_user", "api.namespaces.team-a: no user named 'kvpeer-no-such-user'"),
        ("namespace_group", "api.namespaces.team-a: no group named 'kvpeer-no-such-group'"),
    ],
)
def test_check_config_fails_on_what_start_would(tmp_path: Path, change: str, key: str) -> None:
    config = daemon_config(tmp_path)
    assert run("daemon_main", "--config", str(config), "--check-config").returncode == 0
    text = config.read_text()
    if change == "psk_unreadable":
        text = text.replace(str(tmp_path / "psk.key"), str(tmp_path / "absent.key"))
    elif change == "interface":
        text = text.replace('interfaces = ["127.0.0.1"]', 'interfaces = ["kvpeer-no-such-if0"]')
    elif change == "group":
        text += '[api]\nsocket_group = "kvpeer-no-such-group"\n'
    elif change == "namespace_user":
        text += '[api.namespaces]\nteam-a = ["root", "kvpeer-no-such-user"]\n'
    else:
        text += '[api.namespaces]\nteam-a = ["@kvpeer-no-such-group"]\n'
    config.write_text(text)
    result = run("daemon_main", "--config", str(config), "--check-config")
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_check_config_fails_on_metrics_taking_the_transport_port_of_the_chosen_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With transport.host unset, load cannot tell; the check knows the host a start would take
    (discovery.interfaces' first address, 127.0.0.1 here) and that /metrics took it first."""
    config = daemon_config(tmp_path, transport="port = 7500\n")
    config.write_text(config.read_text().replace("enabled = false", "enabled = true\nport = 7500"))
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and "metrics.port: 7500 is transport.port too" in err, err
    assert "transport.host (127.0.0.1)" in err


@pytest.mark.parametrize(
    ("interfaces", "message"),
    [('["kvpeer-no-such-if0"]', "discovery.interfaces: no interface 'kvpeer-no-such-if0'"),
     ('["127.0.0.2"]', "discovery: advertised address 127.0.0.1 is not on a configured interface")],
)
def test_check_config_checks_the_interfaces_with_advertise_addresses_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], interfaces: str, message: str
) -> None:
    """With transport.advertise_addresses set, discovery.interfaces went unchecked: a typo
    passed --check-config, then every start failed on it (exit 1, restarted)."""
    transport = 'host = "127.0.0.1"\nport = 0\nadvertise_addresses = ["127.0.0.1"]\n'
    config = daemon_config(tmp_path, transport=transport)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    config = daemon_config(tmp_path, transport=transport, discovery=f"interfaces = {interfaces}\n")
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and message in err, err


def test_the_etcd_backend_without_its_extra_is_a_config_error_at_check_and_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It passed --check-config, then start died of ModuleNotFoundError with exit 1, which
    systemd restarts forever."""
    config = daemon_config(tmp_path)
    config.write_text(config.read_text().replace(
        'backend = "static"', 'backend = "etcd"\netcd_endpoints = ["http://127.0.0.1:2379"]'
    ))
    monkeypatch.setattr(cli, "_has_module", lambda name: name != "aetcd")
    for mode in (["--check-config"], []):
        assert cli.daemon_main(["--config", str(config), *mode]) == cli.EXIT_CONFIG
        assert 'needs the etcd extra: pip install "kvpeer[etcd]"' in capsys.readouterr().err
    monkeypatch.setattr(cli, "_has_module", lambda name: True)
    config.write_text(config.read_text().replace("http://127.0.0.1:2379", "https://127.0.0.1:2379"))
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == cli.EXIT_CONFIG
    assert "discovery.etcd_endpoints" in capsys.readouterr().err


def _deny_writes(monkeypatch: pytest.MonkeyPatch, denied: Path, *, read_only: bool) -> None:
    """What another owner (or, with ``read_only``, a read-only mount) does to this user at
    ``denied``: root may write anywhere, so os.access and os.statvfs are told."""
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(
        cli.os, "access", lambda path, mode: Path(path) != denied and real_access(path, mode)
    )

    def statvfs(path: Any) -> Any:
        found = real_statvfs(path)
        if read_only and Path(path) == denied:
            return SimpleNamespace(f_flag=found.f_flag | os.ST_RDONLY, f_blocks=found.f_blocks,
                                   f_frsize=found.f_frsize)
        return found

    monkeypatch.setattr(cli.os, "statvfs", statvfs)


def _store_dir_config(tmp_path: Path, exists: bool) -> tuple[Path, Path, Path]:
    """A daemon config, its store.dir (made, or only its parent), and the directory a start
    would write into: the store.dir itself, or the parent it would be created in."""
    config = daemon_config(tmp_path)
    store_dir = load_config(config, env={}).store.dir
    where = store_dir if exists else store_dir.parent
    where.mkdir(parents=True)
    return config, store_dir, where


@pytest.mark.parametrize("exists", [True, False])
def test_check_config_fails_on_a_store_dir_this_user_may_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    exists: bool,
) -> None:
    """EACCES is fatal at start (exit 2), yet --check-config warned "RAM tier only", and said
    nothing of a store.dir not created yet under a directory this user may not write."""
    config, store_dir, where = _store_dir_config(tmp_path, exists)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    assert "store.dir" not in capsys.readouterr().err
    _deny_writes(monkeypatch, where, read_only=False)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and "RAM tier" not in err
    assert f"config error: store.dir: cannot open the disk store: store directory {store_dir}: " \
        "permission denied" in err
    if not exists:
        assert f"({store_dir.parent}, where it would be created, is not writable" in err


def test_check_config_leaves_a_state_dir_not_made_yet_to_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh install: /var/lib/kvpeer does not exist before the first start (StateDirectory=
    makes it, the daemon's own), and /var/lib is not the daemon user's: that is no error."""
    config = daemon_config(tmp_path)
    loaded = load_config(config, env={})
    loaded.node.state_dir.parent.mkdir(parents=True, exist_ok=True)
    assert not loaded.node.state_dir.exists()
    _deny_writes(monkeypatch, loaded.node.state_dir.parent, read_only=False)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    assert "store.dir" not in capsys.readouterr().err


@pytest.mark.parametrize("exists", [True, False])
def test_check_config_warns_of_a_store_dir_on_a_read_only_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    exists: bool,
) -> None:
    """EROFS (ProtectSystem=strict without ReadWritePaths=) leaves the store on its RAM tier."""
    config, store_dir, where = _store_dir_config(tmp_path, exists)
    _deny_writes(monkeypatch, where, read_only=True)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: store.dir {store_dir} is on a read-only file system" in err
    assert "RAM tier only" in err and "ReadWritePaths=" in err


@pytest.mark.parametrize("exists", [True, False])
def test_check_config_fails_on_a_socket_directory_this_user_may_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    exists: bool,
) -> None:
    """It passed; the start then exited 2 with "cannot open the local API socket
    (api.socket_path): [Errno 13] Permission denied", naming no path."""
    config = daemon_config(tmp_path)
    socket_dir = tmp_path / "sockets"
    config.write_text(config.read_text() + f'[api]\nsocket_path = "{socket_dir / "kvpeer.sock"}"\n')
    if exists:
        socket_dir.mkdir()
    where = socket_dir if exists else tmp_path
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    assert "api.socket_path" not in capsys.readouterr().err
    _deny_writes(monkeypatch, where, read_only=False)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and "config error: api.socket_path: cannot create the local API socket " \
        f"{socket_dir / 'kvpeer.sock'}: " in err, err
    if exists:
        assert f"{socket_dir} is not writable by this user" in err
    else:
        assert f"{socket_dir} does not exist, and {where}, where it would be created, is not " \
            "writable by this user" in err


def test_check_config_leaves_a_runtime_dir_not_made_yet_to_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """/run/kvpeer exists only while the unit runs (RuntimeDirectory=), and /run is root's."""
    config = daemon_config(tmp_path)
    runtime_dir = load_config(config, env={}).node.runtime_dir
    assert not runtime_dir.exists()
    _deny_writes(monkeypatch, runtime_dir.parent, read_only=False)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    assert "api.socket_path" not in capsys.readouterr().err


def test_a_start_that_cannot_bind_the_api_socket_names_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bind's EACCES carries no file name: the line said "(api.socket_path): [Errno 13]
    Permission denied", and which path that was had to be looked up in the config."""
    from kvpeer.api.server import ApiServer

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(asyncio, "start_unix_server", refuse)
    config = load_config(daemon_config(tmp_path), env={})
    server = ApiServer(config.api.socket_path, SimpleNamespace(), shm_dir=tmp_path)
    with pytest.raises(PermissionError) as info:
        asyncio.run(server.start())
    message, status = cli.start_failure(info.value, config)
    assert message == (f"cannot open the local API socket (api.socket_path = "
                       f"{config.api.socket_path}): [Errno 13] Permission denied")
    assert status == cli.EXIT_CONFIG


def test_check_config_warns_of_a_disk_budget_larger_than_the_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 20 GiB default on a 10 GiB disk passed without a word: the store meets a full disk
    long before its budget."""
    config = daemon_config(tmp_path)  # disk_bytes 16MiB
    store_dir = load_config(config, env={}).store.dir
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    assert "store.disk_bytes" not in capsys.readouterr().err  # any test machine has 16 MiB
    real_statvfs = os.statvfs

    def small_disk(path: Any) -> Any:  # 8 MiB in all
        return SimpleNamespace(f_flag=real_statvfs(path).f_flag, f_blocks=2048, f_frsize=4096)

    monkeypatch.setattr(cli.os, "statvfs", small_disk)
    assert cli.daemon_main(["--config", str(config), "--check-config"]) == 0
    assert f"WARNING: store.disk_bytes (16.0 MiB) is larger than the file system holding " \
        f"store.dir {store_dir} (8.0 MiB in all): the store will hit a full disk before its " \
        "budget" in capsys.readouterr().err


def test_a_socket_path_too_long_for_a_unix_socket_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-config passed it; the start failed to bind ("AF_UNIX path too long")."""
    config = daemon_config(tmp_path)
    path = tmp_path / ("x" * 120) / "kvpeer.sock"
    config.write_text(config.read_text() + f'[api]\nsocket_path = "{path}"\n')
    for mode in (["--check-config"], []):
        assert cli.daemon_main(["--config", str(config), *mode]) == cli.EXIT_CONFIG
        err = capsys.readouterr().err
        assert f"api.socket_path: {path} is {len(str(path))} bytes long" in err, err
        assert "at most 107" in err


def test_a_socket_group_the_user_is_not_in_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start failed with EPERM blamed on api.socket_path; --check-config had passed."""
    config = daemon_config(tmp_path)
    config.write_text(config.read_text() + '[api]\nsocket_group = "root"\n')
    assert cli.check_start_config(load_config(config, env={}))  # root may give it to any group
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli.os, "getegid", lambda: 1000)
    monkeypatch.setattr(cli.os, "getgroups", lambda: [1000, 27])
    with pytest.raises(ConfigError, match="api.socket_group: this user is not in group 'root'"):
        cli.check_start_config(load_config(config, env={}))
    monkeypatch.setattr(cli.os, "getgroups", lambda: [1000, 0])
    cli.check_start_config(load_config(config, env={}))


def test_check_config_warns_of_a_transport_host_that_is_not_here(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, transport='host = "192.0.2.99"\nport = 0\n')
    result = run("daemon_main", "--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr  # at boot the address may come later
    assert "transport.host 192.0.2.99 is not an address of this machine" in result.stderr
    here = run("daemon_main", "--config", str(daemon_config(tmp_path)), "--check-config")
    assert "not an address of this machine" not in here.stderr


def test_a_daemon_killed_by_the_watchdog_prints_every_threads_stack(tmp_path: Path) -> None:
    """systemd's watchdog ends a stuck daemon with SIGABRT: its journal said nothing of where."""
    script = (
        "import os, sys, threading; from kvpeer import cli\n"
        "threading.Thread(target=threading.Event().wait, name='stuck', daemon=True).start()\n"
        "def run(main, use_uvloop):\n"
        "    main.close(); os.abort()\n"
        "cli._run = run\n"
        "sys.exit(cli.daemon_main(sys.argv[1:]))\n"
    )
    config = daemon_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script, "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == -signal.SIGABRT, result.stderr
    assert "Fatal Python error: Aborted" in result.stderr
    assert "Current thread 0x" in result.stderr and "in daemon_main" in result.stderr
    assert "\nThread 0x" in result.stderr, result.stderr  # the other thread too


@pytest.mark.parametrize(
    ("text", "mode"),
    [("[stor]\n", []), ('[discovery]\nbackend = "etcd"\n', []),
     ('[discovery]\nbackend = "etcd"\n', ["--check-config"])],
)
def test_config_errors_before_logging_carry_the_journal_priority(
    tmp_path: Path, text: str, mode: list[str]
) -> None:
    """Errors found at load time were printed bare: `journalctl -p err` missed exactly the
    lines that say why the unit failed, while later errors carried <3>."""
    config = tmp_path / "kvpeer.toml"
    config.write_text(f'[node]\nnode_id = "j"\nstate_dir = "{tmp_path}"\n' + text)
    err = tmp_path / "stderr"
    with err.open("w") as stream:  # stderr is "the journal": JOURNAL_STREAM names it
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        script = (
            "import sys; from kvpeer import cli; cli._has_module = lambda name: False; "
            "sys.exit(cli.daemon_main(sys.argv[1:]))"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, "--config", str(config), *mode],
            stderr=stream, stdout=subprocess.DEVNULL, timeout=120, env=env,
        )
    assert result.returncode == cli.EXIT_CONFIG
    [line] = err.read_text().splitlines()
    assert line.startswith("<3>kvpeerd: config error: "), line


def test_log_level_takes_any_case_and_refuses_typos(tmp_path: Path) -> None:
    assert cli.daemon_parser().parse_args(["--log-level", "WARNING"]).log_level == "warning"
    result = run("daemon_main", "--config", str(daemon_config(tmp_path)), "--log-level", "WARN")
    assert result.returncode == 2  # argparse's usage error, not a ValueError traceback
    assert "invalid choice: 'warn'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("host", "level"), [("192.0.2.1", "ERROR"), ("127.0.0.1", "WARNING")])
def test_check_config_says_loudly_that_no_cluster_key_is_set(tmp_path: Path, host: str, level: str) -> None:
    config = daemon_config(tmp_path, transport=f'host = "{host}"\nport = 0\n')
    text = config.read_text()
    config.write_text("\n".join(line for line in text.splitlines() if not line.startswith("psk_file")) + "\n")
    result = run("daemon_main", "--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr  # keyless is valid: the demo runs so
    assert f"kvpeerd: {level}: no cluster key" in result.stderr and "any host on the LAN" in result.stderr
    keyed = run("daemon_main", "--config", str(daemon_config(tmp_path)), "--check-config")
    assert keyed.returncode == 0 and "no cluster key" not in keyed.stderr


def test_fingerprint_takes_a_revision() -> None:
    args = cli.client_parser().parse_args(["fingerprint", "model.gguf", "--revision", "v2"])
    assert (args.model_path, args.revision) == ("model.gguf", "v2")
    assert cli.client_parser().parse_args(["fingerprint"]).revision == ""


class RecordingClient:
    """Stands in for KVPeerClient: records calls, answers none of them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        raise AssertionError(f"the client was asked {name} despite bad input")


def _put_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The files `kvpeer put` reads: 4 tokens, a 1-layer model's fingerprint, its KV."""
    import torch

    tokens, model, kv = tmp_path / "prompt.tokens", tmp_path / "model.json", tmp_path / "kv.pt"
    tokens.write_text("1 2 3 4")
    model.write_text(json.dumps(dataclasses.asdict(
        ModelFingerprint(name="m", layers=1, kv_heads=1, head_dim=8, dtype="float16", rope_theta=1e4)
    )))
    torch.save((torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)), kv)
    return tokens, model, kv


@pytest.mark.parametrize("case", ["tokens", "kv", "kv_not_a_pair", "out_dir"])
def test_bad_input_files_are_one_line_and_nothing_is_asked_of_the_daemon(
    tmp_path: Path, case: str
) -> None:
    import torch

    tokens, model, kv = _put_files(tmp_path)
    command = ["put", "--tokens", str(tokens), "--model", str(model), "--kv", str(kv)]
    expected = "bad KV file"
    if case == "tokens":
        tokens.write_text("1 2 not-a-token")
        expected = "bad tokens file"
    elif case == "kv":
        kv.write_bytes(b"not a pickle")
    elif case == "kv_not_a_pair":
        torch.save({"k": 1}, kv)
    else:  # found only after the whole fetch, before
        command = ["fetch", "--tokens", str(tokens), "--model", str(model),
                   "--out", str(tmp_path / "absent" / "kv.pt")]
        expected = "is not a writable directory"
    client = RecordingClient()
    with pytest.raises(SystemExit) as info:
        cli._client_command(client, cli.client_parser().parse_args(command))
    assert expected in str(info.value.code) and client.calls == []


def test_fingerprint_without_transformers_names_the_extra() -> None:
    hide = "import sys; sys.modules['transformers'] = None; sys.modules['kvpeer.models'] = None; "
    done = subprocess.run(
        [sys.executable, "-c", hide + "from kvpeer.cli import client_main; sys.exit(client_main(['fingerprint']))"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert 'pip install "kvpeer[transformers]"' in done.stderr


def test_fingerprint_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    """It printed transformers' 15-line traceback about a hub repository."""
    done = run("client_main", "fingerprint", str(tmp_path / "absent.gguf"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"kvpeer fingerprint: no such file or directory: {tmp_path / 'absent.gguf'}")
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("content", [
    b"not a model\n",
    # version 3, a tensor and a key announced, then the file ends (a partial download)
    b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"\x05",
])
def test_fingerprint_of_a_file_that_is_no_model_is_one_line(tmp_path: Path, content: bytes) -> None:
    """A GGUF cut short (a partial download) raised struct.error, a traceback."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    done = run("client_main", "fingerprint", str(bad))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"kvpeer fingerprint: cannot load {bad}: ")
    assert done.stderr.count("\n") == 1


def test_fingerprint_of_a_directory_without_a_model_says_so(tmp_path: Path) -> None:
    """transformers tried a tokenizer first and said "Couldn't instantiate the backend tokenizer
    from one of:", cut at its first line."""
    done = run("client_main", "fingerprint", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == (f"kvpeer fingerprint: {tmp_path} is not a transformers model directory (no "
                           "config.json); give the directory a model was saved to, or a .gguf file\n")


@pytest.mark.parametrize(("content", "message"), [
    ('{"name": "m", "layers": 2, "kv_heads": 2, "dtype": "float16"}', "missing head_dim (`kvpeer fingerprint`"),
    ('{"name": "m", "layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "float16", "heads": 4}', "unknown heads"),
    ('["m", 2, 2, 8]', "expected a JSON object, got list"),
])
def test_a_model_file_with_fields_missing_or_unknown_names_them(tmp_path: Path, content: str, message: str) -> None:
    """The dataclass said "ModelFingerprint.__init__() missing 1 required keyword-only argument"."""
    model = tmp_path / "model.json"
    model.write_text(content)
    with pytest.raises(SystemExit) as done:
        cli._read_fingerprint(model)
    assert str(done.value).startswith(f"kvpeer: bad model fingerprint file {model}: ")
    assert message in str(done.value)


def test_a_kv_file_of_numpy_arrays_is_one_line(tmp_path: Path) -> None:
    """torch's weights-only refusal is a dozen lines with terminal colours."""
    import numpy as np
    import torch

    kv = tmp_path / "kv.pt"
    torch.save((np.zeros(3), np.zeros(3)), kv)
    with pytest.raises(SystemExit) as info:
        cli._read_kv(kv)
    message = str(info.value.code)
    assert "\n" not in message and "\x1b" not in message, message
    assert message.startswith(f"kvpeer: bad KV file {kv}") and "which is not a tensor" in message


@pytest.mark.parametrize(("content", "why"), [
    (b"1 2 3 4\n", "not a file that torch.save wrote"),  # the tokens file given as --kv
    (b"", "the file is empty or cut short"),
    ({"k": 1}, "it holds a dict"),
    ((1, 2, 3), "it holds a tuple of int, int, int"),
], ids=["tokens_file", "empty", "dict", "triple"])
def test_a_kv_file_that_is_no_kv_pair_says_what_it_is_in_one_line(
    tmp_path: Path, content: Any, why: str
) -> None:
    """A file torch.load refuses was torch's paragraph, ending in advice to load it unsafely
    with weights_only=False; the wrong object made a bare "not enough values to unpack"."""
    import torch

    kv = tmp_path / "prompt.tokens"
    if isinstance(content, bytes):
        kv.write_bytes(content)
    else:
        torch.save(content, kv)
    with pytest.raises(SystemExit) as info:
        cli._read_kv(kv)
    assert info.value.code == (
        f"kvpeer: bad KV file {kv}: not a torch.save'd (k, v) pair of tensors ({why})"
    )


@pytest.mark.parametrize(
    "argv",
    [["--socket", "/tmp/s.sock", "--namespace", "team", "lookup", "--tokens", "t", "--model", "m"],
     ["lookup", "--tokens", "t", "--model", "m", "--socket", "/tmp/s.sock", "--namespace", "team"],
     ["fetch", "--tokens", "t", "--model", "m", "--out", "o", "--socket", "/tmp/s.sock",
      "--namespace", "team"]],
)
def test_socket_and_namespace_go_before_or_after_the_command(argv: list[str]) -> None:
    """As --json and --timeout do: after the command they were "unrecognized arguments"."""
    args = cli.client_parser().parse_args(argv)
    assert (args.socket, args.namespace) == ("/tmp/s.sock", "team")


@pytest.mark.parametrize("command", ["status", "peers", "stats", "evict"])
def test_commands_of_no_namespace_do_not_offer_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Their --help offered --namespace "of lookup, fetch and put"; given, it only made a hello
    that api.namespaces could refuse."""
    argv = [command, "--all"] if command == "evict" else [command]
    assert "--namespace" not in _help(command)
    with pytest.raises(SystemExit):
        cli.client_parser().parse_args([*argv, "--namespace", "team"])
    capsys.readouterr()
    clients: list[dict[str, Any]] = []

    def connect(**options: Any) -> Any:
        clients.append(options)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    monkeypatch.setattr("kvpeer.api.client.KVPeerClient", connect)
    assert cli.client_main(["--namespace", "team", *argv]) == 1  # before the command: ignored
    assert clients[0]["namespace"] is None


def _help(*argv: str) -> str:
    """What `kvpeer ARGV --help` prints, its lines joined (argparse wraps at the terminal)."""
    done = run("client_main", *argv, "--help", env={**os.environ, "COLUMNS": "1000"})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "command", ["status", "peers", "stats", "lookup", "fetch", "put", "fingerprint", "evict"]
)
def test_each_commands_help_says_what_it_does(command: str) -> None:
    """`kvpeer status --help` went from the usage line straight to the options."""
    usage, description, *_ = _help(command).split("\n\n")
    assert not description.startswith(("options:", "positional arguments:")), description


def test_evict_help_says_the_disk_files_are_deleted_too() -> None:
    """"drop" read as dropped from memory, the disk store left to reload at the next start; the
    store's clear deletes the files (test_store: test_clear_drops_everything_batch_by_batch)."""
    evict = _help("evict")
    assert "their files from the disk store" in evict and "its disk files too" in evict


def test_option_help_states_defaults_and_levels() -> None:
    from kvpeer.codec import LEVELS
    from kvpeer.config import CodecSection, FetchSection

    assert cli.CODEC_LEVELS == LEVELS
    levels = ", ".join(LEVELS)
    fetch, put = _help("fetch"), _help("put")
    assert "(default: the daemon's fetch.deadline_s, none unless set)" in fetch
    assert f"least faithful codec level to accept: {levels} (most faithful first; " in fetch
    assert f"default: the daemon's fetch.min_level, {FetchSection().min_level} unless set)" in fetch
    assert f"codec level to store: {levels} (default: the daemon's codec.level, {CodecSection().level} " in put
    assert "whitespace-separated integers, or a NumPy .npy array" in put
    with pytest.raises(SystemExit) as info:  # the daemon's INVALID, after reading every file
        cli.client_parser().parse_args(["put", "--tokens", "t", "--model", "m", "--kv", "k",
                                        "--level", "q99"])
    assert info.value.code == 2


def test_no_daemon_at_the_socket_says_how_to_point_at_one(tmp_path: Path) -> None:
    result = run("client_main", "status", "--socket", str(tmp_path / "absent.sock"))
    assert result.returncode == 1
    assert "is kvpeerd running? set KVPEER_SOCKET or --socket" in result.stderr


@pytest.mark.parametrize("kind", ["directory", "regular file"])
def test_a_socket_path_that_is_no_socket_says_what_is_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """connect() to a directory or a file is "Connection refused": the message asked whether
    kvpeerd was running."""
    path = tmp_path
    if kind == "regular file":
        path = tmp_path / "kvpeer.toml"
        path.write_text("")
    assert cli.client_main(["--socket", str(path), "status"]) == 1
    assert capsys.readouterr().err == (
        f"kvpeer: cannot reach the daemon at {path}: it is a {kind}, not kvpeerd's socket "
        "(set KVPEER_SOCKET or --socket to its api.socket_path)\n"
    )


def test_a_socket_this_user_may_not_open_says_which_group_may(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """"[Errno 13] Permission denied" and nothing else: which group the user lacks had to be
    found with ls -l."""
    import grp

    path = tmp_path / "kvpeer.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        path.chmod(0o660)

        def refuse(**options: Any) -> Any:  # what connect() says to a user outside the group
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr("kvpeer.api.client.KVPeerClient", refuse)
        assert cli.client_main(["--socket", str(path), "status"]) == 1
    group = grp.getgrgid(path.stat().st_gid).gr_name
    assert capsys.readouterr().err == (
        f"kvpeer: cannot reach the daemon at {path}: [Errno 13] Permission denied (the socket is "
        f"mode 0660, group {group}: this user must be in group {group} (`sudo usermod -aG "
        f"{group} $USER`, then log in again) or run as root)\n"
    )


@pytest.mark.parametrize("argv", [["--socket", "", "status"], ["status", "--socket="]])
def test_an_empty_socket_option_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """It fell back to /run/kvpeer/kvpeer.sock without a word (`--socket "$UNSET"`)."""
    with pytest.raises(SystemExit) as info:
        cli.client_parser().parse_args(argv)
    assert info.value.code == 2 and "argument --socket: an empty path" in capsys.readouterr().err


def test_an_empty_kvpeer_socket_means_the_default_socket_as_the_help_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvpeer.api.client import DEFAULT_SOCKET, default_socket_path

    monkeypatch.setenv("KVPEER_SOCKET", "")
    assert default_socket_path() == DEFAULT_SOCKET
    assert "(default $KVPEER_SOCKET, unless unset or empty, else /run/kvpeer/kvpeer.sock)" in (
        " ".join(cli.client_parser().format_help().split())
    )


class AnsweringClient:
    """Stands in for KVPeerClient: answers as a daemon with one peer and one chunk does."""

    STATS = {
        "node_id": "a", "ready": True, "degraded": ["disk tier not open: read-only file system"],
        "store": {"chunks": 1, "ram_bytes": 4096, "last_disk_error": ""}, "chunks": 1, "peers": 2,
        "peer_inventories": {"b": 3}, "codec_backends": ["zstd", "ffmpeg"],
    }
    PEERS = [
        {"node_id": "b", "addresses": ["192.0.2.7"], "port": 7457, "fingerprints": ["ab"],
         "chunks": 3, "epoch": 9, "key": None},
        {"node_id": "c", "addresses": ["192.0.2.8"], "port": 7457, "fingerprints": [],
         "chunks": 0, "epoch": 1, "key": "next"},
    ]

    def stats(self) -> dict[str, Any]:
        return self.STATS

    def peers(self) -> list[dict[str, Any]]:
        return self.PEERS

    def lookup(self, tokens: Any, fingerprint: Any) -> Any:
        from kvpeer.api.messages import LookupResult

        return LookupResult(id=7, matched_tokens=768, chunk_tokens=256, sources=["local", "local", "b"])

    def put(self, tokens: Any, k: Any, v: Any, fingerprint: Any, level: Any = None) -> Any:
        from kvpeer.api.messages import PutResult

        return PutResult(id=8, chunks=2, stored=1, chunk_tokens=256)


def _client_output(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli._client_command(AnsweringClient(), cli.client_parser().parse_args(argv)) == 0
    return capsys.readouterr().out


def test_status_is_a_short_summary_and_stats_says_everything_readably(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both printed the same, nested dicts as one long Python repr line."""
    status = _client_output(capsys, "status")
    assert status == ("node_id: a\nready: yes\ndegraded:\n"
                      "  - disk tier not open: read-only file system\npeers: 2\nchunks: 1\n")
    stats = _client_output(capsys, "stats")
    assert "{" not in stats and "[" not in stats
    assert "store:\n  chunks: 1\n  ram_bytes: 4096\n  last_disk_error: none\n" in stats
    assert "peer_inventories:\n  b: 3\n" in stats and "codec_backends: zstd, ffmpeg\n" in stats


@pytest.mark.parametrize("command", ["status", "stats"])
def test_status_and_stats_json_stay_every_stat(capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert json.loads(_client_output(capsys, command, "--json")) == AnsweringClient.STATS


def test_peers_are_one_line_each_and_their_key_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    """They were printed as Python dicts, "'key': None" for a peer with no session open."""
    assert _client_output(capsys, "peers") == (
        "b  192.0.2.7:7457  3 chunks  key: no session yet\n"
        "c  192.0.2.8:7457  0 chunks  key: next\n"
    )
    assert json.loads(_client_output(capsys, "peers", "--json")) == AnsweringClient.PEERS


def test_a_peer_line_says_what_it_does_not_know() -> None:
    """A daemon from before the key column was shown as "no session yet" (wrong during a key
    rotation); missing fields read "None"; several addresses looked like one port for the last."""
    older = {"node_id": "b", "addresses": ["192.0.2.7", "192.0.2.9"], "port": 7457}
    assert cli._peer_line(older) == "b  192.0.2.7:7457, 192.0.2.9:7457  ? chunks  key: ?"
    assert cli._peer_line({}) == "?  ?  ? chunks  key: ?"


def test_no_peers_and_no_status_print_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """`kvpeer peers | wc -l` counted the "no peers" line as a peer; an empty status, a blank line."""
    cli._print({}, False)
    assert capsys.readouterr().out == ""


def test_lookup_and_put_print_no_request_id_but_json_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens, model, kv = _put_files(tmp_path)
    files = ["--tokens", str(tokens), "--model", str(model)]
    lookup = _client_output(capsys, "lookup", *files)
    assert lookup == "matched_tokens: 768\nchunk_tokens: 256\nsources: local x2, b\n"
    put = _client_output(capsys, "put", *files, "--kv", str(kv))
    assert put == "chunks: 2\nstored: 1\nchunk_tokens: 256\n"
    assert json.loads(_client_output(capsys, "lookup", *files, "--json"))["id"] == 7
    assert json.loads(_client_output(capsys, "put", *files, "--kv", str(kv), "--json")) == {
        "id": 8, "chunks": 2, "stored": 1, "chunk_tokens": 256
    }


def test_a_put_of_kv_longer_than_its_tokens_stores_it_and_says_what_was_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It stored the first tokens' KV without a word (a shorter KV is refused)."""
    import torch

    tokens, model, kv = _put_files(tmp_path)  # 4 tokens
    files = ["--tokens", str(tokens), "--model", str(model), "--kv", str(kv)]
    assert cli._client_command(AnsweringClient(), cli.client_parser().parse_args(["put", *files])) == 0
    assert capsys.readouterr().err == ""
    torch.save((torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8)), kv)
    assert cli._client_command(AnsweringClient(), cli.client_parser().parse_args(["put", *files])) == 0
    out, err = capsys.readouterr()
    assert out == "chunks: 2\nstored: 1\nchunk_tokens: 256\n"
    assert err == (f"kvpeer put: warning: {kv} holds the KV of 6 tokens, --tokens gives 4: only "
                   "the first 4 tokens' KV is stored\n")


def test_check_config_and_start_say_which_file_was_read_and_warn_of_ignored_settings(
    tmp_path: Path,
) -> None:
    config = daemon_config(tmp_path)
    env = {**os.environ, "KVPEER_DISCOVERY__BACKEND": "zeroconf",
           "KVPEER_DISCOVERY__STATIC_PEERS": "192.0.2.7:7457"}
    checked = run("daemon_main", "--config", str(config), "--check-config", env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"\n# from {config}; from the environment: KVPEER_DISCOVERY__BACKEND" in checked.stdout
    assert "WARNING: discovery.static_peers is ignored" in checked.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:  # the start ends right after the log
        port = taken.getsockname()[1]
        env["KVPEER_TRANSPORT__PORT"] = str(port)
        started = run("daemon_main", "--config", str(config), "--no-uvloop", env=env)
    assert started.returncode == 2, started.stderr
    assert f"INFO kvpeer.cli: config: from {config}; from the environment" in started.stderr
    assert "WARNING kvpeer.cli: discovery.static_peers is ignored" in started.stderr


def test_check_config_warns_of_a_kvpeer_variable_that_sets_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVPEER_STORE_RAM_BYTES", "4GiB")  # one underscore: kept the default
    assert cli.daemon_main(["--config", str(daemon_config(tmp_path)), "--check-config"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: KVPEER_STORE_RAM_BYTES is not a kvpeer setting and is ignored" in err
    assert "did you mean KVPEER_STORE__RAM_BYTES?" in err


@pytest.mark.parametrize("option", ["--level", "--min-level"])
def test_the_demo_refuses_an_unknown_level_before_it_starts_anything(tmp_path: Path, option: str) -> None:
    """examples/two_nodes.py made two network namespaces and loaded the model, then died of the
    daemon's "INVALID: level: unknown codec level 'q99'" in a traceback."""
    demo = Path(__file__).resolve().parents[1] / "examples" / "two_nodes.py"
    # Should the check be missing, the model and the cluster cannot be imported: nothing starts.
    script = (
        "import runpy, sys; sys.modules['kvpeer.models'] = None; "
        "sys.modules['kvpeer.testing.cluster'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(demo), option, "q99"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"two_nodes.py: error: argument {option}: invalid choice: 'q99'" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_demo_that_fails_keeps_its_work_directory_and_says_where(tmp_path: Path) -> None:
    """The daemons' logs that say why are in there; removing it on failure left nothing to read."""
    demo = Path(__file__).resolve().parents[1] / "examples" / "two_nodes.py"
    # A stand-in model without the rest of its module: the run fails before anything starts.
    script = (
        "import runpy, sys, types; models = types.ModuleType('kvpeer.models'); "
        "models.load_model = lambda: (None, None); sys.modules['kvpeer.models'] = models; "
        "sys.modules['kvpeer.testing.cluster'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(demo)], capture_output=True, text=True,
        timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 1 and "ImportError" in done.stderr.splitlines()[-1], done.stderr
    [kept] = list(tmp_path.iterdir())
    assert f"work directory kept, with the daemons' logs: {kept}" in done.stderr


def test_a_fetch_that_restores_less_than_is_held_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--min-level exact` of chunks held at q8: 'matched_tokens: 0', exit 0, and no word why."""
    import torch

    tokens, model, _kv = _put_files(tmp_path)

    class PartialFetch:
        def lookup(self, tokens: Any, fingerprint: Any) -> Any:
            return SimpleNamespace(matched_tokens=4, chunk_tokens=4)

        @contextlib.contextmanager
        def fetch(self, tokens: Any, fingerprint: Any, **options: Any) -> Any:
            assert options["min_level"] == "exact"
            empty = torch.zeros(1, 1, 0, 8)
            yield SimpleNamespace(matched_tokens=0, levels=[], recompute_from=0, k=empty, v=empty,
                                  wait_for_chunk=lambda index: False)

    command = ["fetch", "--tokens", str(tokens), "--model", str(model), "--out", str(tmp_path / "kv.pt"),
               "--min-level", "exact"]
    assert cli._client_command(PartialFetch(), cli.client_parser().parse_args(command)) == 0
    err = capsys.readouterr().err
    assert "0 of the 4 tokens held were restored" in err and "--min-level" in err
