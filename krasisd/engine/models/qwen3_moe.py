"""Qwen3-MoE: grouped-query attention with per-head q/k RMSNorm, softmax top-k experts.

Legend: T = new tokens, S = cached + new tokens, D = hidden, H = query heads,
Hkv = key/value heads, Dh = head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import CausalLM, DecoderLayer, DenseMLP, RMSNorm, causal_mask
from krasisd.engine.models.moe import SparseMoe


class GQAttention(nn.Module):
    """Grouped-query attention over a cache of rotated keys and values."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary):
        super().__init__()
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _qkv(self, x, cos, sin, cache):
        """x [T, D] -> q [H, T, Dh], k and v [Hkv, S, Dh] (cached + new)."""
        num_new = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(num_new, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(num_new, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(num_new, self.num_kv_heads, self.head_dim)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # [S, Hkv, Dh] each
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """q [H, T, Dh], k and v [Hkv, S, Dh] -> [T, D]; 4-D and contiguous, the form in which
        a fused SDPA backend can take it on the GPU."""
        q4, k4, v4 = (t.unsqueeze(0).contiguous() for t in (q, k, v))  # [1, H|Hkv, T|S, Dh]
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=True
        )[0]  # [H, T, Dh]
        return self.o_proj(out.transpose(0, 1).reshape(q.shape[1], -1))

    def prefill(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D] with a causal mask over cached + new tokens."""
        q, k, v = self._qkv(x, cos, sin, cache)
        num_new, num_total = q.shape[1], k.shape[1]
        if num_new == num_total:
            return self._attend(q, k, v, None, True)
        return self._attend(q, k, v, causal_mask(num_new, num_total, x.device), False)

    def decode(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D]; one new token sees the whole cache, so no mask is needed."""
        q, k, v = self._qkv(x, cos, sin, cache)
        num_new, num_total = q.shape[1], k.shape[1]
        mask = None if num_new == 1 else causal_mask(num_new, num_total, x.device)
        return self._attend(q, k, v, mask, False)


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3MoeForCausalLM: MoE where (i + 1) % decoder_sparse_step == 0, but mlp_only_layers."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, [])
        for idx in range(config.num_hidden_layers):
            attn = GQAttention(config, idx, self.rotary)
            if config.is_moe_layer(idx):
                mlp = SparseMoe(config, idx)
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size)
            self.model.layers.append(DecoderLayer(config, idx, attn, mlp))
