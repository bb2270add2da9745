"""Clients nobody here wrote (ollama, openai, curl) against a real daemon over its socket."""

from __future__ import annotations

import json
import subprocess

import ollama
import openai
import pytest
from harness import ollama_over_socket, openai_over_socket

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ollama_client(daemon):
    return ollama_over_socket(daemon.socket_path)


@pytest.fixture(scope="module")
def openai_client(daemon):
    return openai_over_socket(daemon.socket_path)


def curl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "30", "--unix-socket",
                           str(daemon.socket_path), *args], capture_output=True, text=True,
                          timeout=40)


def test_ollama_generate(ollama_client):
    answer = ollama_client.generate(model="fake", prompt="hello there",
                                    options={"num_predict": 4, "temperature": 0})
    assert answer.done and answer.done_reason == "length"
    assert answer.response.startswith("[<user>hello there<assistant>]")
    assert answer.response.endswith("w3 ")
    assert answer.eval_count == 4
    assert answer.prompt_eval_count > 0 and answer.total_duration > 0


def test_ollama_generate_stream_with_system(ollama_client):
    parts = list(ollama_client.generate(model="fake", prompt="hi", system="be brief",
                                        stream=True, options={"num_predict": 3}))
    assert [p.done for p in parts] == [False] * 3 + [True]
    assert parts[0].response == "[<system>be brief<user>hi<assistant>]"
    final = parts[-1]
    assert final.done_reason == "length" and final.eval_count == 3
    assert final.eval_duration > 0 and final.load_duration is not None


def test_ollama_generate_raw(ollama_client):
    answer = ollama_client.generate(model="fake", prompt="as is", raw=True,
                                    options={"num_predict": 1})
    assert answer.response == "[as is]"


def test_long_prompt_keeps_its_end(ollama_client):
    answer = ollama_client.generate(model="fake", prompt="abcdefghij", raw=True,
                                    options={"num_predict": 1, "num_ctx": 5})
    assert answer.response == "[ghij]" and answer.prompt_eval_count == 4


def test_ollama_chat(ollama_client):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    answer = ollama_client.chat(model="fake", messages=messages, options={"num_predict": 2})
    assert answer.message.role == "assistant"
    assert answer.message.content == "[<system>sys<user>q1<assistant>a1<user>q2<assistant>]w1 "
    parts = list(ollama_client.chat(model="fake", messages=messages[1:2], stream=True,
                                    options={"num_predict": 2}))
    assert "".join(p.message.content for p in parts) == "[<user>q1<assistant>]w1 "
    assert parts[-1].done and parts[-1].eval_count == 2


def test_ollama_unknown_model(ollama_client):
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.generate(model="nope", prompt="x")
    assert info.value.status_code == 404
    assert "nope" in info.value.error


def test_ollama_models(ollama_client):
    names = {m.model for m in ollama_client.list().models}
    assert {"fake:latest", "other:latest"} <= names
    ollama_client.generate(model="fake", prompt="x", options={"num_predict": 1})
    loaded = {m.model for m in ollama_client.ps().models}
    assert "fake:latest" in loaded
    assert ollama_client.show("fake").details.family == "fake"
    assert ollama_client.show("fake").modelinfo["general.architecture"] == "unknown"


def test_ollama_pull_create_delete(daemon, ollama_client, tmp_path):
    events = list(ollama_client.pull("krasis-tiny", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    assert any(m.model == "krasis-tiny:latest" for m in ollama_client.list().models)
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.pull("no-such-model")
    assert info.value.status_code == 400
    folder = tmp_path / "weights"
    folder.mkdir()
    with daemon.client() as http:
        response = http.post("/api/create", json={"model": "mine", "path": str(folder),
                                                  "stream": False})
    assert response.status_code == 200 and response.json()["status"] == "success"
    ollama_client.delete("mine")
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.delete("mine")
    assert info.value.status_code == 404


def test_openai_chat(openai_client):
    answer = openai_client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hey"}], max_tokens=3)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == "[<user>hey<assistant>]w1 w2 "
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 3


def test_openai_chat_stream_usage(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hey"}], max_tokens=3,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[<user>hey<assistant>]w1 w2 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    plain = list(openai_client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hey"}], max_tokens=2, stream=True))
    assert all(c.usage is None for c in plain)


def test_openai_completions_logprobs(openai_client):
    answer = openai_client.completions.create(model="fake", prompt="abc", max_tokens=3,
                                              logprobs=1)
    choice = answer.choices[0]
    assert choice.text == "[abc]w1 w2 "
    assert choice.logprobs.tokens == ["[abc]", "w1 ", "w2 "]
    assert choice.logprobs.token_logprobs == [-0.25] * 3
    assert choice.logprobs.text_offset == [0, 5, 8]
    chunks = list(openai_client.completions.create(model="fake", prompt="abc", max_tokens=2,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "[abc]w1 "
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_models_and_errors(openai_client):
    ids = {m.id for m in openai_client.models.list()}
    assert "fake:latest" in ids
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="nope",
                                              messages=[{"role": "user", "content": "x"}])
    assert "nope" in info.value.body["message"]


def test_curl(daemon):
    assert curl(daemon, "http://localhost/").stdout == "krasisd is running"
    head = curl(daemon, "-I", "http://localhost/")
    assert head.stdout.startswith("HTTP/1.1 200")
    assert "version" in json.loads(curl(daemon, "http://localhost/api/version").stdout)
    streamed = curl(daemon, "http://localhost/api/generate", "-d",
                    '{"model": "fake", "prompt": "c", "options": {"num_predict": 2}}')
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [line["done"] for line in lines] == [False, False, True]
    assert lines[-1]["eval_count"] == 2
    sse = curl(daemon, "http://localhost/v1/chat/completions", "-d", json.dumps({
        "model": "fake", "stream": True, "max_tokens": 1,
        "messages": [{"role": "user", "content": "s"}]}))
    events = [e for e in sse.stdout.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
