"""Per-model calibration profiles: how finely each (tensor, layer, head) must be quantized.

Heads differ by orders of magnitude in how much quantization noise in their K or V moves the
model's output, and that spread lives in the model's weights (queries, output projection), not
in the KV a chunk carries (codec README, "Where the KL comes from"). A profile holds one step
multiplier per (tensor, layer, head) (or per (tensor, layer): ``heads=1`` applies to every head),
measured on a calibration text (never the evaluated text) by :mod:`kvpeer.codec.calibrate`,
normalised to a geometric mean of 1 so it moves bits between heads rather than changing the rate.
Optionally it also holds per-channel step offsets (quarter octaves on the codec's channel codes),
which move bits between a head's channels by the same map, and the levels it leaves alone.
Profiles are stored as JSON by model fingerprint. The encoder multiplies its per-head base steps
by the profile and adds the offsets to its channel codes; steps and codes travel in the blob's
side info, so the decoder never needs a profile.
No torch here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from kvpeer.codec import levels
from kvpeer.errors import CodecError
from kvpeer.hashing import ModelFingerprint

PROFILE_VERSION = 2  # 2: multipliers of the v2 base step (geometric-mean channel span)
_DIR = Path(__file__).with_name("profiles")
_MAX_LAYERS = 1024
_MAX_HEADS = 1024
_MAX_BYTES = 4 << 20  # SmolLM2's is 30 KB with channel offsets; refuse to parse anything absurd
MULTIPLIER_RANGE = (1e-4, 1e4)
CHANNEL_OFFSET_LIMIT = 16  # quarter octaves: a channel's step within 16x of the plain rule's
LEVEL_SCALE_RANGE = (0.25, 4.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecProfile:
    """Step multipliers for one model, layer-major then head: ``k[layer * heads + head]``."""

    model: str  # ModelFingerprint hex (or a name for hand-made profiles)
    k: tuple[float, ...]
    v: tuple[float, ...]
    heads: int = 1  # multipliers per layer; 1 = one per (tensor, layer), applied to every head
    # per lossy level, a common factor on every multiplier that keeps that level's size equal to
    # the plain call's (the rate does not follow -log2(step) exactly at few bits); absent = 1
    level_scale: dict[str, float] = field(default_factory=dict)
    # lossy levels the profile made worse on its own calibration windows: they keep the plain steps
    skip_levels: tuple[str, ...] = ()
    # optional per-channel step offsets in quarter octaves (positive: finer), added to the codec's
    # channel codes: [2 * layers, heads, head_dim] flattened, K then V; needs heads = the chunk's
    channels: tuple[int, ...] = ()
    source: str = ""  # how it was measured (calibration text, Fisher samples)

    def __post_init__(self) -> None:
        if not self.model:
            raise CodecError("profile needs a model fingerprint")
        if not 1 <= self.heads <= _MAX_HEADS:
            raise CodecError(f"profile head count {self.heads} out of range")
        if len(self.k) != len(self.v) or len(self.k) % self.heads:
            raise CodecError("profile needs one K and one V multiplier per (layer, head)")
        if not 1 <= len(self.k) // self.heads <= _MAX_LAYERS:
            raise CodecError("profile needs 1..1024 layers")
        low, high = MULTIPLIER_RANGE
        for w in (*self.k, *self.v):
            if not (math.isfinite(w) and low <= w <= high):
                raise CodecError(f"profile multiplier {w} out of range")
        for name, scale in self.level_scale.items():
            if name not in levels.BY_NAME or levels.BY_NAME[name].lossless:
                raise CodecError(f"profile scale for unknown or lossless level {name!r}")
            if not (isinstance(scale, float) and LEVEL_SCALE_RANGE[0] <= scale <= LEVEL_SCALE_RANGE[1]):
                raise CodecError(f"profile level scale {scale} out of range")
        for name in self.skip_levels:
            if name not in levels.BY_NAME or levels.BY_NAME[name].lossless:
                raise CodecError(f"profile skips unknown or lossless level {name!r}")
        if self.channels:
            if len(self.channels) % (2 * len(self.k)):
                raise CodecError("profile channel offsets need one per (tensor, layer, head, channel)")
            if not all(isinstance(c, int) and abs(c) <= CHANNEL_OFFSET_LIMIT for c in self.channels):
                raise CodecError(f"profile channel offsets must be integers within ±{CHANNEL_OFFSET_LIMIT}")

    @property
    def head_dim(self) -> int:
        """Channels per head the channel offsets are for (0: none)."""
        return len(self.channels) // (2 * len(self.k)) if self.channels else 0

    def channel_offsets(self, heads: int, head_dim: int) -> list[int] | None:
        """Per-channel code offsets, flat [2*layers, heads, head_dim], for a chunk of that shape
        (None when the profile has none)."""
        if not self.channels:
            return None
        if self.heads != heads or self.head_dim != head_dim:
            raise CodecError(
                f"profile channel offsets are for {self.heads} heads of {self.head_dim}, "
                f"the chunk has {heads} of {head_dim}"
            )
        return list(self.channels)

    def applies_to(self, level: str) -> bool:
        """Whether ``level`` is encoded with this profile (else with the plain steps)."""
        return level not in self.skip_levels

    @property
    def layers(self) -> int:
        return len(self.k) // self.heads

    def multipliers(self) -> list[float]:
        """K multipliers then V multipliers, layer-major: the order of the codec's [2*layers, heads]."""
        return [*self.k, *self.v]

    def grid(self, heads: int, level: str | None = None) -> list[list[float]]:
        """Multipliers as rows [2*layers][heads] for a chunk with ``heads`` KV heads at ``level``."""
        if self.heads not in (1, heads):
            raise CodecError(f"profile has {self.heads} heads per layer, the chunk {heads}")
        scale = self.level_scale.get(level, 1.0) if level else 1.0
        flat = [w * scale for w in self.multipliers()]
        return [flat[row * self.heads : (row + 1) * self.heads] * (heads // self.heads) for row in range(2 * self.layers)]

    @classmethod
    def from_sensitivities(
        cls, model: str, k: list[float], v: list[float], source: str = "", *, heads: int = 1,
        limit: float = MULTIPLIER_RANGE[1],
    ) -> CodecProfile:
        """step_i proportional to 1/sqrt(sensitivity_i), geometric mean 1, within [1/limit, limit].

        ``k``, ``v``: one sensitivity per (layer, head), layer-major. Clamping and re-centring
        alternate so the result keeps a geometric mean of 1 (equal nominal rate) inside the range.
        """
        logs = [-0.5 * math.log(max(s, 1e-30)) for s in (*k, *v)]
        bound = math.log(min(max(limit, 1.0), MULTIPLIER_RANGE[1]))
        for _ in range(50):
            centre = sum(logs) / len(logs)
            logs = [min(max(x - centre, -bound), bound) for x in logs]
            if abs(sum(logs)) < 1e-9 * len(logs):
                break
        w = [float(f"{math.exp(x):.4g}") for x in logs]  # 4 digits: ample, and the file stays small
        n = len(k)
        return cls(model=model, k=tuple(w[:n]), v=tuple(w[n:]), heads=heads, source=source)

    def to_json(self) -> str:
        return json.dumps(
            {"version": PROFILE_VERSION, "model": self.model, "heads": self.heads, "source": self.source,
             "level_scale": self.level_scale, "skip_levels": list(self.skip_levels),
             "k": list(self.k), "v": list(self.v), "channels": self._channel_rows()},
            indent=1,
        )

    def _channel_rows(self) -> list[str]:
        """Channel offsets as one line of integers per (tensor, layer, head): readable JSON."""
        dim = self.head_dim
        return [" ".join(map(str, self.channels[i : i + dim])) for i in range(0, len(self.channels), dim or 1)]

    @classmethod
    def from_json(cls, text: str) -> CodecProfile:
        if len(text) > _MAX_BYTES:
            raise CodecError("codec profile too large")
        try:
            raw = json.loads(text)
            if raw.get("version") != PROFILE_VERSION:
                raise CodecError(f"unsupported profile version {raw.get('version')}")
            heads = raw.get("heads", 1)
            if not isinstance(heads, int) or isinstance(heads, bool):
                raise CodecError("profile head count must be an integer")
            scales = raw.get("level_scale", {})
            if not isinstance(scales, dict):
                raise CodecError("profile level_scale must map level names to factors")
            channels = _parse_channel_rows(raw.get("channels", []))
            skip = raw.get("skip_levels", [])
            if not isinstance(skip, list) or not all(isinstance(name, str) for name in skip):
                raise CodecError("profile skip_levels must list level names")
            return cls(
                model=str(raw["model"]),
                k=tuple(float(x) for x in raw["k"]),
                v=tuple(float(x) for x in raw["v"]),
                heads=heads,
                level_scale={str(name): float(x) for name, x in scales.items()},
                skip_levels=tuple(skip),
                channels=tuple(channels),
                source=str(raw.get("source", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CodecError(f"bad codec profile: {exc}") from None


def _parse_channel_rows(rows: object) -> list[int]:
    """The JSON's channel offsets: a list of lines of integers, one line per (tensor, layer, head)."""
    if not isinstance(rows, list) or not all(isinstance(row, str) for row in rows):
        raise CodecError("profile channels must be lines of integer offsets")
    parsed = [[int(x) for x in row.split()] for row in rows]  # ValueError: caught as a bad profile
    if len({len(row) for row in parsed}) > 1:
        raise CodecError("profile channel lines differ in length")
    return [x for row in parsed for x in row]


def path_for(model: str, directory: Path | None = None) -> Path:
    return (directory or _DIR) / f"{model}.json"


def load(model: str, directory: Path | None = None) -> CodecProfile | None:
    """The stored profile of a model fingerprint (hex), or None if there is none."""
    path = path_for(model, directory)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if not S_ISREG(stat.st_mode):
        return None
    # a daemon reads it for every put and every lower level it makes: parse a file once per version
    profile = _parsed(str(path), stat.st_mtime_ns, stat.st_size)
    if profile.model != model:
        raise CodecError(f"profile {path} is for {profile.model}, not {model}")
    return profile


@functools.lru_cache(maxsize=16)
def _parsed(path: str, mtime_ns: int, size: int) -> CodecProfile:
    return CodecProfile.from_json(Path(path).read_text())


def for_fingerprint(fingerprint: ModelFingerprint, directory: Path | None = None) -> CodecProfile | None:
    """The profile for an engine's model: the one stored for its exact fingerprint, else the one
    calibrated on the same model in float32 (``kvpeer.codec.calibrate`` loads weights in float32).
    The sensitivities are the weights', so they do not depend on the dtype the engine's KV comes
    in; the fingerprint does (KV of different dtypes must not be exchanged), and a bf16 or fp16
    engine got no profile before."""
    profile = load(fingerprint.hex, directory)
    if profile is None and fingerprint.dtype != "float32":
        profile = load(dataclasses.replace(fingerprint, dtype="float32").hex, directory)
    return profile


def save(profile: CodecProfile, directory: Path | None = None) -> Path:
    path = path_for(profile.model, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return path
