"""GPU prefill driver: walks the engine's model over a long prompt, layer by layer.

It differs from ``CausalLM.prefill`` in three ways that matter on the GPU:
- the feed-forward part (router, shared experts, routed experts) runs ``chunk_tokens`` at a
  time, so a 32K-token prompt never holds 32K tokens of expert activations;
- MLA attention calls ``scaled_dot_product_attention`` with 4-D tensors, which the fused
  backends (cuDNN, memory-efficient) require; 3-D inputs fall back to the math backend,
  which materializes [H, T, T] scores; cuDNN is tried first (it takes MLA's 192/128 head
  sizes, flash does not);
- only the last token's logits are computed unless asked (lm_head over 10K tokens of a
  102K vocabulary would be 4 GB of float32).
The expert backend's optional ``begin_forward(num_tokens, top_k)`` hook starts the first
MoE layer's copy before the embeddings run. The caller advances the KV cache afterwards,
as ``Engine.forward`` does.

Legend: T = new tokens, S = cached + new tokens, D = hidden, H = heads, V = vocab.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def sdpa_backends():
    """Context preferring cuDNN, then memory-efficient, then flash attention; math last."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority
        return sdpa_kernel(order)


def _mla_prefill(attn, x: torch.Tensor, cos, sin, cache) -> torch.Tensor:
    """MLAttention.prefill with batched 4-D tensors: x [T, D] -> [T, D]."""
    num_new = x.shape[0]
    q_nope, q_rope = attn._query(x, cos, sin)  # [T, H, N], [T, H, R]
    entries = attn._cached(attn._latent(x, cos, sin), cache)  # [S, C + R]
    kv_latent, k_rope = entries.split([attn.latent_dim, attn.rope_dim], dim=-1)
    num_total = entries.shape[0]
    kv = attn.kv_b_proj(kv_latent).view(num_total, attn.num_heads, -1)  # [S, H, N + Dv]
    k_nope, v = kv.split([attn.nope_dim, attn.v_dim], dim=-1)
    k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, attn.num_heads, -1)], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1)  # [T, H, N + R]
    mask, is_causal = None, True
    if num_total != num_new:
        past = num_total - num_new
        key_pos = torch.arange(num_total, device=x.device)
        mask = key_pos[None, :] <= (past + torch.arange(num_new, device=x.device))[:, None]
        is_causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # [1, H, *, *]
        attn_mask=mask, is_causal=is_causal, scale=attn.scale,
    )[0]  # [H, T, Dv]
    return attn.o_proj(out.transpose(0, 1).reshape(num_new, -1))


def _attention(attn, x, cos, sin, cache) -> torch.Tensor:
    if all(hasattr(attn, n) for n in ("_query", "_latent", "_cached", "kv_b_proj", "latent_dim")):
        return _mla_prefill(attn, x, cos, sin, cache)
    return attn.prefill(x, cos, sin, cache)


def _ffn_chunked(layer, h: torch.Tensor, backend, chunk_tokens: int) -> None:
    """h [T, D] += ffn(norm(h)), ``chunk_tokens`` rows at a time (in place)."""
    for start in range(0, h.shape[0], chunk_tokens):
        part = h[start : start + chunk_tokens]  # [C, D] view
        normed = layer.post_attention_layernorm(part)
        part += layer.mlp(normed, backend) if layer.is_moe else layer.mlp(normed)


@torch.inference_mode()
def prefill_logits(model, input_ids: torch.Tensor, cache=None, chunk_tokens: int = 8192,
                   last_only: bool = True) -> torch.Tensor:
    """input_ids [T] -> float32 logits [1, V] (or [T, V] with ``last_only=False``)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    backend = model.expert_backend
    num_new = input_ids.shape[0]
    begin = getattr(backend, "begin_forward", None)
    if callable(begin):
        begin(num_new, model.config.num_experts_per_tok)
    start = cache.length if cache is not None else 0
    positions = torch.arange(start, start + num_new, device=input_ids.device)
    cos, sin = model.rotary.cos_sin(positions)  # [T, R/2] each
    x = model.model.embed_tokens(input_ids)  # [T, D]
    ctx = sdpa_backends() if x.is_cuda else contextlib.nullcontext()
    with ctx:
        for layer in model.model.layers:
            x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache)
            _ffn_chunked(layer, x, backend, chunk_tokens)
    x = x[-1:] if last_only else x
    return model.lm_head(model.model.norm(x)).float()  # [1 | T, V]
