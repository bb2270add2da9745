"""Malformed input gets a 400 that names the problem, never a 500 or an internal text.

Found by fuzzing the API: NaN/Infinity in integer options, num_ctx = 2^63, deep nesting,
lone surrogates, huge keep_alive values, names with a trailing newline, n = 0.
"""

from __future__ import annotations

import datetime
import json

import pytest

pytestmark = pytest.mark.timeout(60)

# Text that means a stack, a library path or an exception's repr reached the client.
INTERNALS = ("Traceback", 'File "', "site-packages", ".py", ".so", "frame #", "Error(")


def _message(path: str, response) -> str:
    error = response.json()["error"]
    return error["message"] if path.startswith("/v1/") else error


def _generate(extra: bytes) -> bytes:
    return b'{"model": "fake", "prompt": "x", ' + extra + b"}"


def _option(text: bytes) -> bytes:
    return _generate(b'"options": {' + text + b"}")


def _chat_v1(extra: bytes) -> bytes:
    return (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], ' + extra
            + b"}")


NESTED_DEEP = b'"format": ' + b"[" * 5000 + b"]" * 5000
NESTED_FIFTY = b'"format": ' + b"[" * 50 + b"]" * 50

GENERATE, CHAT, V1_CHAT, V1_TEXT = "/api/generate", "/api/chat", "/v1/chat/completions", \
    "/v1/completions"
MALFORMED = [  # (path, body, a word the message must have), by id
    pytest.param(GENERATE, _option(b'"top_k": NaN'), "NaN", id="top_k-nan"),
    pytest.param(GENERATE, _option(b'"num_predict": Infinity'), "Infinity", id="num_predict-inf"),
    pytest.param(GENERATE, _option(b'"seed": -Infinity'), "Infinity", id="seed-minus-inf"),
    pytest.param(GENERATE, _option(b'"temperature": NaN'), "NaN", id="temperature-nan"),
    pytest.param(GENERATE, _option(b'"top_p": 1e400'), "too large", id="top_p-1e400"),
    pytest.param(GENERATE, _option(b'"temperature": 1e-308'), "temperature", id="temperature-tiny"),
    pytest.param(GENERATE, _option(b'"repeat_penalty": 5e-324'), "repeat_penalty",
                 id="repeat_penalty-tiny"),
    pytest.param(GENERATE, _option(b'"presence_penalty": -1e308'), "presence_penalty",
                 id="presence_penalty-huge"),
    pytest.param(V1_CHAT, _chat_v1(b'"frequency_penalty": 1e300'), "frequency_penalty",
                 id="v1-frequency_penalty-huge"),
    pytest.param(GENERATE, _option(b'"num_ctx": 9223372036854775808'), "num_ctx",
                 id="num_ctx-2e63"),
    pytest.param(GENERATE, _option(b'"num_ctx": 2147483649'), "num_ctx", id="num_ctx-2e31-plus-1"),
    pytest.param(GENERATE, _option(b'"num_ctx": 1e300'), "num_ctx", id="num_ctx-1e300"),
    pytest.param(GENERATE, _option(b'"num_ctx": 0'), "num_ctx", id="num_ctx-0"),
    pytest.param(GENERATE, _option(b'"seed": 18446744073709551616'), "seed", id="seed-2e64"),
    pytest.param(GENERATE, _option(b'"num_predict": ' + b"9" * 5000), "digits",
                 id="num_predict-5000-digits"),
    pytest.param(GENERATE, _generate(NESTED_DEEP), "nested", id="nested-5000"),
    pytest.param(GENERATE, _generate(NESTED_FIFTY), "nested", id="nested-50"),
    pytest.param(GENERATE, b'{"model": "fake", "prompt": "a \\ud800 b"}', "surrogate",
                 id="surrogate-prompt"),
    pytest.param(GENERATE, _generate(b'"\\udfff": 1'), "surrogate", id="surrogate-key"),
    pytest.param(CHAT, b'{"model": "fake", "messages": [{"role": "user", "content": "\\ud83d"}]}',
                 "surrogate", id="surrogate-chat"),
    pytest.param(GENERATE, _generate(b'"keep_alive": [1]'), "keep_alive", id="keep_alive-list"),
    pytest.param(GENERATE, _generate(b'"keep_alive": NaN'), "NaN", id="keep_alive-nan"),
    pytest.param(GENERATE, _option(b'"top_k": "' + b"y" * 100_000 + b'"'), "top_k",
                 id="option-value-100k"),
    pytest.param(V1_CHAT, _chat_v1(b'"max_tokens": NaN'), "NaN", id="v1-max_tokens-nan"),
    pytest.param(V1_CHAT, _chat_v1(b'"max_tokens": 1e999'), "too large", id="v1-max_tokens-1e999"),
    pytest.param(V1_CHAT, _chat_v1(b'"n": 0'), "n=1", id="v1-n-0"),
    pytest.param(V1_CHAT, _chat_v1(b'"n": -3'), "n=1", id="v1-n-minus-3"),
    pytest.param(V1_TEXT, b'{"model": "fake", "prompt": "x", "n": 0}', "n=1", id="v1-text-n-0"),
    pytest.param(V1_TEXT, b'{"model": "fake", "prompt": "x", "seed": 1e308}', "seed",
                 id="v1-seed-1e308"),
]


