"""Video streams (hevc, ffv1) decode to the same integers as zstd; NVENC probe and fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpeer import codec
from kvpeer.codec import container, nvenc, video

needs_hevc = pytest.mark.skipif(not video.available("hevc"), reason="FFmpeg lacks libx265/hevc")
needs_ffv1 = pytest.mark.skipif(not video.available("ffv1"), reason="FFmpeg lacks ffv1")


def _kv() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 2, 40, 16, generator=g).half(), torch.randn(2, 2, 40, 16, generator=g).half()


@pytest.mark.parametrize("backend", ["ffmpeg", "hevc", "ffv1"])
@pytest.mark.parametrize("level", ["q8", "q4"])
def test_video_streams_decode_like_zstd(backend: str, level: str) -> None:
    if not video.available("hevc" if backend == "hevc" else "ffv1"):
        pytest.skip("FFmpeg build lacks the codec")
    k, v = _kv()
    # video streams take no tail steps and no rotary prior (8-bit planes): the same integers as
    # zstd without them
    reference = codec.decode(codec.encode(k, v, level, backend="zstd", tail=False, rotate_half=False))
    blob = codec.encode(k, v, level, backend=backend)
    assert codec.read_header(blob).stream in ("hevc", "ffv1")
    assert not codec.read_header(blob).token_runs
    decoded = codec.decode(blob)
    assert torch.equal(decoded[0], reference[0]) and torch.equal(decoded[1], reference[1])


@needs_hevc
def test_hevc_bitstream_round_trip_is_lossless() -> None:
    """What the NVENC path writes (HEVC 4:4:4 8-bit, lossless) must decode on the CPU exactly."""
    rng = np.random.default_rng(0)
    symbols = np.clip(np.rint(rng.normal(0, 20, (5, 24, 33))), -128, 127).astype(np.int16)
    stream = video.encode(symbols, "hevc")
    assert stream[:4] == b"\x00\x00\x00\x01"  # Annex B start code: no container around it
    assert np.array_equal(video.decode(stream, "hevc", 5, 24, 33), symbols)


@pytest.mark.parametrize("stream", [pytest.param("hevc", marks=needs_hevc), pytest.param("ffv1", marks=needs_ffv1)])
def test_corrupt_video_payload_is_codec_error(stream: str) -> None:
    k, v = _kv()
    blob = codec.encode(k, v, "q6", backend=stream)
    h = codec.read_header(blob)
    side, payload = (bytes(x) for x in container.sections(blob, h))
    rng = np.random.default_rng(1)
    for cut in (len(payload) // 2, len(payload) - 3, 10):
        bad = [payload[:cut]]
        flipped = bytearray(payload)
        for pos in rng.integers(0, len(payload), 3):
            flipped[pos] ^= 0x5A
        bad.append(bytes(flipped))
        for p in bad:
            forged = container.pack(
                container.Header(**{**{n: getattr(h, n) for n in h.__slots__}, "payload_len": len(p), "digest": b""}),
                side,
                p,
            )
            try:
                k2, v2 = codec.decode(forged)
            except codec.CodecError:
                continue
            assert k2.shape == k.shape and v2.shape == v.shape


@needs_hevc
def test_nvenc_probe_parses_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = nvenc.parse_probe_output('{"module": true, "gpus": ["NVIDIA H100"], "encode": false, "decode": true}')
    assert caps.usable and caps.decode and not caps.encode
    assert not nvenc.parse_probe_output("garbage").usable
    assert not nvenc.parse_probe_output('{"module": false, "error": "No module"}').usable
    monkeypatch.setattr(nvenc, "_probed", None)
    monkeypatch.setattr(nvenc, "_run_probe", lambda timeout: nvenc.NvCapabilities(reason="no GPU"))
    assert nvenc.cached() is None and codec.available_backends(probe=False)[0] == "zstd"
    assert not nvenc.available()
    assert "nvenc" not in codec.available_backends()
    k, v = _kv()
    blob = codec.encode(k, v, "q8", backend="nvenc")  # falls back to a CPU HEVC encode
    assert codec.read_header(blob).stream == "hevc"
    assert codec.decode(blob)[0].shape == k.shape


def test_a_probe_cancelled_while_it_runs_kills_its_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop while the daemon starts cancels the probe; its process must not live on (nor a
    thread wait out the 20 s limit before the daemon can exit)."""
    import asyncio
    import os

    monkeypatch.setattr(nvenc, "_probed", None)
    monkeypatch.setattr(nvenc, "_PROBE_SCRIPT", "import time; time.sleep(60)")
    started: list[asyncio.subprocess.Process] = []
    running = asyncio.Event()
    real_exec = asyncio.create_subprocess_exec

    async def exec_and_note(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        proc = await real_exec(*args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        running.set()
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", exec_and_note)

    async def main() -> None:
        probing = asyncio.create_task(nvenc.probe_async())
        await asyncio.wait_for(running.wait(), 30)
        probing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probing

    asyncio.run(main())
    [proc] = started
    assert proc.returncode is not None  # reaped, not left running
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    assert nvenc.cached() is None  # nothing remembered: the next start probes again


def test_a_probe_past_its_limit_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setattr(nvenc, "_probed", None)
    monkeypatch.setattr(nvenc, "_PROBE_SCRIPT", "import time; time.sleep(60)")
    caps = asyncio.run(nvenc.probe_async(limit_s=0.5))
    assert not caps.usable and "timed out" in caps.reason
    assert nvenc.cached() is caps


def test_real_probe_never_raises() -> None:
    caps = nvenc.probe()
    assert isinstance(caps.usable, bool)
    if not caps.usable:
        assert caps.reason


def test_unknown_backend() -> None:
    k, v = _kv()
    with pytest.raises(codec.CodecError):
        codec.encode(k, v, "q8", backend="jpeg")


@needs_ffv1
def test_ffv1_takes_chunks_wider_than_one_slice_allows() -> None:
    """ffv1 refuses one slice for frames wider than 352: longer chunks take the slice count ffv1
    picks (it travels in the stream) and decode to the same values as zstd."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 400, 16, generator=g).half(), torch.randn(1, 2, 400, 16, generator=g).half()
    blob = codec.encode(k, v, "q4", backend="ffmpeg")
    assert codec.read_header(blob).stream == "ffv1"
    reference = codec.decode(codec.encode(k, v, "q4", tail=False, rotate_half=False))
    decoded = codec.decode(blob)
    assert torch.equal(decoded[0], reference[0]) and torch.equal(decoded[1], reference[1])


@needs_hevc
def test_a_frame_the_encoder_refuses_is_a_codec_error() -> None:
    with pytest.raises(codec.CodecError, match="refused"):
        video.encode(np.zeros((3, 8, 8), np.int16), "hevc")  # x265 opens no 8-pixel plane


def _small(shape: tuple[int, int, int, int], zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return (k * 0, v * 0) if zeros else (k.half(), v.half())


@pytest.mark.parametrize("backend", ["hevc", "nvenc", "ffmpeg"])
@pytest.mark.parametrize(
    ("shape", "zeros"),
    [
        ((2, 8, 9, 64), False),  # 8 quantized tokens: x265 opens no 8-pixel-wide plane
        ((2, 8, 3, 64), False),
        ((4, 1, 40, 2), False),  # heads x head_dim = 2: nor an 8-pixel-tall one
        ((2, 2, 1, 8), False),  # the only token is kept exact: nothing left to quantize
        ((2, 2, 12, 8), True),  # every token of an all-zero chunk is sink-like, so exact
    ],
)
def test_chunks_too_small_for_a_video_stream_take_the_zstd_stream(
    backend: str, shape: tuple[int, int, int, int], zeros: bool
) -> None:
    if not video.available("ffv1" if backend == "ffmpeg" else "hevc"):
        pytest.skip("FFmpeg build lacks the codec")
    k, v = _small(shape, zeros)
    blob = codec.encode(k, v, "q4", backend=backend)
    if backend == "ffmpeg" and shape[2] > 1 and not zeros:
        assert codec.read_header(blob).stream == "ffv1"  # ffv1 takes any plane with a column
        return
    assert codec.read_header(blob).stream == "zstd"  # the header records the stream written
    assert blob == codec.encode(k, v, "q4")  # what backend="zstd" writes
    k2, v2 = codec.decode(blob)
    assert k2.shape == k.shape and v2.shape == v.shape
