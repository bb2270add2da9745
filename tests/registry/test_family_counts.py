"""Mixtral, MiniMax-M2 and gpt-oss in the registry: active-parameter counts from
num_local_experts and fused [E, ...] expert tensors, and gpt-oss served unquantized (no
INT4/INT8 cache is built for it, with the reason in the cache row, the stream and the log).

The models are tiny random ones saved by transformers (save_pretrained), so the tensor
names are the ones those families' checkpoints use.
"""

import json
import logging

import pytest
from krasis_registry import Registry, caches
from krasis_registry.modelinfo import parameter_counts, routing

transformers = pytest.importorskip("transformers")

SIZES = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "num_local_experts": 4, "num_experts_per_tok": 2}
L, H, I, E, K, V = 2, 64, 32, 4, 2, 128  # noqa: E741


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import torch

    made = {}
    for family, config_class in (("mixtral", transformers.MixtralConfig),
                                 ("minimax_m2", transformers.MiniMaxM2Config),
                                 ("gpt_oss", transformers.GptOssConfig)):
        torch.manual_seed(0)
        config = config_class(**SIZES, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        model = transformers.AutoModelForCausalLM.from_config(config)
        out = tmp_path_factory.mktemp(family)
        model.save_pretrained(out)
        made[family] = out
    return made


def _non_expert_params(family: str) -> int:
    """Everything but the routed experts, from the sizes (q, k, v, o; norms; router)."""
    kv = SIZES["num_key_value_heads"] * SIZES["head_dim"]
    attention = H * H * 2 + H * kv * 2
    if family == "gpt_oss":
        attention += H + 2 * kv + H + SIZES["num_attention_heads"]  # biases, sinks
        router = E * H + E
    else:
        router = E * H
    if family == "minimax_m2":
        router += E  # e_score_correction_bias
        attention += H + kv  # q and k norms over the whole projection
    return 2 * V * H + H + L * (attention + 2 * H + router)


def _expert_params(family: str) -> int:
    """Routed experts of every layer: gate, up, down (and gpt-oss's biases)."""
    per_expert = 3 * H * I + (2 * I + H if family == "gpt_oss" else 0)
    return L * E * per_expert


@pytest.mark.parametrize("family", ["mixtral", "minimax_m2", "gpt_oss"])
def test_active_parameters_count_k_of_e_experts(family_dirs, family):
    model_dir = family_dirs[family]
    config = json.loads((model_dir / "config.json").read_text())
    assert routing(config) == (E, K)
    total, active = parameter_counts(model_dir, config)
    experts, rest = _expert_params(family), _non_expert_params(family)
    assert total == experts + rest
    assert active == rest + experts * K // E  # was total: experts counted all active
    assert active < total


def test_fused_expert_tensors_are_the_ones_gpt_oss_saves(family_dirs):
    from krasis_registry.modelinfo import _tensor_shapes

    shapes = _tensor_shapes(family_dirs["gpt_oss"] / "model.safetensors")
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == [E, H, 2 * I]
    assert shapes["model.layers.0.mlp.experts.down_proj_bias"] == [E, H]


def test_a_nested_text_config_gives_the_routing():
    config = {"architectures": ["KimiK25ForConditionalGeneration"],
              "text_config": {"n_routed_experts": 384, "num_experts_per_tok": 8}}
    assert routing(config) == (384, 8)
    assert routing({"num_local_experts": 32, "experts_per_token": 4}) == (32, 4)
    assert routing({"hidden_size": 8}) == (0, 0)


@pytest.mark.parametrize("family", ["mixtral", "minimax_m2"])
def test_show_reports_the_counts(family_dirs, family):
    reg = Registry()
    list(reg.create(f"tiny-{family}", family_dirs[family], build_caches=False))
    shown = reg.show(f"tiny-{family}")
    rest = _non_expert_params(family)
    assert shown["parameters"] == {"total": rest + _expert_params(family),
                                   "active": rest + _expert_params(family) * K // E}


def test_gpt_oss_is_not_quantized(caplog):
    gpt_oss = {"architectures": ["GptOssForCausalLM"], "hidden_size": 2880,
               "intermediate_size": 2880, "num_local_experts": 32}
    mixtral = {**gpt_oss, "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
               "intermediate_size": 14336}
    caches._explained.clear()
    with caplog.at_level(logging.WARNING, logger="krasis_registry.caches"):
        assert caches.pick_quant(gpt_oss, "int4") is None
        assert caches.pick_quant(gpt_oss, "int8") is None
        assert caches.pick_quant(gpt_oss, "int4", group_size=64) is None  # a pinned layout too
        assert caches.pick_quant(gpt_oss, "int4") is None
    said = [r.getMessage() for r in caplog.records]
    assert said == ["not quantizing to int4: GptOssForCausalLM: the native INT4/INT8 expert "
                    "kernels do not take gpt-oss's expert biases and clamped SwiGLU yet; it is "
                    "served unquantized"]  # once
    assert caches.pick_quant(mixtral, "int4") == ("int4", 128)
    assert caches.pick_quant(mixtral, "int4", group_size=64) == ("int4", 64)
    assert caches.pick_quant(mixtral, "none") is None


def test_a_gpt_oss_create_builds_no_quantized_cache_and_says_why(family_dirs):
    from fakebuilders import fast_builder

    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=64)
    events = list(reg.create("oss", family_dirs["gpt_oss"], build_caches=["cpu"]))
    assert events[-1] == {"status": "success"}
    [skip] = [e for e in events if e["status"].startswith("skipping cpu cache")]
    assert "GptOssForCausalLM" in skip["status"] and "served unquantized" in skip["status"]
    shown = reg.show("oss")
    assert shown["state"] == "ready"
    [cache] = shown["caches"]
    assert cache["state"] == "failed" and cache["group_size"] == 0
    assert cache["error"].startswith("not built: GptOssForCausalLM: the native INT4/INT8")
    assert not list((reg.home / "caches").rglob("*.bin"))  # the builder never ran
    rest = _non_expert_params("gpt_oss")
    assert shown["parameters"]["active"] == rest + _expert_params("gpt_oss") * K // E


def test_the_daemon_serves_gpt_oss_unquantized(family_dirs):
    from krasisd.models import ModelCatalog

    config = json.loads((family_dirs["gpt_oss"] / "config.json").read_text())
    catalog = ModelCatalog.__new__(ModelCatalog)
    catalog.quant, catalog._warned = "int4", set()
    assert catalog._pick_format("oss:latest", config) == "none"
