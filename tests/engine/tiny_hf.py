"""Tiny random checkpoints written by transformers itself, the oracle for the engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_shared_experts=1)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

# name -> (transformers config class, model class, kwargs)
VARIANTS = {
    "v2-greedy-yarn": ("DeepseekV2", dict(
        MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=2, q_lora_rank=None, topk_method="greedy",
        routed_scaling_factor=1.0, rope_scaling=dict(YARN))),
    "v2-group-qlora": ("DeepseekV2", dict(
        MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=3, q_lora_rank=24, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=2.0)),
    "v3-noaux": ("DeepseekV3", dict(
        MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=3, q_lora_rank=24, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_scaling=dict(YARN))),
    "v3-plain": ("DeepseekV3", dict(
        MLA, num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=8,
        num_experts_per_tok=2, q_lora_rank=None, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, rope_interleave=False)),
    "qwen3-moe": ("Qwen3Moe", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=10000.0)),
    "qwen3-step2-yarn": ("Qwen3Moe", dict(
        num_hidden_layers=2, num_key_value_heads=1, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
        decoder_sparse_step=2, rope_theta=1000.0, rope_scaling={
            "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128})),
}


def make_hf_model(variant: str, seed: int = 0):
    """A transformers model for a variant, with random weights (router weights spread wide)."""
    import transformers

    prefix, kwargs = VARIANTS[variant]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.08 if ".gate." not in name else 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model


def save_hf_model(model, path: Path, legacy_rope: bool = False) -> Path:
    """save_pretrained with safetensors; optionally rewrite config.json's rope as legacy
    ``rope_scaling`` + top-level ``rope_theta``."""
    model.save_pretrained(path, safe_serialization=True)
    if legacy_rope:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        params.pop("rope_type", None)
        cfg["rope_scaling"] = params if params.get("type") else None
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return path
