"""Config: defaults, TOML, environment precedence, errors naming the key, the example file."""

from __future__ import annotations

import dataclasses
import re
import socket
import tomllib
from pathlib import Path

import pytest

from kvpeer import config as cfg
from kvpeer.config import Config, example_toml, load_config, parse_size
from kvpeer.discovery.advert import validate_node_id
from kvpeer.errors import ConfigError

EXAMPLE = Path(__file__).parents[1] / "systemd" / "kvpeer.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvpeer.toml"
    path.write_text(text)
    return path


def test_defaults_and_derived_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[node]\nnode_id = "n1"\n'), env={})
    assert config.node.node_id == "n1"
    assert config.api.socket_path == Path("/run/kvpeer/kvpeer.sock")
    assert config.store.dir == Path("/var/lib/kvpeer/store")
    assert config.store.ram_bytes == 2 << 30
    assert config.codec.level == "q8" and config.codec.chunk_tokens == 256
    assert config.transport.port == 7457 and config.transport.allow_loopback is False
    assert config.metrics.host == "127.0.0.1" and config.metrics.port == 9457
    assert config.discovery.update_min_interval_s == 1.0


def test_paths_follow_the_node_directories(tmp_path: Path) -> None:
    text = f'[node]\nnode_id = "n1"\nstate_dir = "{tmp_path}/s"\nruntime_dir = "{tmp_path}/r"\n'
    config = load_config(write(tmp_path, text), env={})
    assert config.api.socket_path == tmp_path / "r" / "kvpeer.sock"
    assert config.store.dir == tmp_path / "s" / "store"


