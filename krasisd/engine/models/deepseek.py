"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and DeepSeek MoE.

The cache holds, per token and layer, only the compressed latent: kv_lora_rank normalised
values followed by qk_rope_head_dim rotated key values (576 for DeepSeek-V2-Lite).
Prefill expands the latents into per-head keys and values; decode uses the absorbed form,
folding kv_b_proj into the query and the output, and never expands K or V.

Legend: T = new tokens, S = cached + new tokens, D = hidden, H = heads, C = kv_lora_rank,
R = qk_rope_head_dim, N = qk_nope_head_dim, Dv = v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import (
    CausalLM,
    DecoderLayer,
    DenseMLP,
    RMSNorm,
    causal_mask,
    heads_first,
)
from krasisd.engine.models.moe import SparseMoe


class MLAttention(nn.Module):
    """Multi-head latent attention with prefill (expanded) and decode (absorbed) paths."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary):
        super().__init__()
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.scale = config.attention_scale
        q_out = self.num_heads * config.qk_head_dim
        bias = config.attention_bias
        self.q_lora_rank = config.q_lora_rank  # None: one q_proj; else q_a_proj, norm, q_b_proj
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, config.hidden_size, bias=bias)
        self._absorbed: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head for the absorbed form, made contiguous once:
        w_uk [H, N, C] (folded into the query) and w_uv_t [H, C, Dv] (into the output)."""
        weight = self.kv_b_proj.weight
        if self._absorbed is None or self._absorbed[0] != weight.data_ptr():
            w_kv = weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)  # [H, N + Dv, C]
            w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
            self._absorbed = (weight.data_ptr(), w_uk.contiguous(),
                              w_uv.transpose(1, 2).contiguous())
        return self._absorbed[1], self._absorbed[2]

    def query(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> q_nope [T, H, N], rotated q_rope [T, H, R]."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.num_heads, -1)  # [T, H, N + R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self.rotary.apply(q_rope, cos, sin)

    def latent(self, x, cos, sin) -> torch.Tensor:
        """x [T, D] -> cache entries [T, C + R]: normalised latent, then rotated shared key."""
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], -1)
        return torch.cat([self.kv_a_layernorm(kv_latent), self.rotary.apply(k_rope, cos, sin)], -1)

    def _cached(self, latent: torch.Tensor, cache) -> torch.Tensor:
        if cache is None:
            return latent
        return cache.append(self.layer_idx, latent)  # [S, C + R]

    def prefill(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D], expanding every cached latent into per-head K and V."""
        num_new = x.shape[0]
        q_nope, q_rope = self.query(x, cos, sin)
        entries = self._cached(self.latent(x, cos, sin), cache)  # [S, C + R]
        kv_latent, k_rope = entries.split([self.latent_dim, self.rope_dim], dim=-1)
        num_total = entries.shape[0]
        kv = self.kv_b_proj(kv_latent).view(num_total, self.num_heads, -1)  # [S, H, N + Dv]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # [T, H, N + R]
        if num_total == num_new:
            mask, is_causal = None, True
        else:
            mask, is_causal = causal_mask(num_new, num_total, x.device), False
        out = F.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v),  # [1, H, T|S, *]
            attn_mask=mask, is_causal=is_causal, scale=self.scale,
        )[0]  # [H, T, Dv]
        return self.o_proj(out.transpose(0, 1).reshape(num_new, -1))

    def decode(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D], attending over the compressed cache in absorbed form."""
        num_new = x.shape[0]
        q_nope, q_rope = self.query(x, cos, sin)  # [T, H, N], [T, H, R]
        entries = self._cached(self.latent(x, cos, sin), cache)  # [S, C + R]
        num_total = entries.shape[0]
        w_uk, w_uv_t = self.absorbed_weights()  # [H, N, C], [H, C, Dv]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, T, C]
        q_full = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1)  # [H, T, C + R]
        # one GEMM over the cache: rows are (head, token) pairs
        scores = q_full.reshape(-1, entries.shape[1]) @ entries.T  # [H*T, S]
        scores = scores.view(self.num_heads, num_new, num_total).float() * self.scale
        if num_new > 1:
            mask = causal_mask(num_new, num_total, x.device)  # [T, S]
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(entries.dtype)  # [H, T, S]
        kv_latent = entries[:, : self.latent_dim]  # [S, C], a strided view
        out_latent = probs.view(-1, num_total) @ kv_latent  # [H*T, C]
        out = torch.bmm(out_latent.view(self.num_heads, num_new, -1), w_uv_t)  # [H, T, Dv]
        return self.o_proj(out.transpose(0, 1).reshape(num_new, -1))


class DeepseekForCausalLM(CausalLM):
    """DeepseekV2ForCausalLM and DeepseekV3ForCausalLM (they differ in routing and rope layout)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, [])
        for idx in range(config.num_hidden_layers):
            attn = MLAttention(config, idx, self.rotary)
            if config.is_moe_layer(idx):
                mlp = SparseMoe(config, idx)
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size)
            self.model.layers.append(DecoderLayer(config, idx, attn, mlp))
