"""gpt-oss (GptOssForCausalLM): GQA with attention sinks, sliding and full layers alternating,
biases on q/k/v/o, YaRN rotary; a biased router whose top-k logits are softmaxed; experts
with biases and a clamped SwiGLU.

The sink is a learned logit per head that joins every softmax and is then dropped: it takes
probability mass without contributing a value. Attention computes it as one extra key with
a zero value whose score is the sink, through an additive float mask, so prefill keeps
scaled_dot_product_attention's 4-D form.

The experts' activation and biases are not what the native INT4/INT8 kernels compute
(silu(gate) * up), so gpt-oss runs its routed experts on the torch reference backend
(experts.TorchExperts with experts.ClampedSwiGLU); attaching any other backend raises
UnsupportedModelError.

Legend: T = new tokens, S = cached + new tokens, H = query heads, Hkv = key/value heads,
Dh = head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from krasisd.engine.config import ModelConfig
from krasisd.engine.errors import UnsupportedModelError
from krasisd.engine.experts import ClampedSwiGLU, TorchExperts
from krasisd.engine.models.common import CausalLM, DecoderLayer, causal_mask
from krasisd.engine.models.gqa_moe import VariantAttention
from krasisd.engine.models.moe import SparseMoe


class SinkAttention(VariantAttention):
    """VariantAttention (window per layer type, biases) with a learned sink logit per head."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary):
        super().__init__(config, layer_idx, rotary)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads), requires_grad=False)  # [H]

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """q [H, T, Dh], k and v [Hkv, S, Dh] -> [T, D], each softmax joined by the head's sink."""
        num_new, num_total = q.shape[1], k.shape[1]
        if mask is None:
            mask = (causal_mask(num_new, num_total, q.device) if is_causal
                    else torch.ones(num_new, num_total, dtype=torch.bool, device=q.device))
        bias = torch.zeros(self.num_heads, num_new, num_total + 1, dtype=q.dtype,
                           device=q.device)  # [H, T, S + 1]
        bias[:, :, :num_total].masked_fill_(~mask, float("-inf"))
        bias[:, :, num_total] = self.sinks.to(q.dtype)[:, None]
        zero = k.new_zeros(k.shape[0], 1, k.shape[2])  # [Hkv, 1, Dh]: the sink's key and value
        k, v = torch.cat([k, zero], dim=1), torch.cat([v, zero], dim=1)  # [Hkv, S + 1, Dh]
        q4, k4, v4 = (t.unsqueeze(0).contiguous() for t in (q, k, v))  # [1, H|Hkv, T|S+1, Dh]
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=bias.unsqueeze(0), scale=self.scale, enable_gqa=True
        )[0]  # [H, T, Dh]
        return self.o_proj(out.transpose(0, 1).reshape(num_new, -1))


class GptOssForCausalLM(CausalLM):
    """GptOssForCausalLM: SinkAttention and the MoE block on every layer."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, [])
        for idx in range(config.num_hidden_layers):
            attn = SinkAttention(config, idx, self.rotary)
            self.model.layers.append(DecoderLayer(config, idx, attn, SparseMoe(config, idx)))

    @property
    def expert_backend(self):
        return self._expert_backend

    @expert_backend.setter
    def expert_backend(self, backend) -> None:
        """Attach the routed-expert backend, giving it gpt-oss's activation; only the torch
        reference backend computes it (and the experts' biases)."""
        if backend is not None:
            if not isinstance(backend, TorchExperts):
                raise UnsupportedModelError(
                    "gpt-oss's experts (biases, clamped SwiGLU) run only on the torch reference "
                    f"expert backend, not on {type(backend).__name__}; load it with quant='none'")
            backend.activation = ClampedSwiGLU(self.config.swiglu_alpha, self.config.swiglu_limit)
        self._expert_backend = backend
