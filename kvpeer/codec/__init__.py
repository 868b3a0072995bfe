"""The KV codec: compress one chunk's K/V into a self-describing blob and back.

Public surface (others build on these names): :data:`LEVELS`, :data:`DEFAULT_LEVEL`,
:func:`encode`, :func:`decode`, :func:`read_header`, :func:`verify`, :func:`digest`,
:func:`transcode`, :func:`level_rank`, :func:`available_backends`, :class:`CodecError`.
Everything a blob needs to decode travels in it. All functions are blocking CPU work.
"""

from kvpeer.codec.container import Header
from kvpeer.codec.core import (
    available_backends,
    decode,
    digest,
    encode,
    read_header,
    transcode,
    verify,
)
from kvpeer.codec.levels import DEFAULT_LEVEL, LEVELS, level_rank
from kvpeer.codec.profile import CodecProfile
from kvpeer.codec.rope import RopeSpec
from kvpeer.errors import CodecError

__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "CodecError",
    "CodecProfile",
    "Header",
    "RopeSpec",
    "available_backends",
    "decode",
    "digest",
    "encode",
    "level_rank",
    "read_header",
    "transcode",
    "verify",
]
