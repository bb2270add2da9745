"""One-token attention over a fixed window of the KV cache, for the decode step
(krasisd.engine.gpu.graphs): the window is a bucket of S positions, masked past the token's
position, which lives in a device buffer so the step can replay as a CUDA graph.

``fused=True`` runs the Triton kernels of krasisd.engine.gpu.fused (rotary, norms, softmax,
cache write in a few launches); ``fused=False`` the plain torch code, the reference.

Legend: D = hidden, H = heads, C = kv_lora_rank, R = rope dims, N = nope dims, Dv = value
dims, S = attended positions, Hkv = key/value heads, Dh = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from krasisd.engine.gpu import fused as kernels
from krasisd.engine.gpu.mla_decode import mla_decode_attention
from krasisd.engine.models.deepseek import MLAttention


@dataclass
class Position:
    """The token's position [1] (int64), its rotary cos/sin [1, R/2] (float32, scaled by the
    attention factor) and the attended window's length S, for one step."""

    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bucket: int

    def masked(self) -> torch.Tensor:
        """[1, S] True where a position is past the current token."""
        return (torch.arange(self.bucket, device=self.pos.device) > self.pos)[None, :]


def norm(module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """An RMSNorm module applied to rows of x, in one launch when fused."""
    if not fused:
        return module(x)
    out = torch.empty_like(x)
    kernels.rmsnorm(x, module.weight, module.eps, out)
    return out


def mla(attn, x: torch.Tensor, entries: torch.Tensor, at: Position, fused: bool) -> torch.Tensor:
    """Absorbed MLA of x [1, D] over the layer's cache entries [M, C + R] (the new entry is
    written at the position): [1, D]."""
    q_full = (_mla_query_fused if fused else _mla_query)(attn, x, entries, at)  # [H, C + R]
    window = entries[: at.bucket]  # [S, C + R]
    if fused and _flash_fits(entries):  # flash-decoding: the window is read once
        out_latent = mla_decode_attention(q_full, entries, at.pos, at.bucket, attn.scale,
                                          attn.latent_dim)  # [H, C]
    elif fused:
        scores = q_full @ window.T  # [H, S]: one GEMM
        probs = torch.empty_like(scores)
        kernels.masked_softmax(scores, at.pos, attn.scale, probs)
        out_latent = probs @ window[:, : attn.latent_dim]  # [H, C]
    else:
        scores = (q_full @ window.T).float() * attn.scale  # [H, S]
        probs = scores.masked_fill(at.masked(), float("-inf")).softmax(dim=-1)
        out_latent = probs.to(window.dtype) @ window[:, : attn.latent_dim]  # [H, C]
    _, w_uv_t = attn.absorbed_weights()  # [H, C, Dv]
    out = torch.bmm(out_latent[:, None, :], w_uv_t)  # [H, 1, Dv]
    return attn.o_proj(out.view(1, -1))


def mla_rows(attn, x: torch.Tensor, entries: list[torch.Tensor], positions: torch.Tensor,
             lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Absorbed MLA for the tokens x [B, D] of B sequences, each with its own cache entries
    [M, C + R] and position (positions [B] int64 on the device, lengths [B] the same on the
    host; cos/sin [B, R/2]): [B, D]. The projections run once over the B rows; the cache
    write and the flash-decoding attention once per sequence (fused kernels only: check
    ``rows_fit`` first)."""
    rows, heads, latent = x.shape[0], attn.num_heads, attn.latent_dim
    q, kv = _mla_projections(attn, x)  # [B, H (N + R)], [B, C + R]
    q = q.view(rows, heads, -1)  # [B, H, N + R]
    w_uk, w_uv_t = attn.absorbed_weights()  # [H, N, C], [H, C, Dv]
    q_latent = torch.bmm(q[:, :, : attn.nope_dim].transpose(0, 1), w_uk)  # [H, B, C]
    q_latent = q_latent.transpose(0, 1).contiguous()  # [B, H, C]
    q_full = torch.empty(rows, heads, entries[0].shape[1], dtype=x.dtype, device=x.device)
    out_latent = torch.empty(rows, heads, latent, dtype=x.dtype, device=x.device)  # [B, H, C]
    for b in range(rows):
        kernels.mla_prep(q[b], q_latent[b], kv[b], cos[b], sin[b], attn.kv_a_layernorm.weight,
                         attn.kv_a_layernorm.eps, positions[b : b + 1], entries[b], q_full[b],
                         attn.rotary.interleave)
        mla_decode_attention(q_full[b], entries[b], positions[b : b + 1], lengths[b] + 1,
                             attn.scale, latent, out=out_latent[b])
    out = torch.bmm(out_latent.transpose(0, 1), w_uv_t)  # [H, B, Dv]
    return attn.o_proj(out.transpose(0, 1).reshape(rows, -1))


def rows_fit(attn, entries: torch.Tensor) -> bool:
    """Whether ``mla_rows`` takes this layer (MLA, on CUDA, a half-precision cache)."""
    return (isinstance(attn, MLAttention) and entries.device.type == "cuda"
            and _flash_fits(entries))


def _flash_fits(entries: torch.Tensor) -> bool:
    """Whether mla_decode's kernels take this layer: they need a half-precision cache."""
    return entries.dtype in (torch.bfloat16, torch.float16)


def _mla_query(attn, x, entries, at: Position) -> torch.Tensor:
    """The torch reference: writes the entry, returns the absorbed query [H, C + R]."""
    q_nope, q_rope = attn.query(x, at.cos, at.sin)  # [1, H, N], [1, H, R]
    entries.index_copy_(0, at.pos, attn.latent(x, at.cos, at.sin))
    w_uk, _ = attn.absorbed_weights()  # [H, N, C]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, 1, C]
    q_full = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1)  # [H, 1, C + R]
    return q_full.view(attn.num_heads, -1)


def _mla_projections(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's query and compressed key/value projections of x [T, D]: q [T, H (N + R)],
    kv [T, C + R] (both in one launch where the layer has q_proj and no kv bias)."""
    kv_a = attn.kv_a_proj_with_mqa
    if attn.q_lora_rank is None and kv_a.bias is None:
        qkv = kernels.project(attn, "_q_kv_weight", (attn.q_proj, kv_a), x)
        return qkv.split([attn.q_proj.out_features, kv_a.out_features], dim=1)
    if attn.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(norm(attn.q_a_layernorm, attn.q_a_proj(x), fused=True))
    return q, kv_a(x)


def _mla_query_fused(attn, x, entries, at: Position) -> torch.Tensor:
    q, kv = _mla_projections(attn, x)  # [1, H (N + R)], [1, C + R]
    q = q.view(attn.num_heads, -1)  # [H, N + R]
    w_uk, _ = attn.absorbed_weights()  # [H, N, C]
    q_latent = torch.bmm(q[:, None, : attn.nope_dim], w_uk)  # [H, 1, C]
    q_full = torch.empty(attn.num_heads, entries.shape[1], dtype=x.dtype, device=x.device)
    kernels.mla_prep(q, q_latent.view(attn.num_heads, -1), kv.view(-1), at.cos[0], at.sin[0],
                     attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, at.pos, entries,
                     q_full, attn.rotary.interleave)
    return q_full  # [H, C + R]


def gqa(attn, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: Position,
        fused: bool) -> torch.Tensor:
    """Grouped-query attention of x [1, D] over keys/values [M, Hkv, Dh]: [1, D]."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if fused and all(p.bias is None for p in projections):  # one launch for q, k and v
        qkv = kernels.project(attn, "_qkv_weight", projections, x)  # [1, (H + 2Hkv) Dh]
        q, k, v = qkv[0].split([p.out_features for p in projections])
    else:
        q, k, v = (p(x) for p in projections)
    q = norm(attn.q_norm, q.view(attn.num_heads, attn.head_dim), fused)
    k = norm(attn.k_norm, k.view(attn.num_kv_heads, attn.head_dim), fused)
    v = v.view(1, attn.num_kv_heads, attn.head_dim)
    q = attn.rotary.apply(q[None], at.cos, at.sin)  # [1, H, Dh]
    k = attn.rotary.apply(k[None], at.cos, at.sin)  # [1, Hkv, Dh]
    keys.index_copy_(0, at.pos, k)
    values.index_copy_(0, at.pos, v)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys[: at.bucket].transpose(0, 1),
        values[: at.bucket].transpose(0, 1), attn_mask=~at.masked(), scale=attn.scale,
        enable_gqa=True,
    )  # [H, 1, Dh]
    return attn.o_proj(out.transpose(0, 1).reshape(1, -1))