def test_precedence_default_then_file_then_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[node]\nnode_id = "n1"\n[transport]\nport = 7000\nconnect_timeout_s = 3\n'
        '[store]\nram_bytes = "512MiB"\n',
    )
    env = {
        "KVPEER_TRANSPORT__PORT": "7500",
        "KVPEER_STORE__DISK_BYTES": "1.5GiB",
        "KVPEER_DISCOVERY__INTERFACES": "eth0, 10.0.0.2",
        "KVPEER_API__ALLOWED_UIDS": "[1000, 1001]",
        "KVPEER_API__SOCKET_MODE": "0600",
        "kvpeer_log__json": "true",
        "KVPEER_SOCKET": "/elsewhere.sock",  # the client's variable: not a config key
    }
    config = load_config(path, env=env)
    assert config.transport.port == 7500  # env beats file
    assert config.transport.connect_timeout_s == 3.0  # file beats default
    assert config.store.ram_bytes == 512 << 20
    assert config.store.disk_bytes == 3 << 29
    assert config.discovery.interfaces == ("eth0", "10.0.0.2")
    assert config.api.allowed_uids == (1000, 1001)
    assert config.api.socket_mode == 0o600
    assert config.log.json is True
    assert config.transport.mtu == 0
    assert load_config(path, env={"KVPEER_TRANSPORT__MTU": "9000"}).transport.mtu == 9000
    assert load_config(path, env={"KVPEER_TRANSPORT__MTU": "auto"}).transport.mtu == 0
    assert load_config(path, env={"KVPEER_NODE__NODE_ID": "123"}).node.node_id == "123"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[store]\nram_bytes = "lots"\n', {}, "store.ram_bytes: expected a size like '2GiB', got 'lots'"),
        ("[store]\nram_gb = 2\n", {}, "store.ram_gb: unknown key"),
        ("[stor]\nram_bytes = 2\n", {}, "stor: unknown key"),
        ("[transport]\nport = 70000\n", {}, "transport.port: must be <= 65535"),
        ('[transport]\nport = "x"\n', {}, "transport.port: expected an integer"),
        ('[transport]\nmtu = "big"\n', {}, "transport.mtu: expected an integer or 'auto'"),
        ("[transport]\nmtu = 100\n", {}, "transport.mtu: must be 0 (auto) or 576-65536"),
        ('[log]\nlevel = "loud"\n', {}, "log.level: expected one of"),
        ('[codec]\nlevel = "q9"\n', {}, "codec.level: unknown codec level 'q9'"),
        # a lookup of a long prompt then had more chunks than an answer may name
        ("[codec]\nchunk_tokens = 16\n", {}, "codec.chunk_tokens: must be >= 64"),
        ('[node]\nnode_id = "a b"\n', {}, "node.node_id"),
        # discovery announces the id as a DNS label: a dot passed here and failed at start
        ('[node]\nnode_id = "gpu01.rack3"\n', {}, "node.node_id: 'gpu01.rack3' must be"),
        ('[transport]\nadvertise_addresses = ["gpu-node-1"]\n', {}, "transport.advertise_addresses: 'gpu-node-1'"),
        ('[fetch]\npolicy = "greedy"\n', {}, "fetch.policy: expected 'adaptive' or 'fixed:LEVEL'"),
        ('[fetch]\npolicy = "fixed:q9"\n', {}, "fetch.policy: unknown codec level 'q9'"),
        ('[api]\nsocket_path = "{home}/s"\n', {}, "api.socket_path: unknown placeholder"),
        ("store = 3\n", {}, "store: expected a table"),
        ("[transport]\nheartbeat_interval_s = 5\n", {}, "transport.heartbeat_interval_s"),
        ("", {"KVPEER_TRANSPORT__PORTT": "1"}, "transport.portt: unknown key (from KVPEER_TRANSPORT__PORTT)"),
        ("", {"KVPEER_METRIX__PORT": "1"}, "metrix: unknown key (from KVPEER_METRIX__PORT)"),
        ("", {"KVPEER_METRICS__ENABLED": "maybe"}, "metrics.enabled: expected true or false, got 'maybe' (from KVPEER_METRICS__ENABLED)"),
        ("", {"KVPEER_STORE__": "1"}, "KVPEER_STORE__: expected KVPEER_<SECTION>__<KEY>"),
        # An empty host binds every interface: /metrics on the LAN by a blank env line.
        ("", {"KVPEER_METRICS__HOST": ""}, "metrics.host: empty; it would listen on every interface"),
        ('[metrics]\nhost = " "\n', {}, "metrics.host: empty"),
        # passed, and the start only logged that it ran without /metrics (names: see below)
        ('[metrics]\nhost = "999.1.1.1"\n', {}, "metrics.host: '999.1.1.1' is neither an IP address"),
        ('[metrics]\nhost = "%s"\n' % ("a" * 64), {}, "is neither an IP address nor a host name"),
        ("[node\n", {}, "invalid TOML"),
        # resolved against the daemon's working directory: / under systemd
        ('[api]\nsocket_path = "run/kvpeer.sock"\n', {}, "api.socket_path: 'run/kvpeer.sock' is a relative path"),
        ('[node]\nstate_dir = "node1"\n', {}, "node.state_dir: 'node1' is a relative path"),
        ('[store]\ndir = "~/kv"\n', {}, "store.dir: '~/kv' is a relative path (~ is not expanded)"),
        ("", {"KVPEER_TRANSPORT__PSK_FILE": "cluster.key"}, "transport.psk_file: 'cluster.key' is a relative path"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env=env)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("metrics_host", "transport_host"),
    [("0.0.0.0", None), ("::", "192.168.1.20"), ("127.0.0.1", "127.0.0.1"), ("localhost", "127.0.0.1")],
)
def test_metrics_on_the_transport_port_and_an_overlapping_host_is_an_error_naming_both(
    tmp_path: Path, metrics_host: str, transport_host: str | None
) -> None:
    """It passed --check-config; the start then failed with "cannot listen for peers
    (transport.host, transport.port): address already in use": /metrics had taken the port."""
    transport = f'host = "{transport_host}"\n' if transport_host else ""
    text = f'[metrics]\nhost = "{metrics_host}"\nport = 7500\n[transport]\n{transport}port = 7500\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    assert "metrics.port: 7500 is transport.port too" in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        '[metrics]\nport = 7500\n[transport]\nhost = "192.168.1.20"\nport = 7500\n',  # apart
        '[metrics]\nport = 7500\n[transport]\nport = 7500\n',  # its host is chosen later
        '[metrics]\nhost = "0.0.0.0"\nport = 0\n[transport]\nport = 0\n',  # any free port
        '[metrics]\nenabled = false\nhost = "0.0.0.0"\nport = 7457\n',
    ],
)
def test_metrics_and_transport_listeners_that_cannot_clash_are_fine(tmp_path: Path, text: str) -> None:
    load_config(write(tmp_path, text), env={})


