"""Pieces every model shares: RMSNorm, rotary embeddings (default, linear, YaRN), SwiGLU MLP,
and the embed -> layers -> norm -> head skeleton with separate prefill and decode paths.

All code is plain torch and device-agnostic: tensors stay where the weights are.
Legend: T = new tokens, S = cached + new tokens, D = hidden, R = rotary dims, V = vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from krasisd.engine.config import ModelConfig, yarn_get_mscale


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the reference implementations do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DenseMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] (float32, CPU) and the factor applied to cos and sin."""
    dim, base = config.rope_dim, config.rope_theta
    steps = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu")
    pos_freqs = base ** (steps / dim)  # [R/2]
    if config.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if config.rope_type == "linear":
        return 1.0 / (pos_freqs * config.rope_factor), 1.0
    return _yarn_inv_freq(config, pos_freqs)


def _yarn_inv_freq(config: ModelConfig, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor, dim, base = config.rope_factor, config.rope_dim, config.rope_theta
    attention_factor = config.rope_attention_factor
    if attention_factor is None:
        if config.rope_mscale and config.rope_mscale_all_dim:
            attention_factor = (yarn_get_mscale(factor, config.rope_mscale)
                                / yarn_get_mscale(factor, config.rope_mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    original = config.rope_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)  # [R/2]
    extrapolation = 1 - ramp  # [R/2]: 1 keeps the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables for given positions; ``interleave`` picks DeepSeek's pair layout."""

    def __init__(self, config: ModelConfig):
        self.inv_freq, self.attention_factor = rope_inv_freq(config)
        self.interleave = config.rope_interleave
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # copies on other devices

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """inv_freq [R/2] on ``device``, copied once (a CUDA graph captures no copy)."""
        device = torch.device(device)
        if device == self.inv_freq.device:
            return self.inv_freq
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        return self._inv_freq_on[device]

    def cos_sin(self, positions: torch.Tensor, out: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, R/2] in float32, scaled by the attention factor
        (written into ``out``'s two tensors when given)."""
        freqs = positions.float()[:, None] * self.inv_freq_on(positions.device)[None, :]
        if out is None:
            return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        cos, sin = out
        torch.mul(freqs.cos(), self.attention_factor, out=cos)
        torch.mul(freqs.sin(), self.attention_factor, out=sin)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, R] or [T, H, R]; the output is the same for q and k up to one shared
        permutation of the R dims, which leaves q.k unchanged."""
        if x.dim() == 3:
            cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2]
        x32 = x.float()
        if self.interleave:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x32[..., :half], x32[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)


def causal_mask(num_new: int, num_total: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S]: new token t (at position S - T + t) sees cached positions <= its own."""
    past = num_total - num_new
    key_pos = torch.arange(num_total, device=device)  # [S]
    query_pos = past + torch.arange(num_new, device=device)  # [T]
    return key_pos[None, :] <= query_pos[:, None]


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[T, H, Dh] -> contiguous [1, H, T, Dh]: the 4-D form in which scaled_dot_product_attention
    can take a fused backend on the GPU (cuDNN, memory-efficient, flash); 3-D inputs fall back
    to the math backend, which materializes the [H, T, S] scores."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


class CausalLM(nn.Module):
    """embed -> decoder layers -> norm -> lm_head. Subclasses build ``self.model.layers``.

    Each layer has ``prefill(x, cos, sin, cache)`` and ``decode(x, cos, sin, cache)``; the
    routed experts are computed by ``self.expert_backend`` (an ExpertBackend), set by the loader.
    """

    def __init__(self, config: ModelConfig, layers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        # no random init: models are built on the meta device and their weights assigned, and
        # normal_ on a meta tensor imports torch's Python reference ops (2-4 s per process)
        self.model.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.expert_backend = None

    def prefill(self, input_ids: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        """input_ids [T] -> float32 logits [T, V] ([1, V] with ``last_only``); full attention
        over cache + new tokens."""
        return self._run(input_ids, cache, decode=False, last_only=last_only)

    def decode(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """input_ids [T] (usually T = 1) -> float32 logits [T, V] through the cached decode path."""
        return self._run(input_ids, cache, decode=True)

    def _run(self, input_ids: torch.Tensor, cache, decode: bool,
             last_only: bool = False) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[0], device=input_ids.device)
        cos, sin = self.rotary.cos_sin(positions)  # [T, R/2] each
        x = self.model.embed_tokens(input_ids)  # [T, D]
        for layer in self.model.layers:
            step = layer.decode if decode else layer.prefill
            x = step(x, cos, sin, cache, self.expert_backend)
        if last_only:
            x = x[-1:]  # [1, D]: the output head only where the next token is drawn
        x = self.model.norm(x)
        return self.lm_head(x).float()  # [T, V]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then a dense MLP or a sparse MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)

    def prefill(self, x, cos, sin, cache, backend):
        h = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, cache)
        return h + self.ffn(self.post_attention_layernorm(h), backend)

    def decode(self, x, cos, sin, cache, backend):
        h = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache)
        return h + self.ffn(self.post_attention_layernorm(h), backend)

    def ffn(self, x: torch.Tensor, backend) -> torch.Tensor:
        """The feed-forward part of normed x [T, D]: the dense MLP, or the MoE block with its
        routed experts through ``backend``."""
        return self.mlp(x, backend) if self.is_moe else self.mlp(x)

