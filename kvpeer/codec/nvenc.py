"""The GPU backend's probe and fallback (issue 11): NVENC/NVDEC through PyNvVideoCodec.

PyNvVideoCodec is never imported at module load, nor in this process by the probe: importing a
CUDA library can hang or abort on a machine with a broken driver, so :func:`probe` runs a small
script in a subprocess with a timeout, once per process (cached), and reports what it found.
Where it finds no usable encoder the codec falls back to the CPU backends; the stream NVENC
would write (HEVC 4:4:4 8-bit, IDR at each chunk start, no B-frames, lossless) is the ``hevc``
stream that :mod:`kvpeer.codec.video` decodes on the CPU, so CPU and GPU nodes interoperate.

Not verified here (no GPU on the build machine): the encode/decode calls themselves. They are
kept out of this module until they have run on a GPU.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 20.0

_PROBE_SCRIPT = r"""
import json, sys
out = {"module": False, "gpus": [], "error": ""}
try:
    import PyNvVideoCodec as nvc
    out["module"] = True
    out["version"] = str(getattr(nvc, "__version__", ""))
except Exception as exc:
    out["error"] = f"PyNvVideoCodec: {type(exc).__name__}: {exc}"
    print(json.dumps(out)); sys.exit(0)
try:
    import torch
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:
    out["error"] = f"cuda: {type(exc).__name__}: {exc}"
for name, kwargs in (("encode", {}), ):
    try:
        enc = nvc.CreateEncoder(256, 256, "YUV444", False, codec="hevc", tuning_info="lossless")
        out["encode"] = True
        del enc
    except Exception as exc:
        out["encode"] = False
        out["encode_error"] = f"{type(exc).__name__}: {exc}"
try:
    dec = nvc.CreateDecoder(gpuid=0, codec=nvc.cudaVideoCodec.HEVC, usedevicememory=True)
    out["decode"] = True
    del dec
except Exception as exc:
    out["decode"] = False
    out["decode_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class NvCapabilities:
    """What the probe found; ``reason`` says why a part is unavailable."""

    module: bool = False
    gpus: tuple[str, ...] = ()
    encode: bool = False
    decode: bool = False
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.module and bool(self.gpus) and (self.encode or self.decode)

    def as_dict(self) -> dict[str, object]:
        return {
            "module": self.module,
            "gpus": list(self.gpus),
            "encode": self.encode,
            "decode": self.decode,
            "reason": self.reason,
        }


def parse_probe_output(text: str) -> NvCapabilities:
    """Capabilities from the probe script's JSON line (anything unexpected: not usable)."""
    try:
        raw = json.loads(text.strip().splitlines()[-1])
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        gpus = raw.get("gpus") or []
        reasons = [str(raw.get(key, "")) for key in ("error", "encode_error", "decode_error")]
        return NvCapabilities(
            module=bool(raw.get("module")),
            gpus=tuple(str(g) for g in gpus) if isinstance(gpus, list) else (),
            encode=raw.get("encode") is True,
            decode=raw.get("decode") is True,
            reason="; ".join(r for r in reasons if r),
        )
    except (ValueError, IndexError) as exc:
        return NvCapabilities(reason=f"probe output unreadable: {exc}")


def _run_probe(timeout: float) -> NvCapabilities:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return NvCapabilities(reason=f"probe timed out after {timeout:.0f} s")
    except OSError as exc:
        return NvCapabilities(reason=f"probe could not start: {exc}")
    if done.returncode != 0:
        return NvCapabilities(reason=f"probe exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_probe_output(done.stdout)


_probed: NvCapabilities | None = None


@functools.cache
def probe(timeout: float = PROBE_TIMEOUT_S) -> NvCapabilities:
    """Probe NVENC/NVDEC once per process (blocking; run it in an executor from asyncio)."""
    global _probed
    caps = _run_probe(timeout)
    log.info("nvenc probe: %s", caps.as_dict())
    _probed = caps
    return caps


def cached() -> NvCapabilities | None:
    """The probe's result if it has run in this process, else None (never blocks)."""
    return _probed


def available() -> bool:
    """True where the probe found a GPU with a working NVENC encoder.

    The encode path is not implemented on this build yet (see module docstring), so even then
    the codec encodes HEVC on the CPU; this only reports the hardware.
    """
    caps = probe()
    return caps.usable and caps.encode
