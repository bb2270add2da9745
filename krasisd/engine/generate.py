"""One generation's state: sampling, stop strings, detokenizing and Ollama's counters.

:class:`Generation` is what the generation loop (krasisd.engine.loop) drives for each
sequence: the loop prefills its prompt in chunks and forwards its sampled tokens (shared
decode steps); the Generation picks each next token from the logits and turns it into
chunks. ``generate_stream`` runs one Generation through that same loop, alone, so a
runner serving many requests and ``Engine.generate`` go one way.

- Every sampled token yields one chunk (its id, logprob and the text it completed, which may
  be empty while a character is unfinished or while the text could still begin a stop string).
- The last chunk has ``done=True``, ``token_id=None``, any remaining text, the reason and the
  counters: "stop" (an EOS token, not emitted, or a stop string, not emitted), "length"
  (``num_predict`` tokens, or prompt + generated reached ``num_ctx``), "cancel".
- ``eval_count`` counts sampled tokens other than EOS; durations are wall-clock ns:
  ``prompt_eval_duration_ns`` the forwards of the prompt's chunks, ``eval_duration_ns`` the
  picks and the decode steps of the generated tokens. ``prompt_eval_count`` is the whole
  prompt, also the tokens copied from the prefix cache (Ollama's meaning); those are
  ``Generation.cached_tokens``, and their copy counts in ``prompt_eval_duration_ns``.
- ``pick`` (optional) chooses each token instead of the sampler, e.g. JSON mode's constrained
  draw; it can also end the answer with the token it picked (reason "stop", token emitted).
- Forwards: the prompt (in chunks), then one per emitted token that does not end the answer,
  so ``num_predict=N`` costs N decode forwards after the prompt.
- Cancellation is asked once per loop step (``should_cancel``), also between prompt chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from krasisd.engine.detokenize import StreamDecoder, context_ids
from krasisd.engine.options import DEFAULT_NUM_CTX, GenerationChunk, SamplingOptions
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


class Generation:
    """One sequence as the generation loop drives it: the prompt still to prefill, its KV
    cache, the sampled token to forward next, the choice of tokens (``pick``), the
    stop-string filter, the detokenizer and the counters.

    Raises ValueError for a bad prompt. ``options.num_ctx`` None means DEFAULT_NUM_CTX here;
    the loop resolves it against the model first (GenerationLoop.num_ctx). ``key`` is the
    caller's name for it (a runner's request id).
    """

    def __init__(self, engine, prompt_ids: Sequence[int], options: SamplingOptions,
                 should_cancel: Callable[[], bool] | None = None, pick: Pick | None = None,
                 key=None):
        if options.num_ctx is None:
            options = replace(options, num_ctx=DEFAULT_NUM_CTX)
        self.prompt = _check_prompt(engine, prompt_ids, options)
        self.options = options
        self.key = key
        self.should_cancel = should_cancel or (lambda: False)
        self.pick = pick or sampler_pick(Sampler(options))
        self.counters = _Counters(history=list(self.prompt))
        self.decoder = None
        if engine.tokenizer is not None:
            self.decoder = StreamDecoder(engine.tokenizer,
                                         context_ids(engine.tokenizer, self.prompt))
        self.stops = StopStringFilter(options.stop)
        self.eos_ids = set(engine.eos_token_ids or ())
        self.cache = None  # the loop's: made at the first prompt chunk, dropped at the end
        self.prefilled = 0  # prompt tokens in the cache
        self.cached_tokens = 0  # of them, copied from the prefix cache (not forwarded)
        self.next_token: int | None = None  # sampled, forwarded by the next step
        self.done = False

    @property
    def num_ctx(self) -> int:
        return self.options.num_ctx

    @property
    def history(self) -> list[int]:
        """The prompt and the tokens generated so far (EOS excluded); the cache holds its
        first ``cache.length``."""
        return self.counters.history

    @property
    def prefill_left(self) -> int:
        """Prompt tokens not yet in the cache."""
        return len(self.prompt) - self.prefilled

    def prefill_ids(self, max_tokens: int) -> list[int]:
        """The next chunk of the prompt, at most ``max_tokens``."""
        return self.prompt[self.prefilled:self.prefilled + max_tokens]

    def cancelled(self) -> list[GenerationChunk]:
        """The final chunk when the request was cancelled (asked once per step), else []."""
        if not self.should_cancel():
            return []
        return self._end("cancel")

    def restored(self, num_tokens: int, elapsed_ns: int) -> None:
        """The first ``num_tokens`` of the prompt were copied into the cache from the prefix
        cache (krasisd.engine.prefix_cache), in ``elapsed_ns``; at least one is left."""
        if not 0 <= num_tokens < self.prefill_left:
            raise ValueError(f"{num_tokens} restored tokens leave no prompt token to prefill")
        self.prefilled += num_tokens
        self.cached_tokens += num_tokens
        self.counters.prompt_eval_duration_ns += elapsed_ns

    def prefilled_chunk(self, num_tokens: int, logits: torch.Tensor,
                        elapsed_ns: int) -> list[GenerationChunk]:
        """``num_tokens`` more of the prompt are cached; ``logits`` [V] are the last one's.
        After the prompt's last chunk the first token is picked."""
        self.prefilled += num_tokens
        self.counters.prompt_eval_duration_ns += elapsed_ns
        if self.prefill_left:
            return []
        self.counters.prompt_eval_count = len(self.prompt)
        log.debug("prefill done: %d tokens in %.1f ms", len(self.prompt),
                  self.counters.prompt_eval_duration_ns / 1e6)
        return self._take(logits)

    def decoded(self, logits: torch.Tensor, elapsed_ns: int) -> list[GenerationChunk]:
        """``next_token`` was forwarded in a step of ``elapsed_ns``; ``logits`` [V] follow it."""
        self.next_token = None
        self.counters.eval_duration_ns += elapsed_ns
        return self._take(logits)

    def failed(self) -> None:
        """The loop gave up on this sequence (its forward failed)."""
        self.done = True

    def _take(self, logits: torch.Tensor) -> list[GenerationChunk]:
        """Pick the next token: its chunk, then the final chunk if it ends the answer, else
        the token is left in ``next_token`` to forward."""
        reason = self._limit_reached()
        if reason is not None:
            return self._end(reason)
        counters = self.counters
        start_ns = time.perf_counter_ns()
        token_id, logprob, ends = self.pick(logits, counters.history)
        if token_id in self.eos_ids:
            counters.eval_duration_ns += time.perf_counter_ns() - start_ns
            return self._end("stop")
        counters.history.append(token_id)
        counters.eval_count += 1
        text, stopped = self.stops.push(self.decoder.push(token_id) if self.decoder else "")
        counters.eval_duration_ns += time.perf_counter_ns() - start_ns
        chunk = GenerationChunk(token_id=token_id, text=text, logprob=logprob)
        reason = "stop" if stopped or ends else self._limit_reached()
        if reason is not None:
            return [chunk, *self._end(reason)]
        self.next_token = token_id
        return [chunk]

    def _limit_reached(self) -> str | None:
        """"length" when the context or num_predict is used up, else None."""
        if len(self.counters.history) >= self.num_ctx:
            return "length"
        if 0 <= self.options.num_predict <= self.counters.eval_count:
            return "length"
        return None

    def _end(self, reason: str) -> list[GenerationChunk]:
        self.done = True
        self.next_token = None
        text = _final_text(self.decoder, self.stops, stopped=reason == "stop")
        return [self.counters.final(text, reason)]


