"""A model whose chat template never ends: the request gets a 400 in bounded time, and the
runner is idle afterwards and serves the next request (a real runner and engine)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from harness import Proc, uds_client
from krasis_registry.create import bundled_dir

pytestmark = pytest.mark.timeout(180)

RUNAWAY = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_runaway_chat_template_is_stopped_and_the_runner_freed(tmp_path):
    folder = tmp_path / "runaway"
    shutil.copytree(bundled_dir("krasis-tiny"), folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = RUNAWAY
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (tmp_path / "d").mkdir()
    daemon = Proc(tmp_path / "d", KRASIS_THREADS="1", KRASIS_QUANT="none").wait_ready()
    try:
        with uds_client(daemon.socket, 120) as http:
            created = http.post("/api/create", json={"model": "runaway", "path": str(folder),
                                                     "stream": False})
            assert created.json() == {"status": "success"}
            loaded = http.post("/api/generate", json={"model": "runaway"})  # load only
            assert loaded.status_code == 200, loaded.text
            started = time.monotonic()
            answer = http.post("/api/chat", json={
                "model": "runaway", "stream": False,
                "messages": [{"role": "user", "content": "Hello"}]})
            assert time.monotonic() - started < 15
            assert answer.status_code == 400, answer.text
            assert "chat template ran longer than 3 s" in answer.json()["error"]
            [runner] = http.get("/api/ps").json()["models"]
            before = _cpu_s(runner["pid"])
            time.sleep(1.0)
            assert _cpu_s(runner["pid"]) - before < 0.5  # nothing left running
            raw = http.post("/api/generate", json={
                "model": "runaway", "prompt": "The", "raw": True, "stream": False,
                "options": {"temperature": 0, "num_predict": 3}})
            assert raw.status_code == 200 and raw.json()["eval_count"] >= 1, raw.text
    finally:
        daemon.stop()
