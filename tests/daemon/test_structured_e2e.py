"""Structured output end to end: `python -m krasisd` serving the bundled krasis-tiny with a
JSON schema as Ollama's ``format`` and as OpenAI's ``response_format``; every answer parses
and validates, over several seeds. A bad schema is a 400 before any runner starts. Tools
given to a model with no tool-call format (krasis-tiny) leave its answer plain text."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from harness import Proc, uds_client

pytestmark = pytest.mark.timeout(240)

BUNDLED = Path(__file__).resolve().parents[2] / "registry" / "bundled" / "krasis-tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a user as JSON."}]
OPTIONS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_predict": 400}


def _check(text: str) -> None:
    """SCHEMA checked by hand."""
    value = json.loads(text)
    assert set(value) == {"name", "age", "tags"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in value["tags"])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("this installation has no bundled krasis-tiny")
    proc = Proc(tmp_path_factory.mktemp("structured"), KRASIS_THREADS="1").wait_ready()
    try:
        with uds_client(proc.socket, 180) as http:
            pulled = [json.loads(line) for line in
                      http.post("/api/pull", json={"model": "krasis-tiny"}).text.splitlines()]
        assert pulled[-1] == {"status": "success"}, pulled[-1]
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ollama_format_schema(daemon, seed):
    client = ollama.Client(host="http://localhost", timeout=120,
                           transport=httpx.HTTPTransport(uds=str(daemon.socket)))
    answer = client.chat(model="krasis-tiny", messages=ASK, format=SCHEMA,
                         options={**OPTIONS, "seed": seed})
    assert answer.done_reason == "stop", answer.message.content
    _check(answer.message.content)


@pytest.mark.parametrize("seed", [4, 5])
def test_openai_response_format_json_schema(daemon, seed):
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=120)
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http,
                           max_retries=0)
    answer = client.chat.completions.create(
        model="krasis-tiny", messages=ASK, seed=seed, max_tokens=400,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    _check(answer.choices[0].message.content)


def test_a_bad_schema_is_a_400_before_the_model_is_looked_up(daemon):
    with uds_client(daemon.socket, 30) as http:
        response = http.post("/api/chat", json={
            "model": "never-pulled", "messages": ASK, "stream": False,
            "format": {"type": "object", "properties": {"a": {"type": "strin"}}}})
    assert response.status_code == 400  # not 404: the schema was checked first
    assert "Invalid type: strin" in response.json()["error"]


def test_tools_for_a_model_without_a_tool_format_give_plain_text(daemon):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}]
    with uds_client(daemon.socket, 120) as http:
        answer = http.post("/api/chat", json={
            "model": "krasis-tiny", "messages": ASK, "tools": tools, "stream": False,
            "options": {"temperature": 0, "num_predict": 8}}).json()
    assert answer["done"] and 1 <= answer["eval_count"] <= 8, answer
    assert answer["message"]["content"] and "tool_calls" not in answer["message"]
