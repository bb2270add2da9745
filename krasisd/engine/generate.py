"""Streaming generation: prefill, then sample and decode one token at a time.

Uses only ``engine.new_cache``, ``engine.forward``, ``engine.tokenizer`` and
``engine.eos_token_ids``, so any engine (CPU, GPU, a test fake) streams the same way.

- Every sampled token yields one chunk (its id, logprob and the text it completed, which may
  be empty while a character is unfinished or while the text could still begin a stop string).
- The last chunk has ``done=True``, ``token_id=None``, any remaining text, the reason and the
  counters: "stop" (an EOS token, not emitted, or a stop string, not emitted), "length"
  (``num_predict`` tokens, or prompt + generated reached ``num_ctx``), "cancel".
- ``eval_count`` counts sampled tokens other than EOS; durations are wall-clock ns.
- ``pick`` (optional) chooses each token instead of the sampler, e.g. JSON mode's constrained
  draw; it can also end the answer with the token it picked (reason "stop", token emitted).
- Forwards: one for the prompt, then one per emitted token that does not end the answer, so
  ``num_predict=N`` costs N forwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from krasisd.engine.detokenize import StreamDecoder, context_ids
from krasisd.engine.options import GenerationChunk, SamplingOptions
from krasisd.engine.sampling import Sampler

log = logging.getLogger(__name__)

Pick = Callable[[torch.Tensor, list[int]], tuple[int, float, bool]]
"""Chooses the next token from the logits [V] and the ids so far (prompt and generated):
(token id, its logprob, whether this token ends the answer)."""


def sampler_pick(sampler: Sampler) -> Pick:
    """The plain choice: a draw from ``sampler``; only EOS or a stop string end the answer."""

    def pick(logits: torch.Tensor, history: list[int]) -> tuple[int, float, bool]:
        token_id, logprob = sampler.sample(logits, history)
        return token_id, logprob, False

    return pick


class StopStringFilter:
    """Holds back text while it could still be the start of a stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hit = False  # a stop string was found
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            safe, self._pending = self._pending[: min(hits)], ""
            self.hit = True
            return safe, True
        held = self._held_length()
        cut = len(self._pending) - held
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe, False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _held_length(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


@dataclass
class _Counters:
    prompt_eval_count: int = 0
    prompt_eval_duration_ns: int = 0
    eval_count: int = 0
    eval_duration_ns: int = 0
    history: list[int] = field(default_factory=list)

    def final(self, text: str, reason: str) -> GenerationChunk:
        return GenerationChunk(
            token_id=None, text=text, done=True, done_reason=reason,
            prompt_eval_count=self.prompt_eval_count,
            prompt_eval_duration_ns=self.prompt_eval_duration_ns,
            eval_count=self.eval_count, eval_duration_ns=self.eval_duration_ns,
        )


def _check_prompt(engine, prompt_ids: Sequence[int], options: SamplingOptions) -> list[int]:
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty: at least one token is needed")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        raise ValueError("prompt ids must be non-negative ints")
    vocab_size = getattr(getattr(engine, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int) and max(prompt) >= vocab_size:
        raise ValueError(f"prompt holds token id {max(prompt)}, the vocabulary has {vocab_size}")
    if len(prompt) > options.num_ctx:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens, more than the context window num_ctx="
            f"{options.num_ctx}; shorten it or raise num_ctx"
        )
    if options.stop and engine.tokenizer is None:
        raise ValueError("stop strings need a tokenizer, and this model has none")
    return prompt


def forward_last(engine, ids: list[int], cache) -> torch.Tensor:
    """Logits [V] of the last of ``ids`` after appending them all to ``cache``."""
    with torch.inference_mode():
        # last_only: a long prompt never materialises [T, V] logits (1.6 GB at 4K x 102,400)
        logits = engine.forward(torch.tensor(ids, dtype=torch.long), cache, last_only=True)
    return logits[-1]  # [V]


def generate_stream(
    engine,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
    should_cancel: Callable[[], bool] | None = None,
    pick: Pick | None = None,
) -> Iterator[GenerationChunk]:
    """Stream the continuation of ``prompt_ids``; raises ValueError for a bad prompt."""
    prompt = _check_prompt(engine, prompt_ids, options)
    return _generate(engine, prompt, options, should_cancel or (lambda: False),
                     pick or sampler_pick(Sampler(options)))


def _generate(engine, prompt, options, should_cancel, pick: Pick) -> Iterator[GenerationChunk]:
    counters = _Counters(history=list(prompt))
    if should_cancel():
        yield counters.final("", "cancel")
        return
    decoder = None
    if engine.tokenizer is not None:
        decoder = StreamDecoder(engine.tokenizer, context_ids(engine.tokenizer, prompt))
    stops = StopStringFilter(options.stop)
    eos_ids = set(engine.eos_token_ids or ())

    start_ns = time.perf_counter_ns()
    cache = engine.new_cache(options.num_ctx)
    last_logits = forward_last(engine, prompt, cache)  # [V]
    counters.prompt_eval_count = len(prompt)
    counters.prompt_eval_duration_ns = time.perf_counter_ns() - start_ns
    log.debug("prefill done: %d tokens in %.1f ms", len(prompt),
              counters.prompt_eval_duration_ns / 1e6)

    reason = None
    while reason is None:
        reason = _reason_to_end(counters, options, should_cancel)
        if reason is not None:
            break
        start_ns = time.perf_counter_ns()
        token_id, logprob, ends = pick(last_logits, counters.history)
        if token_id in eos_ids:
            counters.eval_duration_ns += time.perf_counter_ns() - start_ns
            reason = "stop"
            break
        counters.history.append(token_id)
        counters.eval_count += 1
        text, stopped = stops.push(decoder.push(token_id) if decoder else "")
        if stopped or ends:
            reason = "stop"
        elif _reason_to_end(counters, options, lambda: False) is None:
            last_logits = forward_last(engine, [token_id], cache)  # [V]
        counters.eval_duration_ns += time.perf_counter_ns() - start_ns
        yield GenerationChunk(token_id=token_id, text=text, logprob=logprob)
    yield counters.final(_final_text(decoder, stops, stopped=reason == "stop"), reason)


def _reason_to_end(counters: _Counters, options: SamplingOptions, should_cancel) -> str | None:
    """Why generation must end before sampling another token, or None to go on."""
    if should_cancel():
        return "cancel"
    if len(counters.history) >= options.num_ctx:
        return "length"
    if 0 <= options.num_predict <= counters.eval_count:
        return "length"
    return None


def _final_text(decoder: StreamDecoder | None, stops: StopStringFilter, stopped: bool) -> str:
    """Text still held back at the end; nothing after a stop string."""
    if stopped and stops.hit:
        return ""
    text, hit = stops.push(decoder.flush() if decoder else "")
    return text if hit else text + stops.flush()