def test_a_socket_mode_written_in_decimal_gets_the_octal_spellings_that_work(tmp_path: Path) -> None:
    """`socket_mode = 777` said only "must be <= 511, got 777": TOML reads it as decimal."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[api]\nsocket_mode = 777\n"), env={})
    assert str(err.value) == (
        'api.socket_mode: must be <= 511, got 777 (a file mode is octal: write it as 0o777 or "0777")'
    )
    for spelled in ("0o777", '"0777"'):
        config = load_config(write(tmp_path, f"[api]\nsocket_mode = {spelled}\n"), env={})
        assert config.api.socket_mode == 0o777
    with pytest.raises(ConfigError) as err:  # digits that are no mode either way: the forms only
        load_config(write(tmp_path, '[api]\nsocket_mode = "1777"\n'), env={})
    assert str(err.value).endswith('got 1023 (a file mode is octal, like 0o660 or "0660")')


def test_a_file_not_in_utf8_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """A Latin-1 file (an editor's default) raised UnicodeDecodeError: a traceback, exit 1."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('[node]\nnode_id = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config file {path}: not UTF-8 .*0xe9"):
        load_config(path, env={})


class FakeResolver:
    """socket.getaddrinfo of a machine whose /etc/hosts names "vm" and "ip6-localhost"."""

    def __init__(self, known: tuple[str, ...] = ("vm", "ip6-localhost"), error: int = socket.EAI_NONAME) -> None:
        self.known, self.error = known, error
        self.asked: list[str] = []

    def __call__(self, host: str, *args: object, **kwargs: object) -> list[object]:
        self.asked.append(host)
        if host in self.known:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        raise socket.gaierror(self.error, "Name or service not known")


@pytest.mark.parametrize(
    ("host", "effective"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "0.0.0.0"), ("::", "::"), ("::1", "::1"),
     ("10.1.2.3", "10.1.2.3"), ("localhost", "localhost"),
     # names that bind, refused since 601a0c1: a working deployment exited 2 after an upgrade
     ("LOCALHOST", "LOCALHOST"), ("vm", "vm"), ("ip6-localhost", "ip6-localhost"),
     (" 127.0.0.1 ", "127.0.0.1")],
)
def test_metrics_host_takes_an_ip_address_or_a_name_that_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, effective: str
) -> None:
    monkeypatch.setattr(cfg.socket, "getaddrinfo", FakeResolver())
    config = load_config(write(tmp_path, f'[metrics]\nhost = "{host}"\n'), env={})
    assert config.metrics.host == effective
    # from the environment too (a padded value: as systemd's Environment= may pass it)
    config = load_config(write(tmp_path, ""), env={"KVPEER_METRICS__HOST": host})
    assert config.metrics.host == effective


def test_a_metrics_host_name_that_does_not_resolve_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = FakeResolver()
    monkeypatch.setattr(cfg.socket, "getaddrinfo", resolver)
    with pytest.raises(ConfigError, match="metrics.host: 'metrics.lan' is neither an IP address "
                       "nor a name this machine resolves"):
        load_config(write(tmp_path, ""), env={"KVPEER_METRICS__HOST": "metrics.lan"})
    assert resolver.asked == ["metrics.lan"]
    # No resolver yet (at boot, EAI_AGAIN): the name may be good, the start's bind will tell.
    monkeypatch.setattr(cfg.socket, "getaddrinfo", FakeResolver(error=socket.EAI_AGAIN))
    assert load_config(write(tmp_path, '[metrics]\nhost = "metrics.lan"\n'), env={}).metrics.host == "metrics.lan"


def test_an_empty_metrics_host_is_fine_with_metrics_off(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[metrics]\nenabled = false\nhost = \"\"\n"), env={})
    assert not config.metrics.enabled


