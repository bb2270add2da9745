"""Continuous batching: sequences decoding at the same time share one forward per step.

``batched_decode`` runs one decode step for B sequences, each with its own KV cache (their
lengths differ): embeddings, norms, router, routed and shared experts and the output head
run once over the B tokens (so each expert's weights are read once per step, not once per
sequence); attention runs per sequence over its own cache, so nothing needs padding or
masking.

``BatchingEngine`` wraps an Engine for a runner that serves several requests at once, one
thread per request: ``generate`` is ``Engine.generate`` (the same streaming, sampling and
stop rules, from krasisd.engine.generate), but one-token forwards from different threads
are gathered into one ``batched_decode``. The first waiting thread leads: it runs the step
when every registered sequence that is not prefilling has submitted its token, when
``max_batch`` are waiting, or ``max_wait_ms`` after the first submission (or after the end
of the last step, if later). ``StepClock`` decides whether the step is shared or its
sequences run one by one on the engine's own (graph) path, whichever measured faster.
Prompts (prefill) run one at a time, between steps.

Legend: B = sequences in the step, D = hidden, V = vocab, R = rotary dims.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from krasisd.engine.generate import generate_stream

log = logging.getLogger(__name__)


@torch.inference_mode()
def batched_decode(model, token_ids: list[int], caches: list) -> torch.Tensor:
    """One decode step of B sequences: token_ids [B], caches [B] -> float32 logits [B, V]."""
    if len(token_ids) != len(caches) or not caches:
        raise ValueError("batched_decode needs one token per cache and at least one cache")
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("a cache appears twice in one batch")
    for cache in caches:
        cache.check_room(1)
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)  # [B]
    lengths = [c.length for c in caches]
    positions = torch.tensor(lengths, dtype=torch.long, device=device)  # [B]
    cos, sin = model.rotary.cos_sin(positions)  # [B, R/2] each
    x = model.model.embed_tokens(ids)  # [B, D]
    backend = model.expert_backend
    norm = _norm_op(device)
    compressed = hasattr(caches[0], "entries")  # MLA's compressed KV cache
    for layer in model.model.layers:
        normed = norm(layer.input_layernorm, x)  # [B, D]
        idx, attn_module = layer.layer_idx, layer.self_attn
        entries = [c.entries[idx] for c in caches] if compressed else None
        if entries is not None and _rows_fit(attn_module, entries[0]):  # fused, on CUDA
            from krasisd.engine.gpu.decode_attention import mla_rows

            attn = mla_rows(attn_module, normed, entries, positions, lengths, cos, sin)
        else:
            attn = torch.cat([
                attn_module.decode(normed[b : b + 1], cos[b : b + 1], sin[b : b + 1], cache)
                for b, cache in enumerate(caches)
            ])  # [B, D]
        h = x + attn
        x = h + layer._ffn(norm(layer.post_attention_layernorm, h), backend)
    logits = model.lm_head(norm(model.model.norm, x)).float()  # [B, V]
    for cache in caches:
        cache.advance(1)
    return logits


def _sync(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


def _norm_op(device: torch.device):
    """RMSNorm modules applied as one Triton launch on CUDA, as the module elsewhere."""
    if device.type != "cuda":
        return lambda module, x: module(x)
    from krasisd.engine.gpu.decode_attention import norm

    return lambda module, x: norm(module, x, fused=True)


def _rows_fit(attn, entries: torch.Tensor) -> bool:
    """Whether the GPU's batched MLA attention takes this layer (Triton present, on CUDA)."""
    if entries.device.type != "cuda":
        return False
    from krasisd.engine.gpu.decode_attention import rows_fit

    return rows_fit(attn, entries)


