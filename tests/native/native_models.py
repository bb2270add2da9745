"""A tiny random DeepSeek-V2 checkpoint for the native CPU expert tests."""

import torch


def save_tiny_deepseek(path, seed: int = 0) -> None:
    """A random transformers DeepseekV2 model (3 layers, 8 experts, top-3) saved to path."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    )
    DeepseekV2ForCausalLM(config).save_pretrained(path)
