"""Runtime configuration of the peer transport, and loading of the cluster pre-shared key.

Owns :class:`TransportConfig` (every knob with its default and why) and :func:`load_psk`.
It does not parse TOML: the daemon's config loader hands a section to
:meth:`TransportConfig.from_section`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import string
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kvpeer.errors import ConfigError

logger = logging.getLogger(__name__)

#: A DTLS record carries at most 16 KiB of plaintext, so one SCTP packet cannot be larger.
MAX_SCTP_PACKET = 16_384
#: What aiortc uses when nothing else is known: fits any IPv4/IPv6 path (1280 minus headroom).
DEFAULT_SCTP_PACKET = 1_189
#: Cluster keys are at least this many bytes (64 hex digits), as many as the HMAC's output.
MIN_PSK_BYTES = 32
#: A key file holds one hex key and a newline; anything much larger is not a key file.
PSK_FILE_LIMIT = 4096
#: aiortc announces (and enforces on the sender) a 256 KiB data-channel message limit.
MAX_DATA_CHANNEL_MESSAGE = 256 * 1024
CONGESTION_CONTROLS = ("rate", "reno")
#: What the blobs arriving from one peer may hold unless configured (max_incoming_blob_bytes).
DEFAULT_INCOMING_BLOB_BYTES = 1 << 30
#: Said by the transport at start and by ``kvpeerd --check-config`` when no key is set, at the
#: level of :attr:`TransportConfig.keyless_risk`. Not refused: the demo and tests run keyless.
KEYLESS_RISK = (
    "no cluster key (transport.psk_file is not set): any host on the LAN that has none either "
    "joins as a full peer: it reads every cached prefix of every namespace and puts KV that "
    "engines will use. Set transport.psk_file to a file made by `openssl rand -hex 32`"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportConfig:
    """How this node talks to its peers. Times are seconds, sizes bytes."""

    #: Address the signalling socket binds and the only address ICE offers. No default: the
    #: daemon passes the discovered LAN interface address (0.0.0.0 is refused; binding every
    #: interface would offer the key exchange to networks the cluster does not live on).
    host: str
    #: Signalling TCP port; 0 picks an ephemeral port (read it back from ``transport.port``).
    port: int = 0
    #: Cluster pre-shared key; ``None`` runs the same handshake with an empty key, which only
    #: peers that also have no key accept (a warning is logged at start).
    psk: bytes | None = None
    #: Next key during a rotation: both keys are accepted and offered until the switch.
    next_psk: bytes | None = None
    #: Offer 127.0.0.1 as an ICE candidate. aioice never does, so without this a single-host
    #: setup (unit tests, a non-root demo) has no path. Only takes effect when ``host`` is a
    #: loopback address; a LAN address is never affected.
    allow_loopback: bool = False
    #: MTU of our interface toward peers; ``None`` reads it from the interface that owns
    #: ``host``. The SCTP packet size is agreed from both peers' MTUs.
    mtu: int | None = None
    #: Upper bound of the SCTP packet size whatever the MTUs say (<= 16384, a DTLS record).
    max_packet_bytes: int = MAX_SCTP_PACKET
    #: Allow packets larger than the path MTU (IP fragmentation); off: fragile off-host.
    allow_fragmentation: bool = False
    #: Apply the aiortc speed-ups of :mod:`kvpeer.transport.aiortc_patches`.
    patch_aiortc: bool = True
    #: SCTP receive window we advertise: what a peer may have in flight toward us, including
    #: what we hold behind a lost packet until its retransmission arrives. With loss that is
    #: a few bandwidth-delay products (100 Mbit/s x 40 ms x 3 = 1.5 MB), so at 512 KiB a 1 %
    #: loss path stalled on the window; the sender's congestion window, not this, keeps
    #: switch queues short. Memory: at most this much per peer.
    receive_window_bytes: int = 4 * 1024 * 1024
    #: SCTP congestion control (with ``patch_aiortc``). ``"rate"``: the window follows the
    #: measured delivery rate and minimum RTT, and random loss does not shrink it
    #: (:mod:`kvpeer.transport.congestion`). ``"reno"``: aiortc's RFC 9260 window, which
    #: halves on loss (softened by ``loss_tolerant``).
    congestion_control: str = "rate"
    #: With ``"reno"``: treat a loss seen while the RTT shows no standing queue as random,
    #: not congestion (the window is not halved). Off: halve on every loss event.
    loss_tolerant: bool = True
    #: UDP socket buffer asked for (capped by net.core.rmem_max / wmem_max, with a warning).
    socket_buffer_bytes: int = 4 * 1024 * 1024
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    #: Control-channel ping period; a peer silent for ``peer_dead_after_s`` is reported down.
    heartbeat_interval_s: float = 0.5
    peer_dead_after_s: float = 2.0
    #: Largest control message sent or accepted (msgpack, before decoding). At most 256 KiB:
    #: the largest data-channel message aiortc accepts (its SDP max-message-size).
    max_message_bytes: int = MAX_DATA_CHANNEL_MESSAGE
    #: Largest blob served or fetched.
    max_blob_bytes: int = 256 * 1024 * 1024
    #: Bulk frame size (payload + 16-byte header): one data-channel message.
    frame_bytes: int = 64 * 1024
    #: Number of bulk data channels; blobs are spread over them round-robin.
    bulk_channels: int = 1
    #: Blob transfers served to one peer at a time; more are answered BUSY.
    max_transfers_per_peer: int = 16
    #: Bytes the blobs arriving over one session may hold at once, all its fetches together
    #: (a peer id has at most two sessions, so a peer can make us hold twice this): a
    #: blob counts its stated size (frames buffered before BlobStart as they come). A blob past
    #: it fails BUSY, which the fetcher treats as transient. Without a cap, one peer could
    #: make us hold max_transfers_per_peer x max_blob_bytes (4.5 GiB at the defaults).
    #: ``None``: 1 GiB, or max_blob_bytes if larger (the fetcher keeps 2 chunks in flight per
    #: peer, and chunks are far below 256 MiB). At least max_blob_bytes. Not counted: the one
    #: joined copy per blob while its digest is checked.
    max_incoming_blob_bytes: int | None = None
    #: Flow control: stop writing a bulk channel above ``high``, resume below ``low``.
    buffer_high_bytes: int = 4 * 1024 * 1024
    buffer_low_bytes: int = 1024 * 1024
    #: Grace period of close(): transfers in flight are confirmed by the peer first.
    close_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"transport.host: not an IP address: {self.host!r}") from None
        if address.is_unspecified:
            raise ConfigError("transport.host: give the LAN interface address, not 0.0.0.0/::")
        if address.is_loopback and not self.allow_loopback:
            raise ConfigError(
                "transport.host is a loopback address: set allow_loopback for single-host use"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"transport.port out of range: {self.port}")
        for name in ("psk", "next_psk"):
            key = getattr(self, name)
            if key is not None and len(key) < MIN_PSK_BYTES:
                raise ConfigError(f"transport.{name}: at least {MIN_PSK_BYTES} bytes")
        if self.mtu is not None and not 576 <= self.mtu <= 65536:
            raise ConfigError(f"transport.mtu out of range: {self.mtu}")
        if not DEFAULT_SCTP_PACKET <= self.max_packet_bytes <= MAX_SCTP_PACKET:
            raise ConfigError(
                f"transport.max_packet_bytes must be {DEFAULT_SCTP_PACKET}..{MAX_SCTP_PACKET}"
            )
        positive = (
            "connect_timeout_s", "request_timeout_s", "heartbeat_interval_s",
            "peer_dead_after_s", "close_timeout_s",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"transport.{name} must be > 0")
        if self.peer_dead_after_s <= self.heartbeat_interval_s:
            raise ConfigError("transport.peer_dead_after_s must exceed heartbeat_interval_s")
        if not 1024 <= self.frame_bytes <= MAX_DATA_CHANNEL_MESSAGE:
            raise ConfigError("transport.frame_bytes must be 1 KiB..256 KiB")
        if not 1 <= self.bulk_channels <= 16:
            raise ConfigError("transport.bulk_channels must be 1..16")
        if self.max_transfers_per_peer < 1:
            raise ConfigError("transport.max_transfers_per_peer must be >= 1")
        if not 0 < self.buffer_low_bytes < self.buffer_high_bytes:
            raise ConfigError("transport: need 0 < buffer_low_bytes < buffer_high_bytes")
        if self.congestion_control not in CONGESTION_CONTROLS:
            raise ConfigError(
                f"transport.congestion_control: one of {', '.join(CONGESTION_CONTROLS)}, "
                f"got {self.congestion_control!r}"
            )
        if not 64 * 1024 <= self.receive_window_bytes <= 64 * 1024 * 1024:
            raise ConfigError("transport.receive_window_bytes must be 64 KiB..64 MiB")
        if not 4096 <= self.max_message_bytes <= MAX_DATA_CHANNEL_MESSAGE:
            raise ConfigError(
                f"transport.max_message_bytes must be 4096..{MAX_DATA_CHANNEL_MESSAGE}"
            )
        if self.max_blob_bytes < 1:
            raise ConfigError("transport.max_blob_bytes must be >= 1")
        if self.max_incoming_blob_bytes is not None and self.max_incoming_blob_bytes < self.max_blob_bytes:
            raise ConfigError("transport.max_incoming_blob_bytes must be >= max_blob_bytes")

    @property
    def incoming_blob_budget(self) -> int:
        """max_incoming_blob_bytes, its default filled in."""
        if self.max_incoming_blob_bytes is None:
            return max(DEFAULT_INCOMING_BLOB_BYTES, self.max_blob_bytes)
        return self.max_incoming_blob_bytes

    @property
    def keyless_risk(self) -> int | None:
        """How loudly to say that no key is set: ``logging.ERROR`` (the handshake runs with the
        empty key, which every keyless host on the LAN holds), ``logging.WARNING`` on a loopback
        host (the demo, tests: no other host reaches it), None when a key is set."""
        if self.psk is not None or self.next_psk is not None:
            return None
        return logging.WARNING if ipaddress.ip_address(self.host).is_loopback else logging.ERROR

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Keys accepted and offered, current first (the empty key when none is set)."""
        keys = tuple(k for k in (self.psk, self.next_psk) if k is not None)
        return keys or (b"",)

    @classmethod
    def from_section(cls, section: Any, *, default_host: str | None = None) -> TransportConfig:
        """Build from the daemon's ``[transport]`` section (a mapping or an object).

        Keys named like fields are taken as they are; ``psk_file`` / ``next_psk_file`` are read
        with :func:`load_psk`. Keys the transport does not know are ignored here: the daemon's
        loader owns rejecting unknown keys.
        """
        values: Mapping[str, Any]
        if isinstance(section, Mapping):
            values = section
        else:
            values = {
                name: getattr(section, name)
                for name in dir(section)
                if not name.startswith("_") and not callable(getattr(section, name))
            }
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known and v is not None}
        if "host" not in kwargs:
            if default_host is None:
                raise ConfigError("transport.host: not set and no LAN address discovered")
            kwargs["host"] = default_host
        for field_name, file_key in (("psk", "psk_file"), ("next_psk", "next_psk_file")):
            path = values.get(file_key)
            if path:
                kwargs[field_name] = load_psk(path, f"transport.{file_key}")
        for unset_as_zero in ("mtu", "max_incoming_blob_bytes"):  # the config file's 0: default
            if kwargs.get(unset_as_zero) == 0:
                del kwargs[unset_as_zero]
        return cls(**kwargs)

    def with_port(self, port: int) -> TransportConfig:
        return replace(self, port=port)


