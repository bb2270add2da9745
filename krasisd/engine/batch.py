"""A decode step of several sequences at once: ``batched_decode``, the CPU engine's
``Engine.decode_batch`` (krasisd.engine.loop runs it for every sequence decoding in a step).

Embeddings, norms, router, routed and shared experts and the output head run once over the
B tokens (so each expert's weights are read once per step, not once per sequence); attention
runs per sequence over its own cache (their lengths differ), so nothing needs padding or
masking.

Legend: B = sequences in the step, D = hidden, V = vocab, R = rotary dims.
"""

from __future__ import annotations

import torch

from krasisd.engine.kv_cache import MLAKVCache


@torch.inference_mode()
def batched_decode(model, token_ids: list[int], caches: list) -> torch.Tensor:
    """One decode step of B sequences: token_ids [B], caches [B] -> float32 logits [B, V]."""
    if len(token_ids) != len(caches) or not caches:
        raise ValueError("batched_decode needs one token per cache and at least one cache")
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("a cache appears twice in one batch")
    for cache in caches:
        cache.check_room(1)
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)  # [B]
    lengths = [c.length for c in caches]
    positions = torch.tensor(lengths, dtype=torch.long, device=device)  # [B]
    cos, sin = model.rotary.cos_sin(positions)  # [B, R/2] each
    x = model.model.embed_tokens(ids)  # [B, D]
    backend = model.expert_backend
    norm = _norm_op(device)
    compressed = isinstance(caches[0], MLAKVCache)
    for layer in model.model.layers:
        normed = norm(layer.input_layernorm, x)  # [B, D]
        idx, attn_module = layer.layer_idx, layer.self_attn
        entries = [c.entries[idx] for c in caches] if compressed else None
        if entries is not None and _rows_fit(attn_module, entries[0]):  # fused, on CUDA
            from krasisd.engine.gpu.decode_attention import mla_rows

            attn = mla_rows(attn_module, normed, entries, positions, lengths, cos, sin)
        else:
            attn = torch.cat([
                attn_module.decode(normed[b : b + 1], cos[b : b + 1], sin[b : b + 1], cache)
                for b, cache in enumerate(caches)
            ])  # [B, D]
        h = x + attn
        x = h + layer.ffn(norm(layer.post_attention_layernorm, h), backend)
    logits = model.lm_head(norm(model.model.norm, x)).float()  # [B, V]
    for cache in caches:
        cache.advance(1)
    return logits


def _norm_op(device: torch.device):
    """RMSNorm modules applied as one Triton launch on CUDA, as the module elsewhere."""
    if device.type != "cuda":
        return lambda module, x: module(x)
    from krasisd.engine.gpu.decode_attention import norm

    return lambda module, x: norm(module, x, fused=True)


def _rows_fit(attn, entries: torch.Tensor) -> bool:
    """Whether the GPU's batched MLA attention takes this layer (Triton present, on CUDA)."""
    if entries.device.type != "cuda":
        return False
    from krasisd.engine.gpu.decode_attention import rows_fit

    return rows_fit(attn, entries)
