"""format "json": generation constrained so the answer is one JSON object.

How (kept honest, see docs/api.md): :class:`JsonPick` is the ``pick`` of the one generation
loop (krasisd.engine.generate), so prompt checks, counters and limits are the plain ones.
At every step the sampler draws a token as usual; if
that token's text cannot continue a valid JSON object (checked by :class:`JsonPrefix`, a
character-level pushdown automaton), its logit is set to -inf and the sampler draws again.
This samples exactly from the model's distribution restricted to valid continuations. The
generation ends as soon as the top-level object is closed (done_reason "stop"); it can
still end early on ``num_predict`` or ``num_ctx`` ("length"), leaving the object unclosed.
Token texts are the tokenizer's decoding of each token alone; runs of whitespace are capped
(``MAX_WHITESPACE``) so a model cannot pad forever. Stop strings are not applied.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator

import torch

from krasisd.engine.generate import generate_stream
from krasisd.engine.options import GenerationChunk, SamplingOptions
from krasisd.engine.sampling import Sampler

MAX_WHITESPACE = 16
_MAX_DRAWS = 32
_WS = " \t\n\r"
_NUMBER_NEXT = {  # number sub-state -> {character class: next sub-state}
    "sign": {"0": "zero", "d": "int"},
    "zero": {".": "dot", "e": "exp"},
    "int": {"0": "int", "d": "int", ".": "dot", "e": "exp"},
    "dot": {"0": "frac", "d": "frac"},
    "frac": {"0": "frac", "d": "frac", "e": "exp"},
    "exp": {"0": "exp_digits", "d": "exp_digits", "+": "exp_sign", "-": "exp_sign"},
    "exp_sign": {"0": "exp_digits", "d": "exp_digits"},
    "exp_digits": {"0": "exp_digits", "d": "exp_digits"},
}
_NUMBER_COMPLETE = {"zero", "int", "frac", "exp_digits"}


class JsonPrefix:
    """Immutable state of a JSON object read so far; ``feed`` returns a new state or None."""

    __slots__ = ("mode", "stack", "aux", "spaces")

    def __init__(self, mode: str = "start", stack: tuple = (), aux: str = "", spaces: int = 0):
        self.mode = mode  # start, value, key_or_end, key, colon, after, string, number, literal, done
        self.stack = stack  # open containers: "{" or "["
        self.aux = aux  # string: "k"/"v" + escape state; number: sub-state; literal: rest
        self.spaces = spaces  # consecutive whitespace characters

    @property
    def done(self) -> bool:
        return self.mode == "done"

    def feed(self, text: str) -> JsonPrefix | None:
        state: JsonPrefix | None = self
        for char in text:
            state = state._step(char)
            if state is None:
                return None
        return state

    def _step(self, c: str) -> JsonPrefix | None:
        mode = self.mode
        if mode == "string":
            return self._string(c)
        if mode == "number":
            nxt = _NUMBER_NEXT[self.aux].get("0" if c == "0" else "d" if c.isdigit() and
                                             c.isascii() else c.lower() if c in "eE" else c)
            if nxt is not None:
                return JsonPrefix("number", self.stack, nxt)
            if self.aux not in _NUMBER_COMPLETE:
                return None
            return JsonPrefix("after", self.stack)._step(c)
        if mode == "literal":
            if c != self.aux[0]:
                return None
            rest = self.aux[1:]
            return JsonPrefix("literal", self.stack, rest) if rest else self._closed_value()
        if c in _WS:
            if mode == "done" or self.spaces >= MAX_WHITESPACE:
                return None
            return JsonPrefix(mode, self.stack, self.aux, self.spaces + 1)
        return self._structural(c)

    def _structural(self, c: str) -> JsonPrefix | None:
        mode, stack = self.mode, self.stack
        if mode == "start":
            return JsonPrefix("key_or_end", ("{",)) if c == "{" else None
        if mode in ("key_or_end", "key") and c == '"':
            return JsonPrefix("string", stack, "k")
        if mode == "key_or_end" and c == "}":
            return JsonPrefix("after", stack[:-1])._closed_container()
        if mode == "colon":
            return JsonPrefix("value", stack) if c == ":" else None
        if mode in ("value", "value_or_end"):
            if mode == "value_or_end" and c == "]":
                return JsonPrefix("after", stack[:-1])._closed_container()
            return self._value_start(c)
        if mode == "after":
            return self._after(c)
        return None

    def _value_start(self, c: str) -> JsonPrefix | None:
        stack = self.stack
        if c == '"':
            return JsonPrefix("string", stack, "v")
        if c == "{":
            return JsonPrefix("key_or_end", stack + ("{",))
        if c == "[":
            return JsonPrefix("value_or_end", stack + ("[",))
        if c == "-":
            return JsonPrefix("number", stack, "sign")
        if c.isascii() and c.isdigit():
            return JsonPrefix("number", stack, "zero" if c == "0" else "int")
        for word in ("true", "false", "null"):
            if c == word[0]:
                return JsonPrefix("literal", stack, word[1:])
        return None

    def _after(self, c: str) -> JsonPrefix | None:
        top = self.stack[-1] if self.stack else None
        if c == "," and top == "{":
            return JsonPrefix("key", self.stack)
        if c == "," and top == "[":
            return JsonPrefix("value", self.stack)
        if (c == "}" and top == "{") or (c == "]" and top == "["):
            return JsonPrefix("after", self.stack[:-1])._closed_container()
        return None

    def _closed_container(self) -> JsonPrefix:
        return JsonPrefix("done") if not self.stack else self

    def _closed_value(self) -> JsonPrefix:
        return JsonPrefix("after", self.stack)

    def _string(self, c: str) -> JsonPrefix | None:
        role, escape = self.aux[0], self.aux[1:]
        if escape == "\\":
            if c == "u":
                return JsonPrefix("string", self.stack, role + "u0")
            return JsonPrefix("string", self.stack, role) if c in '"\\/bfnrt' else None
        if escape.startswith("u"):
            if c not in "0123456789abcdefABCDEF":
                return None
            count = int(escape[1]) + 1
            return JsonPrefix("string", self.stack, role + (f"u{count}" if count < 4 else ""))
        if c == '"':
            return JsonPrefix("colon", self.stack) if role == "k" else self._closed_value()
        if c == "\\":
            return JsonPrefix("string", self.stack, role + "\\")
        return None if ord(c) < 0x20 else self


# per engine, for the engine's life: an id() key could be reused by a later engine whose
# vocabulary differs
_VOCAB_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(engine) -> list[str]:
    """Each token's text decoded alone (cached per engine)."""
    texts = _VOCAB_CACHE.get(engine)
    if texts is None:
        tokenizer = engine.tokenizer
        size = getattr(getattr(engine, "config", None), "vocab_size", None) or tokenizer.vocab_size
        texts = _VOCAB_CACHE[engine] = [tokenizer.decode([i]) for i in range(size)]
    return texts


