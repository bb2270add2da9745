"""MoE families beyond DeepSeek-V2 and Qwen3-MoE against transformers' own classes, on tiny
random checkpoints written by save_pretrained: Mixtral, Kimi K2 / K2.5 (DeepSeek-V3 under
Kimi's names and layout), GLM-4.5 MoE, GLM-4.7-Flash (Glm4MoeLite: DeepSeek-V3's MLA),
MiniMax-M2 and gpt-oss, two configs each.

Each is checked in float32 through the torch reference expert backend (logits, prefill plus
decode through the KV cache, greedy output over 32 tokens) and through the native INT8
backend built from the same folder (gpt-oss, whose experts the native kernels cannot
compute, is refused there with a message saying so).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from krasisd.engine import load
from krasisd.engine.config import ModelConfig
from krasisd.engine.errors import UnsupportedModelError
from krasisd.engine.experts import TorchExperts
from krasisd.engine.loader import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_shared_experts=1,
           num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, q_lora_rank=24)

# name -> (transformers class prefix, config kwargs, how the saved folder is rewritten)
VARIANTS = {
    "mixtral-top2": ("Mixtral", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
        num_experts_per_tok=2), None),
    "mixtral-window-top3": ("Mixtral", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=32, intermediate_size=64,
        num_local_experts=8, num_experts_per_tok=3, sliding_window=7), None),
    "kimi-k2": ("DeepseekV3", dict(
        MLA, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True), "kimi_k2"),
    "kimi-k25": ("DeepseekV3", dict(
        MLA, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.5,
        norm_topk_prob=True, rope_interleave=False), "kimi_k25"),
    "glm4-qknorm-partial": ("Glm4Moe", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=32, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=2,
        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5}), None),
    "glm4-plain": ("Glm4Moe", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=64,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
        norm_topk_prob=False, use_qk_norm=False, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                         "partial_rotary_factor": 0.75}), None),
    "glm4-lite-default": ("Glm4MoeLite", dict(
        MLA, num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=1.8,
        norm_topk_prob=True), None),
    "glm4-lite-layer-types": ("Glm4MoeLite", dict(
        MLA, num_hidden_layers=4, first_k_dense_replace=None, q_lora_rank=None,
        num_experts_per_tok=2, routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_interleave=False, mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 0.707,
                         "mscale_all_dim": 0.707}), None),
    "minimax-m2-rotary-dim": ("MiniMaxM2", dict(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=32, intermediate_size=32,
        num_local_experts=8, num_experts_per_tok=3, rotary_dim=16), "rotary_dim"),
    "minimax-m2-full": ("MiniMaxM2", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=16, intermediate_size=64,
        num_local_experts=6, num_experts_per_tok=4), None),
    "gpt-oss-window-yarn": ("GptOss", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=6, swiglu_limit=0.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False}), None),
    "gpt-oss-full-top1": ("GptOss", dict(
        num_hidden_layers=2, num_key_value_heads=1, head_dim=32, intermediate_size=48,
        num_local_experts=6, num_experts_per_tok=1, sliding_window=4, swiglu_limit=1.0,
        layer_types=["full_attention", "sliding_attention"]), None),
}


def make_hf_model(variant: str, seed: int = 0):
    """A transformers model with random weights: router weights spread wide, sinks large
    enough to matter, norms near one."""
    prefix, kwargs, _ = VARIANTS[variant]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("sinks"):
                param.normal_(0.0, 1.0)
            else:
                routing = ".gate." in name or ".router." in name
                param.normal_(0.0, 0.5 if routing else 0.08)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model


def save_variant(hf_model, variant: str, path: Path) -> Path:
    """save_pretrained, then the rewrite the variant asks for: Kimi K2's model_type; Kimi
    K2.5's multimodal layout (text config nested, ``language_model.`` names, a vision tensor);
    MiniMax-M2's ``rotary_dim`` as its released config.json spells it."""
    hf_model.save_pretrained(path, safe_serialization=True)
    rewrite = VARIANTS[variant][2]
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if rewrite == "kimi_k2":
        config["model_type"] = "kimi_k2"
    elif rewrite == "kimi_k25":
        text = dict(config, model_type="kimi_k2")
        config = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                  "text_config": text, "vision_config": {"hidden_size": 16},
                  "eos_token_id": text["eos_token_id"], "tie_word_embeddings": False}
        tensors = load_file(path / "model.safetensors")
        renamed = {f"language_model.{name}": t for name, t in tensors.items()}
        renamed["vision_tower.patch_embed.proj.weight"] = torch.zeros(16, 3, 2, 2)
        save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    elif rewrite == "rotary_dim":
        factor = config["rope_parameters"].pop("partial_rotary_factor")
        config["rotary_dim"] = int(factor * config["head_dim"])
    config_path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, our engine over the saved folder, the folder)."""
    torch.set_num_threads(1)
    variant = request.param
    hf_model = make_hf_model(variant)
    model_dir = save_variant(hf_model, variant, tmp_path_factory.mktemp(variant))
    engine = load(model_dir, quant="none", device="cpu")
    yield hf_model, engine, model_dir
    engine.close()


def prompt(length: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (length,), generator=gen).tolist()


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()  # [T, V]


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within TOL of the largest reference logit (float32 throughout)."""
    return (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


def test_logits_match_transformers(pair):
    hf_model, engine, _ = pair
    ids = prompt(24)
    ours = engine.logits(ids)
    assert ours.dtype == torch.float32 and ours.shape == (24, VOCAB)
    assert close(ours, hf_logits(hf_model, ids))


def test_prefill_then_decode_matches_transformers(pair):
    hf_model, engine, _ = pair
    ids = prompt(28, seed=2)
    cache = engine.new_cache(32)
    steps = [engine.forward(ids[:9], cache)]
    steps += [engine.forward([token], cache) for token in ids[9:20]]
    steps.append(engine.forward(ids[20:], cache))  # a chunk after a cached prefix
    assert cache.length == 28
    ref = hf_logits(hf_model, ids)
    assert close(torch.cat(steps), ref)
    assert close(engine.logits(ids), ref)


def test_greedy_32_tokens_match_transformers_generate(pair):
    hf_model, engine, _ = pair
    ids = prompt(6, seed=5)
    saved, engine.eos_token_ids = engine.eos_token_ids, set()
    try:
        ours = engine.greedy(ids, max_new_tokens=32)
    finally:
        engine.eos_token_ids = saved
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False)[0, len(ids):].tolist()
    assert len(ours) == 32 and ours == ref


