"""Which grammar a request asks for: Ollama's ``format`` ("json" or a JSON schema) and OpenAI's
``response_format`` (json_object, json_schema) as llguidance grammars, checked.

This module imports llguidance only (no torch), so the daemon checks a request's schema and
answers 400 before any runner sees it; the runner compiles the same grammar for its pick
(krasisd.engine.constrained).

Whitespace between two JSON tokens is what llama.cpp's JSON grammar (Ollama's format "json")
allows: nothing, one space, or a newline and at most ``MAX_INDENT`` spaces or tabs. Compact
and indented JSON both fit; runs of blank lines or padding, which a small model would
otherwise write until ``num_predict`` runs out, do not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import llguidance

MAX_INDENT = 20
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_WHITESPACE = {"whitespace_pattern": rf"(?:[ ]|\n[ \t]{{0,{MAX_INDENT}}})?"}
LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors name no parser state


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
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=LIMITS)
    if error:
        raise ValueError(f"invalid JSON schema: {one_line(error)}")
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


def one_line(message: str, max_chars: int = 300) -> str:
    """llguidance's multi-line messages (a regex error draws a caret under the pattern) as
    one line: "regex parse error: [a: error: unclosed character class"."""
    lines = [line.strip().rstrip(":") for line in message.splitlines()]
    text = ": ".join(line for line in lines if line and set(line) != {"^"})
    return (text[:max_chars] + "...") if len(text) > max_chars else text or "unknown error"


def _json_type(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number",
            list: "an array", type(None): "null"}.get(type(value), type(value).__name__)