def _pick(sampler: Sampler, logits: torch.Tensor, history: list[int], state: JsonPrefix,
          texts: list[str], eos_ids: set[int]) -> tuple[int, float, JsonPrefix]:
    """Draw until a token keeps the text a valid prefix; after a few draws, take the best."""
    masked = logits.clone()  # [V]
    for _ in range(_MAX_DRAWS):
        token_id, logprob = sampler.sample(masked, history)
        nxt = None if token_id in eos_ids or token_id >= len(texts) else \
            state.feed(texts[token_id])
        if nxt is not None and texts[token_id]:
            return token_id, logprob, nxt
        masked[token_id] = float("-inf")
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [V]
    for token_id in torch.argsort(masked, descending=True).tolist():
        if token_id < len(texts) and token_id not in eos_ids and texts[token_id]:
            nxt = state.feed(texts[token_id])
            if nxt is not None:
                return token_id, float(log_probs[token_id]), nxt
    raise ValueError("no token of this model's vocabulary can continue the JSON answer")


class JsonPick:
    """The generation loop's ``pick`` for format "json": a sampler draw kept to valid JSON,
    ending the answer when the top-level object closes."""

    def __init__(self, engine, options: SamplingOptions):
        if engine.tokenizer is None:
            raise ValueError('format "json" needs the model\'s tokenizer, and this model has none')
        self.engine = engine
        self.sampler = Sampler(options)
        self.eos_ids = set(engine.eos_token_ids or ())
        self.state = JsonPrefix()
        self._texts: list[str] | None = None  # decoded at the first pick, after the prompt check

    def __call__(self, logits: torch.Tensor, history: list[int]) -> tuple[int, float, bool]:
        if self._texts is None:
            self._texts = token_texts(self.engine)
        token_id, logprob, self.state = _pick(self.sampler, logits, history, self.state,
                                              self._texts, self.eos_ids)
        return token_id, logprob, self.state.done


def json_mode(engine, options: SamplingOptions) -> tuple[SamplingOptions, JsonPick]:
    """The options (stop strings off) and the ``pick`` of a format "json" generation."""
    options = dataclasses.replace(options, stop=[])
    return options, JsonPick(engine, options)


def generate_json(engine, prompt_ids: list[int], options: SamplingOptions,
                  should_cancel: Callable[[], bool]) -> Iterator[GenerationChunk]:
    """The generation loop with one sequence (krasisd.engine.generate.generate_stream: same
    prompt checks, counters and limits), every answer a prefix of one JSON object; stop
    strings are not applied. A runner builds the same Generation from ``json_mode``."""
    options, pick = json_mode(engine, options)
    return generate_stream(engine, prompt_ids, options, should_cancel, pick=pick)
