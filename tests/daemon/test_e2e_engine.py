"""End to end: `python -m krasisd` with the real registry, runner and engine on a tiny model.

The model is the bundled krasis-tiny when this installation has it (pulled, no network),
else a tiny random DeepSeek-V2 folder written by transformers (registered with /api/create).
Both go through the registry's CPU cache build and the engine's default int4 path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from harness import Proc, uds_client

from krasisd.jsonmode import JsonPrefix

pytestmark = pytest.mark.timeout(240)

BUNDLED = Path(__file__).resolve().parents[2] / "registry" / "bundled" / "krasis-tiny"
OPTIONS = {"temperature": 0, "num_predict": 12}


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(daemon process, model name, bundled pull events) with a model ready to serve.

    krasis-tiny is pulled when bundled; if that pull fails, a random model is created so the
    other tests still run, and test_bundled_krasis_tiny_pulls reports the failure.
    """
    root = tmp_path_factory.mktemp("e2e")
    daemon = Proc(root, KRASIS_THREADS="1").wait_ready()
    try:
        with uds_client(daemon.socket, 180) as http:
            bundled = []
            if (BUNDLED / "config.json").is_file():
                bundled = _events(http.post("/api/pull", json={"model": "krasis-tiny"}))
            name = "krasis-tiny"
            if bundled[-1:] != [{"status": "success"}]:
                from tiny_model import write_model

                folder = write_model(root / "tiny-v2")
                name, created = "tiny-v2", _events(http.post("/api/create", json={
                    "model": "tiny-v2", "path": str(folder)}))
                assert created[-1] == {"status": "success"}, created
        yield daemon, name, bundled
    finally:
        daemon.stop()


def test_bundled_krasis_tiny_pulls(served):
    _, _, bundled = served
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("this installation has no bundled krasis-tiny")
    assert bundled[0]["status"].startswith(("pulling", "importing")), bundled[0]
    assert any("cache" in e.get("status", "") for e in bundled), bundled
    assert bundled[-1] == {"status": "success"}, bundled[-1]


@pytest.fixture(scope="module")
def client(served):
    daemon, _, _ = served
    return ollama.Client(host="http://localhost", timeout=120,
                         transport=httpx.HTTPTransport(uds=str(daemon.socket)))


def test_ollama_chat_streams_real_tokens(served, client):
    _, name, _ = served
    parts = list(client.chat(model=name, stream=True, options=OPTIONS,
                             messages=[{"role": "user", "content": "Hello there"}]))
    final = parts[-1]
    assert final.done and final.done_reason in ("stop", "length")
    assert 1 <= final.eval_count <= 12 and final.prompt_eval_count > 3
    assert final.load_duration > 0 and final.total_duration >= final.eval_duration > 0
    assert all(not p.done for p in parts[:-1])


def test_greedy_generate_is_deterministic(served, client):
    _, name, _ = served
    first = client.generate(model=name, prompt="Once upon a time", options=OPTIONS)
    second = client.generate(model=name, prompt="Once upon a time", options=OPTIONS)
    assert first.response == second.response and first.eval_count == second.eval_count
    assert second.load_duration == 0  # the runner stayed warm


def test_openai_completion_logprobs(served):
    daemon, name, _ = served
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=120)
    api = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    answer = api.completions.create(model=name, prompt="The", max_tokens=5, logprobs=1,
                                    temperature=0)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.token_logprobs) == answer.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == answer.choices[0].text


def test_format_json_is_constrained(served, client):
    _, name, _ = served
    answer = client.generate(model=name, prompt="Reply with JSON.", format="json",
                             options={"temperature": 0.7, "seed": 3, "num_predict": 40})
    assert JsonPrefix().feed(answer.response) is not None, answer.response
    if answer.done_reason == "stop":
        assert isinstance(json.loads(answer.response), dict)


def test_runner_process_title_and_unload(served, client):
    daemon, name, _ = served
    with uds_client(daemon.socket) as http:
        client.generate(model=name, prompt="x", options={"num_predict": 1})
        pid = http.get("/api/ps").json()["models"][0]["pid"]
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert title == f"krasis-runner {name}:latest"
        assert http.post("/api/generate", json={"model": name, "keep_alive": 0}).json()[
            "done_reason"] == "unload"
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}") and http.get("/api/ps").json()["models"] == []


def test_32_concurrent_streams_on_the_real_model(served):
    import asyncio

    daemon, name, _ = served

    async def one(index: int) -> list[dict]:
        transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=120) as http:
            async with http.stream("POST", "/api/chat", json={
                    "model": name, "options": {"num_predict": 2, "seed": index},
                    "messages": [{"role": "user", "content": f"Question {index}"}]}) as r:
                return [json.loads(line) async for line in r.aiter_lines()]

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(asyncio.wait_for(run_all(), 180))
    assert all(lines[-1].get("done") is True for lines in results), [r[-1] for r in results]
    assert all(lines[-1]["eval_count"] <= 2 for lines in results)  # EOS may come first


def test_4_concurrent_greedy_streams_answer_as_alone(served, client):
    """KRASIS_NUM_PARALLEL (default 4): the four decode together, in shared steps."""
    import asyncio

    daemon, name, _ = served
    prompts = ["Once upon a time", "The capital of", "1, 2, 3,", "Hello"]
    alone = [client.generate(model=name, prompt=p, options=OPTIONS).response for p in prompts]

    async def one(prompt: str) -> dict:
        transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=60) as http:
            response = await http.post("/api/generate", json={
                "model": name, "prompt": prompt, "stream": False, "options": OPTIONS})
            return response.json()

    async def run_all():
        return await asyncio.gather(*(one(p) for p in prompts))

    together = asyncio.run(asyncio.wait_for(run_all(), 60))
    assert all(answer.get("done") is True for answer in together), together
    assert [answer["response"] for answer in together] == alone
    assert any(alone)  # the model said something
