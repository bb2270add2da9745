"""The engine's models against transformers' own implementations on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import VARIANTS, make_hf_model, save_hf_model

from krasisd.engine import load
from krasisd.engine.config import ModelConfig
from krasisd.engine.models.moe import scale_weights, select_experts

pytest.importorskip("transformers")

TOL = 1e-4
# (variant, written with the legacy rope_scaling spelling)
CASES = [(name, name in ("v2-greedy-yarn", "qwen3-step2-yarn")) for name in VARIANTS]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def pair(request, tmp_path_factory):
    """(transformers model, our engine) over the same saved checkpoint."""
    torch.set_num_threads(1)
    variant, legacy = request.param
    hf_model = make_hf_model(variant)
    model_dir = save_hf_model(hf_model, tmp_path_factory.mktemp(variant), legacy_rope=legacy)
    engine = load(model_dir, quant="none", device="cpu")
    yield hf_model, engine
    engine.close()


def prompt(length: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 96, (length,), generator=gen).tolist()


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()  # [T, V]


def test_logits_match_transformers(pair):
    hf_model, engine = pair
    ids = prompt(24)
    ours = engine.logits(ids)
    assert ours.dtype == torch.float32 and ours.shape == (24, 96)
    assert (ours - hf_logits(hf_model, ids)).abs().max().item() < TOL


def test_prefill_plus_16_decode_steps_equal_full_forward(pair):
    hf_model, engine = pair
    ids = prompt(24, seed=2)
    cache = engine.new_cache(32)
    steps = [engine.forward(ids[:8], cache)]
    for token in ids[8:]:
        steps.append(engine.forward([token], cache))
    assert cache.length == 24
    incremental = torch.cat(steps)  # [24, V]
    assert (incremental - engine.logits(ids)).abs().max().item() < TOL
    assert (incremental - hf_logits(hf_model, ids)).abs().max().item() < TOL


def test_chunked_prefill_matches_full_forward(pair):
    _, engine = pair
    ids = prompt(20, seed=3)
    cache = engine.new_cache(20)
    chunks = [engine.forward(ids[:6], cache), engine.forward(ids[6:13], cache),
              engine.forward(ids[13:], cache)]
    assert (torch.cat(chunks) - engine.logits(ids)).abs().max().item() < TOL


def test_multi_token_decode_path_matches_prefill(pair):
    _, engine = pair
    ids = prompt(12, seed=4)
    cache = engine.new_cache(12)
    engine.forward(ids[:5], cache)
    with torch.inference_mode():
        out = engine.model.decode(torch.tensor(ids[5:]), cache)  # 7 tokens, masked absorbed form
    assert (out - engine.logits(ids)[5:]).abs().max().item() < TOL


def test_greedy_matches_transformers_generate(pair):
    hf_model, engine = pair
    ids = prompt(6, seed=5)
    ours = engine.greedy(ids, max_new_tokens=32)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                eos_token_id=sorted(engine.eos_token_ids))[0, len(ids):].tolist()
    assert ours == ref
    assert len(ours) == 32 or ours[-1] in engine.eos_token_ids


def test_greedy_runs_32_tokens_without_eos(pair):
    hf_model, engine = pair
    ids = prompt(5, seed=6)
    saved, engine.eos_token_ids = engine.eos_token_ids, set()
    try:
        ours = engine.greedy(ids, max_new_tokens=32)
    finally:
        engine.eos_token_ids = saved
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False)[0, len(ids):].tolist()
    assert len(ours) == 32 and ours == ref


def test_bfloat16_load_stays_close(pair, tmp_path):
    hf_model, engine = pair
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    bf16 = load(tmp_path, dtype="bfloat16")
    ids = prompt(10, seed=7)
    assert bf16.new_cache(4).nbytes * 2 == engine.new_cache(4).nbytes
    diff = (bf16.logits(ids) - engine.logits(ids)).abs().max().item()
    assert diff < 0.1


def _config(**overrides) -> ModelConfig:
    base = dict(architecture="DeepseekV2ForCausalLM", vocab_size=32, hidden_size=16,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=32, moe_intermediate_size=8, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=8,
                num_experts_per_tok=2)
    return ModelConfig(**{**base, **overrides})


def test_deepseek_v2_norm_topk_prob_normalises_without_scaling():
    weights = torch.tensor([[0.3, 0.1]])
    normed = scale_weights(_config(norm_topk_prob=True, routed_scaling_factor=16.0), weights)
    scaled = scale_weights(_config(norm_topk_prob=False, routed_scaling_factor=16.0), weights)
    assert torch.allclose(normed, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(scaled, torch.tensor([[4.8, 1.6]]))


def test_group_limited_greedy_only_picks_from_best_groups():
    config = _config(topk_method="group_limited_greedy", n_group=4, topk_group=1,
                     num_experts_per_tok=2)
    scores = torch.tensor([[0.05, 0.05, 0.30, 0.01, 0.20, 0.19, 0.10, 0.10]])
    assert sorted(select_experts(config, scores, None)[0].tolist()) == [2, 3]


def test_noaux_tc_group_choice_includes_correction_bias():
    config = _config(architecture="DeepseekV3ForCausalLM", topk_method="noaux_tc",
                     scoring_func="sigmoid", n_group=2, topk_group=1, num_experts_per_tok=2)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.9, 1.0, 0.0])
    assert sorted(select_experts(config, scores, None)[0].tolist()) == [0, 1]
    assert sorted(select_experts(config, scores, bias)[0].tolist()) == [4, 6]


def test_moe_layer_placement_rules():
    v2 = _config(first_k_dense_replace=1, moe_layer_freq=2)
    assert [v2.is_moe_layer(i) for i in range(4)] == [False, False, True, False]
    qwen = _config(architecture="Qwen3MoeForCausalLM", head_dim=8, decoder_sparse_step=2,
                   mlp_only_layers=(3,))
    assert [qwen.is_moe_layer(i) for i in range(4)] == [False, True, False, False]


def test_kv_cache_width_of_deepseek_v2_lite_is_576():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "configs" / "deepseek-v2-lite.json"
    config = ModelConfig.from_dict(json.loads(path.read_text()))
    assert config.kv_cache_width == 576
    assert config.rope_type == "yarn" and config.rope_factor == 40.0


def test_rotary_tables_into_given_buffers_and_one_copy_per_device():
    from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2
    from krasisd.engine.models.common import RotaryEmbedding

    rotary = RotaryEmbedding(ModelConfig.from_dict(TINY_DEEPSEEK_V2))
    positions = torch.tensor([0, 5, 300])
    cos, sin = rotary.cos_sin(positions)
    out = (torch.empty_like(cos), torch.empty_like(sin))
    assert all(a is b for a, b in zip(rotary.cos_sin(positions, out=out), out, strict=True))
    assert torch.equal(out[0], cos) and torch.equal(out[1], sin)
    assert rotary.inv_freq_on("meta") is rotary.inv_freq_on(torch.device("meta"))
    assert rotary.inv_freq_on("cpu") is rotary.inv_freq


def test_prefill_attention_is_4d_and_contiguous(pair, monkeypatch):
    """The form in which a fused SDPA backend (cuDNN, memory-efficient, flash) can take
    prefill attention on the GPU: [B, H, T, D] with contiguous inputs (3-D inputs take the
    math backend there, which materializes the [H, T, S] scores)."""
    _, engine = pair
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append([(t.dim(), t.is_contiguous()) for t in (q, k, v)])
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    ids = prompt(12, seed=3)
    cache = engine.new_cache(16)
    engine.forward(ids[:8], cache)  # no cached prefix: causal
    engine.forward(ids[8:], cache)  # after a cached prefix: a mask
    layers = engine.config.num_hidden_layers
    assert len(seen) == 2 * layers
    assert all(call == [(4, True)] * 3 for call in seen)
