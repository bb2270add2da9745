"""format "json" runs the plain generation loop: same prompt errors, one forward per token."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from krasisd.engine.generate import generate_stream
from krasisd.engine.loop import decode_one_by_one
from krasisd.engine.options import SamplingOptions
from krasisd.jsonmode import _VOCAB_CACHE, JsonPrefix, generate_json, token_texts

PIECES = ["{", "}", '"a"', ":", "1", ",", "[", "]", " ", "<eos>", "x"]
EOS = PIECES.index("<eos>")


class PieceTokenizer:
    vocab_size = len(PIECES)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(PIECES[i] for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [0]


class VocabConfig:
    vocab_size = len(PIECES)


class RankedEngine:
    """Every position has the same logits, ranking ``order`` first to last; counts forwards."""

    def __init__(self, order: list[str]):
        self.tokenizer = PieceTokenizer()
        self.config = VocabConfig()
        self.eos_token_ids = {EOS}
        self.logits = torch.full((len(PIECES),), -10.0)  # [V]
        for rank, piece in enumerate(order):
            self.logits[PIECES.index(piece)] = 10.0 - rank
        self.forwards = 0

    def new_cache(self, max_tokens):
        return None

    def forward(self, ids, cache, last_only=False):
        self.forwards += 1
        return self.logits.expand(len(ids), -1).clone()  # [T, V]

    decode_batch = decode_one_by_one


# "[" and "x" can never open the object; after "{" "a" ":" the arrays nest without end
NEVER_CLOSES = ["[", "x", "<eos>", "{", '"a"', ":"]
# after "{": "}" closes it at once
CLOSES = ["x", "<eos>", "}", "{"]
GREEDY = dict(temperature=0, repeat_penalty=1.0, top_k=0, top_p=1.0)


def _collect(stream):
    chunks = list(stream)
    return chunks[:-1], chunks[-1]


@pytest.mark.parametrize("prompt, num_ctx, match", [
    ([], 16, "prompt is empty"),
    ([0] * 17, 16, "more than the context window"),
    ([0, -1], 16, "non-negative ints"),
    ([0, len(PIECES)], 16, "the vocabulary has"),
])
def test_json_mode_gets_the_plain_prompt_errors(prompt, num_ctx, match):
    options = SamplingOptions(num_ctx=num_ctx, **GREEDY)
    messages = []
    for generate in (generate_stream, generate_json):
        engine = RankedEngine(NEVER_CLOSES)
        with pytest.raises(ValueError, match=match) as info:
            list(generate(engine, prompt, options, lambda: False))
        messages.append(str(info.value))
        assert engine.forwards == 0
    assert messages[0] == messages[1]


@pytest.mark.parametrize("num_predict", [1, 2, 5, 9])
def test_num_predict_n_costs_n_forwards(num_predict):
    options = SamplingOptions(num_predict=num_predict, **GREEDY)
    engine = RankedEngine(NEVER_CLOSES)
    chunks, final = _collect(generate_json(engine, [0, 0], options, lambda: False))
    assert final.done_reason == "length" and final.eval_count == num_predict == len(chunks)
    assert engine.forwards == num_predict  # the prompt's, then one per token but the last
    text = "".join(c.text for c in chunks) + final.text
    assert text == "".join((["{", '"a"', ":"] + ["["] * num_predict)[:num_predict])
    assert JsonPrefix().feed(text) is not None
    plain = RankedEngine(NEVER_CLOSES)
    list(generate_stream(plain, [0, 0], options, lambda: False))
    assert plain.forwards == engine.forwards


def test_context_end_costs_no_extra_forward():
    options = SamplingOptions(num_ctx=6, **GREEDY)
    engine = RankedEngine(NEVER_CLOSES)
    chunks, final = _collect(generate_json(engine, [0, 0], options, lambda: False))
    assert final.done_reason == "length" and len(chunks) == 4
    assert engine.forwards == 4


def test_closing_the_object_ends_with_stop_and_valid_json():
    engine = RankedEngine(CLOSES)
    options = SamplingOptions(num_predict=50, stop=["}"], **GREEDY)  # stop strings not applied
    chunks, final = _collect(generate_json(engine, [0], options, lambda: False))
    text = "".join(c.text for c in chunks) + final.text
    assert final.done_reason == "stop" and json.loads(text) == {}
    assert [c.token_id for c in chunks] == [PIECES.index("{"), PIECES.index("}")]
    assert engine.forwards == 2 == final.eval_count  # none after the closing token


def test_cancel_before_the_prompt_runs_nothing():
    engine = RankedEngine(NEVER_CLOSES)
    chunks, final = _collect(generate_json(engine, [0], SamplingOptions(**GREEDY),
                                           lambda: True))
    assert chunks == [] and final.done_reason == "cancel" and engine.forwards == 0


def test_json_mode_needs_a_tokenizer():
    engine = RankedEngine(NEVER_CLOSES)
    engine.tokenizer = None
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        generate_json(engine, [0], SamplingOptions(**GREEDY), lambda: False)


def test_token_texts_live_as_long_as_their_engine():
    engine = RankedEngine(CLOSES)
    assert token_texts(engine) == PIECES
    assert token_texts(engine) is token_texts(engine)  # decoded once
    entries = len(_VOCAB_CACHE)
    del engine
    gc.collect()
    assert len(_VOCAB_CACHE) == entries - 1