@dataclass
class _Request:
    token_id: int
    cache: object
    submitted_s: float = field(default_factory=time.perf_counter)
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatchStats:
    """Steps run and sequences decoded since creation (mean batch = tokens / steps);
    ``one_by_one``: steps whose sequences ran one after another on the engine's own path,
    because that measured faster than a shared step of their number; ``step_s``: seconds
    spent inside steps."""

    steps: int = 0
    tokens: int = 0
    prefills: int = 0
    one_by_one: int = 0
    step_s: float = 0.0  # wall time inside steps (the rest: waiting, hand-offs, the callers)


class StepClock:
    """Which way a step of B sequences runs faster, from measured step times.

    A shared step reads each weight once for B tokens, but on the GPU it runs eagerly, while
    the engine's own one-token path replays CUDA graphs; on the H200, 8 sequences sharing a
    step of DeepSeek-V2-Lite's shape made 110 tok/s together, one sequence alone 390. So the
    two ways alternate until each has ``warm_measures`` times (a first one-token step of a
    new cache also captures its graphs), then the faster runs (the one-token time times B
    against the shared time), the slower re-tried every ``retry_steps`` steps.
    """

    def __init__(self, retry_steps: int = 64, smoothing: float = 0.2, warm_measures: int = 3):
        self.retry_steps, self.smoothing = retry_steps, smoothing
        self.warm_measures = warm_measures
        self.single_s: float | None = None
        self.shared_s: dict[int, float] = {}
        self._measures: dict[int, int] = {}  # size -> shared measures; 1 -> one-token ones
        self._since_retry: dict[int, int] = {}

    def share(self, size: int) -> bool:
        """Whether a step of ``size`` sequences should be shared."""
        if size == 1:
            return False
        shared_n, single_n = self._measures.get(size, 0), self._measures.get(1, 0)
        if min(shared_n, single_n) < self.warm_measures:
            return shared_n <= single_n
        shared_wins = self.shared_s[size] <= self.single_s * size
        count = self._since_retry.get(size, 0) + 1
        self._since_retry[size] = count % self.retry_steps
        return shared_wins if count < self.retry_steps else not shared_wins

    def record(self, size: int, shared: bool, seconds: float) -> None:
        """A step of ``size`` sequences took ``seconds`` (one sequence's, when not shared)."""
        key = size if shared else 1
        self._measures[key] = self._measures.get(key, 0) + 1
        if shared:
            self.shared_s[size] = self._smooth(self.shared_s.get(size), seconds)
        else:
            self.single_s = self._smooth(self.single_s, seconds)

    def _smooth(self, old: float | None, new: float) -> float:
        """Down at once, up slowly: a first step also pays one-off work (graph captures)."""
        return new if old is None or new < old else old + self.smoothing * (new - old)