def test_batched_decode_matches_one_sequence_at_a_time(pair):
    """decode_batch (the generation loop's step) over caches of different lengths."""
    _, engine, _ = pair
    prompts = [prompt(5, seed=11), prompt(13, seed=12)]
    caches = [engine.new_cache(16) for _ in prompts]
    for ids, cache in zip(prompts, caches, strict=True):
        engine.forward(ids, cache)
    batched = engine.decode_batch([7, 9], caches)  # [2, V]
    for row, (ids, token) in enumerate(zip(prompts, [7, 9], strict=True)):
        assert close(batched[row], engine.logits(ids + [token])[-1])


def test_bfloat16_load_stays_close(pair):
    _, engine, model_dir = pair
    bf16 = load(model_dir, dtype="bfloat16")
    ids = prompt(10, seed=7)
    assert bf16.dtype == torch.bfloat16
    per_position = (bf16.logits(ids) - engine.logits(ids)).abs().amax(dim=-1)  # [T]
    assert per_position.median().item() < 0.05  # bf16 rounding can flip a route at a position
    bf16.close()


def test_native_int8_backend(pair, tmp_path):
    """quant='int8': the CPU cache built from the folder (renamed and fused layouts included)
    holds the experts the float path runs; gpt-oss is refused with the reason."""
    hf_model, engine, model_dir = pair
    if engine.config.expert_bias:
        with pytest.raises(UnsupportedModelError, match="clamped SwiGLU.*quant='none'"):
            load(model_dir, quant="int8", threads=1, cache_dir=tmp_path / "cpu")
        return
    int8 = load(model_dir, quant="int8", threads=1, cache_dir=tmp_path / "cpu")
    assert type(int8.expert_backend).__name__ == "NativeExperts"
    ids = prompt(16, seed=7)
    ref = hf_logits(hf_model, ids)
    full = int8.logits(ids)
    # INT8 experts and dense linears on a random model this small: a few % of the top logit at
    # a typical position (at a few, INT8 rounding flips a routing choice, DeepSeek-V3's groups
    # most often, and the error is larger there)
    per_position = (full - ref).abs().amax(dim=-1)  # [T]
    assert 0 < per_position.median().item() < 0.05 * ref.abs().max().item()
    cache = int8.new_cache(16)
    steps = [int8.forward(ids[:6], cache)] + [int8.forward([t], cache) for t in ids[6:]]
    assert (torch.cat(steps) - full).abs().max().item() < 1e-3
    # each MoE layer's experts: the native INT8 backend against the float reference
    torch_backend = engine.expert_backend
    layer = next(i for i in range(engine.config.num_hidden_layers) if engine.config.is_moe_layer(i))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, engine.config.hidden_size, generator=gen)  # [T, D]
    ids_k = torch.stack([torch.randperm(engine.config.n_routed_experts, generator=gen)
                         [: engine.config.num_experts_per_tok] for _ in range(5)])  # [T, K]
    weights = torch.rand(ids_k.shape, generator=gen)  # [T, K]
    want = torch_backend(layer, x, ids_k, weights)
    got = int8.expert_backend(layer, x, ids_k, weights)
    assert (got - want).abs().max().item() < 0.03 * want.abs().max().item()
    int8.close()


