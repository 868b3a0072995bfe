"""kvpeer for vLLM (V1 engine): a ``KVConnectorBase_V1`` that loads shared prefixes from the local
kvpeer daemon into vLLM's paged KV cache and saves computed prefixes to it.

Owns two things:

* the mapping between vLLM's paged blocks and kvpeer chunks (pure code: :class:`BlockChunkMap`,
  :func:`write_paged`, :func:`read_paged`). A kvpeer chunk (256 tokens by default) must be a
  whole number of vLLM blocks, so chunk c lands in blocks ``block_ids[c*C/B : (c+1)*C/B]``;
* the connector (:class:`KVPeerConnector`): the scheduler side asks the daemon how much of a
  prompt it holds (``lookup``) and plans loads and saves; the worker side ``fetch``-es chunks
  into the request's blocks and ``put``-s finished prompts. Neither moves KV twice: a load asks
  for the chunks past vLLM's own prefix-cache hit (``kv_from``), and a save copies out only the
  KV past the chunks the daemon held at the lookup (a conversation's history once, not every
  turn). A daemon that predates ``kv_from`` gets whole prompts, as before.

Honesty note: vLLM does not install on the CPU-only development machine, so this connector has
NOT run inside a vLLM engine. Its signatures follow vLLM 0.33's ``KVConnectorBase_V1``; the
block/chunk mapping and both paged layouts are tested as pure code, and the connector's
scheduler and worker halves are tested end to end against a real daemon socket with stand-ins
for vLLM's request and scheduler-output objects. Tensor parallelism > 1 and hybrid (sliding
window / mamba) models and quantized (fp8) KV caches are refused, not guessed at. Requests whose
KV is not their tokens' alone (a LoRA adapter, images, prompt embeddings, a cache salt) neither
load nor save.

Use: ``--kv-transfer-config '{"kv_connector": "KVPeerConnector", "kv_role": "kv_both",
"kv_connector_module_path": "kvpeer.integrations.vllm", "kv_connector_extra_config":
{"kvpeer_socket": "/run/kvpeer/kvpeer.sock", "kvpeer_namespace": "default"}}'``. Add
``"kvpeer_model_name"`` where vLLM's model path does not end in the name the other engines use.
``"kvpeer_layout"`` names the paged cache's layout (:data:`LAYOUTS`); unset, the one that fits the
caches vLLM registers is taken, and caches no layout fits are refused when registered.

The daemon may be down, restarting or hung; the engine must not wait on it. The connector connects
on first use (and again after a failure), and bounds each wait by keys of the same extra config
(seconds, see :class:`DaemonWaits`): ``kvpeer_lookup_timeout_s`` (0.5) for the scheduler's lookup,
``kvpeer_load_deadline_s`` (2) for a load (the daemon stops there; vLLM recomputes the rest),
``kvpeer_save_timeout_s`` (60) for a save. After the daemon fails to answer, lookups, loads and
saves are skipped for ``kvpeer_backoff_s`` (10): requests are computed as if nothing matched.
Then a quick probe (within the lookup timeout) says whether to use the daemon again.

Saves never hold up the forward pass: ``save_kv_layer`` copies the computed KV out of the paged
cache, and a thread of the connector's own sends the copies to the daemon (which encodes them
before it answers) while the engine goes on. At most ``kvpeer_max_pending_save_bytes`` (1 GiB)
of copies wait; a save past that is dropped (the daemon is a cache: the next engine to compute
that prompt saves it). :meth:`KVPeerConnector.flush_saves` waits for the ones in flight.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from kvpeer.api import messages as m
from kvpeer.api.client import DEFAULT_TIMEOUT_S, default_socket_path
from kvpeer.errors import ApiError, ConfigError, ErrorCode, KVPeerError
from kvpeer.hashing import DEFAULT_CHUNK_TOKENS, ModelFingerprint
from kvpeer.integrations._daemon import (
    ANSWER_GRACE_S,
    ASK_AGAIN_S,
    Backoff,
    DaemonConnection,
    RefusedFields,
    daemon_away,
    refused_field,
)
from kvpeer.integrations._fingerprint import dtype_name, fingerprint, model_name

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Base = object
    _MetaBase = object
    HAVE_VLLM = False
else:
    try:  # vLLM loads this module itself; without vLLM the pure parts stay usable and tested
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorBase_V1 as _Base,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorMetadata as _MetaBase,
        )

        HAVE_VLLM = True
    except ImportError:
        _Base = object
        _MetaBase = object
        HAVE_VLLM = False

# Per-layer paged cache layouts.
#  "blocks_heads_tokens_2d": vLLM >= 0.2x standardized view [num_blocks, kv_heads, block, 2*head_dim]
#                            (K in channels [0, D), V in [D, 2D)).
#  "kv_blocks_tokens_heads": the classic FlashAttention cache [2, num_blocks, block, kv_heads, head_dim].
LAYOUTS = ("blocks_heads_tokens_2d", "kv_blocks_tokens_heads")

MAX_LOAD_SHORT = 4096  # requests whose load stopped short, remembered for their later save
MAX_PENDING_SAVE_BYTES = 1 << 30  # kvpeer_max_pending_save_bytes: KV copies waiting to be put
SHUTDOWN_SAVE_WAIT_S = 10.0  # at shutdown, how long saves still waiting may take to go out


# --------------------------------------------------------------------------- pure mapping


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockChunkMap:
    """Arithmetic between vLLM blocks (``block_size`` tokens) and kvpeer chunks."""

    block_size: int
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.chunk_tokens <= 0:
            raise ConfigError("block_size and chunk_tokens must be positive")
        if self.chunk_tokens % self.block_size:
            raise ConfigError(
                f"kvpeer chunk ({self.chunk_tokens} tokens) must be a multiple of vLLM's block "
                f"size ({self.block_size})"
            )

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size

    def loadable_tokens(self, prompt_len: int, matched_tokens: int) -> int:
        """Tokens worth loading: whole chunks the daemon holds, leaving at least the last
        prompt token to compute (its logits start generation)."""
        cap = max(prompt_len - 1, 0) // self.chunk_tokens * self.chunk_tokens
        return max(0, min(matched_tokens // self.chunk_tokens * self.chunk_tokens, cap))

    def new_matched_tokens(self, prompt_len: int, num_computed: int, matched_tokens: int) -> int:
        """What ``get_num_new_matched_tokens`` answers: loadable tokens past vLLM's own hits."""
        return max(0, self.loadable_tokens(prompt_len, matched_tokens) - num_computed)

    def saveable_tokens(self, prompt_len: int) -> int:
        """Tokens of a prompt kvpeer can key (whole chunks only)."""
        return prompt_len // self.chunk_tokens * self.chunk_tokens

    def blocks(self, block_ids: Sequence[int], start: int, stop: int) -> list[int]:
        """Block ids holding tokens [start, stop) (both multiples of the block size)."""
        if start % self.block_size or stop % self.block_size or not 0 <= start <= stop:
            raise ValueError(f"token range [{start}, {stop}) is not block aligned")
        first, last = start // self.block_size, stop // self.block_size
        if last > len(block_ids):
            raise ValueError(f"tokens up to {stop} need {last} blocks, the request has {len(block_ids)}")
        return list(block_ids[first:last])

    def chunk_span(self, chunk: int, start: int, stop: int) -> tuple[int, int] | None:
        """The part of chunk ``chunk`` inside tokens [start, stop), or None if none is."""
        lo = max(chunk * self.chunk_tokens, start)
        hi = min((chunk + 1) * self.chunk_tokens, stop)
        return (lo, hi) if lo < hi else None


