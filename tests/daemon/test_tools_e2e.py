"""Tool calls through the daemon: a request's tools reach the chat template, and the answer's
calls come back whole, in Ollama's and OpenAI's shapes, streamed and not, from real runner
processes serving tests/daemon/tool_engine.py (which writes Hermes calls)."""

from __future__ import annotations

import json

import pytest
from harness import ollama_over_socket, openai_over_socket
from tool_engine import ANSWER_WITHOUT_TOOLS, CALLS, REPLY, THOUGHT

pytestmark = pytest.mark.timeout(60)

TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} of a place",
    "parameters": {"type": "object", "properties": {k: {"type": "string"} for k in args}}}}
    for name, args in CALLS]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fake_env):
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    root = tmp_path_factory.mktemp("krasisd-tools")
    thread = DaemonThread(fake_config(root, runner_loader="tool_engine:load"),
                          FakeRegistry(root / "models")).start()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def ollama_client(daemon):
    return ollama_over_socket(daemon.socket_path)


@pytest.fixture(scope="module")
def openai_client(daemon):
    return openai_over_socket(daemon.socket_path)


def _calls_of(tool_calls) -> list[tuple[str, dict]]:
    return [(c.function.name, dict(c.function.arguments)) for c in tool_calls]


def test_ollama_chat_returns_tool_calls(ollama_client):
    answer = ollama_client.chat(model="fake", messages=ASK, tools=TOOLS)
    assert answer.message.content == "Let me check.\n"
    assert _calls_of(answer.message.tool_calls) == CALLS
    assert answer.done_reason == "stop"


def test_ollama_chat_streams_whole_calls(ollama_client):
    parts = list(ollama_client.chat(model="fake", messages=ASK, tools=TOOLS, stream=True))
    assert "".join(p.message.content for p in parts) == "Let me check.\n"
    with_calls = [p for p in parts if p.message.tool_calls]
    assert [c for p in with_calls for c in _calls_of(p.message.tool_calls)] == CALLS
    assert "<tool_call>" not in "".join(p.message.content for p in parts)
    assert parts[-1].done and not parts[-1].message.tool_calls


def test_the_conversation_goes_on_with_tool_results(ollama_client):
    """An assistant turn with tool calls and the tool's results are accepted as input."""
    name, args = CALLS[0]
    messages = [*ASK, {"role": "assistant", "content": "",
                       "tool_calls": [{"function": {"name": name, "arguments": args}}]},
                {"role": "tool", "content": "18 C", "tool_name": name}]
    answer = ollama_client.chat(model="fake", messages=messages, tools=TOOLS)
    assert _calls_of(answer.message.tool_calls) == CALLS


def test_openai_chat_returns_tool_calls(openai_client):
    answer = openai_client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == CALLS
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2


def test_openai_stream_deltas_rebuild_the_calls(openai_client):
    stream = openai_client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS,
                                                   stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert content == "Let me check.\n" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == CALLS


def test_tool_choice_none_sends_no_tools(openai_client):
    answer = openai_client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS,
                                                   tool_choice="none")
    assert answer.choices[0].message.content == ANSWER_WITHOUT_TOOLS
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, message", [
    ({"tools": TOOLS, "tool_choice": "required"}, 'use \\"auto\\" or \\"none\\"'),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "function.name"),
    ({"tools": {"name": "x"}}, "'tools' must be a list"),
])
def test_unsupported_tool_requests_are_400(daemon, body, message):
    with daemon.client() as http:
        response = http.post("/v1/chat/completions", json={"model": "fake", "messages": ASK,
                                                            **body})
    assert response.status_code == 400
    assert message in response.text


# ---- thinking: Ollama's think, OpenAI's reasoning_effort --------------------------------


def test_ollama_think_true_returns_the_thinking_apart(ollama_client):
    answer = ollama_client.chat(model="fake", messages=ASK, think=True)
    assert answer.message.thinking == THOUGHT and answer.message.content == REPLY
    parts = list(ollama_client.chat(model="fake", messages=ASK, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == REPLY  # no <think> tags in content
    generated = ollama_client.generate(model="fake", prompt="Weather?", think=True)
    assert generated.thinking == THOUGHT and generated.response == REPLY


def test_ollama_think_false_reaches_the_template(ollama_client):
    answer = ollama_client.chat(model="fake", messages=ASK, think=False)
    assert answer.message.content == REPLY and not answer.message.thinking


def test_openai_reasoning_effort_gives_reasoning_content(openai_client):
    # the effort reaches the template, whose prompt opens the thinking: the answer starts in it
    answer = openai_client.chat.completions.create(model="fake", messages=ASK,
                                                   reasoning_effort="high")
    message = answer.choices[0].message
    assert message.content == REPLY and message.model_extra["reasoning_content"] == THOUGHT
    stream = openai_client.chat.completions.create(model="fake", messages=ASK,
                                                   reasoning_effort="low", stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == REPLY


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/api/chat", {"think": "very"}, "expected true, false or one of low, medium, high"),
    ("/api/generate", {"think": 1}, "invalid value for 'think'"),
    ("/v1/chat/completions", {"reasoning_effort": True}, "invalid value for 'reasoning_effort'"),
])
def test_bad_thinking_values_are_400(daemon, path, body, message):
    import httpx

    payload = {"model": "fake", **body}
    payload.update({"messages": ASK} if path != "/api/generate" else {"prompt": "hi"})
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket_path)),
                      base_url="http://localhost", timeout=30) as http:
        response = http.post(path, json=payload)
    assert response.status_code == 400 and message in response.text