# ---- configuration ----------------------------------------------------------------------


def _saved_config(variant: str, tmp_path: Path) -> dict:
    path = save_variant(make_hf_model(variant), variant, tmp_path / variant)
    return json.loads((path / "config.json").read_text())


def test_family_fields_are_parsed(tmp_path):
    glm = ModelConfig.from_dict(_saved_config("glm4-qknorm-partial", tmp_path))
    assert (glm.family, glm.qk_norm, glm.rope_dim, glm.topk_method) == (
        "glm4_moe", "head", 16, "noaux_tc")
    assert [glm.is_moe_layer(i) for i in range(3)] == [False, True, True]
    minimax = ModelConfig.from_dict(_saved_config("minimax-m2-rotary-dim", tmp_path))
    assert (minimax.qk_norm, minimax.rope_dim, minimax.head_dim) == ("projection", 16, 32)
    mixtral = ModelConfig.from_dict(_saved_config("mixtral-window-top3", tmp_path))
    assert (mixtral.moe_intermediate_size, mixtral.attention_window(0)) == (64, 7)
    oss = ModelConfig.from_dict(_saved_config("gpt-oss-full-top1", tmp_path))
    assert [oss.attention_window(i) for i in range(2)] == [None, 4]
    assert (oss.scoring_func, oss.expert_bias, oss.swiglu_limit) == ("topk_softmax", True, 1.0)
    lite = ModelConfig.from_dict(_saved_config("glm4-lite-layer-types", tmp_path))
    assert (lite.is_mla, lite.topk_method, lite.rope_interleave) == (True, "noaux_tc", False)
    assert [lite.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    kimi = ModelConfig.from_dict(_saved_config("kimi-k25", tmp_path))
    assert (kimi.architecture, kimi.is_mla, kimi.n_routed_experts) == (
        "DeepseekV3ForCausalLM", True, 8)


def test_qwen3_sliding_window_setting_stays_off():
    """Qwen3-MoE configs carry sliding_window with use_sliding_window false: no window."""
    config = ModelConfig.from_dict(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        sliding_window=4, use_sliding_window=False))
    assert config.attention_window(0) is None and config.qk_norm == "head"


