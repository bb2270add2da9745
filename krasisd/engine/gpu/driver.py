"""GPU prefill driver: walks the engine's model over a long prompt, layer by layer.

It differs from ``CausalLM.prefill`` in three ways that matter on the GPU:
- the feed-forward part (router, shared experts, routed experts) runs ``chunk_tokens`` at a
  time, so a 32K-token prompt never holds 32K tokens of expert activations;
- attention (the model's own ``prefill``, which calls ``scaled_dot_product_attention`` with
  the 4-D contiguous tensors the fused backends take) tries cuDNN first (it takes MLA's
  192/128 head sizes, flash does not);
- only the last token's logits are computed unless asked (lm_head over 10K tokens of a
  102K vocabulary would be 4 GB of float32).
The expert backend's ``begin_forward(num_tokens, top_k)`` (krasisd.engine.experts) starts
the first MoE layer's copy before the embeddings run. The caller advances the KV cache
afterwards, as ``Engine.forward`` does.

Legend: T = new tokens, S = cached + new tokens, D = hidden, H = heads, V = vocab.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def sdpa_backends():
    """Context preferring cuDNN, then memory-efficient, then flash attention, then math,
    among the backends the caller left enabled (an enclosing ``sdpa_kernel`` that excludes
    math stays in force)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    enabled = {SDPBackend.CUDNN_ATTENTION: cuda.cudnn_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: cuda.mem_efficient_sdp_enabled(),
               SDPBackend.FLASH_ATTENTION: cuda.flash_sdp_enabled(),
               SDPBackend.MATH: cuda.math_sdp_enabled()}
    order = [backend for backend, on in enabled.items() if on]
    if not order:
        return contextlib.nullcontext()
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: the same backends, torch's order
        return sdpa_kernel(order)


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
    backend.begin_forward(num_new, model.config.num_experts_per_tok)
    start = cache.length if cache is not None else 0
    positions = torch.arange(start, start + num_new, device=input_ids.device)
    cos, sin = model.rotary.cos_sin(positions)  # [T, R/2] each
    x = model.model.embed_tokens(input_ids)  # [T, D]
    ctx = sdpa_backends() if x.is_cuda else contextlib.nullcontext()
    with ctx:
        for layer in model.model.layers:
            x = x + layer.self_attn.prefill(layer.input_layernorm(x), cos, sin, cache)
            _ffn_chunked(layer, x, backend, chunk_tokens)
    x = x[-1:] if last_only else x
    return model.lm_head(model.model.norm(x)).float()  # [1 | T, V]
