"""encode / decode / transcode of one KV chunk: the codec's public operations.

Pure, blocking CPU functions (the daemon runs them in an executor); numpy and zstandard release
the GIL for the heavy parts. torch is touched only at the edges (tensor in, tensor out).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from kvpeer.codec import container, layout, levels, nvenc, quant, video, zstd_stream
from kvpeer.codec import profile as profile_store
from kvpeer.codec import rope as rope_mod
from kvpeer.codec.container import Header
from kvpeer.codec.profile import CodecProfile
from kvpeer.codec.rope import RopeSpec
from kvpeer.errors import CodecError

log = logging.getLogger(__name__)

_TORCH_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_DTYPE_TORCH = {name: dt for dt, name in _TORCH_DTYPES.items()}
_RAW_NUMPY: dict[str, np.dtype[Any]] = {"float16": np.dtype("<u2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<u4")}
_INT_TORCH = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32}
DEFAULT_SINK = 1  # 1: position 0 and sink-like tokens are kept exact (quant.exact_tokens); 0: none
DEFAULT_TAIL = True  # the KV given ends a prefix: its last tokens get finer steps (quant.TAIL_RULE)
_RUN = np.dtype([("count", "<u2"), ("code", "i1")])
RUNS_BYTES = quant.MAX_TOKEN_RUNS * _RUN.itemsize  # the token-run table at the end of the side info


def _check_pair(k: torch.Tensor, v: torch.Tensor) -> str:
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise CodecError("k and v must be torch tensors")
    if k.dim() != 4 or k.shape != v.shape:
        raise CodecError(f"k and v must share a [layers, kv_heads, tokens, head_dim] shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != v.dtype or k.dtype not in _TORCH_DTYPES:
        raise CodecError(f"unsupported dtypes {k.dtype}/{v.dtype}")
    for t in (k, v):
        if t.is_meta or t.layout != torch.strided:
            raise CodecError(f"k and v must be dense tensors holding data, got a {t.layout} tensor on {t.device}")
    layers, heads, tokens, head_dim = (int(n) for n in k.shape)
    container.check_shape((layers, heads, tokens, head_dim))
    return _TORCH_DTYPES[k.dtype]


def _raw(t: torch.Tensor, dtype: str) -> np.ndarray:
    """The tensor's exact bits as an unsigned-int numpy array (bf16 has no numpy dtype)."""
    return t.detach().cpu().contiguous().view(_INT_TORCH[dtype]).numpy().view(_RAW_NUMPY[dtype])


