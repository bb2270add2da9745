"""Structured output: each token drawn from the model's distribution restricted, by a grammar,
to the tokens that keep the answer valid (a JSON schema, any JSON object, Ollama's "json").

The grammar engine is llguidance (a Rust library with no Python dependencies): it compiles a
JSON schema into a grammar, and at every step its matcher writes a bitmask of the allowed
token ids (one bit per id, int32 words). :class:`GrammarPick` is a ``pick`` for the one
generation loop (krasisd.engine.generate's ``Pick``): it masks the logits with that bitmask,
draws with the request's :class:`~krasisd.engine.sampling.Sampler` (greedy at temperature 0),
feeds the drawn token to the matcher and ends the answer as soon as the grammar is complete.
Only generated tokens reach the matcher, never the prompt's. An end-of-sequence token is
allowed only where the grammar could end.

Limits: runs of JSON whitespace are capped at ``MAX_WHITESPACE`` characters (a small model
can otherwise pad forever); stop strings are not applied (they could cut the JSON); an answer
cut by ``num_predict`` or the context is left incomplete. The bench bench/grammar_mask.py
measures the per-step mask cost (docs/api.md has the numbers).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import llguidance
import numpy as np
import torch

from krasisd.engine.generate import generate_stream
from krasisd.engine.options import GenerationChunk, SamplingOptions
from krasisd.engine.sampling import Sampler

MAX_WHITESPACE = 16
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# JSON's four whitespace characters, at most MAX_WHITESPACE in a row between two tokens
_WHITESPACE = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}"}
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors name no parser state


def json_schema_grammar(schema: Any) -> str:
    """The llguidance grammar of answers that are JSON documents valid under ``schema``.

    Raises ValueError, naming the problem, for anything that is not a usable JSON schema:
    a non-object, an unknown type, a broken ``$ref`` or regex, an unsupported keyword.
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"a JSON schema must be a JSON object, got {_json_type(schema)}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=_WHITESPACE)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid JSON schema: {exc}") from exc
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=_LIMITS)
    if error:
        raise ValueError(f"invalid JSON schema: {_one_line(error)}")
    return grammar


def json_object_grammar() -> str:
    """Answers that are one JSON object, of any keys and values (format "json", json_object)."""
    return json_schema_grammar(JSON_OBJECT_SCHEMA)


def format_grammar(fmt: Any) -> str | None:
    """Ollama's ``format``: None or "" = free text, "json" = one JSON object, an object = a
    JSON schema. Anything else is a ValueError."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_object_grammar()
    if isinstance(fmt, Mapping):
        return json_schema_grammar(fmt)
    raise ValueError(f'format must be "json" or a JSON schema object, got {fmt!r}')


def response_format_grammar(response_format: Any) -> str | None:
    """OpenAI's ``response_format``: {"type": "text"} = free text, {"type": "json_object"},
    or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ValueError("response_format json_schema needs 'json_schema': {'name', 'schema'}")
        return json_schema_grammar(spec["schema"])
    raise ValueError(
        f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


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
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {_one_line(self.matcher.get_error())}")
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
                             f"{_one_line(self.matcher.get_error())}")
        self.consumed += 1

    def _check_matcher(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"the grammar failed: {_one_line(self.matcher.get_error())}")


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


def _one_line(message: str, max_chars: int = 300) -> str:
    """llguidance's multi-line messages (a regex error draws a caret under the pattern) as
    one line: "regex parse error: [a: error: unclosed character class"."""
    lines = [line.strip().rstrip(":") for line in message.splitlines()]
    text = ": ".join(line for line in lines if line and set(line) != {"^"})
    return (text[:max_chars] + "...") if len(text) > max_chars else text or "unknown error"


def _json_type(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number",
            list: "an array", type(None): "null"}.get(type(value), type(value).__name__)