def write_paged(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: Sequence[int],
    layout: str = LAYOUTS[0],
) -> None:
    """Scatter one layer's ``k``/``v`` ``[kv_heads, tokens, head_dim]`` into ``block_ids``
    of a paged cache (``tokens`` = len(block_ids) x block size)."""
    heads, tokens, dim = k.shape
    idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_layer.device)
    nb = len(block_ids)
    if nb == 0:
        return
    block = tokens // nb
    if block * nb != tokens:
        raise ValueError("tokens must fill the blocks exactly")
    # [H, nb*B, D] -> [nb, H, B, D]
    kb = k.to(kv_layer.device, kv_layer.dtype).reshape(heads, nb, block, dim).permute(1, 0, 2, 3)
    vb = v.to(kv_layer.device, kv_layer.dtype).reshape(heads, nb, block, dim).permute(1, 0, 2, 3)
    if layout == "blocks_heads_tokens_2d":
        kv_layer[idx, :, :, :dim] = kb
        kv_layer[idx, :, :, dim:] = vb
    elif layout == "kv_blocks_tokens_heads":
        kv_layer[0, idx] = kb.transpose(1, 2)
        kv_layer[1, idx] = vb.transpose(1, 2)
    else:
        raise ConfigError(f"unknown paged layout {layout!r}; known: {LAYOUTS}")


def read_paged(
    kv_layer: torch.Tensor, block_ids: Sequence[int], layout: str = LAYOUTS[0]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather one layer's K, V ``[kv_heads, tokens, head_dim]`` from ``block_ids``."""
    idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_layer.device)
    if layout == "blocks_heads_tokens_2d":
        blocks = kv_layer[idx]  # [nb, H, B, 2D]
        dim = blocks.shape[-1] // 2
        kb, vb = blocks[..., :dim], blocks[..., dim:]
    elif layout == "kv_blocks_tokens_heads":
        kb = kv_layer[0, idx].transpose(1, 2)  # [nb, B, H, D] -> [nb, H, B, D]
        vb = kv_layer[1, idx].transpose(1, 2)
    else:
        raise ConfigError(f"unknown paged layout {layout!r}; known: {LAYOUTS}")
    nb, heads, block, dim = kb.shape
    k = kb.permute(1, 0, 2, 3).reshape(heads, nb * block, dim)
    v = vb.permute(1, 0, 2, 3).reshape(heads, nb * block, dim)
    return k, v


def layouts_fitting(shape: Sequence[int], *, kv_heads: int, head_dim: int, block_size: int) -> list[str]:
    """The :data:`LAYOUTS` a paged cache of ``shape`` has, for a model's KV heads and head size."""
    fitting = []
    if len(shape) == 4 and tuple(shape[1:]) == (kv_heads, block_size, 2 * head_dim):
        fitting.append("blocks_heads_tokens_2d")
    if len(shape) == 5 and shape[0] == 2 and tuple(shape[2:]) == (block_size, kv_heads, head_dim):
        fitting.append("kv_blocks_tokens_heads")
    return fitting


