"""Editors reach krasisd the way they reach Ollama: an http:// base URL on a TCP port.

The daemon here listens on loopback TCP (KRASIS_HOST in its http:// form) beside its socket,
and each test sends the requests docs/editors.md says an editor sends, over that URL, with
the Host header an HTTP client puts there. These are the shapes as far as they are known
from the editors' documentation; the editors themselves are not run here.
"""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
import ollama
import openai
import pytest

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, fake_env):
    """http://127.0.0.1:PORT of a daemon started with KRASIS_HOST=http://127.0.0.1:PORT."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    from krasisd.config import load_config

    root = tmp_path_factory.mktemp("editors")
    url = f"http://127.0.0.1:{_free_port()}"
    host = load_config({"KRASIS_HOME": str(root), "KRASIS_HOST": url}).host
    thread = DaemonThread(fake_config(root, host=host), FakeRegistry(root / "models")).start()
    yield url
    thread.close()


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def test_continue_chat_and_autocomplete_shapes(base_url):
    """Continue (provider: ollama): /api/chat for chat, /api/generate with raw for completion."""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/api/chat", json={
                "model": "fake", "stream": True, "keep_alive": 1800,
                "messages": [{"role": "user", "content": "explain this"}],
                "options": {"num_ctx": 2048, "temperature": 0.2, "num_predict": 2,
                            "stop": ["<|end|>"]}}) as response:
            assert response.status_code == 200
            lines = ndjson(response)
        assert "".join(line["message"]["content"] for line in lines).startswith(
            "[<user>explain this<assistant>]")
        assert lines[-1]["done"] is True
        with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": "def add(a, b):", "raw": True, "stream": True,
                "options": {"num_predict": 1, "temperature": 0.01}}) as response:
            assert response.status_code == 200
            assert ndjson(response)[0]["response"] == "[def add(a, b):]"


def test_zed_lists_shows_and_chats(base_url):
    """Zed (language_models.ollama.api_url): /api/tags, /api/show per model, /api/chat."""
    client = ollama.Client(host=base_url, timeout=30)
    names = {model.model for model in client.list().models}
    assert "fake:latest" in names
    assert client.show("fake").details.family == "fake"
    parts = list(client.chat(model="fake", stream=True, keep_alive="5m",
                             messages=[{"role": "user", "content": "hi"}],
                             options={"num_ctx": 4096, "num_predict": 2}))
    assert parts[-1].done and "".join(p.message.content for p in parts).startswith("[<user>hi")


def test_copilot_style_discovery_and_openai_chat(base_url):
    """VS Code Copilot's Ollama endpoint: /api/version, /api/tags, /api/show, then
    OpenAI-style /v1/chat/completions streamed as server-sent events."""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.get("/api/version").json()["version"]
        assert http.get("/api/tags").status_code == 200
        assert http.post("/api/show", json={"model": "fake"}).status_code == 200
    chat = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    chunks = list(chat.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hey"}], max_tokens=2, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "[<user>hey<assistant>]w1 "


def test_gen_nvim_curl_command(base_url):
    """gen.nvim runs curl: POST /api/chat with a streamed answer."""
    body = json.dumps({"model": "fake", "stream": True,
                       "messages": [{"role": "user", "content": "nvim"}],
                       "options": {"num_predict": 1}})
    done = subprocess.run(["curl", "--silent", "--no-buffer", "--max-time", "30", "-X", "POST",
                           f"{base_url}/api/chat", "-d", body],
                          capture_output=True, text=True, timeout=40)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines[0]["message"]["content"] == "[<user>nvim<assistant>]"
    assert lines[-1]["done"] is True
