"""Grammar-constrained decoding (krasisd.engine.constrained): the bundled krasis-tiny's answers
under a JSON schema always parse and validate, over several seeds; the bitmask is applied
exactly; only generated tokens reach the matcher; EOS waits for a complete answer."""

from __future__ import annotations

import json
import pathlib
import re

import krasis_registry
import numpy as np
import pytest
import torch

from krasisd.engine.chat import encode_chat
from krasisd.engine.constrained import GrammarPick, apply_bitmask, generate_constrained
from krasisd.engine.options import SamplingOptions
from krasisd.grammars import (
    format_grammar,
    json_object_grammar,
    json_schema_grammar,
)

MODEL_DIR = pathlib.Path(krasis_registry.__file__).parent / "bundled" / "krasis-tiny"
ROLES = ["admin", "user", "guest"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "role": {"enum": ROLES},
    },
    "required": ["name", "age", "active", "tags", "role"],
    "additionalProperties": False,
}
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def engine():
    from krasisd.engine import load

    torch.set_num_threads(1)
    engine = load(MODEL_DIR, quant="none", device="cpu", threads=1, dtype=torch.float32)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt(engine):
    return encode_chat(engine.tokenizer, [
        {"role": "user", "content": "Describe a user as JSON with name, age and tags."}])


def _answer(engine, prompt, grammar, **options):
    chunks = list(generate_constrained(
        engine, prompt, SamplingOptions(num_ctx=2048, num_predict=600, **options), grammar))
    return "".join(c.text for c in chunks), chunks[-1]


def _check_against_schema(value) -> None:
    """SCHEMA checked by hand (no JSON-schema validator is a dependency)."""
    assert isinstance(value, dict)
    assert set(SCHEMA["required"]) <= set(value) <= set(SCHEMA["properties"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert type(value["active"]) is bool
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in value["tags"])
    assert value["role"] in ROLES
    if "score" in value:
        assert type(value["score"]) in (int, float)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sampled_answers_validate_against_the_schema(engine, prompt, seed):
    text, last = _answer(engine, prompt, json_schema_grammar(SCHEMA), seed=seed, **SAMPLED)
    assert last.done_reason == "stop", text
    _check_against_schema(json.loads(text))


def test_greedy_answer_validates_and_repeats(engine, prompt):
    grammar = json_schema_grammar(SCHEMA)
    first, last = _answer(engine, prompt, grammar, temperature=0)
    again, _ = _answer(engine, prompt, grammar, temperature=0)
    assert last.done_reason == "stop" and first == again
    _check_against_schema(json.loads(first))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_format_json_gives_one_object(engine, prompt, seed):
    text, last = _answer(engine, prompt, format_grammar("json"), seed=seed, **SAMPLED)
    assert last.done_reason == "stop", text
    assert isinstance(json.loads(text), dict)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert all(re.fullmatch(r" |\n[ \t]{0,20}", run) for run in re.findall(r"\s+", outside_strings))


def test_end_of_sequence_is_refused_until_the_object_is_complete(engine, prompt):
    tok = engine.tokenizer
    eos = next(iter(engine.eos_token_ids))
    [brace], [close] = tok.encode("{", add_special_tokens=False), tok.encode("}", False)
    pick = GrammarPick(engine, json_object_grammar(), SamplingOptions(temperature=0),
                       prompt_length=len(prompt))
    logits = torch.zeros(engine.config.vocab_size)  # [V]
    logits[eos], logits[brace], logits[close] = 100.0, 10.0, 5.0
    token_id, logprob, ends = pick(logits, list(prompt))
    assert (token_id, ends) == (brace, False)
    assert -1e-3 < logprob <= 0  # under the masked distribution, where EOS has no mass
    token_id, _, ends = pick(logits, [*prompt, brace])
    assert (token_id, ends) == (close, True)


def test_only_generated_tokens_reach_the_matcher(engine, prompt):
    """The prompt (which starts with the special <|bos|>) is not fed; a token the loop
    appended to the history after the prompt is."""
    tok = engine.tokenizer
    assert prompt[0] == tok.bos_token_id
    brace = tok.encode("{", add_special_tokens=False)
    pick = GrammarPick(engine, json_object_grammar(), SamplingOptions(temperature=0))
    logits = torch.zeros(engine.config.vocab_size)  # [V]
    logits[brace] = 50.0  # the model wants "{" again and again
    token_id, _, _ = pick(logits, list(prompt) + brace)  # first call: this history is the prompt
    assert tok.decode([token_id]).lstrip().startswith("{")
    pick = GrammarPick(engine, json_object_grammar(), SamplingOptions(temperature=0),
                       prompt_length=len(prompt))
    token_id, _, _ = pick(logits, list(prompt) + brace)  # "{" already generated: no second one
    assert pick.consumed == 2
    assert not tok.decode([token_id]).strip().startswith("{")


class PaddedEngine:
    """krasis-tiny's tokenizer under a model whose logits have 52 padding rows."""

    def __init__(self, tokenizer, eos_ids):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_ids
        self.config = type("Config", (), {"vocab_size": 2100})()


def test_padding_rows_of_the_logits_are_never_picked(engine):
    padded = PaddedEngine(engine.tokenizer, engine.eos_token_ids)
    pick = GrammarPick(padded, json_object_grammar(), SamplingOptions(temperature=0))
    logits = torch.zeros(2100)  # [V]
    logits[2048:] = 100.0
    token_id, _, _ = pick(logits, [0])
    assert token_id < 2048 and engine.tokenizer.decode([token_id]).strip().startswith("{")


def test_a_lost_history_is_an_error(engine, prompt):
    pick = GrammarPick(engine, json_object_grammar(), SamplingOptions(temperature=0),
                       prompt_length=len(prompt))
    logits = torch.zeros(engine.config.vocab_size)  # [V]
    pick(logits, list(prompt))
    with pytest.raises(ValueError, match="lost generated tokens"):
        pick(logits, list(prompt)[:-1])


@pytest.mark.parametrize("vocab, allowed", [
    (70, [0, 5, 31, 32, 63, 64, 69]),  # sparse
    (70, [i for i in range(70) if i not in (3, 40)]),  # nearly full
    (100, [1, 2, 65]),  # the mask covers 96 ids: the last 4 are refused
    (1000, list(range(0, 1000, 3))),
])
def test_apply_bitmask_matches_the_bits(vocab, allowed):
    words = -(-min(vocab, 96 if vocab == 100 else vocab) // 32)
    bits = np.zeros(words * 32, np.bool_)
    bits[allowed] = True
    bitmask = np.packbits(bits, bitorder="little").view(np.int32)
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0))  # [V]
    expected = torch.full((vocab,), float("-inf"))
    expected[allowed] = logits[allowed]
    before = logits.clone()
    assert torch.equal(apply_bitmask(logits, bitmask), expected)
    assert torch.equal(apply_bitmask(logits, torch.from_numpy(bitmask)), expected)
    assert torch.equal(logits, before)  # the caller's logits are untouched