def layer_index(name: str) -> int:
    """Decoder layer number in a vLLM attention layer name (``model.layers.12.self_attn.attn``)."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    if not numbers:
        raise ConfigError(f"cannot tell the layer number of {name!r}")
    return int(numbers[0])


# --------------------------------------------------------------------------- connector metadata


@dataclass(slots=True, kw_only=True)
class LoadSpec:
    """Load tokens [start, stop) of ``tokens`` into ``block_ids`` (the request's blocks)."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    stop: int


@dataclass(slots=True, kw_only=True)
class SaveSpec:
    """Put tokens [0, stop) of ``tokens`` once this step has computed them, with the KV of
    tokens [kv_from, stop) from ``block_ids`` (the daemon held the chunks before kv_from)."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    stop: int
    kv_from: int = 0


@dataclass(kw_only=True)
class KVPeerConnectorMetadata(_MetaBase):  # type: ignore[misc,valid-type]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass(slots=True)
class _Tracked:
    """Scheduler-side state of one request."""

    tokens: list[int]
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # vLLM's own prefix-cache hit, at lookup time
    load_tokens: int = 0
    daemon_holds: int = 0  # tokens of the leading chunks the daemon held itself, at lookup time
    saved: bool = False
    load_planned: bool = False
    shared: bool = True  # False: the request's KV is not its tokens' alone (see _kv_beyond_tokens)


def _resumed(cached: Any, index: int, req_id: str) -> bool:
    """Whether cached request ``index`` comes back from preemption (new blocks replace its old
    ones). Newer vLLM lists such requests in ``resumed_req_ids``; older releases flag each in
    ``resumed_from_preemption``."""
    resumed_ids = getattr(cached, "resumed_req_ids", None)
    if resumed_ids is not None:
        return req_id in resumed_ids
    return bool(cached.resumed_from_preemption[index])


def _kv_beyond_tokens(request: Any) -> str | None:
    """What, besides its token ids, ``request``'s KV depends on (vLLM keys its own prefix cache by
    these too), or None. kvpeer keys KV by token ids and the base model only, so such a request
    neither loads nor saves: a LoRA adapter changes the k/v projections, an image's placeholder
    tokens are the same ids whatever it shows, a cache salt keeps tenants' KV apart."""
    if getattr(request, "lora_request", None) is not None:
        return "a LoRA adapter"
    # mm_features in newer vLLM; mm_inputs/mm_hashes/mm_positions in older releases
    if any(getattr(request, name, None) for name in ("mm_features", "mm_hashes", "mm_positions", "mm_inputs")):
        return "multimodal inputs"
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt embeddings"
    if getattr(request, "cache_salt", None):
        return "a cache salt"
    return None


def _role_name(role: Any) -> str:
    return str(getattr(role, "name", role)).lower()


# --------------------------------------------------------------------------- waiting for the daemon


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonWaits:
    """How long the connector waits for the daemon: each field is the extra-config key
    ``kvpeer_<field>``, in seconds. vLLM waits with it (the scheduler for a lookup, the whole
    batch for a load; saves are put by a thread of their own), so a daemon that is slow or gone
    costs a recompute, not a stall."""

    lookup_timeout_s: float = 0.5
    """The scheduler's wait for a lookup; past it the request is computed. Also bounds the probe
    that ends a back-off. (A daemon still asking peers it has not synced with may take up to 3 s
    to answer a lookup: such a lookup is given up too.)"""
    load_deadline_s: float = 2.0
    """A load's deadline, passed to the fetch: the daemon stops there and vLLM recomputes what
    was not restored (the worker gives up :data:`ANSWER_GRACE_S` later)."""
    save_timeout_s: float = DEFAULT_TIMEOUT_S
    """The saving thread's wait for each answer to a save (a healthy daemon encodes the chunks
    first); while it waits, later saves queue (see ``kvpeer_max_pending_save_bytes``)."""
    backoff_s: float = 10.0
    """After the daemon failed to answer, how long lookups, loads and saves are skipped."""

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> DaemonWaits:
        given = {f.name: _seconds(f"kvpeer_{f.name}", extra[f"kvpeer_{f.name}"])
                 for f in fields(cls) if f"kvpeer_{f.name}" in extra}
        return cls(**given)


def _bytes_key(extra: Mapping[str, Any], key: str, default: int) -> int:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive number of bytes, not {value!r}")
    return value