def test_missing_explicit_file_is_an_error_missing_default_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None, env={"KVPEER_NODE__STATE_DIR": str(tmp_path)})
    assert config.node.node_id


def test_node_id_is_stable(tmp_path: Path) -> None:
    machine = tmp_path / "machine-id"
    machine.write_text("0123456789abcdef0123456789abcdef\n")
    a = cfg.default_node_id(tmp_path / "s1", machine_id_path=machine, hostname=lambda: "gpu-7.lan")
    b = cfg.default_node_id(tmp_path / "s2", machine_id_path=machine, hostname=lambda: "gpu-7.lan")
    c = cfg.default_node_id(tmp_path / "s1", machine_id_path=machine, hostname=lambda: "gpu-8")
    assert a == b and a.startswith("gpu-7-") and a != c
    # Without a machine id, a random id is saved in the state directory and reused.
    state = tmp_path / "s3"
    first = cfg.default_node_id(state, machine_id_path=tmp_path / "none", hostname=lambda: "h")
    again = cfg.default_node_id(state, machine_id_path=tmp_path / "none", hostname=lambda: "h")
    assert first == again and (state / "node_id").read_text().strip() == first
    # A saved id discovery would refuse (a dot) is replaced, not carried into a failing start.
    (state / "node_id").write_text("gpu01.rack3\n")
    replaced = cfg.default_node_id(state, machine_id_path=tmp_path / "none", hostname=lambda: "h")
    assert "." not in replaced
    validate_node_id(replaced)


def _float_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        for name, tp in cfg._hints(type(getattr(Config(), section.name))).items():
            if tp is float:
                keys.append(f"{section.name}.{name}")
    return keys


@pytest.mark.parametrize("spelling", ["nan", "inf", "-inf"])
def test_no_float_setting_takes_nan_or_infinity(tmp_path: Path, spelling: str) -> None:
    """Every comparison with nan is False, so a nan passed every range check (a nan api.lease_s
    made the lease reaper spin at 100% CPU)."""
    keys = _float_keys()
    assert "api.lease_s" in keys and len(keys) > 10
    for key in keys:
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(write(tmp_path, f"[{section}]\n{name} = {spelling}\n"), env={})
        env = {f"KVPEER_{section.upper()}__{name.upper()}": spelling}
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(write(tmp_path, ""), env=env)


def test_a_size_too_large_for_an_integer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="store.ram_bytes"):
        load_config(write(tmp_path, ""), env={"KVPEER_STORE__RAM_BYTES": "9" * 400})
    with pytest.raises(ConfigError, match="store.disk_bytes"):
        load_config(write(tmp_path, '[store]\ndisk_bytes = "99999999PiB"\n'), env={})


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1k") == 1000 and parse_size(4096) == 4096
    for bad in ("lots", "-1", "1 XB", True, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert cfg.format_size(3 << 29) == "1536MiB"


def test_check_config_output_round_trips(tmp_path: Path) -> None:
    text = f'[node]\nnode_id = "n1"\nstate_dir = "{tmp_path}"\n[transport]\npsk_file = "/k"\nmtu = 1400\n'
    config = load_config(write(tmp_path, text), env={"KVPEER_STORE__RAM_BYTES": "3GiB"})
    printed = config.as_toml()
    tomllib.loads(printed)  # valid TOML
    again = load_config(write(tmp_path, printed), env={})
    assert again == config
    assert 'ram_bytes = "3GiB"' in printed and "socket_mode = 0o660" in printed
    assert config.as_dict()["transport"]["psk_file"] == "/k"


def test_example_file_is_generated_and_covers_every_field() -> None:
    text = EXAMPLE.read_text()
    assert text == example_toml(), "regenerate: python -m kvpeer.config --example > " + str(EXAMPLE)
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.M))
    sections = set(re.findall(r"^\[([a-z_]+)\]$", text, flags=re.M))
    for section in dataclasses.fields(Config):
        assert section.name in sections
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f.name in documented, f"{section.name}.{f.name} missing from the example"
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"


