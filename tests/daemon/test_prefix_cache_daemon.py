"""End to end: a 20-turn chat with krasis-tiny through `python -m krasisd` (the real
registry, runner and engine) never prefills its history again: each turn's prompt tokens
forwarded are the turn's new tokens (up to a block of the prefix cache), as the runner's
counters in /api/ps say; KRASIS_PREFIX_CACHE reaches the runner's loop.

Answers are not compared with a daemon without the cache: the previous answers' KV was
written by decode steps, which differ from a prefill's by bf16 rounding, and at int4 that
flips a greedy pick in this conversation (turn 11). tests/engine/test_prefix_cache.py checks
identical answers in float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import Proc, uds_client

from krasisd import runner
from krasisd.config import load_config
from krasisd.engine.config import ModelConfig
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, synthetic_engine
from krasisd.runners import ModelSpec, _runner_argv

pytestmark = pytest.mark.timeout(300)

BUNDLED = Path(__file__).resolve().parents[2] / "registry" / "bundled" / "krasis-tiny"
BLOCK = 16  # LoopOptions' default prefix_block_tokens
OPTIONS = {"temperature": 0, "num_predict": 8}
QUESTIONS = [f"What does the {word} module do?" for word in (
    "os", "sys", "json", "re", "math", "time", "random", "string", "socket", "pathlib",
    "shutil", "logging", "typing", "struct", "array", "heapq", "bisect", "queue", "csv", "io")]


def _chat(http, messages: list[dict]) -> dict:
    response = http.post("/api/chat", json={"model": "krasis-tiny", "messages": messages,
                                            "stream": False, "options": OPTIONS})
    assert response.status_code == 200, response.text
    return response.json()


def _prefix_stats(http) -> dict | None:
    models = http.get("/api/ps").json()["models"]
    return models[0].get("prefix_cache") if models else None


def _conversation(root: Path, **env) -> tuple[list[str], list[dict]]:
    """The answers of the chat's turns and, after each, the runner's prefix-cache counters."""
    root.mkdir(parents=True, exist_ok=True)
    daemon = Proc(root, KRASIS_THREADS="1", KRASIS_NUM_PARALLEL="1", **env).wait_ready()
    try:
        with uds_client(daemon.socket, 120) as http:
            pulled = [json.loads(line) for line in
                      http.post("/api/pull", json={"model": "krasis-tiny"}).text.splitlines()]
            assert pulled[-1] == {"status": "success"}, pulled[-1]
            messages, answers, stats = [], [], []
            for question in QUESTIONS:
                messages.append({"role": "user", "content": question})
                reply = _chat(http, messages)
                answers.append(reply["message"]["content"])
                messages.append({"role": "assistant", "content": answers[-1]})
                stats.append({"prompt": reply["prompt_eval_count"],
                              "answer": reply["eval_count"], "cache": _prefix_stats(http)})
            # the same conversation through OpenAI's route: its usage names the reused tokens
            response = http.post("/v1/chat/completions", json={
                "model": "krasis-tiny", "messages": messages, "max_tokens": 4, "temperature": 0})
            assert response.status_code == 200, response.text
            stats.append({"openai_usage": response.json()["usage"]})
        return answers, stats
    finally:
        daemon.stop()


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="no bundled krasis-tiny")
def test_a_twenty_turn_chat_never_prefills_its_history_again(tmp_path):
    answers, turns = _conversation(tmp_path / "cached")
    usage = turns.pop()["openai_usage"]
    # all but the last answer's tail, the template's closing tokens and at most a block
    assert 0.9 * usage["prompt_tokens"] < usage["prompt_tokens_details"]["cached_tokens"] \
        < usage["prompt_tokens"]
    assert len(answers) == len(QUESTIONS)
    first = turns[0]["cache"]
    assert first is not None and first["capacity_bytes"] > 0  # on by default
    assert first["hit_tokens"] == 0 and first["miss_tokens"] == turns[0]["prompt"]
    for before, turn in zip(turns, turns[1:], strict=False):
        prefilled = turn["cache"]["miss_tokens"] - before["cache"]["miss_tokens"]
        reused = turn["cache"]["hit_tokens"] - before["cache"]["hit_tokens"]
        assert prefilled + reused == turn["prompt"]
        # the new tokens: the prompt past the previous prompt and its answer (the answer's
        # last token was never forwarded, and a block holds up to BLOCK - 1 more)
        new = turn["prompt"] - before["prompt"] - before["answer"]
        assert 0 < prefilled <= new + 1 + BLOCK, (prefilled, new, turn)
    total_prompt = sum(t["prompt"] for t in turns)
    last = turns[-1]["cache"]
    assert last["miss_tokens"] < total_prompt / 5  # history was read once, not 20 times
    assert last["hit_rate"] > 0.8 and last["bytes"] > 0 and last["blocks"] > 0


def _runner_args(env: dict):
    cfg = load_config({"KRASIS_HOME": "/tmp/unused", **env})
    argv = _runner_argv(ModelSpec(name="m", model_dir=Path("/m"), quant="int8"), cfg, fd=3)
    return runner._parse_args(argv[argv.index("--fd"):])


def test_krasis_prefix_cache_reaches_the_runners_loop():
    engine = synthetic_engine(ModelConfig.from_dict(TINY_DEEPSEEK_V2), "cpu", torch.float32)
    sized = runner.loop_options(engine, _runner_args({"KRASIS_PREFIX_CACHE": "64MiB"}))
    assert sized.prefix_cache_bytes == 64 * 2**20
    assert runner.loop_options(engine, _runner_args({"KRASIS_PREFIX_CACHE": "0"})) \
        .prefix_cache_bytes == 0
    default = runner.loop_options(engine, _runner_args({}))
    assert default.prefix_cache_bytes > 0  # an eighth of the available memory
    bad = _runner_args({"KRASIS_PREFIX_CACHE": "lots"})  # a warning, then the default
    assert bad.prefix_cache_bytes is None
    with pytest.raises(SystemExit):
        runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m",
                            "--prefix-cache-bytes", "-1"])
    # the cache's keys name the model, its folder and its quantization
    identity = runner.model_identity(engine, _runner_args({}))
    assert identity.startswith("m|/m|int8|") and "float32" in identity
