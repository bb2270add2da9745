"""GQA MoE families beyond Qwen3-MoE: Mixtral, GLM-4.5/4.6/4.7 (Glm4Moe) and MiniMax-M2.

They share Qwen3-MoE's attention (qwen3_moe.GQAttention), its cache and the router and MoE block
of moe.py; what differs is configuration, handled by ``VariantAttention``:

- q/k RMSNorm per head (Qwen3, GLM with ``use_qk_norm``), over the whole projection before the
  heads are split (MiniMax-M2), or none (Mixtral, GLM without it);
- partial rotary: only the first ``rope_dim`` dims of each head rotate (GLM's
  ``partial_rotary_factor``, MiniMax-M2's ``rotary_dim``), half-split pairs;
- biases on q/k/v without one on the output (GLM's ``attention_bias``);
- sliding-window attention (Mixtral's ``sliding_window``; gpt-oss's sliding layers).

Routing, from config.py: Mixtral is softmax top-k renormalised (``greedy``); GLM is
DeepSeek-V3's ``noaux_tc`` (sigmoid, correction bias, groups) with shared experts and dense
first layers; MiniMax-M2 is ``noaux_tc`` with one group (sigmoid plus bias picks, the picked
sigmoids renormalised).

Legend: T = new tokens, S = cached + new tokens, D = hidden, H = query heads,
Hkv = key/value heads, Dh = head_dim, R = rotated dims per head.
"""

from __future__ import annotations

import torch
from torch import nn

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import CausalLM, DecoderLayer, DenseMLP, RMSNorm, causal_mask
from krasisd.engine.models.moe import SparseMoe
from krasisd.engine.models.qwen3_moe import GQAttention

# families whose output projection has no bias even when q/k/v have one (attention_bias)
NO_OUTPUT_BIAS = ("glm4_moe",)


def window_mask(num_new: int, num_total: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S]: causal, and a query sees only the ``window`` positions ending at its own
    (as transformers: key_pos > query_pos - window)."""
    past = num_total - num_new
    key_pos = torch.arange(num_total, device=device)  # [S]
    query_pos = past + torch.arange(num_new, device=device)  # [T]
    offset = query_pos[:, None] - key_pos[None, :]  # [T, S]
    return (offset >= 0) & (offset < window)


class VariantAttention(GQAttention):
    """GQAttention with the q/k norm kind, partial rotary, output bias and sliding window of
    the config (see the module's docstring)."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary):
        super().__init__(config, layer_idx, rotary)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if config.attention_bias and config.family in NO_OUTPUT_BIAS:
            self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm == "none":
            self.q_norm = self.k_norm = None
        elif self.qk_norm == "projection":
            self.q_norm = RMSNorm(q_width, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_width, config.rms_norm_eps)
        self.rope_dim = config.rope_dim
        self.window = config.attention_window(layer_idx)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, Dh] with its first R dims rotated (all of them without partial rotary)."""
        if self.rope_dim == self.head_dim:
            return self.rotary.apply(x, cos, sin)
        rotated = self.rotary.apply(x[..., : self.rope_dim], cos, sin)  # [T, H, R]
        return torch.cat([rotated, x[..., self.rope_dim :]], dim=-1)

    def _qkv(self, x, cos, sin, cache):
        """x [T, D] -> q [H, T, Dh], k and v [Hkv, S, Dh] (cached + new)."""
        num_new = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*Dh], [T, Hkv*Dh] x 2
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(num_new, self.num_heads, self.head_dim)  # [T, H, Dh]
        k = k.view(num_new, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = v.view(num_new, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # [S, Hkv, Dh] each
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def mask(self, num_new: int, num_total: int, device) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [T, S] or None, is_causal) for T new queries over S keys."""
        if self.window is not None and num_total > self.window:
            return window_mask(num_new, num_total, self.window, device), False
        if num_new == num_total:
            return None, True
        if num_new == 1:
            return None, False
        return causal_mask(num_new, num_total, device), False

    def prefill(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D] over cached + new tokens (causal, within the window if any)."""
        q, k, v = self._qkv(x, cos, sin, cache)
        return self._attend(q, k, v, *self.mask(q.shape[1], k.shape[1], x.device))

    decode = prefill  # one new token needs no mask unless a window cuts the cache


class GqaMoeForCausalLM(CausalLM):
    """MixtralForCausalLM, Glm4MoeForCausalLM and MiniMaxM2ForCausalLM: VariantAttention, then
    a dense SwiGLU MLP (GLM's first ``first_k_dense_replace`` layers) or the MoE block."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, [])
        for idx in range(config.num_hidden_layers):
            attn = VariantAttention(config, idx, self.rotary)
            if config.is_moe_layer(idx):
                mlp = SparseMoe(config, idx)
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size)
            self.model.layers.append(DecoderLayer(config, idx, attn, mlp))