def test_example_file_loads_to_the_defaults(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('node_id = ""', 'node_id = "n1"')
    from_example = load_config(write(tmp_path, text), env={})
    assert from_example == load_config(write(tmp_path, '[node]\nnode_id = "n1"\n'), env={})


def test_discovery_section_maps_onto_discovery_config() -> None:
    discovery = pytest.importorskip("kvpeer.discovery.config")
    section = Config().discovery
    mapped = discovery.DiscoveryConfig.from_section(section)
    for f in dataclasses.fields(section):
        assert getattr(mapped, f.name) == getattr(section, f.name), f.name


def test_transport_section_maps_onto_transport_config(tmp_path: Path) -> None:
    transport = pytest.importorskip("kvpeer.transport.config")
    key = tmp_path / "cluster.key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    text = f'[node]\nnode_id = "n"\n[transport]\nhost = "10.0.0.2"\npsk_file = "{key}"\n'
    section = load_config(write(tmp_path, text), env={}).transport
    mapped = transport.TransportConfig.from_section(section)
    assert mapped.host == "10.0.0.2" and mapped.psk == bytes.fromhex("ab" * 32)
    assert mapped.mtu is None  # 0 = auto
    for name in ("port", "connect_timeout_s", "request_timeout_s", "heartbeat_interval_s",
                 "peer_dead_after_s", "allow_loopback", "max_message_bytes", "max_blob_bytes",
                 "max_transfers_per_peer", "congestion_control"):
        assert getattr(mapped, name) == getattr(section, name), name
    unset = transport.TransportConfig.from_section(Config().transport, default_host="10.0.0.3")
    assert unset.host == "10.0.0.3"
    assert unset.incoming_blob_budget == max(1 << 30, unset.max_blob_bytes)  # 0: the default


def test_a_defaulted_transport_host_names_where_it_came_from(tmp_path: Path) -> None:
    daemon = pytest.importorskip("kvpeer.daemon")
    config = load_config(write(tmp_path, '[node]\nnode_id = "n"\n'), env={})
    with pytest.raises(ConfigError) as info:
        daemon.transport_config(config, "127.0.0.1")
    assert "loopback" in str(info.value) and "the first address of discovery.interfaces" in str(info.value)
    text = '[node]\nnode_id = "n"\n[transport]\nhost = "127.0.0.1"\n'
    with pytest.raises(ConfigError) as info:  # set by the operator: said as it was
        daemon.transport_config(load_config(write(tmp_path, text), env={}), "10.0.0.2")
    assert "first address" not in str(info.value)


def test_the_incoming_blob_cap_reaches_the_daemons_transport(tmp_path: Path) -> None:
    daemon = pytest.importorskip("kvpeer.daemon")
    text = '[node]\nnode_id = "n"\n[transport]\nmax_incoming_blob_bytes = "2GiB"\n'
    config = load_config(write(tmp_path, text), env={})
    assert daemon.transport_config(config, "10.0.0.2").incoming_blob_budget == 2 << 30
    default = load_config(write(tmp_path, '[node]\nnode_id = "n"\n'), env={})
    assert daemon.transport_config(default, "10.0.0.2").incoming_blob_budget == 1 << 30
    small = '[node]\nnode_id = "n"\n[transport]\nmax_incoming_blob_bytes = "1MiB"\n'
    with pytest.raises(ConfigError, match="transport.max_incoming_blob_bytes"):
        daemon.transport_config(load_config(write(tmp_path, small), env={}), "10.0.0.2")


def test_congestion_control_reaches_the_daemons_transport(tmp_path: Path) -> None:
    daemon = pytest.importorskip("kvpeer.daemon")
    text = '[node]\nnode_id = "n"\n[transport]\ncongestion_control = "reno"\n'
    config = load_config(write(tmp_path, text), env={})
    assert daemon.transport_config(config, "10.0.0.2").congestion_control == "reno"
    env = {"KVPEER_TRANSPORT__CONGESTION_CONTROL": "cubic"}
    with pytest.raises(ConfigError, match="transport.congestion_control"):
        load_config(write(tmp_path, '[node]\nnode_id = "n"\n'), env=env)


def test_kvpeerd_check_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    good = write(tmp_path, '[node]\nnode_id = "n1"\n[store]\nram_bytes = "1GiB"\n')
    done = subprocess.run(
        [sys.executable, "-m", "kvpeer.cli", "--check-config", "--config", str(good)],
        capture_output=True, text=True, timeout=120, env={"KVPEER_TRANSPORT__PORT": "7600"},
    )
    assert done.returncode == 0, done.stderr
    printed = tomllib.loads(done.stdout)
    assert printed["store"]["ram_bytes"] == "1GiB" and printed["transport"]["port"] == 7600
    bad = subprocess.run(
        [sys.executable, "-m", "kvpeer.cli", "--check-config", "--config", str(good)],
        capture_output=True, text=True, timeout=120, env={"KVPEER_STORE__RAM_BYTES": "lots"},
    )
    assert bad.returncode == 2
    assert "store.ram_bytes: expected a size like '2GiB', got 'lots'" in bad.stderr


def test_api_namespaces_is_a_table_of_members_from_the_file_or_the_environment(tmp_path: Path) -> None:
    text = '[node]\nnode_id = "n1"\n[api.namespaces]\nteam-a = ["alice", "@engines"]\n"default" = ["*"]\n'
    config = load_config(write(tmp_path, text), env={})
    assert config.api.namespaces == (("default", ("*",)), ("team-a", ("alice", "@engines")))
    printed = config.as_toml()
    assert 'namespaces = {"default" = ["*"], "team-a" = ["alice", "@engines"]}' in printed
    assert load_config(write(tmp_path, printed), env={}) == config  # --check-config round trips
    env = {"KVPEER_API__NAMESPACES": '{ team-b = ["bob"] }'}
    assert load_config(write(tmp_path, '[node]\nnode_id = "n1"\n'), env=env).api.namespaces == (("team-b", ("bob",)),)
    assert load_config(write(tmp_path, '[node]\nnode_id = "n1"\n'), env={}).api.namespaces == ()
    for bad in ('namespaces = ["alice"]', 'namespaces = { team-a = [] }', 'namespaces = { team-a = [1] }'):
        with pytest.raises(ConfigError, match=r"api\.namespaces: expected a table of lists of names"):
            load_config(write(tmp_path, f'[node]\nnode_id = "n1"\n[api]\n{bad}\n'), env={})


def test_a_metrics_host_lookup_that_does_not_answer_does_not_hold_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolver that never answers held config load ~20 s per nameserver, before any log."""
    import threading
    import time

    release = threading.Event()

    def hangs(*_args: object, **_kwargs: object) -> list[object]:
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(cfg.socket, "getaddrinfo", hangs)
    monkeypatch.setattr(cfg, "NAME_LOOKUP_S", 0.2)
    started = time.monotonic()
    try:
        config = load_config(write(tmp_path, '[metrics]\nhost = "metrics.lan"\n'), env={})
    finally:
        release.set()
    assert config.metrics.host == "metrics.lan" and time.monotonic() - started < 5


def test_a_metrics_host_name_is_looked_up_as_the_ipv4_the_server_binds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name with only an IPv6 address passed, and the start's IPv4 server could not bind it."""
    families: list[object] = []

    def resolver(host: str, *args: object, family: int = 0, **kwargs: object) -> list[object]:
        families.append(family)
        if family == socket.AF_INET:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", 0, 0, 0))]

    monkeypatch.setattr(cfg.socket, "getaddrinfo", resolver)
    with pytest.raises(ConfigError, match="v6only"):
        load_config(write(tmp_path, '[metrics]\nhost = "v6only"\n'), env={})
    assert families == [socket.AF_INET]


def test_the_source_says_which_file_was_read_or_that_there_was_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert cfg.config_source(None, {}) == f"no file at {tmp_path / 'absent.toml'}: defaults"
    path = write(tmp_path, "")
    env = {"KVPEER_TRANSPORT__PORT": "7500", "KVPEER_SOCKET": "/tmp/s", "HOME": "/root"}
    assert cfg.config_source(path, env) == (
        f"from {path}; from the environment: KVPEER_TRANSPORT__PORT"  # KVPEER_SOCKET: the CLI's
    )
    assert load_config(path, env={}).as_toml(f"from {path}").startswith(
        f"# kvpeer effective configuration\n# from {path}\n"
    )
    # A path may hold a newline or bytes that are not UTF-8: the output must stay TOML.
    odd = "from /tmp/x\n[bad.toml\udcff"
    text = load_config(path, env={}).as_toml(odd)
    assert text.startswith("# kvpeer effective configuration\n# from /tmp/x\\n[bad.toml\\udcff\n")
    back = tmp_path / "back.toml"
    back.write_text(text)
    assert load_config(back, env={}) == load_config(path, env={})


def test_static_peers_with_another_backend_is_a_warning(tmp_path: Path) -> None:
    """They were silently ignored with the default zeroconf backend."""
    peers = '[node]\nnode_id = "n1"\n[discovery]\nstatic_peers = ["192.0.2.7:7457"]\n'
    [warning] = cfg.config_warnings(load_config(write(tmp_path, peers), env={}))
    assert 'discovery.static_peers is ignored: it only applies to backend = "static"' in warning
    static = load_config(write(tmp_path, peers + 'backend = "static"\n'), env={})
    assert cfg.config_warnings(static) == []


def test_a_kvpeer_variable_that_sets_nothing_is_a_warning_with_the_name_meant(tmp_path: Path) -> None:
    """KVPEER_STORE_RAM_BYTES=4GiB (one underscore) kept the default without a word, where
    KVPEER_STORE__RAM_BYTE=1 is refused."""
    env = {"KVPEER_STORE_RAM_BYTES": "4GiB", "KVPEER_VERBOSE": "1", "KVPEER_SOCKET": "/tmp/s",
           "KVPEER_TRANSPORT__PORT": "7500", "PATH": "/bin"}
    config = load_config(write(tmp_path, ""), env=env)
    assert config.store.ram_bytes == 2 << 30  # still ignored: a warning, not a guess
    warnings = cfg.config_warnings(config, env)
    assert warnings == [
        "KVPEER_STORE_RAM_BYTES is not a kvpeer setting and is ignored (settings are "
        "KVPEER_<SECTION>__<KEY>, two underscores after the section); did you mean "
        "KVPEER_STORE__RAM_BYTES?",
        "KVPEER_VERBOSE is not a kvpeer setting and is ignored (settings are "
        "KVPEER_<SECTION>__<KEY>, two underscores after the section)",
    ]


def test_every_kvpeer_variable_the_code_reads_is_known_to_the_config() -> None:
    """Else the daemon would warn of a variable that is in use: KVPEER_SOCKET is the client's."""
    root = Path(__file__).resolve().parent.parent
    sources = [*root.glob("kvpeer/**/*.py"), *root.glob("tests/**/*.py"),
               *root.glob("benchmarks/**/*.py"), *root.glob("examples/**/*.py")]
    read = {name for path in sources for name in re.findall(r"\bKVPEER_\w+", path.read_text())
            if "__" not in name}
    assert read - {"KVPEER_STORE_RAM_BYTES", "KVPEER_VERBOSE"} <= cfg.OTHER_ENV_NAMES


def test_the_module_entry_point_has_a_help() -> None:
    """`python -m kvpeer.config --help` took --help for a config file's path."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kvpeer.config", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m kvpeer.config") and "--example" in done.stdout


def test_the_level_docs_name_every_level_and_what_the_readme_measured() -> None:
    from kvpeer.codec import LEVELS

    docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(cfg.CodecSection)}
    assert f"({', '.join(LEVELS)})" in docs["level"]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith("| q5 (daemon's floor) |")]
    plain, daemon = (cell.split(", ")[-1].strip() for cell in row.split("|")[2:4])  # top-1
    min_level = next(f for f in dataclasses.fields(cfg.FetchSection) if f.name == "min_level")
    assert f"{plain} coded whole, {daemon} as the daemon stores it" in min_level.metadata["doc"]