def load_psk(path: str | os.PathLike[str], key: str = "transport.psk_file") -> bytes:
    """Read a cluster key file: at least ``MIN_PSK_BYTES`` bytes written as hex
    (``openssl rand -hex 32``), whitespace around and between the digits ignored.

    Refused, with a message that names the problem and never shows the key: a file that is not
    a regular file or that others may read, one over ``PSK_FILE_LIMIT`` bytes, a character that
    is not a hex digit (its position), an odd number of digits, too few bytes. Raw bytes and
    passphrases are not taken: a typo or a CRLF silently made another key of them, and a
    passphrase can be guessed offline from one recorded handshake.
    """
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {p}: {exc.strerror}") from None
    # Checked on the fd before fdopen: fdopen of a directory raised IsADirectoryError (a
    # traceback from --check-config, and at start an error that named other keys), leaving
    # the fd open.
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{key}: {p} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{key}: {p} is group/world accessible "
                f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as file:
        try:
            data = file.read(PSK_FILE_LIMIT + 1)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {p}: {exc.strerror}") from None
    if len(data) > PSK_FILE_LIMIT:
        raise ConfigError(
            f"{key}: {p} is larger than {PSK_FILE_LIMIT} bytes; it should hold "
            f"one hex key (openssl rand -hex 32)"
        )
    # Whitespace anywhere is layout (xxd -p wraps its lines, editors add CRLF), not key.
    return _parse_hex_key(b"".join(data.split()), f"{key}: {p}")