class BatchingEngine:
    """An Engine-shaped wrapper whose concurrent one-token forwards share one step."""

    def __init__(self, engine, max_batch: int = 8, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.engine = engine
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
        if hasattr(engine, "pooled_caches"):  # a cache (and its graphs) kept per sequence
            engine.pooled_caches = max(engine.pooled_caches, max_batch)
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._pending: list[_Request] = []
        self._stepping = False
        self._last_step_end_s = 0.0
        self._active = 0  # sequences inside generate()
        self._prefilling = 0
        self.stats = BatchStats()
        self.clock = StepClock()

    # the surface generate_stream uses
    @property
    def config(self):
        return self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def eos_token_ids(self):
        return self.engine.eos_token_ids

    def new_cache(self, max_tokens: int):
        with self._model_lock:
            return self.engine.new_cache(max_tokens)

    def generate(self, prompt_ids, options, should_cancel: Callable[[], bool] | None = None,
                 pick=None) -> Iterator:
        """Stream GenerationChunks, decoding in steps shared with other threads (``pick``: as
        Engine.generate)."""
        stream = generate_stream(self, prompt_ids, options, should_cancel,
                                 pick=pick)  # checks the prompt
        return self._registered(stream)

    def _registered(self, stream) -> Iterator:
        with self.sequence():
            yield from stream

    @contextlib.contextmanager
    def sequence(self):
        """Register a sequence that decodes through ``forward`` (``generate`` does this
        itself): shared steps wait for the tokens of every registered sequence."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def forward(self, input_ids, cache=None, last_only: bool = False) -> torch.Tensor:
        """As Engine.forward; a single token with a cache joins the next shared step."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)  # [T]
        if cache is None or ids.numel() != 1:
            return self._prefill(ids, cache, last_only)
        return self._decode(int(ids[0]), cache)[None, :]  # [1, V]

    def _prefill(self, ids: torch.Tensor, cache, last_only: bool) -> torch.Tensor:
        with self._cond:
            self._prefilling += 1
        try:
            with self._model_lock:
                self.stats.prefills += 1
                return self.engine.forward(ids, cache, last_only=last_only)
        finally:
            with self._cond:
                self._prefilling -= 1
                self._cond.notify_all()

    def _decode(self, token_id: int, cache) -> torch.Tensor:
        if not 0 <= token_id < self.engine.config.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        request = _Request(token_id, cache)
        with self._cond:
            self._pending.append(request)
            self._cond.notify_all()
            while not request.done:
                if not self._stepping and self._ready():
                    batch = self._pending[: self.max_batch]
                    del self._pending[: len(batch)]
                    self._stepping = True
                    self._cond.release()
                    try:
                        self._step(batch)
                    finally:
                        self._cond.acquire()
                        self._stepping = False
                        self._last_step_end_s = time.perf_counter()
                        self._cond.notify_all()
                else:
                    self._cond.wait(timeout=self._wait_left())
        if request.error is not None:
            raise request.error
        return request.logits

    def _ready(self) -> bool:
        if not self._pending:
            return False
        waiting_for = self._active - self._prefilling
        if len(self._pending) >= min(self.max_batch, max(waiting_for, 1)):
            return True
        return self._waited_s() >= self.max_wait_s

    def _waited_s(self) -> float:
        """How long the oldest token has waited for company, counted from the end of the last
        step: tokens submitted during a step did not wait in vain, and counting from their
        submission would run them alone after a long step, splitting the streams into two
        batches that never merge again."""
        since = max(self._pending[0].submitted_s, self._last_step_end_s)
        return time.perf_counter() - since

    def _wait_left(self) -> float | None:
        if self._stepping:  # the step's end notifies
            return None
        if not self._pending:
            return self.max_wait_s
        return max(self.max_wait_s - self._waited_s(), 1e-4)

    def _step(self, batch: list[_Request]) -> None:
        """Run one shared step; each request gets its logits row or its own error."""
        runnable = []
        for request in batch:
            try:
                request.cache.check_room(1)
                runnable.append(request)
            except ValueError as exc:
                request.error = exc
        try:
            if runnable:
                self._run(runnable)
        except Exception as exc:  # every waiting request sees the failure, none hangs
            for request in runnable:
                request.error = exc
        finally:
            for request in batch:
                request.done = True

    def _run(self, batch: list[_Request]) -> None:
        size = len(batch)
        shared = self.clock.share(size)
        with self._model_lock:
            start = time.perf_counter()
            if shared:
                logits = batched_decode(self.engine._live(), [r.token_id for r in batch],
                                        [r.cache for r in batch])  # [B, V]
                rows = list(logits)
            else:  # the engine's own one-token path (CUDA graphs on the GPU), one by one
                rows = [self.engine.forward([r.token_id], r.cache)[0] for r in batch]  # [V]
            _sync(rows[0])  # the times must include the device's work
            seconds = time.perf_counter() - start
            self.clock.record(size, shared, seconds / (1 if shared else size))
        self.stats.step_s += seconds
        for request, row in zip(batch, rows, strict=True):
            request.logits = row
        self.stats.steps += 1
        self.stats.tokens += size
        self.stats.one_by_one += int(size > 1 and not shared)

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.engine.close()
