"""The grammars a request asks for (krasisd.grammars): Ollama's format and OpenAI's
response_format; bad schemas are one-line ValueErrors naming the problem."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import krasis_registry
import llguidance
import pytest

from krasisd.grammars import format_grammar, json_schema_grammar, response_format_grammar

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _accepts(grammar: str, text: str) -> bool:
    """Whether ``text``, tokenized by krasis-tiny's tokenizer, is a whole sentence of
    ``grammar`` (llguidance's matcher)."""
    tokenizer = _tiny_tokenizer()
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


@functools.cache
def _tiny_tokenizer() -> llguidance.LLTokenizer:
    folder = pathlib.Path(krasis_registry.__file__).parent / "bundled" / "krasis-tiny"
    return llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), eos_token=1)


def test_the_daemon_side_needs_no_torch():
    code = "import sys, krasisd.grammars; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("text, ok", [
    ('{"name": "Ada"}', True), ('{"name": 5}', False), ("{}", False), ('{"name": "Ada"} ', False),
])
def test_a_schema_grammar_accepts_exactly_its_documents(text, ok):
    assert _accepts(json_schema_grammar(SCHEMA), text) is ok


@pytest.mark.parametrize("text, ok", [
    ('{"a": [1, {"b": null}], "c": "x"}', True), ("[1]", False), ('"s"', False),
    ('{\n  "a": [\n    1\n  ]\n}', True), ('{ "a" : 1 }', True), ('{"a":1}', True),
    ('{"a":\n' + " " * 20 + "1}", True), ('{"a":\n' + " " * 21 + "1}", False),
    ('{"a":  1}', False), ('{"a":\n\n1}', False), ('{"a":\t1}', False),
])
def test_format_json_is_any_object_with_llama_cpp_whitespace(text, ok):
    assert _accepts(format_grammar("json"), text) is ok

@pytest.mark.parametrize("schema, message", [
    ([1, 2], "must be a JSON object, got an array"),
    ("string", "must be a JSON object, got a string"),
    ({"type": "strin"}, "Invalid type: strin"),
    ({"type": 5}, "type must be a string"),
    ({"properties": {"a": {"$ref": "#/defs/missing"}}}, "/defs/missing"),
    ({"type": "string", "pattern": "[a"}, "unclosed character class"),
    ({"type": "string", "format": "wat"}, "Unknown format: wat"),
    ({"not": {"type": "string"}}, "Unimplemented keys"),
])
def test_invalid_schemas_are_clear_value_errors(schema, message):
    with pytest.raises(ValueError, match="invalid JSON schema|must be a JSON object") as info:
        json_schema_grammar(schema)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), ("json", "grammar"), ({"type": "object"}, "grammar"),
    ("yaml", ValueError), (5, ValueError),
])
def test_ollama_format_values(value, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match='format must be "json" or a JSON schema'):
            format_grammar(value)
    elif expected is None:
        assert format_grammar(value) is None
    else:
        assert isinstance(format_grammar(value), str)


@pytest.mark.parametrize("value, expected", [
    (None, None), ({"type": "text"}, None), ({"type": "json_object"}, "grammar"),
    ({"type": "json_schema", "json_schema": {"name": "u", "schema": SCHEMA}}, "grammar"),
    ({"type": "json_schema"}, "needs 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "x"}}},
     "invalid JSON schema"),
    ({"type": "xml"}, "type must be 'text'"),
    ("json", "must be an object"),
])
def test_openai_response_format_values(value, expected):
    if expected is None:
        assert response_format_grammar(value) is None
    elif expected == "grammar":
        assert isinstance(response_format_grammar(value), str)
    else:
        with pytest.raises(ValueError, match=expected):
            response_format_grammar(value)