@pytest.mark.parametrize(("quantization", "named"), [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "quant_method fp8"),
    ({"quant_method": "mxfp4"}, "quant_method mxfp4"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
     r"quant_method compressed-tensors \(pack-quantized\)"),
])
def test_prequantized_checkpoints_are_refused_naming_the_format(tmp_path, quantization, named):
    model_dir = save_variant(make_hf_model("mixtral-top2"), "mixtral-top2", tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=f"pre-quantized.*{named}.*bf16"):
        load(model_dir)


def test_gpt_oss_experts_refuse_other_backends(tmp_path):
    model_dir = save_variant(make_hf_model("gpt-oss-full-top1"), "gpt-oss-full-top1",
                             tmp_path / "m")
    loaded = load_model(model_dir)
    with pytest.raises(UnsupportedModelError, match="torch reference expert backend"):
        loaded.model.expert_backend = object()
    loaded.model.expert_backend = TorchExperts({})
    assert type(loaded.model.expert_backend.activation).__name__ == "ClampedSwiGLU"


# the fields that matter of the released config.json files, as they spell them
RELEASED = {
    "mistralai/Mixtral-8x7B-Instruct-v0.1": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
        intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-05, rope_theta=1000000.0,
        sliding_window=None, vocab_size=32000, torch_dtype="bfloat16"),
    "zai-org/GLM-4.5-Air": dict(
        architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", attention_bias=True,
        head_dim=128, hidden_size=4096, partial_rotary_factor=0.5, intermediate_size=10944,
        max_position_embeddings=131072, moe_intermediate_size=1408, norm_topk_prob=True,
        num_attention_heads=96, n_group=1, topk_group=1, n_routed_experts=128,
        n_shared_experts=1, routed_scaling_factor=1.0, num_experts_per_tok=8,
        first_k_dense_replace=1, num_hidden_layers=46, num_key_value_heads=8,
        rms_norm_eps=1e-05, rope_scaling=None, rope_theta=1000000, num_nextn_predict_layers=1,
        use_qk_norm=False, vocab_size=151552, eos_token_id=[151329, 151336, 151338]),
    "MiniMaxAI/MiniMax-M2": dict(
        architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", head_dim=128,
        hidden_size=3072, intermediate_size=1536, max_position_embeddings=196608,
        num_attention_heads=48, num_experts_per_tok=8, num_hidden_layers=62,
        num_key_value_heads=8, num_local_experts=256, rms_norm_eps=1e-06, rope_theta=5000000,
        rotary_dim=64, scoring_func="sigmoid", use_routing_bias=True, qk_norm_type="per_layer",
        vocab_size=200064, quantization_config={
            "activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
            "weight_block_size": [128, 128]}),
    "openai/gpt-oss-20b": dict(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", attention_bias=True,
        head_dim=64, hidden_size=2880, intermediate_size=2880,
        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
        num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24,
        num_key_value_heads=8, num_local_experts=32, rms_norm_eps=1e-05, rope_theta=150000,
        rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                      "original_max_position_embeddings": 4096, "rope_type": "yarn",
                      "truncate": False},
        sliding_window=128, swiglu_limit=7.0, vocab_size=201088,
        quantization_config={"modules_to_not_convert": ["model.layers.*.self_attn"],
                             "quant_method": "mxfp4"}),
    "moonshotai/Kimi-K2-Instruct": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=384,
        n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        first_k_dense_replace=1, num_attention_heads=64, num_key_value_heads=64,
        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, routed_scaling_factor=2.827, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, num_hidden_layers=61, vocab_size=163840,
        max_position_embeddings=131072, rope_theta=50000.0, rope_scaling={
            "type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                             "quant_method": "fp8", "weight_block_size": [128, 128]}),
}
EXPECTED = {  # repo -> (family, rotated dims, q/k norm, experts, width, window of layer 0)
    "mistralai/Mixtral-8x7B-Instruct-v0.1": ("mixtral", 128, "none", 8, 14336, None),
    "zai-org/GLM-4.5-Air": ("glm4_moe", 64, "none", 128, 1408, None),
    "MiniMaxAI/MiniMax-M2": ("minimax_m2", 64, "projection", 256, 1536, None),
    "openai/gpt-oss-20b": ("gpt_oss", 64, "none", 32, 2880, 128),
    "moonshotai/Kimi-K2-Instruct": ("deepseek", 64, "none", 384, 2048, None),
}


