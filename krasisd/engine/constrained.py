"""Structured output: each token drawn from the model's distribution restricted, by a grammar,
to the tokens that keep the answer valid (a JSON schema, any JSON object, Ollama's "json").

The grammar engine is llguidance (a Rust library with no Python dependencies); the grammars
come from krasisd.grammars (a JSON schema, any JSON object). At every step the matcher
writes a bitmask of the allowed token ids (one bit per id, int32 words). :class:`GrammarPick`
is a ``pick`` for the one generation loop (krasisd.engine.generate's ``Pick``): it masks
the logits with that bitmask,
draws with the request's :class:`~krasisd.engine.sampling.Sampler` (greedy at temperature 0),
feeds the drawn token to the matcher and ends the answer as soon as the grammar is complete.
Only generated tokens reach the matcher, never the prompt's. An end-of-sequence token is
allowed only where the grammar could end.

Limits: stop strings are not applied (they could cut the JSON); an answer cut by
``num_predict`` or the context is left incomplete. The bench bench/grammar_mask.py
measures the per-step mask cost (docs/api.md has the numbers).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Iterator

import llguidance
import numpy as np
import torch

from krasisd.engine.generate import generate_stream
from krasisd.engine.options import GenerationChunk, SamplingOptions
from krasisd.engine.sampling import Sampler
from krasisd.grammars import LIMITS, one_line

# per engine, for the engine's life (an id() key could be reused by a later engine)
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(engine) -> llguidance.LLTokenizer:
    """llguidance's view of the engine's tokenizer (built once per engine: token bytes and a
    trie over the vocabulary), sized to the model's logits, ending on its EOS ids."""
    cached = _TOKENIZERS.get(engine)
    if cached is not None:
        return cached
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("structured output needs the model's tokenizer, and this model has none")
    eos_ids = sorted(engine.eos_token_ids or ())
    if not eos_ids:
        raise ValueError("structured output needs the model's end-of-sequence token")
    model_vocab = getattr(getattr(engine, "config", None), "vocab_size", None) or 0
    size = max(model_vocab, tokenizer.vocab_size)
    try:
        built = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=size, eos_token=eos_ids)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"the model's tokenizer cannot drive a grammar: {exc}") from exc
    _TOKENIZERS[engine] = built
    return built


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A copy of ``logits`` [V] with -inf wherever ``bitmask`` (int32 words, bit i of word w =
    token 32*w + i) is 0; ids past the mask are disallowed.

    Touches only the smaller of the allowed and refused sets by index: at 151K tokens that is
    ~0.05 ms for a sparse or a nearly full mask, where a full masked_fill takes ~0.15 ms.
    """
    vocab = logits.numel()
    words = bitmask.numpy() if isinstance(bitmask, torch.Tensor) else bitmask
    allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].view(np.bool_)
    if allowed.size < vocab:  # a mask shorter than the logits: the rest is refused
        allowed = np.concatenate([allowed, np.zeros(vocab - allowed.size, np.bool_)])
    if 2 * np.count_nonzero(allowed) <= vocab:
        keep = torch.from_numpy(np.flatnonzero(allowed))  # [A]
        masked = torch.full_like(logits, float("-inf"))  # [V]
        masked[keep] = logits[keep]
        return masked
    refuse = torch.from_numpy(np.flatnonzero(~allowed))  # [V - A]
    masked = logits.clone()  # [V]
    masked[refuse] = float("-inf")
    return masked


class GrammarPick:
    """The generation loop's ``pick`` under a grammar: (logits [V], history ids) ->
    (token id, logprob, whether the grammar is complete). One per generation."""

    def __init__(self, engine, grammar: str, options: SamplingOptions,
                 prompt_length: int | None = None):
        self.tokenizer = grammar_tokenizer(engine)
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=LIMITS)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {one_line(self.matcher.get_error())}")
        self.sampler = Sampler(options)
        self.eos_ids = set(self.tokenizer.eos_tokens)
        self.prompt_length = prompt_length  # None: the history of the first call is the prompt
        self.consumed = 0  # generated tokens fed to the matcher
        self._bitmask = np.zeros((self.tokenizer.vocab_size + 31) // 32, np.int32)

    @property
    def complete(self) -> bool:
        """The answer so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> tuple[int, float, bool]:
        if self.prompt_length is None:
            self.prompt_length = len(history)
        self._catch_up(history)
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._check_matcher()
        masked = apply_bitmask(logits.detach().to("cpu", torch.float32), self._bitmask)  # [V]
        token_id, logprob = self.sampler.sample(masked, history)
        if token_id in self.eos_ids:
            return token_id, logprob, True
        self._consume(token_id)
        return token_id, logprob, self.matcher.is_stopped()

    def _catch_up(self, history: list[int]) -> None:
        """Feed the matcher generated tokens it has not seen (the loop appends each pick)."""
        generated = len(history) - self.prompt_length
        if generated < self.consumed:
            raise ValueError(
                f"the history lost generated tokens: {generated} after the prompt, "
                f"{self.consumed} consumed")
        for token_id in history[self.prompt_length + self.consumed:]:
            self._consume(token_id)

    def _consume(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} breaks the grammar: "
                             f"{one_line(self.matcher.get_error())}")
        self.consumed += 1

    def _check_matcher(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"the grammar failed: {one_line(self.matcher.get_error())}")


def grammar_mode(engine, options: SamplingOptions, grammar: str
                 ) -> tuple[SamplingOptions, GrammarPick]:
    """The options (stop strings off) and the ``pick`` of a generation kept to ``grammar``,
    for a Generation of the loop (its history starts with the prompt, so the pick takes the
    history of its first call as the prompt)."""
    options = dataclasses.replace(options, stop=[])
    return options, GrammarPick(engine, grammar, options)


def generate_constrained(engine, prompt_ids: list[int], options: SamplingOptions,
                         grammar: str, should_cancel: Callable[[], bool] | None = None,
                         ) -> Iterator[GenerationChunk]:
    """The engine's generation loop (same prompt checks, counters and limits) with every token
    kept to ``grammar``; stop strings are not applied. Through ``engine.generate(..., pick=)``
    when the engine takes ``pick`` (a batching engine then counts this stream), else the loop."""
    options, pick = grammar_mode(engine, options, grammar)
    pick.prompt_length = len(prompt_ids)
    should_cancel = should_cancel or (lambda: False)
    if _generate_takes_pick(engine):
        return engine.generate(prompt_ids, options, should_cancel=should_cancel, pick=pick)
    return generate_stream(engine, prompt_ids, options, should_cancel, pick=pick)


def _generate_takes_pick(engine) -> bool:
    generate = getattr(engine, "generate", None)
    if not callable(generate):
        return False
    try:
        return "pick" in inspect.signature(generate).parameters
    except (TypeError, ValueError):
        return False
