"""format "json": the JSON-prefix automaton and the constrained generation loop."""

from __future__ import annotations

import json

import pytest
import torch

from krasisd.engine.loop import decode_one_by_one
from krasisd.engine.options import SamplingOptions
from krasisd.jsonmode import MAX_WHITESPACE, JsonPrefix, generate_json

VALID = ['{}', '{"a":1}', ' {"k" : [ ] }', '{"a": [1, 2.5e-3, -0, true, false, null, "\\u00e9\\n"]}',
         '{"b": {"c": {"d": [[], [{}]]}}, "e": -12.75E+2}']
INVALID = ['[1]', '{a:1}', '{"a":01}', '{"a":1,}', '{"a" 1}', '{"a":tru }', '{"a":"\n"}', '{}x',
           '{"a":1.}', '{"a":-}', '{' + ' ' * (MAX_WHITESPACE + 1) + '}', '{"a":"\\x"}', '"s"']
PREFIXES = ['{"a":1', '{"a": [1, 2', '{"a":"\\u00', '{"x":nu', '{"k"', '{']


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_complete(text):
    json.loads(text)
    state = JsonPrefix().feed(text)
    assert state is not None and state.done


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_refused(text):
    state = JsonPrefix().feed(text)
    assert state is None or not state.done


@pytest.mark.parametrize("text", PREFIXES)
def test_prefixes_stay_open(text):
    state = JsonPrefix().feed(text)
    assert state is not None and not state.done


class JsonishTokenizer:
    """Tokens are small strings, several of them never valid where they would be drawn."""

    pieces = ["{", "}", '"a"', '"bc"', ":", "1", "-2.5", ",", " ", "[", "]", "x", "true", "<eos>",
              "}}", '"', "null"]
    eos_token_ids = {13}
    vocab_size = len(pieces)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [0]


class RandomLogitsEngine:
    """Logits drawn from a seeded generator that favour the invalid tokens."""

    def __init__(self, seed: int):
        self.tokenizer = JsonishTokenizer()
        self.eos_token_ids = {13}
        self.generator = torch.Generator().manual_seed(seed)

    def new_cache(self, max_tokens):
        return None

    def forward(self, ids, cache, last_only=False):
        logits = torch.randn(len(ids), self.tokenizer.vocab_size, generator=self.generator)
        logits[:, [11, 13, 14]] += 3.0  # "x", EOS and "}}" look attractive
        return logits  # [T, V]

    decode_batch = decode_one_by_one


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_generation_yields_json(seed, temperature):
    engine = RandomLogitsEngine(seed)
    options = SamplingOptions(temperature=temperature, seed=seed, num_predict=400, top_k=0,
                              top_p=1.0, repeat_penalty=1.0)
    chunks = list(generate_json(engine, [0], options, lambda: False))
    text = "".join(c.text for c in chunks)
    final = chunks[-1]
    assert JsonPrefix().feed(text) is not None
    if final.done_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert final.done_reason == "length" and final.eval_count == 400
    assert final.eval_count == len(chunks) - 1
    assert all(c.logprob is not None and c.logprob <= 0 for c in chunks[:-1])


def test_constrained_generation_cancels():
    # asked once per loop step, as in plain generation: the prompt's step (token 1), the
    # steps of tokens 2 and 3, then cancelled
    engine = RandomLogitsEngine(0)
    calls = iter([False, False, False, True])
    chunks = list(generate_json(engine, [0], SamplingOptions(num_predict=50, seed=0),
                                lambda: next(calls)))
    assert chunks[-1].done_reason == "cancel" and chunks[-1].eval_count == 3
