"""Per-model calibration profiles: how finely each layer's K and V must be quantized.

Layers differ ~1000x in how much quantization noise in their K or V moves the model's output
(shared/findings/codec.md). A profile holds one step multiplier per (tensor, layer), measured on
a calibration text (never the evaluated text) by :mod:`kvpeer.codec.calibrate`, normalised to a
geometric mean of 1 so a level's nominal size is kept. Profiles are stored as JSON by model
fingerprint. The encoder applies a profile; the decoder never needs one (steps travel in the
blob). No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kvpeer.errors import CodecError

PROFILE_VERSION = 2  # 2: multipliers of the v2 base step (geometric-mean channel span)
_DIR = Path(__file__).with_name("profiles")
_MAX_LAYERS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecProfile:
    """Step multipliers for one model: ``k[layer]`` and ``v[layer]``, geometric mean 1."""

    model: str  # ModelFingerprint hex (or a name for hand-made profiles)
    k: tuple[float, ...]
    v: tuple[float, ...]
    source: str = ""  # how it was measured (calibration text, probe noise)

    def __post_init__(self) -> None:
        if not self.model:
            raise CodecError("profile needs a model fingerprint")
        if not 1 <= len(self.k) <= _MAX_LAYERS or len(self.k) != len(self.v):
            raise CodecError("profile needs one K and one V multiplier per layer")
        for w in (*self.k, *self.v):
            if not (math.isfinite(w) and 1e-4 <= w <= 1e4):
                raise CodecError(f"profile multiplier {w} out of range")

    @property
    def layers(self) -> int:
        return len(self.k)

    def multipliers(self) -> list[float]:
        """K multipliers then V multipliers: the order of the codec's [2*layers] axis."""
        return [*self.k, *self.v]

    @classmethod
    def from_sensitivities(cls, model: str, k: list[float], v: list[float], source: str = "") -> CodecProfile:
        """step_i proportional to 1/sqrt(sensitivity_i), normalised to geometric mean 1."""
        raw = [1.0 / math.sqrt(max(s, 1e-30)) for s in (*k, *v)]
        mean = math.exp(sum(math.log(w) for w in raw) / len(raw))
        w = [min(max(x / mean, 1e-4), 1e4) for x in raw]
        n = len(k)
        return cls(model=model, k=tuple(w[:n]), v=tuple(w[n:]), source=source)

    def to_json(self) -> str:
        return json.dumps(
            {"version": PROFILE_VERSION, "model": self.model, "k": list(self.k), "v": list(self.v), "source": self.source},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> CodecProfile:
        try:
            raw = json.loads(text)
            if raw.get("version") != PROFILE_VERSION:
                raise CodecError(f"unsupported profile version {raw.get('version')}")
            return cls(
                model=str(raw["model"]),
                k=tuple(float(x) for x in raw["k"]),
                v=tuple(float(x) for x in raw["v"]),
                source=str(raw.get("source", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CodecError(f"bad codec profile: {exc}") from None


def path_for(model: str, directory: Path | None = None) -> Path:
    return (directory or _DIR) / f"{model}.json"


def load(model: str, directory: Path | None = None) -> CodecProfile | None:
    """The stored profile of a model fingerprint (hex), or None if there is none."""
    path = path_for(model, directory)
    if not path.is_file():
        return None
    profile = CodecProfile.from_json(path.read_text())
    if profile.model != model:
        raise CodecError(f"profile {path} is for {profile.model}, not {model}")
    return profile


def save(profile: CodecProfile, directory: Path | None = None) -> Path:
    path = path_for(profile.model, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return path