def _from_raw(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    signed = raw.view(np.int16 if raw.dtype.itemsize == 2 else np.int32).reshape(shape)
    return torch.from_numpy(signed.copy()).view(_DTYPE_TORCH[dtype])


MAX_EXACT_POSITION = 0xFFFF  # exact token positions are u16 in the side info

def encode(
    k: torch.Tensor,
    v: torch.Tensor,
    level: str = levels.DEFAULT_LEVEL,
    *,
    backend: str = "zstd",
    sink: int = DEFAULT_SINK,
    profile: CodecProfile | str | None = None,
    rope: RopeSpec | None = None,
    tail: bool = DEFAULT_TAIL,
    rotate_half: bool | None = None,
) -> bytes:
    """Encode one chunk's K and V ([layers, kv_heads, tokens, head_dim]) at ``level``.

    ``backend``: "zstd" (default, fastest on the CPU), "ffmpeg"/"ffv1"/"hevc" (video streams via
    PyAV), "nvenc" (HEVC; CPU fallback). ``sink``: 0 keeps no token exact, >0 keeps position 0
    and the chunk's sink-like tokens exact (:func:`quant.exact_tokens`, at most 16). ``profile``: a
    :class:`CodecProfile` or a model fingerprint hex whose stored profile scales the base step of
    every (tensor, layer, head) (none: the plain rules). ``rope``: theta and the chunk's first absolute position; keys are then
    quantized before RoPE and re-rotated on decode. ``tail``: the KV ends a prefix, so the next
    tokens read its last ones most: those get finer steps (:data:`quant.TAIL_RULE`); pass False
    for a chunk in the middle of a prefix (smaller blob); video streams ignore it. ``rotate_half``:
    the keys' RoPE pairs channel c with c + head_dim/2 (transformers' Llama family, GPT-NeoX, vLLM's
    default), so slow-frequency key channels get finer steps (:data:`quant.ROTARY_PRIOR_OCTAVES`);
    False for models without RoPE or that pair neighbouring channels; None (default): read from
    the keys (:func:`quant.looks_rotate_half`; True with ``rope``); video streams ignore it.
    Decoding never needs any of these. Lossy levels refuse (CodecError) non-finite values and
    fp32/bf16 values so large that their steps would leave float32's range on decode (from ~4e33
    at q3, ~7e34 at q8); ``exact`` keeps anything.
    """
    dtype = _check_pair(k, v)
    spec = levels.get(level)
    stream = _stream_for(backend, spec)
    layers, heads, tokens, head_dim = (int(n) for n in k.shape)
    if spec.lossless:
        raw = np.concatenate([_raw(k, dtype).reshape(-1), _raw(v, dtype).reshape(-1)])
        payload = zstd_stream.compress(zstd_stream.shuffle(raw))
        side = b""
        sink = 0
        stream = "zstd"  # lossless float bits: video planes would not help
    else:
        if tokens > MAX_EXACT_POSITION + 1:
            # exact token positions travel as u16 in the side info
            raise CodecError(f"a lossy chunk holds at most {MAX_EXACT_POSITION + 1} tokens, got {tokens}")
        kv = torch.stack([k, v]).detach().cpu()
        exact = _exact_positions(kv, sink, tokens)
        if stream != "zstd" and not video.fits(stream, heads * head_dim, tokens - len(exact)):
            # decided before the steps, so the chunk gets what backend="zstd" writes
            log.debug("%s cannot hold %d x %d planes: zstd stream instead", stream, heads * head_dim, tokens - len(exact))
            stream = "zstd"
        body_mask = np.ones(tokens, bool)
        body_mask[exact] = False
        exact_raw = _raw(kv[:, :, :, exact, :].contiguous(), dtype)
        full = kv.float()
        if rope is not None:
            full[0] = rope_mod.unrotate(full[0], rope, 0)
        body = full[:, :, :, torch.from_numpy(body_mask), :]
        x = body.numpy().reshape(2 * layers, heads, -1, head_dim)
        if rotate_half is None:
            rotate_half = rope is not None or quant.looks_rotate_half(x[:layers])
        # video planes hold 8 bits: finer slow channels (like the tail) would push them to zstd
        prior = quant.ROTARY_PRIOR_OCTAVES if rotate_half and stream == "zstd" else 0.0
        steps, codes = quant.plan_steps(x, spec.step_log2, rotary_prior=prior)
        resolved = _resolve_profile(profile)
        if resolved is not None and resolved.layers != layers:
            raise CodecError(f"profile has {resolved.layers} layers, the chunk {layers}")
        if resolved is not None and resolved.applies_to(spec.name):
            # the scaled base steps and codes are what the side info stores: decoding needs no profile
            steps = (steps * np.asarray(resolved.grid(heads, spec.name), np.float32)).astype(np.float32)
            offsets = resolved.channel_offsets(heads, head_dim)
            if offsets is not None:
                codes = codes.astype(np.int64) + np.asarray(offsets, np.int64).reshape(codes.shape)
            steps, codes = quant.fit_codes(x, steps, codes)
        # video planes hold 8 bits: the tail's finer steps would push the chunk to zstd anyway
        runs = quant.tail_runs(np.flatnonzero(body_mask), tokens) if tail and stream == "zstd" else ()
        q = quant.quantize(x, steps, codes, runs)
        with np.errstate(over="ignore"):
            in_range = _steps_in_range(quant.channel_steps(q.steps, q.codes), q.zeros, q.runs)
        if not in_range:  # the decoder would refuse the blob (_check_steps)
            raise CodecError(
                f"values up to {float(np.abs(x).max()):.3g} are too large for level {spec.name} (its steps "
                "would leave float32's range on decode); the exact level keeps them"
            )
        side_raw = b"".join((
            q.steps.astype("<f4").tobytes(),
            q.codes.astype(np.int8).tobytes(),
            zstd_stream.shuffle(q.zeros.astype("<i4")),
            exact.astype("<u2").tobytes(),
            zstd_stream.shuffle(exact_raw),  # byte planes: the exponent bytes compress
            rope.pack() if rope is not None else b"",
            _pack_runs(q.runs) if q.runs else b"",
        ))
        side = zstd_stream.compress(side_raw)
        sink = len(exact)
        rest = tokens - sink
        symbols = layout.to_stream(q.symbols)
        if stream != "zstd" and symbols.size and not (-128 <= symbols.min() and symbols.max() <= 127):
            log.debug("symbols exceed 8 bits: zstd stream instead of %s", stream)
            stream = "zstd"
        if stream == "zstd":
            rows = symbols.reshape(2 * layers * heads * head_dim, rest)
            payload = zstd_stream.encode_runs(rows, [count for count, _ in q.runs])
        else:
            payload = video.encode(symbols.reshape(2 * layers, heads * head_dim, rest), stream)
    header = Header(
        level=spec.name,
        level_code=spec.code,
        stream=stream,
        dtype=dtype,
        layers=layers,
        kv_heads=heads,
        tokens=tokens,
        head_dim=head_dim,
        side_len=len(side),
        payload_len=len(payload),
        sink=sink,
        flags=(container.FLAG_KEYS_PRE_ROPE if rope is not None and not spec.lossless else 0)
        | (container.FLAG_TOKEN_RUNS if not spec.lossless and q.runs else 0)
        | (container.FLAG_ENDS_PREFIX if tail else 0),
    )
    return container.pack(header, side, payload)


def _pack_runs(runs: tuple[tuple[int, int], ...]) -> bytes:
    table = np.zeros(quant.MAX_TOKEN_RUNS, _RUN)
    table[: len(runs)] = list(runs)
    return table.tobytes()


def _unpack_runs(raw: bytes, rest: int) -> tuple[tuple[int, int], ...]:
    """The token runs of a flagged blob; CodecError unless they cover its quantized tokens."""
    table = np.frombuffer(raw, _RUN)
    used = int(np.count_nonzero(table["count"]))
    runs = tuple((int(c), int(e)) for c, e in table[:used].tolist())
    if np.any(table[used:]["count"]) or np.any(table[used:]["code"]) or sum(c for c, _ in runs) != rest:
        raise CodecError("token runs do not cover the chunk's quantized tokens")
    return runs


def _resolve_profile(profile: CodecProfile | str | None) -> CodecProfile | None:
    if profile is None or isinstance(profile, CodecProfile):
        return profile
    return profile_store.load(profile)


def read_header(blob: bytes | bytearray | memoryview) -> Header:
    """Parse and validate the header only; CodecError if it is malformed."""
    return container.parse_header(blob, levels.NAMES_BY_CODE)


def verify(blob: bytes | bytearray | memoryview) -> Header:
    """Check the whole blob's digest without decoding; CodecError if it does not match."""
    header = read_header(blob)
    container.verify(blob, header)
    return header


def digest(blob: bytes | bytearray | memoryview) -> bytes:
    """The content digest the blob's header states (check it with :func:`verify`)."""
    return read_header(blob).digest


def _side_len(h: Header) -> int:
    pairs = 2 * h.layers * h.kv_heads
    channels = pairs * h.head_dim
    exact_bytes = h.sink * 2 + 2 * h.layers * h.kv_heads * h.sink * h.head_dim * container.DTYPE_BYTES[h.dtype]
    rope_bytes = rope_mod.PACKED_BYTES if h.keys_pre_rope else 0
    return pairs * 4 + channels * 5 + exact_bytes + rope_bytes + (RUNS_BYTES if h.token_runs else 0)


def _exact_positions(kv: torch.Tensor, sink: int, tokens: int) -> np.ndarray:
    """Token positions kept bit-exact: none if ``sink`` is 0, else position 0 and sink-like tokens."""
    limit = min(tokens, container.MAX_SINK) if sink > 0 else 0
    if limit == 0:
        return np.zeros(0, np.int64)
    keys = kv[0].float().numpy()
    return quant.exact_tokens(keys, limit)


def decode(
    blob: bytes | bytearray | memoryview,
    device: str | torch.device | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a blob into (k, v) of the shape and dtype it states; CodecError if bad.

    ``out``: CPU tensors (k, v) of the blob's shape (any float dtype, any strides, e.g. views
    of a chunk in shared memory) to decode into, saving a full-size temporary and a copy;
    they are returned. If decoding fails they may hold part of the chunk.
    ``max_elements``: refuse a blob stating more elements per tensor than this, before any
    allocation. A blob's digest proves only that it is whole, not who made it: without ``out``
    (whose shape bounds it) an untrusted blob may otherwise claim up to
    ``container.MAX_ELEMENTS`` per tensor, and get it allocated.
    """
    if out is not None:
        return _decode_into(blob, out)
    header = verify(blob)
    if max_elements is not None and header.elements > max_elements:
        raise CodecError(f"chunk of {header.elements} elements per tensor, at most {max_elements} taken")
    k, v = _decode_verified(blob, header)
    if device is not None:
        k, v = k.to(device), v.to(device)
    return k, v


def _decode_verified(
    blob: bytes | bytearray | memoryview, header: Header,
    out_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a blob whose digest was checked; quantized levels write into ``out_kv`` if given
    (lossless ones always return new tensors)."""
    side, payload = container.sections(blob, header)
    if not levels.get(header.level).lossless:
        return _decode_quantized(header, side, payload, out_kv)
    if header.sink or header.side_len or header.stream != "zstd" or header.token_runs:
        raise CodecError("lossless blob with side info")
    n = header.elements
    raw_dtype = _RAW_NUMPY[header.dtype]
    raw = zstd_stream.unshuffle(zstd_stream.decompress(payload, 2 * n * raw_dtype.itemsize), raw_dtype, 2 * n)
    return _from_raw(raw[:n], header.dtype, header.shape), _from_raw(raw[n:], header.dtype, header.shape)


def _decode_into(
    blob: bytes | bytearray | memoryview, out: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    header = read_header(blob)
    k_out, v_out = out
    for dst in out:
        if tuple(dst.shape) != header.shape or dst.device.type != "cpu" or not dst.is_floating_point():
            raise CodecError(
                f"out tensor {tuple(dst.shape)} {dst.dtype} on {dst.device} does not fit a "
                f"{header.shape} chunk (CPU float tensors of that shape)"
            )
    k, v = _decode_verified(blob, verify(blob), out)
    if k is not k_out:  # lossless, or keys before RoPE: decoded whole, then copied
        k_out.copy_(k)
        v_out.copy_(v)
    return k_out, v_out


def _dequantize_body_into(
    dst: torch.Tensor, symbols: np.ndarray, steps: np.ndarray, zeros: np.ndarray,
    exact: np.ndarray, runs: tuple[tuple[int, int], ...], tensor: int,
    shape: tuple[int, int, int, int], rest: int, dtype: torch.dtype, limit: float | None,
) -> None:
    """Tensor ``tensor`` (0 = K, 1 = V) of the channel-major symbols, dequantized straight into
    ``dst`` [L, H, T, D] around the exact positions: the symbols are read transposed (1-2 bytes
    an element, not 4) and float32 destinations are scaled in place, with the same float32
    arithmetic as :func:`layout.dequantize_stream` (:func:`layout.channel_scale`), rounded to the blob's ``dtype`` before any
    other dtype (the same values as ``decode(blob)`` copied into ``dst``), clamped to
    ``limit`` first when :func:`layout.clamp_limit` gives one."""
    layers, heads, _, head_dim = shape
    half = slice(tensor * layers, (tensor + 1) * layers)
    source = torch.from_numpy(symbols).view(2 * layers, heads, head_dim, rest)[half]
    body = source.transpose(-1, -2)  # [L, H, T', D]
    steps_by_code, offset = layout.channel_scale(steps[half], zeros[half], runs)
    offset = offset[:, :, None, :]
    for start, stop, taken, code in _pieces(exact, dst.shape[-2], runs, rest):
        step = steps_by_code[code][:, :, None, :]
        part = body[:, :, taken : taken + stop - start, :]
        target = dst[:, :, start:stop, :]
        if dst.dtype == torch.float32 == dtype:
            target.copy_(part)
            target.mul_(step).add_(offset)
        else:
            values = part.to(torch.float32).mul_(step).add_(offset)
            if limit is not None:
                values.clamp_(-limit, limit)
            target.copy_(values.to(dtype))


def _pieces(
    exact: np.ndarray, tokens: int, runs: tuple[tuple[int, int], ...], rest: int
) -> list[tuple[int, int, int, int]]:
    """(start, stop, first body token, step code): the body spans around the exact positions,
    cut where a token run's step code changes."""
    out = []
    for start, stop, taken in _body_spans(exact, tokens):
        for first, last, code in quant.run_spans(rest, runs):
            lo, hi = max(taken, first), min(taken + stop - start, last)
            if lo < hi:
                out.append((start + lo - taken, start + hi - taken, lo, code))
    return out


def _body_spans(exact: np.ndarray, tokens: int) -> list[tuple[int, int, int]]:
    """(start, stop, first body token) of each run of non-exact positions in [0, tokens)."""
    spans = []
    start = 0
    # before the i-th boundary exactly i exact positions lie below ``start`` (they are sorted)
    for before, position in enumerate([*exact.tolist(), tokens]):
        if position > start:
            spans.append((start, position, start - before))
        start = position + 1
    return spans


def _decode_quantized(
    header: Header, side: memoryview, payload: memoryview,
    out_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    layers, heads, tokens, head_dim = header.shape
    rest = tokens - header.sink
    side_raw = zstd_stream.decompress(side, _side_len(header))
    pairs = 2 * layers * heads
    channels = pairs * head_dim
    pos = 0

    def take(size: int) -> bytes:
        nonlocal pos
        pos += size
        return side_raw[pos - size : pos]

    steps = np.frombuffer(take(pairs * 4), "<f4").reshape(2 * layers, heads).astype(np.float32)
    codes = np.frombuffer(take(channels), np.int8).reshape(2 * layers, heads, head_dim)
    zeros = zstd_stream.unshuffle(take(channels * 4), np.dtype("<i4"), channels)
    zeros = zeros.reshape(2 * layers, heads, head_dim).astype(np.int32)
    with np.errstate(over="ignore", under="ignore"):  # checked below
        step = quant.channel_steps(steps, codes)
    exact = np.frombuffer(take(header.sink * 2), "<u2").astype(np.int64)
    if exact.size and (np.any(np.diff(exact) <= 0) or exact[-1] >= tokens):
        raise CodecError("exact token positions are not increasing or out of range")
    raw_dtype = _RAW_NUMPY[header.dtype]
    exact_count = 2 * layers * heads * header.sink * head_dim
    exact_raw = zstd_stream.unshuffle(take(exact_count * raw_dtype.itemsize), raw_dtype, exact_count)
    rope = rope_mod.RopeSpec.unpack(take(rope_mod.PACKED_BYTES)) if header.keys_pre_rope else None
    runs = _unpack_runs(take(RUNS_BYTES), rest) if header.token_runs else ()
    _check_steps(step, zeros, runs)
    if header.stream == "zstd":
        symbols = zstd_stream.decode_runs(payload, channels, [count for count, _ in runs] or [rest])
    elif header.stream in ("hevc", "ffv1") and rest:
        symbols = video.decode(payload, header.stream, 2 * layers, heads * head_dim, rest)
    else:
        raise CodecError(f"stream {header.stream} cannot hold this chunk")
    dt = _DTYPE_TORCH[header.dtype]
    limit = layout.clamp_limit(step, zeros, runs, symbols, dt, rotated=rope is not None)
    if out_kv is not None and rope is None:
        for index, dst in enumerate(out_kv):
            _dequantize_body_into(dst, symbols, step, zeros, exact, runs, index, header.shape, rest, dt, limit)
        if header.sink:
            exact_kv = _from_raw(exact_raw, header.dtype, (2, layers, heads, header.sink, head_dim))
            positions = torch.from_numpy(exact)
            for index, dst in enumerate(out_kv):
                dst[:, :, positions] = exact_kv[index].to(dst.dtype)
        return out_kv
    values = layout.dequantize_stream(symbols, step, zeros, rest, runs)  # [2L, H, D, T'] float32
    if limit is not None:  # keys before RoPE are clamped once rotated, not before
        (values[layers:] if rope is not None else values).clamp_(-limit, limit)
    restored = values.view(2, layers, heads, head_dim, rest).transpose(-1, -2)
    out = torch.empty((2, layers, heads, tokens, head_dim), dtype=dt)
    if rope is not None:
        keys = torch.zeros((layers, heads, tokens, head_dim), dtype=torch.float32)
        _scatter_body(keys, restored[0], exact)
        rotated = rope_mod.rotate(keys, rope, 0)
        out[0] = rotated.clamp_(-limit, limit) if limit is not None else rotated
        _scatter_body(out[1], restored[1], exact)
    else:
        _scatter_body(out, restored, exact)
    if header.sink:
        out[:, :, :, torch.from_numpy(exact)] = _from_raw(exact_raw, header.dtype, (2, layers, heads, header.sink, head_dim))
    return out[0], out[1]


def _steps_in_range(step: np.ndarray, zeros: np.ndarray, runs: tuple[tuple[int, int], ...]) -> bool:
    """Do base step x code (x a run's code) stay finite and positive, and every symbol x step +
    offset below a quarter of float32's maximum? Symbols are at most int16."""
    limit = np.float64(np.finfo(np.float32).max) / 4
    base = np.abs(zeros.astype(np.float64)) * step
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for code in {code for _, code in runs} | {0}:
            finer = quant.run_step(step, code)
            if (not np.all(np.isfinite(finer)) or np.any(finer <= 0) or not np.all(np.isfinite(base))
                    or np.any(base + 32768.0 * finer > limit)):
                return False
    return True


def _check_steps(step: np.ndarray, zeros: np.ndarray, runs: tuple[tuple[int, int], ...]) -> None:
    """A forged side info can hold a bad base step, or push base step x code (x a run's code)
    past float32 (inf, then NaN in the KV) or to 0; our encoder refuses to write such a blob
    (:func:`_steps_in_range` in encode). Checked before the payload is decoded."""
    if not _steps_in_range(step, zeros, runs):
        raise CodecError("side info gives a channel step out of range (non-finite, <= 0 or too large)")


def _scatter_body(out: torch.Tensor, body: torch.Tensor, exact: np.ndarray) -> None:
    """Copy body tokens [..., T', D] into ``out`` [..., T, D] around the exact positions.

    Slice copies between the few exact tokens (a fancy-index scatter measured 3x slower).
    """
    for start, stop, taken in _body_spans(exact, out.shape[-2]):
        out[..., start:stop, :].copy_(body[..., taken : taken + stop - start, :])


def transcode(blob: bytes | bytearray | memoryview, level: str, **kwargs: Any) -> bytes:
    """A blob at ``level`` (same or lower than the blob's) made from a higher-level blob."""
    header = read_header(blob)
    target = levels.get(level)
    if levels.level_rank(target.name) < levels.level_rank(header.level):
        raise CodecError(f"cannot transcode {header.level} up to {target.name}")
    if target.name == header.level and not kwargs:
        verify(blob)
        return bytes(blob)
    k, v = decode(blob)
    kwargs.setdefault("tail", header.ends_prefix)  # a prefix's last chunk stays one (exact ones too)
    if header.keys_pre_rope and "rope" not in kwargs:
        kwargs["rope"] = _blob_rope(blob, header)  # keep quantizing keys before RoPE
    return encode(k, v, target.name, **kwargs)


def _blob_rope(blob: bytes | bytearray | memoryview, header: Header) -> RopeSpec:
    side, _ = container.sections(blob, header)
    side_raw = zstd_stream.decompress(side, _side_len(header))
    end = len(side_raw) - (RUNS_BYTES if header.token_runs else 0)  # the run table follows it
    return rope_mod.RopeSpec.unpack(side_raw[end - rope_mod.PACKED_BYTES : end])


BACKENDS = ("zstd", "ffmpeg", "hevc", "ffv1", "nvenc")
# The CPU video stream per level for backend "ffmpeg": ffv1 decodes ~as small as lossless x265
# and far faster on the CPU (benchmarks/codec.py); "hevc" is the GPU-compatible choice.
FFMPEG_STREAM = "ffv1"


def _stream_for(backend: str, spec: levels.Level) -> str:
    if backend not in BACKENDS:  # checked at every level, though lossless ones write zstd
        raise CodecError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "zstd" or spec.lossless:
        return "zstd"
    if backend == "ffmpeg":
        backend = FFMPEG_STREAM
    elif backend == "nvenc":
        # The NVENC encode call is not implemented/verified yet (no GPU here): write the same
        # HEVC stream kind on the CPU, which any node can decode.
        if nvenc.available():
            log.info("nvenc present but its encode path is unverified; encoding HEVC on the CPU")
        backend = "hevc"
    if not video.available(backend):
        raise CodecError(f"backend {backend!r} is not available here (FFmpeg lacks it)")
    return backend


def available_backends(probe: bool = True) -> list[str]:
    """Backends that can encode here: "zstd" always, "ffmpeg" with PyAV, "nvenc" with a GPU.

    The first call probes the GPU in a subprocess (blocking, up to 20 s): from the event loop
    pass ``probe=False`` (reports nvenc only once a probe has run, e.g. in an executor at start).
    """
    out = ["zstd"]
    if video.available("hevc") or video.available("ffv1"):
        out.append("ffmpeg")
    caps = nvenc.probe() if probe else nvenc.cached()
    if caps is not None and caps.usable and caps.encode:
        out.append("nvenc")
    return out
