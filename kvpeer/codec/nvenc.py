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

import asyncio
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


def _finished_probe(returncode: int, stdout: str, stderr: str) -> NvCapabilities:
    if returncode != 0:
        return NvCapabilities(reason=f"probe exited {returncode}: {stderr.strip()[-300:]}")
    return parse_probe_output(stdout)


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
    return _finished_probe(done.returncode, done.stdout, done.stderr)


async def _run_probe_async(limit_s: float) -> NvCapabilities:
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE_SCRIPT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        return NvCapabilities(reason=f"probe could not start: {exc}")
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate()
    except TimeoutError:
        return NvCapabilities(reason=f"probe timed out after {limit_s:.0f} s")
    finally:
        if proc.returncode is None:  # timed out, or the caller gave up (a stop during start)
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return _finished_probe(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


_probed: NvCapabilities | None = None


def _remember(caps: NvCapabilities) -> NvCapabilities:
    global _probed
    if caps.usable:
        log.info("nvenc: %s (encode %s, decode %s)", ", ".join(caps.gpus), caps.encode, caps.decode)
    elif not caps.module:  # the usual CPU node: one short line, the details at DEBUG
        log.info("nvenc: unavailable (PyNvVideoCodec is not installed): CPU codecs only")
    else:
        log.info("nvenc: unavailable: %s", caps.reason or "no GPU with a video engine")
    log.debug("nvenc probe: %s", caps.as_dict())
    _probed = caps
    return caps


def probe(timeout: float = PROBE_TIMEOUT_S) -> NvCapabilities:
    """Probe NVENC/NVDEC once per process (blocking; from asyncio use :func:`probe_async`)."""
    return _probed if _probed is not None else _remember(_run_probe(timeout))


async def probe_async(limit_s: float = PROBE_TIMEOUT_S) -> NvCapabilities:
    """:func:`probe` for the event loop: cancelling it (a stop while the daemon starts) kills
    the probe's process at once instead of leaving a thread waiting out the timeout."""
    return _probed if _probed is not None else _remember(await _run_probe_async(limit_s))


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
