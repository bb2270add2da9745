"""bench/gpu_decode.py's command line: --model picks every shape-specific setting, bad flag
values are one-line usage errors, and the cache folder is created when missing."""

import importlib
import json
from pathlib import Path

import pytest

from krasisd.engine.quant import pick_group_size

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def gpu_decode(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import their neighbours
    return importlib.import_module("gpu_decode")


@pytest.fixture
def decode_caches(gpu_decode):
    return importlib.import_module("decode_caches")


def scenario_specs(args) -> list[tuple]:
    return [(s.name, s.budget, sorted(s.modes)) for s in args.scenarios]


def test_default_model_is_deepseek_with_s1_s2(gpu_decode):
    args = gpu_decode.parse_args([])
    assert args.model == "deepseek-v2-lite"
    assert scenario_specs(args) == [("S1", "16GiB", []), ("S2", "4GiB", []),
                                    ("S2-cpu", "4GiB", ["off"])]
    assert args.contexts == [100, 1000, 10000]


def test_qwen3_model_runs_s3(gpu_decode):
    args = gpu_decode.parse_args(["--model", "qwen3-30b-a3b"])
    assert scenario_specs(args) == [("S3", "8GiB", []), ("S3-cpu", "8GiB", ["off"])]
    smoke = gpu_decode.parse_args(["--model", "qwen3-30b-a3b", "--smoke"])
    assert [s.name for s in smoke.scenarios] == ["S3", "S3-cpu"]


def test_scenarios_with_several_modes(gpu_decode):
    args = gpu_decode.parse_args(["--scenarios", "A=4GiB:off+unfused, B=512MiB"])
    assert scenario_specs(args) == [("A", "4GiB", ["off", "unfused"]), ("B", "512MiB", [])]


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama"], "invalid choice"),
    (["--scenarios", "S1"], "name=budget"),
    (["--scenarios", "S1=4GiB:fast"], "unknown mode fast"),
    (["--scenarios", "S1=lots"], "scenario 'S1=lots': invalid size 'lots'"),
    (["--scenarios", "S1=4GiB,S1=8GiB"], "given twice"),
    (["--contexts", "100,x"], "not an integer"),
    (["--steps", "0"], "at least 1"),
    (["--streams", "1,,8"], "empty item"),
])
def test_bad_flags_are_usage_errors(gpu_decode, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_decode.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cache_dir_is_created(gpu_decode, tmp_path):
    args = gpu_decode.parse_args(["--cache-dir", str(tmp_path / "a" / "b")])
    assert args.cache_dir.is_dir()


def test_cache_dir_over_a_file_is_a_usage_error(gpu_decode, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        gpu_decode.parse_args(["--load-only", str(tmp_path / "file")])
    assert "--load-only: cannot create folder" in capsys.readouterr().err


@pytest.mark.parametrize("smoke", [False, True])
def test_configs_follow_the_model(decode_caches, smoke):
    deepseek = decode_caches.bench_config(smoke, "deepseek-v2-lite")
    qwen = decode_caches.bench_config(smoke, "qwen3-30b-a3b")
    assert deepseek.n_shared_experts > 0 and qwen.n_shared_experts == 0
    assert qwen.num_key_value_heads < qwen.num_attention_heads  # GQA
    for config in (deepseek, qwen):
        assert decode_caches.expert_group_size(config) == pick_group_size(
            config.hidden_size, config.moe_intermediate_size, bits=4)
    if not smoke:
        assert (qwen.n_routed_experts, qwen.num_experts_per_tok, qwen.num_hidden_layers) == (
            128, 8, 48)
        assert (deepseek.n_routed_experts, deepseek.num_experts_per_tok) == (64, 6)


def test_small_config_keeps_heads_per_kv_head(decode_caches):
    deepseek = decode_caches.small_config("deepseek-v2-lite")
    qwen = decode_caches.small_config("qwen3-30b-a3b")
    assert deepseek.num_key_value_heads == deepseek.num_attention_heads
    assert qwen.num_attention_heads // qwen.num_key_value_heads == 32 // 4
    assert qwen.n_routed_experts == 128 and qwen.hidden_size == deepseek.hidden_size


def test_load_only_refuses_another_models_caches(decode_caches, tmp_path):
    (tmp_path / "cpu").mkdir()
    manifest = {"model_fingerprint": decode_caches.cache_fingerprint("deepseek-v2-lite", False)}
    (tmp_path / "cpu" / "manifest.json").write_text(json.dumps(manifest))
    decode_caches.check_cache_model(tmp_path, "deepseek-v2-lite", smoke=False)
    with pytest.raises(ValueError, match="qwen3-30b-a3b"):
        decode_caches.check_cache_model(tmp_path, "qwen3-30b-a3b", smoke=False)
    with pytest.raises(ValueError, match="smoke"):
        decode_caches.check_cache_model(tmp_path, "deepseek-v2-lite", smoke=True)