def generate_stream(
    engine,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
    should_cancel: Callable[[], bool] | None = None,
    pick: Pick | None = None,
    loop_options=None,
    context=None,
) -> Iterator[GenerationChunk]:
    """Stream the continuation of ``prompt_ids`` through the generation loop with this one
    sequence (krasisd.engine.loop.run_alone); raises ValueError for a bad prompt or a
    num_ctx beyond ``context`` (a ContextSpec) at once, before any forward. An Engine's own
    loop options and context spec are the defaults; other engines (test fakes) get plain
    LoopOptions and no context limits."""
    from krasisd.engine.engine import Engine
    from krasisd.engine.loop import ContextSpec, GenerationLoop, LoopOptions, run_alone

    if isinstance(engine, Engine):
        loop_options = loop_options or engine.loop_options()
        context = context or engine.context_spec()
    loop = GenerationLoop(engine, loop_options or LoopOptions(), context or ContextSpec())
    options = replace(options, num_ctx=loop.num_ctx(options.num_ctx))
    return run_alone(loop, Generation(engine, prompt_ids, options, should_cancel, pick))


def _final_text(decoder: StreamDecoder | None, stops: StopStringFilter, stopped: bool) -> str:
    """Text still held back at the end; nothing after a stop string."""
    if stopped and stops.hit:
        return ""
    text, hit = stops.push(decoder.flush() if decoder else "")
    return text if hit else text + stops.flush()
