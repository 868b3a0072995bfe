"""The cluster key file: hex of at least 32 bytes, read with bounds, refused with a message that
names the problem and never shows the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpeer.errors import ConfigError
from kvpeer.transport import TransportConfig, load_psk

KEY = bytes(range(32))
HEX = KEY.hex()


def _key_file(tmp_path: Path, data: bytes, name: str = "cluster.key") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"  \n\n"], ids=["none", "lf", "crlf", "blank-lines"])
def test_a_hex_key_reads_the_same_whatever_whitespace_is_around_it(tmp_path: Path, ending: bytes) -> None:
    assert load_psk(_key_file(tmp_path, HEX.encode() + ending)) == KEY
    assert load_psk(_key_file(tmp_path, HEX.upper().encode() + ending)) == KEY


def test_a_key_wrapped_over_lines_reads_the_same(tmp_path: Path) -> None:
    """``xxd -p`` wraps at 60 digits; an editor may add CRLFs: layout, not key."""
    wrapped = HEX[:60] + "\n" + HEX[60:] + "\n"
    assert load_psk(_key_file(tmp_path, wrapped.encode())) == KEY
    assert load_psk(_key_file(tmp_path, (HEX[:32] + "\r\n" + HEX[32:]).encode())) == KEY


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ((HEX[:-1] + "g\n").encode(), "character 64 is a letter other than a-f"),
        (("0x" + HEX).encode(), "character 2 is a letter other than a-f, not a hex digit (write the digits without 0x)"),
        ((HEX[:-1] + "\n").encode(), "an odd number of hex digits (63)"),
        (("ab" * 16 + "\n").encode(), "a key of 16 bytes is too short; at least 32 bytes (64 hex digits"),
        (b"correct horse battery staple and then some more words\n", "not a hex digit"),
        (os.urandom(16) + b"\xff" + os.urandom(31), "not a hex digit"),
    ],
    ids=["typo", "0x", "odd-length", "short", "passphrase", "raw-bytes"],
)
def test_a_key_file_that_is_not_a_long_enough_hex_key_is_refused(tmp_path: Path, data: bytes, says: str) -> None:
    """It became a raw-bytes key: a typo or a CRLF gave another key than the peers', silently,
    and a passphrase made offline guessing from a recorded handshake possible."""
    path = _key_file(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_psk(path)
    message = str(info.value)
    assert says in message and str(path) in message
    words = data.decode("ascii", "replace").split()
    assert not any(len(word) >= 4 and word in message for word in words)  # no key material


def test_what_is_not_a_small_regular_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """/dev/zero was read whole (MemoryError); a FIFO would block the start."""
    with pytest.raises(ConfigError, match="not a regular file"):
        load_psk("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_psk(fifo)
    # A directory: fdopen raised IsADirectoryError (not a ConfigError) and the fd stayed open.
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match=f"transport.psk_file: {tmp_path} is not a regular file"):
        load_psk(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == fds
    big = _key_file(tmp_path, HEX.encode() + b"\n" * 5000)
    with pytest.raises(ConfigError, match="larger than 4096 bytes"):
        load_psk(big)
    big.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_psk(big)


def test_the_next_key_of_a_rotation_is_read_alike(tmp_path: Path) -> None:
    following = bytes(range(100, 132))
    current = _key_file(tmp_path, HEX.encode() + b"\n")
    nxt = _key_file(tmp_path, following.hex().encode() + b"\r\n", "cluster.next.key")
    config = TransportConfig.from_section(
        {"host": "10.0.0.2", "psk_file": str(current), "next_psk_file": str(nxt)}
    )
    assert config.keys == (KEY, following)
    _key_file(tmp_path, b"next key passphrase\n", "cluster.next.key")
    with pytest.raises(ConfigError, match="transport.next_psk_file: .*cluster.next.key"):
        TransportConfig.from_section({"host": "10.0.0.2", "psk_file": str(current), "next_psk_file": str(nxt)})