def _parse_hex_key(text: bytes, where: str) -> bytes:
    for position, byte in enumerate(text, start=1):
        if chr(byte) not in string.hexdigits:
            hint = " (write the digits without 0x)" if text[:2].lower() == b"0x" else ""
            raise ConfigError(
                f"{where}: character {position} is {_describe_byte(byte)}, not a hex digit{hint}; "
                f"the file must hold the key as hex (openssl rand -hex 32)"
            )
    if len(text) % 2:
        raise ConfigError(f"{where}: an odd number of hex digits ({len(text)}): one is missing or extra")
    key = bytes.fromhex(text.decode("ascii"))
    if len(key) < MIN_PSK_BYTES:
        raise ConfigError(
            f"{where}: a key of {len(key)} bytes is too short; at least {MIN_PSK_BYTES} bytes "
            f"({2 * MIN_PSK_BYTES} hex digits: openssl rand -hex 32)"
        )
    return key


def _describe_byte(byte: int) -> str:
    """What a refused key character is, without showing one that may be part of a secret (a
    letter or digit of a passphrase): only whitespace, punctuation and control bytes by name."""
    char = chr(byte)
    if byte >= 0x80:
        return "a non-ASCII byte"
    if char.isalnum():
        return "a letter other than a-f"
    return repr(char)