@pytest.mark.parametrize("repo", sorted(RELEASED))
def test_released_configs_parse_and_prequantized_ones_are_refused(repo, tmp_path):
    raw = RELEASED[repo]
    config = ModelConfig.from_dict(raw, capacity_bytes=1 << 50)
    assert (config.family, config.rope_dim, config.qk_norm, config.n_routed_experts,
            config.moe_intermediate_size, config.attention_window(0)) == EXPECTED[repo]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    if "quantization_config" in raw:
        method = raw["quantization_config"]["quant_method"]
        with pytest.raises(UnsupportedModelError, match=f"quant_method {method}"):
            load(tmp_path)


@pytest.mark.parametrize(("stored", "engine_name"), [
    ("model.layers.3.block_sparse_moe.experts.7.w1.weight",
     "model.layers.3.mlp.experts.7.gate_proj.weight"),
    ("model.layers.3.block_sparse_moe.experts.7.w3.weight",
     "model.layers.3.mlp.experts.7.up_proj.weight"),
    ("model.layers.3.block_sparse_moe.experts.7.w2.weight",
     "model.layers.3.mlp.experts.7.down_proj.weight"),
    ("model.layers.3.block_sparse_moe.gate.weight", "model.layers.3.mlp.gate.weight"),
    ("model.layers.3.block_sparse_moe.e_score_correction_bias",
     "model.layers.3.mlp.gate.e_score_correction_bias"),
    ("model.layers.0.mlp.router.bias", "model.layers.0.mlp.gate.bias"),
    ("language_model.model.layers.2.self_attn.kv_b_proj.weight",
     "model.layers.2.self_attn.kv_b_proj.weight"),
    ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.gate_proj.weight"),
    ("model.layers.1.mlp.gate.e_score_correction_bias",
     "model.layers.1.mlp.gate.e_score_correction_bias"),
    ("vision_tower.encoder.blocks.0.mlp.fc0.weight", "vision_tower.encoder.blocks.0.mlp.fc0.weight"),
])
def test_checkpoint_spellings_map_onto_the_engine_names(stored, engine_name):
    from krasisd.engine.loader import engine_name as rename

    assert rename(stored) == engine_name


def test_renamed_tensors_are_read_by_their_stored_names_on_every_path(pair, monkeypatch):
    """The CUDA branch of read_tensors asks the file for its own names, as safe_open does."""
    from krasisd.engine import loader

    _, engine, model_dir = pair
    index = loader.read_headers(loader.weight_files(model_dir))
    names = ([n for n in sorted(index) if index[n].key] or sorted(index))[:40]  # renamed first
    seen = {}

    def fake_read_to_device(path, keys, device, spans):
        assert set(spans) == set(keys)
        seen.update(loader.read_tensors({k: None for k in keys}, {
            k: loader.TensorInfo(path, spans[k]) for k in keys}))
        return {k: seen[k] for k in keys}

    monkeypatch.setattr(loader, "read_to_device", fake_read_to_device)
    on_cuda = loader.read_tensors(names, index, torch.device("cuda"))
    on_cpu = loader.read_tensors(names, index)
    assert set(on_cuda) == set(on_cpu) == set(names)
    assert all(torch.equal(on_cuda[n], on_cpu[n]) for n in names)
