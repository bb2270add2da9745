"""Bad input, many clients, clients that leave, runners that die: the daemon keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(90)

BAD_REQUESTS = [
    ("POST", "/api/generate", b'{"model": "fake", "prompt": ', 400, "invalid JSON"),
    ("POST", "/api/generate", b'["not", "an", "object"]', 400, "JSON object"),
    ("POST", "/api/generate", b'{"model": "\xff\xfe"}', 400, "UTF-8"),
    ("POST", "/api/generate", b'{"prompt": "x"}', 400, "missing field 'model'"),
    ("POST", "/api/generate", b'{"model": 7, "prompt": "x"}', 400, "'model'"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": 5}', 400, "'prompt'"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "stream": "yes"}', 400,
     "'stream'"),
    ("POST", "/api/generate", b'{"model": "nope", "prompt": "x"}', 404, "not found"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "options": {"temperature": -1}}',
     400, "temperature"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "options": {"top_k": 1.5}}',
     400, "top_k"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "options": {"top_k": "many"}}',
     400, "top_k"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "options": []}', 400,
     "'options'"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "keep_alive": "soon"}', 400,
     "keep_alive"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "x", "format": "xml"}', 400,
     "format"),
    ("POST", "/api/chat", b'{"model": "fake", "messages": [{"role": "robot"}]}', 400, "role"),
    ("POST", "/api/chat", b'{"model": "fake", "messages": "hi"}', 400, "'messages'"),
    ("POST", "/api/generate", b'{"model": "fake", "prompt": "def f(", "suffix": "return 1"}',
     400, "suffix"),
    ("POST", "/api/chat", b'{"model": "fake", "messages": [], "tools": [{"type": "function"}]}',
     400, "tools"),
    ("POST", "/v1/chat/completions", b'{"model": "fake", "messages": [{"role": "user", '
     b'"content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400, "text parts"),
    ("POST", "/api/chat", b'{"model": "broken", "messages": [{"role": "user", "content": "x"}]}',
     500, "broken"),
    ("POST", "/api/pull", b'{"model": "../../etc/passwd"}', 400, "invalid model name"),
    ("POST", "/api/pull", b'{"model": "/abs/path"}', 400, "invalid model name"),
    ("POST", "/api/create", b'{"model": "a/../../b", "path": "/tmp"}', 400, "invalid model name"),
    ("POST", "/api/create", b'{"model": "ok", "path": "relative/dir"}', 400, "absolute"),
    ("DELETE", "/api/delete", b'{"model": "..\\\\x"}', 400, "invalid model name"),
    ("DELETE", "/api/delete", b'{"model": "org/name/../../x"}', 400, "invalid model name"),
    ("POST", "/api/show", b'{"model": "nope"}', 404, "not found"),
    ("POST", "/v1/chat/completions", b'{"model": "fake", "messages": []}', 400, "messages"),
    ("POST", "/v1/chat/completions",
     b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n=1"),
    ("POST", "/v1/completions", b'{"model": "fake", "prompt": 3}', 400, "prompt"),
    ("POST", "/v1/completions", b'{"model": "fake", "prompt": "x", "logprobs": 9}', 400,
     "logprobs"),
    ("GET", "/api/nothing-here", b"", 404, "Not Found"),
    ("GET", "/api/generate", b"", 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method,path,body,status,needle", BAD_REQUESTS)
def test_bad_input_gets_clear_4xx(daemon, method, path, body, status, needle):
    with daemon.client() as http:
        response = http.request(method, path, content=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        message = error["message"] if path.startswith("/v1/") else error
        assert needle in message
        assert http.get("/api/version").status_code == 200


def test_body_over_limit(daemon):
    limit = daemon.cfg.max_body_bytes
    body = json.dumps({"model": "fake", "prompt": "x" * (limit + 10)}).encode()
    with daemon.client() as http:
        response = http.post("/api/generate", content=body)
        assert response.status_code == 413
        assert "KRASIS_MAX_BODY" in response.json()["error"]
        assert http.get("/api/version").status_code == 200


def test_mid_stream_engine_error_is_a_final_error_line(daemon):
    with daemon.client() as http:
        with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": "FAIL please", "options": {"num_predict": 5}}) as r:
            assert r.status_code == 200
            lines = [json.loads(line) for line in r.iter_lines()]
    assert [line.get("done") for line in lines[:-1]] == [False, False]
    assert "failed on purpose" in lines[-1]["error"]


async def _stream_one(path, index: int) -> list[dict]:
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                 timeout=60) as http:
        async with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": f"client {index}",
                "options": {"num_predict": 5}}) as response:
            return [json.loads(line) async for line in response.aiter_lines()]


def test_32_concurrent_streaming_clients(daemon):
    async def run_all():
        return await asyncio.gather(*(_stream_one(daemon.socket_path, i) for i in range(32)))

    results = asyncio.run(asyncio.wait_for(run_all(), 60))
    for index, lines in enumerate(results):
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5
        assert lines[0]["response"] == f"[<user>client {index}<assistant>]"


def _runner_pid(http: httpx.Client, model: str) -> int:
    models = http.get("/api/ps").json()["models"]
    return next(m["pid"] for m in models if m["model"] == model)


def test_disconnect_frees_the_runner(daemon):
    marker = daemon.registry.models["other:latest"] / "cancelled"
    marker.unlink(missing_ok=True)
    with daemon.client() as http:
        with http.stream("POST", "/api/generate", json={
                "model": "other", "prompt": "long", "options": {"num_predict": 100000}}) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["done"] is False
            assert json.loads(next(lines))["done"] is False
        # leaving the block closed the connection mid-stream
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the runner never saw the cancellation"
        assert int(marker.read_text()) < 1000  # stopped long before num_predict
        started = time.monotonic()
        answer = http.post("/api/generate", json={
            "model": "other", "prompt": "next", "stream": False,
            "options": {"num_predict": 3}}).json()
        assert answer["eval_count"] == 3 and time.monotonic() - started < 5


def test_runner_killed_mid_stream(daemon):
    with daemon.client() as http:
        http.post("/api/generate", json={"model": "fake", "prompt": "warm", "stream": False,
                                         "options": {"num_predict": 1}})
        pid = _runner_pid(http, "fake:latest")
        with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": "doomed", "options": {"num_predict": 100000}}) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["done"] is False
            os.kill(pid, signal.SIGKILL)
            rest = [json.loads(line) for line in lines]
        assert "SIGKILL" in rest[-1]["error"]
        assert all("error" not in line for line in rest[:-1])
        answer = http.post("/api/generate", json={"model": "fake", "prompt": "again",
                                                  "stream": False,
                                                  "options": {"num_predict": 2}})
        assert answer.status_code == 200 and answer.json()["eval_count"] == 2
        assert _runner_pid(http, "fake:latest") != pid


def test_keep_alive_zero_unloads_and_empty_prompt_loads(daemon):
    with daemon.client() as http:
        loaded = http.post("/api/generate", json={"model": "other"}).json()
        assert loaded["done_reason"] == "load"
        assert "other:latest" in [m["model"] for m in http.get("/api/ps").json()["models"]]
        unloaded = http.post("/api/generate", json={"model": "other", "keep_alive": 0}).json()
        assert unloaded["done_reason"] == "unload"
        assert "other:latest" not in [m["model"] for m in http.get("/api/ps").json()["models"]]


def test_a_client_gone_mid_response_is_status_499_without_a_traceback(caplog):
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from krasisd.app import errors_middleware

    async def handler(request):
        raise ConnectionResetError("Cannot write to closing transport")

    closing = mock.Mock(is_closing=mock.Mock(return_value=True))
    request = make_mocked_request("POST", "/api/generate", transport=closing)
    caplog.set_level(logging.INFO)
    response = asyncio.run(errors_middleware(request, handler))
    assert response.status == 499
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _leave_early(socket_path, route: str, body: dict, wait_s: float) -> None:
    """Send a request, read a little of the answer, and close with the rest unread."""
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (route.encode(), len(data), data))
        time.sleep(wait_s)
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            sock.recv(100)


def test_clients_leaving_mid_stream_log_no_errors(daemon, caplog):
    """Clients that close with part of the answer unread: a write can fail before the daemon
    sees the close (about one in three here), which aiohttp logged as a traceback."""
    caplog.set_level(logging.INFO)
    chat = {"model": "fake", "stream": True, "max_tokens": 500,
            "messages": [{"role": "user", "content": "x"}]}
    generate = {"model": "fake", "prompt": "x", "options": {"num_predict": 500}}
    for _ in range(20):
        _leave_early(daemon.socket_path, "/api/generate", generate, 0)
        _leave_early(daemon.socket_path, "/v1/chat/completions", chat, 0.01)
    with daemon.client() as http:  # every cancellation went through: the runner is free
        answer = http.post("/api/generate", json={"model": "fake", "prompt": "after",
                                                  "stream": False, "options": {"num_predict": 2}})
        assert answer.status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert any(getattr(r, "status", None) == 499 for r in caplog.records)


@pytest.mark.parametrize("data,line", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", []),  # aiohttp: debug
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n",
     [(logging.INFO, "bad HTTP request", None)]),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
     [(logging.INFO, "bad HTTP request", None)]),
], ids=["tls-to-http", "header-too-long", "bad-length"])
def test_invalid_http_is_a_400_and_at_most_one_info_line(daemon, caplog, data, line):
    caplog.set_level(logging.INFO)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket_path))
        sock.settimeout(5)
        sock.sendall(data)
        assert sock.recv(100).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    time.sleep(0.2)  # the log line follows the answer
    logged = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records
              if r.name == "aiohttp.server"]
    assert logged == line
