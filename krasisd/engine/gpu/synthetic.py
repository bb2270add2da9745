"""Random-weight models with real shapes, for GPU benchmarks and tests.

Dense weights are drawn straight on the target device; routed experts are drawn on the
quantization device layer by layer and quantized there into the GPU format, so no
full-precision copy of all experts ever exists (31 GB for DeepSeek-V2-Lite in bf16).

Legend: E = experts, I = moe_intermediate_size, D = hidden.
"""

from __future__ import annotations

import math

import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.format import ExpertLayout, QuantSpec
from krasisd.engine.gpu.host import HostExperts, to_host
from krasisd.engine.models import build_model

# A DeepSeek-V2 config small enough for CPU tests, with group-size-32 friendly widths.
TINY_DEEPSEEK_V2 = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=96,
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
    num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, moe_layer_freq=1,
    topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, scoring_func="softmax", hidden_act="silu",
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000, bos_token_id=0,
    eos_token_id=1, tie_word_embeddings=False,
)
# A Qwen3-MoE config of the same size (GQA, q/k norm, a dense layer among MoE layers).
TINY_QWEN3_MOE = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=96,
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
    rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-6, eos_token_id=1,
)



@torch.no_grad()
def synthetic_model(config: ModelConfig, device, dtype=torch.bfloat16, seed: int = 0):
    """The engine's model for ``config`` with random dense weights (no routed experts)."""
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen, device=device))
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=gen, device=device))
        elif name.endswith("mlp.gate.weight"):  # router: spread the scores
            param.copy_(torch.randn(param.shape, generator=gen, device=device))
        elif param.dim() == 2:
            std = 1.0 / math.sqrt(param.shape[1])
            param.copy_(std * torch.randn(param.shape, generator=gen, device=device))
        else:
            param.zero_()
    return model.eval()


def dense_bytes(model) -> int:
    """Bytes of every parameter and buffer of the model (the dense weights)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def synthetic_expert_weights(config: ModelConfig, layer: int, device, seed: int = 0):
    """Stacked float weights of one layer: gate/up [E, I, D], down [E, D, I]."""
    e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + layer)
    gate = torch.randn(e, i, d, generator=gen, device=device) / math.sqrt(d)
    up = torch.randn(e, i, d, generator=gen, device=device) / math.sqrt(d)
    down = torch.randn(e, d, i, generator=gen, device=device) / math.sqrt(i)
    return gate, up, down


def synthetic_engine(config: ModelConfig, device, dtype: torch.dtype, seed: int = 0) -> Engine:
    """An Engine of ``synthetic_model`` with its routed experts as float weights in ``dtype``
    (``synthetic_expert_weights``, the TorchExperts reference); no end-of-sequence token."""
    model = synthetic_model(config, device, dtype, seed=seed)
    experts = {layer: tuple(w.to(dtype) for w in synthetic_expert_weights(config, layer, device,
                                                                         seed))
               for layer in range(config.num_hidden_layers) if config.is_moe_layer(layer)}
    return Engine(config, model, TorchExperts(experts), eos_token_ids=set())


@torch.no_grad()
def synthetic_host_experts(config: ModelConfig, spec: QuantSpec, quant_device, seed: int = 0,
                           pin: bool | None = None) -> HostExperts:
    """Routed experts of every MoE layer, drawn and quantized on ``quant_device``."""
    layout = ExpertLayout(config.hidden_size, config.moe_intermediate_size, spec)
    layers = {}
    for layer in range(config.num_hidden_layers):
        if not config.is_moe_layer(layer):
            continue
        gate, up, down = synthetic_expert_weights(config, layer, quant_device, seed)
        layers[layer] = to_host(layout.pack_experts(gate, up, down), pin)  # [E, B]
        del gate, up, down
    return HostExperts(layout, layers, config.n_routed_experts)