@pytest.mark.parametrize("path,body,needle", MALFORMED)
def test_malformed_input_is_a_400_without_internals(daemon, path, body, needle):
    with daemon.client() as http:
        response = http.post(path, content=body)
        assert response.status_code == 400, response.text
        message = _message(path, response)
        assert needle in message
        assert not any(text in message for text in INTERNALS), message
        assert len(message) < 400
        assert http.get("/api/version").status_code == 200


# Every route that takes a model name, with a name that only a partial match accepts.
NAMED_ROUTES = [
    ("POST", "/api/generate", {"prompt": "x"}),
    ("POST", "/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/api/show", {}),
    ("POST", "/api/pull", {}),
    ("POST", "/api/create", {"path": "/tmp"}),
    ("DELETE", "/api/delete", {}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/completions", {"prompt": "x"}),
]
BAD_NAMES = ["fake\n", "fake:latest\n", "fake\r", "fa\tke", "fake\x00", "\nfake", "fake\x7f"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("method,path,fields", NAMED_ROUTES)
def test_names_with_control_characters_are_refused_everywhere(daemon, method, path, fields,
                                                              name):
    with daemon.client() as http:
        response = http.request(method, path, json={"model": name, **fields})
        assert response.status_code == 400, response.text
        assert "invalid model name" in _message(path, response)
        assert "fake:latest" in daemon.registry.models  # the delete did not go through


@pytest.mark.parametrize("name", ["fake%0A", "fake%0D", "fake%00"])
def test_v1_model_path_with_control_characters(daemon, name):
    with daemon.client() as http:
        response = http.get(f"/v1/models/{name}")
        assert response.status_code in (400, 404), response.text  # 404: the route's pattern
        assert response.json()["error"]["message"]


def _expires_at(http, model: str) -> datetime.datetime:
    listed = http.get("/api/ps")
    assert listed.status_code == 200, listed.text
    stamp = next(m["expires_at"] for m in listed.json()["models"] if m["model"] == model)
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.mark.parametrize("keep_alive", [1e308, "99999999999h", "1e308", 2**80, -1])
def test_huge_keep_alive_is_forever_and_ps_answers(daemon, keep_alive):
    with daemon.client() as http:
        loaded = http.post("/api/generate", json={"model": "other", "keep_alive": keep_alive})
        assert loaded.status_code == 200, loaded.text
        assert _expires_at(http, "other:latest").year > 2300  # forever, as Ollama shows it
        http.post("/api/generate", json={"model": "other", "keep_alive": 0})


def test_long_keep_alive_below_the_maximum_is_kept_as_is(daemon):
    with daemon.client() as http:
        loaded = http.post("/api/generate", json={"model": "other", "keep_alive": "8760h"})
        assert loaded.status_code == 200, loaded.text
        expires = _expires_at(http, "other:latest")
        in_a_year = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=365)
        assert abs((expires - in_a_year).total_seconds()) < 60
        http.post("/api/generate", json={"model": "other", "keep_alive": 0})


def test_internal_errors_reach_clients_as_one_line_without_paths():
    from krasisd.app import status_for
    from krasisd.runners import RunnerRequestError

    torch_text = ("generation failed: [enforce fail at alloc_cpu.cpp:118] data. "
                  "DefaultCPUAllocator: not enough memory\nframe #0: c10::ThrowEnforceNotMet "
                  "+ 0x5 (0x7f in /usr/lib/python3/site-packages/torch/lib/libc10.so)\n"
                  "frame #1: at::empty (0x7f in /usr/lib/libtorch_cpu.so)")
    status, message = status_for(RunnerRequestError(500, torch_text))
    assert status == 500 and message.startswith("generation failed: [enforce fail at")
    assert "\n" not in message and "frame #" not in message and "libc10" not in message
    status, message = status_for(OverflowError("Python int too large to convert to C int"))
    assert status == 500 and "C int" not in message and "OverflowError" in message
    traceback_text = ('Traceback (most recent call last):\n  File "/opt/x/site-packages/a.py", '
                      "line 1, in f\nKeyError: 'x'")
    _, message = status_for(RunnerRequestError(500, "model failed: " + traceback_text))
    assert message == "model failed: Traceback (most recent call last):"


def test_client_message_cuts_code_paths():
    from krasisd.client_errors import client_message

    text = "load failed at /usr/local/lib/python3.11/site-packages/torch/serialization.py:1021"
    assert client_message(text) == "load failed at <internal>"
    assert client_message("no such file /home/u/models/x/config.json") \
        == "no such file /home/u/models/x/config.json"  # the user's own paths stay
    assert len(client_message("x" * 10_000)) <= 303


def test_deep_but_allowed_nesting_and_valid_pairs_pass():
    from krasisd.api import ApiError
    from krasisd.request_body import MAX_DEPTH, parse

    nested = json.dumps({"a": [[{"b": "\U0001F600 ok"}]]})
    assert parse(nested) == {"a": [[{"b": "\U0001F600 ok"}]]}
    assert parse('"\\ud83d\\ude00"') == "\U0001F600"  # a valid surrogate pair is one character
    assert parse("[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1))
    assert parse("  ") == {}
    with pytest.raises(ApiError, match="nested"):
        parse("[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH)