def _seconds(key: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{key} must be a positive number of seconds, not {value!r}")
    return seconds




class _Saver:
    """Puts the worker's saves from a thread of its own, in the order given, so that no batch
    waits for the daemon to take (and encode) a prompt's KV. ``save`` does one put and handles
    its errors. At most ``max_bytes`` of KV copies are made and wait (one save of any size when
    none does): :meth:`reserve` refuses past that, before a copy is made."""

    def __init__(self, save: Callable[[SaveSpec, torch.Tensor, torch.Tensor], None], max_bytes: int) -> None:
        self._save = save
        self.max_bytes = max_bytes
        self._pending: deque[tuple[SaveSpec, torch.Tensor, torch.Tensor]] = deque()
        self._bytes = 0  # reserved: copies being made, waiting, or being put
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def reserve(self, size: int) -> bool:
        """Count ``size`` bytes of copies about to be made for a save; False if they would pass
        ``max_bytes`` (or the saver is closed): then make no copy. Each reservation ends in
        :meth:`submit` or :meth:`unreserve`."""
        with self._changed:
            if self._closed or (self._bytes and self._bytes + size > self.max_bytes):
                return False
            self._bytes += size
            return True

    def unreserve(self, size: int) -> None:
        with self._changed:
            self._bytes -= size
            self._changed.notify_all()

    @property
    def waiting_bytes(self) -> int:
        return self._bytes

    def submit(self, spec: SaveSpec, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Queue a save whose copies (the caller's, now ours) were reserved; False if the saver
        was closed meanwhile (the reservation then ends here)."""
        with self._changed:
            if self._closed:
                self._bytes -= k.nbytes + v.nbytes
                return False
            self._pending.append((spec, k, v))
            if self._thread is None:  # only a worker saves: no thread in the scheduler's process
                self._thread = threading.Thread(target=self._run, name="kvpeer-vllm-saves", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        return True

    def flush(self, timeout_s: float | None) -> bool:
        """Wait until every save submitted so far was put (or failed); False on the timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """Let the saves waiting go out for up to ``timeout_s``, then stop taking any; False if
        some did not go out (they are dropped; one being put may still be, see :meth:`join`)."""
        flushed = self.flush(timeout_s)
        with self._changed:
            self._closed = True
            for _, k, v in self._pending:
                self._bytes -= k.nbytes + v.nbytes
            self._pending.clear()
            self._changed.notify_all()
        return flushed

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                spec, k, v = self._pending.popleft()
                self._busy = True
            try:
                self._save(spec, k, v)
            except Exception:  # a bug must not end the thread: later saves still go out
                log.exception("kvpeer save of %s failed", spec.req_id)
            finally:
                with self._changed:
                    self._bytes -= k.nbytes + v.nbytes
                    self._busy = False
                    self._changed.notify_all()


# --------------------------------------------------------------------------- the connector


class KVPeerConnector(_Base):  # type: ignore[misc,valid-type]
    """vLLM V1 KV connector backed by the node's kvpeer daemon (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if HAVE_VLLM:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[call-arg]
        self._vllm_config = vllm_config
        self._role_name = _role_name(role)
        extra = _extra_config(vllm_config)
        _check_kv_cache_groups(kv_cache_config)
        self.fingerprint = fingerprint_from_vllm(vllm_config)
        self.layout = str(extra.get("kvpeer_layout", LAYOUTS[0]))
        if self.layout not in LAYOUTS:
            raise ConfigError(f"kvpeer_layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        self._layout_given = "kvpeer_layout" in extra  # else register_kv_caches may pick it
        self.level = extra.get("kvpeer_level")
        self.map = BlockChunkMap(
            block_size=int(vllm_config.cache_config.block_size),
            chunk_tokens=int(extra.get("kvpeer_chunk_tokens", DEFAULT_CHUNK_TOKENS)),
        )
        self.waits = DaemonWaits.from_extra(extra)
        socket_path = str(extra.get("kvpeer_socket") or default_socket_path())
        namespace = str(extra.get("kvpeer_namespace", "default"))

        def connection(purpose: str, timeout_s: float) -> DaemonConnection:
            return DaemonConnection(socket_path, namespace, timeout_s=timeout_s,
                               client_name=f"vllm {self._role_name} {purpose}")

        # One connection per kind of wait, as the client's timeout is per connection. Nothing
        # connects yet: vLLM must start while the daemon is down.
        self._quick = connection("lookups", self.waits.lookup_timeout_s)  # and probes
        self._loads = connection("loads", self.waits.load_deadline_s + ANSWER_GRACE_S)
        self._saves = connection("saves", self.waits.save_timeout_s)
        self._backoff = Backoff(self.waits.backoff_s)
        self.clock: Callable[[], float] = time.monotonic  # tests pass a fake one
        # scheduler side
        self._requests: dict[str, _Tracked] = {}
        self._unshared_reasons: set[str] = set()  # said once each at INFO
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._meta: KVPeerConnectorMetadata | None = None
        self._load_errors: set[int] = set()
        self._load_bug_logged = False  # a load's unexpected error: its traceback is logged once
        self._save_bug_logged = False  # the same for a save's staging
        self._save_failed: set[str] = set()  # this step's saves not to make (staging or load failed)
        self._load_short: dict[str, int] = {}  # request -> the chunk its load stopped in, oldest first
        self._failed_blocks_told: set[int] = set()  # load errors vLLM was told of lately
        self._steps = 0  # wait_for_save calls: when vLLM was told (whichever it calls first)
        self._told_at = 0
        self._staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saver = _Saver(self._save, _bytes_key(extra, "kvpeer_max_pending_save_bytes", MAX_PENDING_SAVE_BYTES))
        self.saves_dropped = 0  # refused because too much KV was already waiting to be put
        self._dropping = False  # saves are being dropped: warned once until one is taken
        self._not_staged: set[str] = set()  # this step's saves without room: no copies made
        # kv_from (loads, saves) and local_only (the scheduler's lookups) are left out for a
        # while after a daemon that predates them refused them.
        self._refused = RefusedFields()

    # ------------------------------------------------------------------ metadata binding
    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self._meta = connector_metadata
        if HAVE_VLLM:
            super().bind_connector_metadata(connector_metadata)  # type: ignore[misc]

    def clear_connector_metadata(self) -> None:
        self._meta = None
        if HAVE_VLLM:
            super().clear_connector_metadata()  # type: ignore[misc]

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = [int(t) for t in (request.prompt_token_ids or [])]
        if not self._shareable(request):
            self._requests.setdefault(request.request_id, _Tracked(tokens)).shared = False
            return 0, False
        if self.map.saveable_tokens(len(tokens)) == 0:
            return 0, False  # not a whole chunk: nothing to load or save
        # Asked even when vLLM's own prefix cache covers all kvpeer could load: what the daemon
        # holds decides what the save copies (all of it, if the daemon lost the prefix). Then
        # only what it holds itself counts, so no peer is asked (the answer never waits on one).
        nothing_to_load = self.map.loadable_tokens(len(tokens), len(tokens)) <= num_computed_tokens
        found = self._lookup(tokens, request.request_id, local_only=nothing_to_load)
        if found is None:
            return 0, False
        if found.chunk_tokens != self.map.chunk_tokens:
            log.warning("daemon chunk size %d differs from kvpeer_chunk_tokens %d; not loading",
                        found.chunk_tokens, self.map.chunk_tokens)
            return 0, False
        new = self.map.new_matched_tokens(len(tokens), num_computed_tokens, found.matched_tokens)
        tracked = self._requests.setdefault(request.request_id, _Tracked(tokens))
        tracked.num_computed = num_computed_tokens
        tracked.load_tokens = new
        local = next((i for i, source in enumerate(found.sources) if source != "local"), len(found.sources))
        tracked.daemon_holds = local * found.chunk_tokens  # a save need not copy these again
        return new, False

    def _lookup(self, tokens: list[int], req_id: str, *, local_only: bool = False) -> m.LookupResult | None:
        """The daemon's answer, or None (the request is computed): it failed, or is being let be.
        ``local_only`` to a daemon that predates it: a plain lookup."""
        local_only = local_only and self._refused.takes("local_only", time.monotonic())
        if not self._daemon_usable():
            return None
        try:
            with self._quick.lock:
                found = self._quick.client().lookup(tokens, self.fingerprint, local_only=local_only)
        except (KVPeerError, OSError) as exc:
            if local_only and isinstance(exc, ApiError) and refused_field(exc, "local_only"):
                if self._refused.refused("local_only", time.monotonic()):
                    log.info("kvpeer: the daemon predates local-only lookups; prompts vLLM's own "
                             "cache covers are looked up as others are (asking again every %g s)",
                             ASK_AGAIN_S)
                return self._lookup(tokens, req_id)
            slow = isinstance(exc, ApiError) and exc.code == ErrorCode.TIMEOUT
            if slow and self._answers_probe():
                # Slow, not gone: a lookup may take the daemon up to ~3 s while it asks peers
                # it has not synced with yet. This request is computed; the next is asked.
                log.debug(
                    "kvpeer lookup slower than %g s: computing request %s",
                    self.waits.lookup_timeout_s, req_id,
                )
                return None
            if not self._daemon_failed("lookup", exc):
                log.warning("kvpeer lookup failed (%s): computing request %s", exc, req_id)
            return None
        self._daemon_answered()
        return found

    def _shareable(self, request: Any) -> bool:
        reason = _kv_beyond_tokens(request)
        if reason is None:
            return True
        if reason not in self._unshared_reasons:
            self._unshared_reasons.add(reason)
            log.info("kvpeer neither loads nor saves the KV of requests with %s: kvpeer keys KV by "
                     "the prompt's tokens and the base model only", reason)
        return False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        tracked = self._requests.setdefault(
            request.request_id, _Tracked([int(t) for t in (request.prompt_token_ids or [])])
        )
        tracked.load_tokens = num_external_tokens
        tracked.load_planned = num_external_tokens > 0

    def build_connector_meta(self, scheduler_output: Any) -> KVPeerConnectorMetadata:
        meta = KVPeerConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.setdefault(
                new.req_id, _Tracked([int(t) for t in (new.prompt_token_ids or [])])
            )
            tracked.block_ids = list(new.block_ids[0])
            if tracked.shared and not self._shareable(new):  # in case it was never looked up
                tracked.shared = False
            self._plan_load(meta, new.req_id, tracked)
            computed = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
            self._maybe_save(meta, new.req_id, tracked, computed)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked_or_none = self._requests.get(req_id)
            if tracked_or_none is None:
                continue
            new_blocks = cached.new_block_ids[i]
            resumed = _resumed(cached, i, req_id)
            if new_blocks is not None:
                if resumed:
                    tracked_or_none.block_ids = list(new_blocks[0])
                else:
                    tracked_or_none.block_ids.extend(new_blocks[0])
            if resumed:
                # A preempted request lost its blocks; vLLM asked us again when it came back and
                # now counts the external tokens as computed in its fresh, unwritten blocks.
                self._plan_load(meta, req_id, tracked_or_none)
            computed = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id]
            self._maybe_save(meta, req_id, tracked_or_none, computed)
        return meta

    def _plan_load(self, meta: KVPeerConnectorMetadata, req_id: str, tracked: _Tracked) -> None:
        """Load what ``update_state_after_alloc`` promised vLLM, once, past its own prefix hit."""
        if not tracked.load_planned:
            return
        start = tracked.num_computed
        meta.loads.append(LoadSpec(
            req_id=req_id, tokens=tracked.tokens, block_ids=list(tracked.block_ids),
            start=start, stop=start + tracked.load_tokens,
        ))
        tracked.load_planned = False

    def _maybe_save(self, meta: KVPeerConnectorMetadata, req_id: str, tracked: _Tracked, computed: int) -> None:
        stop = self.map.saveable_tokens(len(tracked.tokens))
        # Save once, in the step that computes the last whole chunk, and only what was
        # computed here: chunks that came from kvpeer are already in the daemon.
        if tracked.saved or not tracked.shared or stop == 0 or computed < stop:
            return
        tracked.saved = True
        held = tracked.daemon_holds  # at the lookup; 0 when there was none
        if held >= tracked.num_computed:
            # A load continues what the daemon held (its chunks from peers are cached there);
            # vLLM's own hit past ``held`` may be missing at the daemon, and is saved.
            held = max(held, tracked.num_computed + tracked.load_tokens)
        if held >= stop:
            return
        meta.saves.append(SaveSpec(
            req_id=req_id, tokens=tracked.tokens, block_ids=list(tracked.block_ids), stop=stop,
            kv_from=held,  # a conversation's history is copied out once, not per turn
        ))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return False, None  # saves finish inside wait_for_save: blocks may be freed now

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = {layer_index(name) for name in kv_caches}
        if layers != set(range(self.fingerprint.layers)):
            raise ConfigError(
                f"vLLM registered layers {sorted(layers)}; kvpeer expects 0..{self.fingerprint.layers - 1}"
            )
        self._check_layout({tuple(cache.shape) for cache in kv_caches.values()})
        self._kv_caches = dict(kv_caches)

    def _check_layout(self, shapes: set[tuple[int, ...]]) -> None:
        """Refuse caches the layout does not fit (every load and save would fail inside vLLM's
        forward pass); with no ``kvpeer_layout`` given, take the one layout that fits them."""
        fp = self.fingerprint
        fitting = [set(layouts_fitting(shape, kv_heads=fp.kv_heads, head_dim=fp.head_dim,
                                       block_size=self.map.block_size)) for shape in shapes]
        common = set.intersection(*fitting) if fitting else set()
        if self.layout in common:
            return
        if not self._layout_given and len(common) == 1:
            self.layout = common.pop()
            log.info("kvpeer: vLLM's paged KV caches have the %s layout", self.layout)
            return
        raise ConfigError(
            f"vLLM's paged KV caches have shape {', '.join(map(str, sorted(shapes)))}, which "
            f"kvpeer_layout {self.layout!r} does not fit ({fp.kv_heads} KV heads of {fp.head_dim}, "
            f"blocks of {self.map.block_size}); kvpeer knows {', '.join(LAYOUTS)} (see the "
            "connector's module)"
        )

    def _layers(self, forward_context: Any = None) -> dict[int, torch.Tensor]:
        caches = self._kv_caches
        if not caches and forward_context is not None:
            caches = {
                name: layer.kv_cache for name, layer in forward_context.no_compile_layers.items()
                if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)
            }
        return {layer_index(name): cache for name, cache in caches.items()}

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta
        if meta is None or not meta.loads:
            return
        layers = self._layers(forward_context)
        for spec in meta.loads:
            self._load(spec, layers)

    def _load(self, spec: LoadSpec, layers: dict[int, torch.Tensor]) -> None:
        loaded_to = spec.start
        if self._daemon_usable():
            try:
                for restored_to in self._restore(spec, layers):
                    loaded_to = restored_to  # a failure later keeps the chunks written so far
                self._daemon_answered()
            except (KVPeerError, OSError) as exc:
                if not self._daemon_failed("load", exc):
                    log.warning("kvpeer load for %s stopped at token %d: %s", spec.req_id, loaded_to, exc)
            except Exception:  # a bug must not stop vLLM's forward pass: the rest is recomputed
                log.log(logging.DEBUG if self._load_bug_logged else logging.ERROR,
                        "kvpeer load for %s failed at token %d", spec.req_id, loaded_to, exc_info=True)
                self._load_bug_logged = True
        if loaded_to < spec.stop:
            # vLLM recomputes what it is told failed; never leave blocks half-promised.
            self._load_errors.update(self.map.blocks(spec.block_ids, loaded_to, spec.stop))
            # A later save of the request starts no later than the chunk the load stopped in
            # (vLLM recomputes from there; the daemon may not hold it). Saves over the failed
            # blocks are not made meanwhile: see _over_failed_blocks.
            self._load_short[spec.req_id] = loaded_to // self.map.chunk_tokens * self.map.chunk_tokens
            while len(self._load_short) > MAX_LOAD_SHORT:
                del self._load_short[next(iter(self._load_short))]

    def _restore(self, spec: LoadSpec, layers: dict[int, torch.Tensor]) -> Iterator[int]:
        """Fetch ``spec``'s chunks into its blocks; yields the token restored up to after each.
        Only the chunks from ``spec.start`` are asked for (vLLM holds the tokens before it)."""
        kv_from = spec.start if self._takes_kv_from() else 0
        try:
            yield from self._restore_from(spec, layers, kv_from)
        except ApiError as exc:  # refused before any chunk came: asked again, from chunk 0
            if not (kv_from and self._predates_kv_from(exc)):
                raise
            yield from self._restore_from(spec, layers, 0)

    def _takes_kv_from(self) -> bool:
        return self._refused.takes("kv_from", time.monotonic())

    def _predates_kv_from(self, exc: ApiError) -> bool:
        """``exc`` is a daemon older than kv_from refusing it: said once, and not asked again
        for :data:`~kvpeer.integrations._daemon.ASK_AGAIN_S`."""
        if not refused_field(exc, "kv_from"):
            return False
        if self._refused.refused("kv_from", time.monotonic()):
            log.info("kvpeer: the daemon predates kv_from; loads and saves move whole prompts' KV "
                     "(asking again every %g s)", ASK_AGAIN_S)
        return True

    def _restore_from(self, spec: LoadSpec, layers: dict[int, torch.Tensor], kv_from: int) -> Iterator[int]:
        with self._loads.lock:
            fetch = self._loads.client().fetch(
                spec.tokens[: spec.stop], self.fingerprint, deadline_s=self.waits.load_deadline_s,
                kv_from=kv_from,
            )
            # The connection is dropped before the handle's release, which waits for the answer.
            with fetch as result, self._loads.dropped_on_timeout():
                chunk = spec.start // self.map.chunk_tokens
                while True:
                    span = self.map.chunk_span(chunk, spec.start, spec.stop)
                    if span is None:
                        return
                    arrived = result.wait_for_chunk(chunk)
                    if kv_from:  # answered, not refused: saves send kv_from again
                        self._refused.accepted("kv_from")
                    if not arrived:
                        return
                    k, v = result.chunk(chunk)  # [L, H, C, D], chunk-local tokens
                    lo, hi = span
                    offset = chunk * self.map.chunk_tokens
                    blocks = self.map.blocks(spec.block_ids, lo, hi)
                    for index, cache in layers.items():
                        write_paged(cache, k[index, :, lo - offset : hi - offset],
                                    v[index, :, lo - offset : hi - offset], blocks, self.layout)
                    yield hi
                    chunk += 1

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv restores every layer of each chunk before returning

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        if errors:  # kept until vLLM has had a whole step to recompute them
            self._failed_blocks_told |= errors
            self._told_at = self._steps
        return errors

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._meta
        if meta is None or not meta.saves:
            return
        index = layer_index(layer_name)
        for spec in meta.saves:
            if spec.req_id in self._not_staged or spec.req_id in self._save_failed:
                continue
            if self._over_failed_blocks(spec):
                self._save_failed.add(spec.req_id)
                log.debug("kvpeer save for %s not made: its blocks include ones a load failed to write",
                          spec.req_id)
                continue
            try:
                self._stage(spec, index, kv_layer)
            except Exception:  # a bug must not stop vLLM's forward pass: this save is dropped
                log.log(logging.DEBUG if self._save_bug_logged else logging.ERROR,
                        "kvpeer save for %s failed at layer %d; not saved", spec.req_id, index,
                        exc_info=True)
                self._save_bug_logged = True
                self._save_failed.add(spec.req_id)
                kv = self._staged.pop(spec.req_id, None)
                if kv is not None:
                    self._saver.unreserve(kv[0].nbytes + kv[1].nbytes)

    def _stage(self, spec: SaveSpec, index: int, kv_layer: torch.Tensor) -> None:
        """Copy layer ``index`` of ``spec``'s KV out of the paged cache into its staging buffers
        (made, with room reserved, at its first layer)."""
        fp = self.fingerprint
        staged = self._staged.get(spec.req_id)
        # Where the copy starts is fixed by its first layer: the saving thread may learn
        # meanwhile that the daemon predates kv_from, and the buffers are sized already.
        save_from = self._save_from(spec) if staged is None else spec.stop - staged[0].shape[2]
        blocks = self.map.blocks(spec.block_ids, save_from, spec.stop)
        k, v = read_paged(kv_layer, blocks, self.layout)
        if staged is None:
            shape = (fp.layers, fp.kv_heads, spec.stop - save_from, fp.head_dim)
            # Room first: a save that will be dropped must not cost this step its copies.
            size = 2 * math.prod(shape) * k.element_size()
            if not self._saver.reserve(size):
                self._not_staged.add(spec.req_id)
                return
            try:
                self._staged[spec.req_id] = (torch.empty(shape, dtype=k.dtype), torch.empty(shape, dtype=k.dtype))
            except BaseException:
                self._saver.unreserve(size)
                raise
        k_all, v_all = self._staged[spec.req_id]
        k_all[index].copy_(k)
        v_all[index].copy_(v)

    def _over_failed_blocks(self, spec: SaveSpec) -> bool:
        """Whether ``spec``'s blocks include one a load failed to write, in this step (the
        forward pass read it unwritten; another request sharing the block too) or the step
        before (with async scheduling the next step is planned before vLLM reads the failure).
        Such a save would put KV computed on unwritten blocks, and the daemon keeps a key it
        holds: it is not made (the next request of that prefix saves it)."""
        failed = self._load_errors | self._failed_blocks_told
        return bool(failed) and not failed.isdisjoint(self.map.blocks(spec.block_ids, 0, spec.stop))

    def _save_from(self, spec: SaveSpec) -> int:
        """The first token whose KV a save copies: the scheduler's kv_from, or where this
        request's load stopped if earlier (0 for a daemon that refused kv_from, until a try shows
        it takes it: a save refused for kv_from is lost, its rows before it not copied; the put
        of a whole prompt makes the try, see :meth:`_tries_kv_from`)."""
        if not self._refused.confirmed("kv_from"):
            return 0
        return min(spec.kv_from, self._load_short.pop(spec.req_id, spec.kv_from))

    def wait_for_save(self) -> None:
        """Hand this step's saves to the saving thread: their KV was copied out of the paged
        cache layer by layer, so nothing here waits for the daemon."""
        meta = self._meta
        staged, self._staged = self._staged, {}
        not_staged, self._not_staged = self._not_staged, set()
        self._save_failed = set()  # said when it failed
        if self._steps > self._told_at:
            self._failed_blocks_told = set()  # a whole step has passed since vLLM was told
        self._steps += 1
        for spec in meta.saves if meta is not None else ():
            short = self._load_short.pop(spec.req_id, spec.kv_from)  # its one save was this step's
            if short < spec.kv_from:  # staged whole (kv_from refused): a try of kv_from starts there
                spec = replace(spec, kv_from=short)
            kv = staged.pop(spec.req_id, None)
            if kv is not None and self._saver.submit(spec, *kv):
                self._dropping = False
            elif kv is not None or spec.req_id in not_staged:
                self._save_dropped(spec.req_id)
        for k, v in staged.values():  # staged for no save of this step: give the room back
            self._saver.unreserve(k.nbytes + v.nbytes)

    def _save_dropped(self, req_id: str) -> None:
        self.saves_dropped += 1
        log.log(logging.DEBUG if self._dropping else logging.WARNING,
                "kvpeer put for %s dropped: %d bytes of saves are still waiting for the daemon, "
                "%d at most (kvpeer_max_pending_save_bytes)", req_id, self._saver.waiting_bytes,
                self._saver.max_bytes)
        self._dropping = True

    def flush_saves(self, timeout_s: float | None = None) -> bool:
        """Wait until the saves handed over so far reached the daemon (or failed); False if
        ``timeout_s`` passed first."""
        return self._saver.flush(timeout_s)

    def _save(self, spec: SaveSpec, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._daemon_usable():
            log.debug("kvpeer put for %s skipped: backing off from the daemon", spec.req_id)
            return
        kv_from = spec.stop - k.shape[2]  # what save_kv_layer staged
        try:
            if not (kv_from == 0 < spec.kv_from and self._tries_kv_from(spec, k, v)):
                self._put(spec, k, v, kv_from)
        except Exception as exc:  # a save is best effort: whatever put raises, the batch goes on
            if kv_from and isinstance(exc, ApiError) and self._predates_kv_from(exc):
                return  # this one's KV starts at kv_from: dropped; the next saves copy it all
            if not self._daemon_failed("save", exc):
                log.warning("kvpeer put for %s failed: %s: %s", spec.req_id, type(exc).__name__, exc)
            return
        self._daemon_answered()

    def _tries_kv_from(self, spec: SaveSpec, k: torch.Tensor, v: torch.Tensor) -> bool:
        """A save staged whole because the daemon refused kv_from tries it again once
        :data:`~kvpeer.integrations._daemon.ASK_AGAIN_S` has passed (the daemon may have been
        upgraded): True if the daemon took it. Refused, the caller puts the whole prompt, which
        it holds: a try costs one refused request, never the save."""
        if self._refused.confirmed("kv_from") or not self._refused.takes("kv_from", time.monotonic()):
            return False
        try:
            self._put(spec, k[:, :, spec.kv_from:], v[:, :, spec.kv_from:], spec.kv_from)
        except ApiError as exc:
            if not self._predates_kv_from(exc):
                raise
            return False
        self._refused.accepted("kv_from")
        return True

    def _put(self, spec: SaveSpec, k: torch.Tensor, v: torch.Tensor, kv_from: int) -> None:
        with self._saves.lock:
            self._saves.client().put(
                spec.tokens[: spec.stop], k, v, self.fingerprint, level=self.level, kv_from=kv_from,
            )

    def shutdown(self) -> None:
        if not self._saver.close(min(self.waits.save_timeout_s, SHUTDOWN_SAVE_WAIT_S)):
            log.warning("kvpeer: saves still waiting for the daemon at shutdown were dropped")
        self._saves.abort()  # a put still in flight fails now, not after kvpeer_save_timeout_s
        self._saver.join(SHUTDOWN_SAVE_WAIT_S)
        for connection in (self._quick, self._loads, self._saves):
            if connection.lock.acquire(timeout=SHUTDOWN_SAVE_WAIT_S):
                try:
                    connection.drop()
                finally:
                    connection.lock.release()

    # ------------------------------------------------------------------ backing off
    def _daemon_usable(self) -> bool:
        """False while backing off from the daemon. When the back-off ends, a quick probe (within
        the lookup timeout) goes first: a daemon still hung costs that, not a load's or a save's
        longer wait, each time the back-off ends."""
        now = self.clock()
        if not self._backoff.allows(now):
            return False
        if not self._backoff.retrying(now):
            return True
        return self._answers_probe()

    def _answers_probe(self) -> bool:
        """Whether the daemon answers a cheap request within the lookup timeout (backing off
        if not)."""
        try:
            with self._quick.lock:
                self._quick.client().stats()
        except (KVPeerError, OSError) as exc:
            return not self._daemon_failed("probe", exc)
        self._daemon_answered()
        return True

    def _daemon_failed(self, what: str, exc: BaseException) -> bool:
        """Back off if ``exc`` says the daemon is not answering (warning once, not per request);
        False if it turned down this one request instead (the caller says so)."""
        if not daemon_away(exc):
            return False
        if self._backoff.failed(self.clock()):
            log.warning("kvpeer daemon did not answer a %s (%s): computing without it, trying again "
                        "every %g s", what, exc, self._backoff.backoff_s)
        else:
            log.debug("kvpeer daemon still not answering a %s: %s", what, exc)
        return True

    def _daemon_answered(self) -> None:
        if self._backoff.succeeded():
            log.info("kvpeer daemon answers again: lookups, loads and saves resume")


def _extra_config(vllm_config: Any) -> dict[str, Any]:
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    extra = getattr(transfer, "kv_connector_extra_config", None) or {}
    return dict(extra)


def _check_kv_cache_groups(kv_cache_config: Any) -> None:
    """Refuse a model whose KV is not one group of full-attention layers: the connector maps
    chunks onto the first group's block table only, in a full-attention layout, so other groups'
    blocks (sliding window, mamba, a draft model) would stay unwritten and a sliding window's
    freed blocks would be read. (vLLM versions that pass no ``kv_cache_config`` are not checked
    here; :meth:`KVPeerConnector.register_kv_caches` still refuses layers it cannot number.)"""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    kinds = [type(group.kv_cache_spec).__name__ for group in groups]
    if len(kinds) > 1 or (kinds and kinds[0] != "FullAttentionSpec"):
        raise ConfigError(
            f"kvpeer's vLLM connector supports one group of full-attention layers; this model's "
            f"KV cache groups are {', '.join(kinds)}"
        )


def fingerprint_from_vllm(vllm_config: Any) -> ModelFingerprint:
    """The kvpeer fingerprint of the model vLLM serves (single GPU, standard attention).

    Built like the transformers side's (:func:`kvpeer.models.model_fingerprint`), so engines of
    both kinds share chunks: the name is ``kvpeer_model_name`` from the connector's extra config,
    else the last part of vLLM's model path or hub id; the revision is ``kvpeer_revision`` from
    it, else "" (as on the transformers side, whose ``model_fingerprint`` takes ``revision=``)."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if getattr(parallel, "tensor_parallel_size", 1) != 1 or getattr(parallel, "pipeline_parallel_size", 1) != 1:
        raise ConfigError("kvpeer's vLLM connector supports tensor/pipeline parallel size 1 only")
    hf = getattr(model, "hf_text_config", None) or getattr(model, "hf_config", None)
    extra = _extra_config(vllm_config)
    name = extra.get("kvpeer_model_name") or model_name(model.model)
    revision = str(extra.get("kvpeer_revision") or "")
    if getattr(model, "revision", None) and not revision:
        log.info(
            "kvpeer: --revision %s is not part of the KV fingerprint; set kvpeer_revision (the "
            "same on every engine of this model) to keep revisions of %s apart", model.revision, name,
        )
    return fingerprint(
        hf,
        name=str(name),
        revision=revision,
        layers=model.get_num_layers(parallel),
        kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        dtype=_kv_dtype(vllm_config),
    )


# vLLM's --kv-cache-dtype values whose cache holds plain floating-point KV.
_PLAIN_KV_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16",
                    "float32": "float32", "float": "float32"}


def _kv_dtype(vllm_config: Any) -> str:
    """The dtype of the KV in vLLM's cache: the model's for ``auto``. A quantized cache (fp8 and
    the like) is refused: its blocks hold KV divided by per-layer k/v scales that kvpeer neither
    stores nor applies, so a load would cast the daemon's KV into them unscaled."""
    cache_dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None) or "auto")
    if cache_dtype == "auto":
        return dtype_name(vllm_config.model_config.dtype)
    if cache_dtype in _PLAIN_KV_DTYPES:
        return _PLAIN_KV_DTYPES[cache_dtype]
    raise ConfigError(
        f"kvpeer's vLLM connector cannot use a {cache_dtype!r} KV cache (quantized KV needs the "
        "layers' k/v scales, which kvpeer does not carry); serve with --kv-cache-dtype auto"
    )
