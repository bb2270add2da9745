"""The generation loop: one thread owns the engine and runs it in steps (continuous batching).

Each ``step()``:
1. asks every sequence whether it was cancelled (waiting ones too): a cancelled one ends at
   once, even between two chunks of its prompt, and its KV cache is dropped;
2. admits waiting sequences, oldest first, while fewer than ``max_batch`` run and the
   worst-case KV memory of all admitted ones (``num_ctx`` tokens each) fits the KV budget
   (a sequence that does not fit waits; one that could never fit was refused by ``num_ctx``);
3. picks the work under ``step_token_budget`` tokens: every decoding sequence forwards its one
   sampled token, and the rest of the budget (at most ``prefill_chunk_tokens``) goes to the
   next chunk of ONE prefilling sequence, the one with the fewest prompt tokens left (the
   oldest of those), so a long prompt is prefilled in chunks between the decode steps of the
   sequences already running, and a short prompt that comes meanwhile goes first;
4. runs it: the decode tokens as one batched forward (``engine.decode_batch``), the prompt
   chunk through ``engine.forward(chunk, cache, last_only=True)``, which appends to the cache;
5. post-processes: each sequence with new logits picks its next token (krasisd.engine.generate's
   Generation: sampler or ``pick``, stop strings, detokenizing, counters) and the chunks are
   returned as :class:`Emitted`; finished sequences leave, and waiting ones join at the next
   step.

With a prefix cache (``LoopOptions.prefix_cache_bytes`` > 0, krasisd.engine.prefix_cache): a
sequence whose prompt starts with cached blocks gets their KV copied into its new cache when
its first chunk is picked in step 3, and prefills only the rest; a sequence's complete
blocks are stored when its prompt has been prefilled and again when it ends (its generated
tokens too, so the next turn of a chat reuses the answer), also when cancelled (only the
tokens its forwards wrote). A sequence whose forward failed stores nothing.

A forward that raises fails the sequences it ran for (an :class:`Emitted` with ``error``); the
others go on. ``run_alone`` drives a loop holding one sequence, synchronously: that is
``Engine.generate``.

The engine contract (:class:`StepEngine`): ``tokenizer``, ``eos_token_ids``,
``new_cache(max_tokens)``, ``forward(ids, cache, last_only=True)`` and
``decode_batch(token_ids, caches)``.

Legend: B = sequences decoding in a step, T = tokens of a prompt chunk, V = vocab.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from krasisd.engine.loop_options import (
    ContextLimitError,
    ContextSpec,
    Emitted,
    LoopOptions,
    LoopStats,
    default_prefill_chunk_tokens,
    resolve_num_ctx,
)
from krasisd.engine.options import GenerationChunk
from krasisd.engine.prefix_cache import PrefixCache

__all__ = ["ContextLimitError", "ContextSpec", "Emitted", "GenerationLoop", "LoopOptions",
           "LoopStats", "StepEngine", "decode_one_by_one", "default_prefill_chunk_tokens",
           "run_alone"]

log = logging.getLogger(__name__)

class StepEngine(Protocol):
    """What the loop calls on an engine (Engine, HybridEngine and test fakes have it)."""

    tokenizer: object
    eos_token_ids: set[int]

    def new_cache(self, max_tokens: int): ...

    def forward(self, input_ids, cache=None, last_only: bool = False) -> torch.Tensor: ...

    def decode_batch(self, token_ids: list[int], caches: list) -> torch.Tensor: ...


def decode_one_by_one(engine, token_ids: list[int], caches: list) -> torch.Tensor:
    """A ``decode_batch`` that forwards each token through ``engine.forward``: [B, V]."""
    return torch.stack([engine.forward(torch.tensor([token], dtype=torch.long), cache,
                                       last_only=True)[-1]
                        for token, cache in zip(token_ids, caches, strict=True)])


class GenerationLoop:
    """Sequences waiting and running, stepped by the one thread that owns the engine."""

    def __init__(self, engine: StepEngine, options: LoopOptions,
                 context: ContextSpec | None = None, prefix_cache: PrefixCache | None = None,
                 identity: str | None = None):
        """``prefix_cache``: one to use (it may be shared by loops of several models, each
        with its own ``identity``); None makes one of ``options.prefix_cache_bytes`` (none
        when 0). ``identity`` names the model and quantization in the cache's keys (None:
        this engine object, so nothing is shared with other engines)."""
        self.engine = engine
        self.options = options
        self.context = context or ContextSpec()
        self.waiting: deque = deque()
        self.running: list = []  # admitted, in admission order: prefilling or decoding
        self.stats = LoopStats()
        if prefix_cache is None and options.prefix_cache_bytes > 0:
            prefix_cache = PrefixCache(options.prefix_cache_bytes, options.prefix_block_tokens)
        self.prefix = prefix_cache
        self.identity = identity or f"{type(engine).__qualname__}@{id(engine):x}"

    # -- requests ---------------------------------------------------------------------

    def num_ctx(self, requested: int | None) -> int:
        """The context window of a request (ContextLimitError beyond the model's maximum or
        the KV budget; see krasisd.engine.loop_options.resolve_num_ctx)."""
        return resolve_num_ctx(requested, self.context, self.options.kv_budget_bytes)

    def kv_bytes(self, num_ctx: int) -> int:
        """Worst-case cache bytes of a sequence of ``num_ctx`` tokens: its KV and, on a hybrid
        model, its DeltaNet states."""
        return self.context.sequence_bytes(num_ctx)

    def add(self, generation) -> None:
        """Queue a sequence (a Generation); it joins the running ones at a coming step."""
        self.waiting.append(generation)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------

    def step(self) -> list[Emitted]:
        """Run one step (see the module's docstring); returns the chunks it produced."""
        self.stats.steps += 1
        out: list[Emitted] = []
        self._drop_cancelled(out)
        self._admit()
        decoding = [g for g in self.running if g.next_token is not None]
        room = self.options.tokens_per_step - len(decoding)
        prefilling = self._pick_prefill(out) if room > 0 else None
        chunk = prefilling.prefill_ids(min(room, self.options.prefill_chunk_tokens)) \
            if prefilling is not None else []
        if decoding:
            self._decode(decoding, out)
        if chunk:
            self._prefill(prefilling, chunk, out)
        self.running = [g for g in self.running if not g.done]
        return out

    def _drop_cancelled(self, out: list[Emitted]) -> None:
        for queue in (self.waiting, self.running):
            for generation in list(queue):
                chunks = generation.cancelled()
                if chunks:
                    out.extend(Emitted(generation, chunk) for chunk in chunks)
                    self._release(generation)  # its complete blocks are stored first
                    queue.remove(generation)

    def _admit(self) -> None:
        budget = self.options.kv_budget_bytes
        while self.waiting and len(self.running) < self.options.max_batch:
            head = self.waiting[0]
            if budget is not None and self.running:
                needed = sum(self.kv_bytes(g.num_ctx) for g in self.running)
                if needed + self.kv_bytes(head.num_ctx) > budget:
                    return  # it waits for room; later ones wait behind it (no starving)
            self.running.append(self.waiting.popleft())

    def _pick_prefill(self, out: list[Emitted]):
        """The sequence whose prompt gets this step's chunk: the fewest tokens left, the first
        of ties. With a prefix cache, a sequence's first chunk is preceded by the copy of the
        cached blocks its prompt starts with, looked up only then, so a request that came
        with another of the same context finds the blocks that one stored after its prompt."""
        while True:
            generation = min((g for g in self.running if g.prefill_left),
                             key=lambda g: g.prefill_left, default=None)
            if generation is None or self.prefix is None or generation.cache is not None:
                return generation
            if self._restore(generation, out):
                return generation

    def _restore(self, generation, out: list[Emitted]) -> bool:
        """Copy the cached blocks the prompt starts with into a new cache for it; False when
        that failed (the sequence has ended with the error)."""
        if not self.prefix.matched_blocks(self.identity, generation.prompt):
            return True
        start_ns = time.perf_counter_ns()
        try:
            generation.cache = self.engine.new_cache(generation.num_ctx)
            reused = self.prefix.restore(self.identity, generation.prompt, generation.cache)
        except Exception as exc:  # noqa: BLE001 - this sequence's failure
            log.exception("restoring a cached prefix failed")
            self.running.remove(generation)
            self._fail(generation, exc, out)
            return False
        self.stats.prefix_hit_tokens += reused
        generation.restored(reused, time.perf_counter_ns() - start_ns)
        return True

    def _decode(self, decoding: list, out: list[Emitted]) -> None:
        start_ns = time.perf_counter_ns()
        try:
            logits = self.engine.decode_batch([g.next_token for g in decoding],
                                              [g.cache for g in decoding])  # [B, V]
            logits = logits.to("cpu")  # the picks read them there: one copy, not one per row
        except Exception as exc:  # noqa: BLE001 - every sequence of the step sees it
            log.exception("decode step failed")
            for generation in decoding:
                self._fail(generation, exc, out)
            return
        elapsed_ns = time.perf_counter_ns() - start_ns
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(decoding)
        self.stats.forward_s += elapsed_ns / 1e9
        for generation, row in zip(decoding, logits, strict=True):
            self._emit(generation, lambda g=generation, r=row: g.decoded(r, elapsed_ns), out)

    def _prefill(self, generation, chunk: list[int], out: list[Emitted]) -> None:
        start_ns = time.perf_counter_ns()
        try:
            if generation.cache is None:
                generation.cache = self.engine.new_cache(generation.num_ctx)
            ids = torch.tensor(chunk, dtype=torch.long)  # [T]
            with torch.inference_mode():
                logits = self.engine.forward(ids, generation.cache, last_only=True)[-1]  # [V]
        except Exception as exc:  # noqa: BLE001 - this sequence's failure
            log.exception("prefill failed")
            self._fail(generation, exc, out)
            return
        elapsed_ns = time.perf_counter_ns() - start_ns
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += len(chunk)
        self.stats.forward_s += elapsed_ns / 1e9
        if self.prefix is not None:
            self.prefix.count_prefilled(len(chunk))
            if generation.prefill_left == len(chunk):  # the prompt is all in the cache now
                self._store(generation)
        self._emit(generation,
                   lambda: generation.prefilled_chunk(len(chunk), logits, elapsed_ns), out)

    def _emit(self, generation, post: Callable[[], list[GenerationChunk]],
              out: list[Emitted]) -> None:
        """Post-process one sequence; an error there (a pick that fails) ends it alone."""
        try:
            chunks = post()
        except Exception as exc:  # noqa: BLE001 - this sequence's failure
            self._fail(generation, exc, out)
            return
        out.extend(Emitted(generation, chunk) for chunk in chunks)
        if generation.done:
            self._release(generation)

    def _fail(self, generation, exc: BaseException, out: list[Emitted]) -> None:
        generation.failed()
        self._release(generation, store=False)  # a failed forward may have left it unsound
        out.append(Emitted(generation, error=exc))

    def _store(self, generation) -> None:
        """Keep the complete blocks of what the sequence's cache holds (its prompt and the
        generated tokens forwarded so far); a failure here costs only the reuse."""
        try:
            self.prefix.store(self.identity, generation.history, generation.cache)
        except Exception:  # noqa: BLE001 - e.g. no memory for the copies
            log.exception("storing a prefix failed")

    def _release(self, generation, store: bool = True) -> None:
        if store and self.prefix is not None and generation.cache is not None:
            self._store(generation)
        generation.cache = None  # the KV memory goes with the last reference

    def prefix_stats(self) -> dict | None:
        """The prefix cache's counters and size (PrefixStats.as_dict), None without one."""
        return None if self.prefix is None else self.prefix.stats.as_dict()


def run_alone(loop: GenerationLoop, generation) -> Iterator[GenerationChunk]:
    """Drive ``loop`` with ``generation`` as its only sequence; yields its chunks and raises
    the error of a failed forward."""
    loop.add(generation)
    while loop.has_work():
        for emitted in loop.step():
            if emitted.error is not None:
                raise emitted.error
            yield emitted.chunk
