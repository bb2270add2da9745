"""The krasis command against the real krasisd: serve, create (or pull the bundled
krasis-tiny), an interactive answer on a terminal, Ctrl+C, ps, stop, rm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import pytest
from krasis.client import Client, ConnectError

START_TIMEOUT_S = 90


TINY_CONFIG = {  # DeepSeek-V2's own checkpoint format; widths fit the INT4 group size (128)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
    "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
    "v_head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": False, "scoring_func": "softmax",
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _random_weights(c: dict) -> dict:
    """Every tensor of a DeepseekV2ForCausalLM checkpoint, random (numpy: no torch import)."""
    import numpy as np

    rng = np.random.default_rng(0)
    d, heads, v = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]

    def mat(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def mlp(prefix: str, width: int) -> dict:
        return {f"{prefix}.gate_proj.weight": mat(width, d), f"{prefix}.up_proj.weight":
                mat(width, d), f"{prefix}.down_proj.weight": mat(d, width)}

    out = {"model.embed_tokens.weight": mat(v, d), "model.norm.weight": np.ones(d, np.float32),
           "lm_head.weight": mat(v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {f"{p}.input_layernorm.weight": np.ones(d, np.float32),
                f"{p}.post_attention_layernorm.weight": np.ones(d, np.float32),
                f"{p}.self_attn.q_proj.weight": mat(heads * qk, d),
                f"{p}.self_attn.kv_a_proj_with_mqa.weight":
                    mat(c["kv_lora_rank"] + c["qk_rope_head_dim"], d),
                f"{p}.self_attn.kv_a_layernorm.weight": np.ones(c["kv_lora_rank"], np.float32),
                f"{p}.self_attn.kv_b_proj.weight":
                    mat(heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
                f"{p}.self_attn.o_proj.weight": mat(d, heads * c["v_head_dim"])}
        if i < c["first_k_dense_replace"]:
            out |= mlp(f"{p}.mlp", c["intermediate_size"])
            continue
        out[f"{p}.mlp.gate.weight"] = mat(c["n_routed_experts"], d)
        for e in range(c["n_routed_experts"]):
            out |= mlp(f"{p}.mlp.experts.{e}", c["moe_intermediate_size"])
        out |= mlp(f"{p}.mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
    return out


def write_random_model(out_dir: Path) -> Path:
    """A random DeepSeek-V2 folder: config, safetensors and a word-level tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(_random_weights(TINY_CONFIG), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab |= {f"w{i}": i for i in range(3, TINY_CONFIG["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
    return out_dir


def krasis(*argv: str, env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krasis.cli", *argv], env=env, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


@pytest.fixture
def served(tmp_path):
    """A `krasis serve` in a temporary home; yields its environment."""
    folder = Path(tempfile.mkdtemp(prefix="krasis-e2e-"))
    env = {**os.environ, "KRASIS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "KRASIS_SOCKET": str(folder / "krasisd.sock"), "KRASIS_THREADS": "1"}
    for name in ("KRASIS_HOST", "KRASIS_PRELOAD", "NOTIFY_SOCKET"):
        env.pop(name, None)
    log = open(tmp_path / "krasisd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "krasis.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    client = Client(socket_path=env["KRASIS_SOCKET"])
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.heartbeat()
            break
        except ConnectError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "krasisd.log").read_text()) from None
            time.sleep(0.2)
    yield env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_create_run_ps_stop_rm(served, tmp_path):
    folder = write_random_model(tmp_path / "weights")
    created = krasis("create", "tiny", "--from", str(folder), env=served)
    assert created.returncode == 0, created.stderr
    assert created.stderr.strip().splitlines()[-1] == "success"
    assert "tiny:latest" in krasis("list", env=served).stdout

    child = pexpect.spawn(sys.executable, ["-m", "krasis.cli", "run", "tiny", "--verbose"],
                          env=served, encoding="utf-8", timeout=180, dimensions=(24, 120))
    child.expect_exact(">>>")
    child.sendline("/set parameter num_predict 12")
    child.expect_exact("Set parameter 'num_predict' to '12'")
    child.sendline("/set parameter seed 7")
    child.sendline("w5 w6 w7")
    child.expect(r"\neval count:\s+(\d+) token\(s\)")
    assert 1 <= int(child.match.group(1)) <= 12
    child.expect(r"eval rate:\s+[\d.]+ tokens/s")
    child.expect_exact(">>>")
    # Ctrl+C stops a long answer and the session goes on
    child.sendline("/set parameter num_predict 100000")
    child.sendline("w8 w9")
    child.expect(r"w\d+ w\d+ w\d+")
    child.sendintr()
    child.expect_exact(">>>", timeout=30)
    child.sendline("/set parameter num_predict 3")
    child.sendline("w10")
    child.expect(r"\neval count:\s+(\d+) token\(s\)")
    assert 1 <= int(child.match.group(1)) <= 3
    child.expect_exact(">>>")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    ps = krasis("ps", env=served)
    row = next(line for line in ps.stdout.splitlines() if line.startswith("tiny"))
    assert "100% CPU" in row and "from now" in row
    assert krasis("stop", "tiny", env=served).returncode == 0
    deadline = time.monotonic() + 30
    while "tiny" in krasis("ps", env=served).stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "tiny" not in krasis("ps", env=served).stdout
    removed = krasis("rm", "tiny", env=served)
    assert removed.stdout.strip() == "deleted 'tiny'"
    assert "tiny" not in krasis("list", env=served).stdout
