"""The quality ladder: level names, their stable wire codes and what each one means.

Levels are ordered most faithful first. ``exact`` is lossless; the others quantize with a
uniform step per channel derived from the data (:mod:`kvpeer.codec.quant`) whose overall size a
level fixes: ``step_log2`` is the base step as log2 of a fraction of each head's geometric-mean
channel span. The names keep their historical bit widths; what a level means is its step. A blob carries the level's code,
never its index in :data:`LEVELS`, so the ladder can grow without breaking old blobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpeer.errors import CodecError


@dataclass(frozen=True, slots=True, kw_only=True)
class Level:
    """One rung of the ladder."""

    name: str
    code: int  # stable wire code; never reused
    bits: int  # 0 for lossless; else the nominal width the level is named after
    step_log2: float = 0.0  # base step = head's geometric-mean channel span * 2**step_log2

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 255:
            raise ValueError("level code must fit a byte")
        if self.bits and not 2 <= self.bits <= 8:
            raise ValueError("bits must be 0 (lossless) or 2..8")

    @property
    def lossless(self) -> bool:
        return self.bits == 0


_LADDER = (
    Level(name="exact", code=0, bits=0),
    Level(name="q8", code=8, bits=8, step_log2=-6.35),
    Level(name="q7", code=7, bits=7, step_log2=-5.6),
    Level(name="q6", code=6, bits=6, step_log2=-4.75),
    Level(name="q5", code=5, bits=5, step_log2=-3.5),
    Level(name="q4", code=4, bits=4, step_log2=-2.5),
    Level(name="q3", code=3, bits=3, step_log2=-2.1),
)

LEVELS: tuple[str, ...] = tuple(level.name for level in _LADDER)
DEFAULT_LEVEL = "q8"
BY_NAME: dict[str, Level] = {level.name: level for level in _LADDER}
NAMES_BY_CODE: dict[int, str] = {level.code: level.name for level in _LADDER}


def get(name: str) -> Level:
    """The level called ``name``; CodecError for an unknown one (or not a string)."""
    if not isinstance(name, str):
        raise CodecError(f"codec level must be a name, one of {', '.join(LEVELS)}; got {name!r}")
    try:
        return BY_NAME[name]
    except KeyError:
        raise CodecError(f"unknown codec level {name!r}; known: {', '.join(LEVELS)}") from None


def level_rank(name: str) -> int:
    """0 for the most faithful level, growing towards the smallest."""
    return LEVELS.index(get(name).name)
