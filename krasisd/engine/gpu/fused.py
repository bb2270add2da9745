"""Fused Triton kernels for the one-token decode step, each beside the torch code it replaces.

A decode step of DeepSeek-V2-Lite's shape launched about 90 kernels per layer, most of them
elementwise pieces of RMSNorm, rotary embedding and softmax on a few thousand values; in a
CUDA graph each still costs a few microseconds. These kernels do those pieces in one launch
each and round where the torch code rounds (float32 math, bf16 stores), so results agree
with the unfused step to bf16 noise:

- ``rmsnorm``: optional residual add of up to three deltas, then RMSNorm (or just the add);
- ``silu_mul``: SwiGLU's ``silu(gate) * up`` over a fused [T, 2I] projection;
- ``mla_prep``: MLA decode's rotary embedding of q_rope and k_rope, the latent's RMSNorm,
  the query [H, C + R] assembled and the new cache entry written at the device position;
- ``masked_softmax``: scale, mask past the device position, softmax, bf16 probabilities;
- ``router_logits``: the router's float32 projection in one launch;
- ``router_topk``: softmax (or sigmoid) over expert logits, greedy top-K, normalisation and
  scaling, and the expert-heat count.

Legend: T = tokens, D = hidden, I = expert width, H = heads, C = kv_lora_rank,
R = rope dims, S = attended positions, E = experts, K = experts per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from krasisd.engine.gpu import dense_decode
from krasisd.engine.models.moe import weight_rule

# -- residual add + RMSNorm ---------------------------------------------------------------


@triton.jit
def _rmsnorm_kernel(x_ptr, d1_ptr, d2_ptr, d3_ptr, res_ptr, w_ptr, out_ptr, D, eps,
                    NUM_DELTAS: tl.constexpr, STORE_RES: tl.constexpr, NORM: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    base = row * D
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_DELTAS > 0:
        x += tl.load(d1_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_DELTAS > 1:
        x += tl.load(d2_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_DELTAS > 2:
        x += tl.load(d3_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_RES:
        xr = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + base + offs, xr, mask=mask)
        x = xr.to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor | None,
            deltas: tuple = (), residual_out: torch.Tensor | None = None) -> None:
    """``residual_out = x + sum(deltas)`` (rounded to its dtype) and ``out = RMSNorm(that)``;
    either output may be None. x, deltas, outputs: contiguous [T, D]."""
    rows, dim = x.shape
    if len(deltas) > 3:
        raise ValueError("rmsnorm takes at most three deltas")
    ptrs = list(deltas) + [x] * (3 - len(deltas))
    norm = weight is not None and out is not None
    _rmsnorm_kernel[(rows,)](
        x, *ptrs, residual_out if residual_out is not None else x,
        weight if norm else x, out if norm else x, dim, eps,
        NUM_DELTAS=len(deltas), STORE_RES=residual_out is not None, NORM=norm,
        BLOCK=triton.next_power_of_2(dim), num_warps=_warps(dim))


# -- SwiGLU -------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    gate = tl.load(gu_ptr + row * 2 * width + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * width + width + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[T, 2I] (gate then up) -> [T, I] = silu(gate) * up."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, BLOCK=block)
    return out


def fuse_rows(owner, name: str, linears) -> torch.Tensor:
    """One [sum of N, D] weight for Linear layers without bias that read the same input, kept
    as ``owner.<name>``; the layers then hold views of it (no copy kept), so one projection
    replaces several launches. Idempotent."""
    fused = owner.__dict__.get(name)  # kept by an earlier call
    if fused is None:
        fused = torch.cat([linear.weight.data for linear in linears], dim=0)  # [sum N, D]
        start = 0
        for linear in linears:
            width = linear.weight.shape[0]
            linear.weight = torch.nn.Parameter(fused[start:start + width], requires_grad=False)
            start += width
        setattr(owner, name, fused)
    return fused


def project(owner, name: str, linears, x: torch.Tensor) -> torch.Tensor:
    """x [T, D] through bias-free linears that all read it, in one launch: [T, sum of N].
    Float linears share a ``fuse_rows`` weight; quantized ones (dense_decode) a fused
    GpuQuantLinear, or run one by one where they cannot be fused."""
    if isinstance(linears[0], dense_decode.GpuQuantLinear):
        fused = dense_decode.fuse(owner, name + "_q", linears)
        if fused is None:
            return torch.cat([linear(x) for linear in linears], dim=-1)
        return fused(x)
    return x @ fuse_rows(owner, name, linears).T


def fuse_gate_up(mlp) -> torch.Tensor:
    """One [2I, D] weight for a SwiGLU MLP's gate and up projections (``fuse_rows``)."""
    return fuse_rows(mlp, "_gate_up_weight", (mlp.gate_proj, mlp.up_proj))


def swiglu(mlp, x: torch.Tensor) -> torch.Tensor:
    """A DenseMLP's forward in three launches: one [T, 2I] projection, silu_mul, down; over
    quantized weights two: the gate/up kernel applies the SiLU (dense_decode)."""
    if isinstance(mlp.gate_proj, dense_decode.GpuQuantLinear):
        gate_up = dense_decode.fuse(mlp, "_gate_up_q", (mlp.gate_proj, mlp.up_proj))
        return mlp(x) if gate_up is None else mlp.down_proj(gate_up.swiglu(x))
    return mlp.down_proj(silu_mul(x @ fuse_gate_up(mlp).T))


# -- MLA decode: rotary, latent norm, query assembly, cache write --------------------------


@triton.jit
def _rope_pair(src, cos, sin, offs, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    if INTERLEAVE:
        a = tl.load(src + 2 * offs).to(tl.float32)
        b = tl.load(src + 2 * offs + 1).to(tl.float32)
    else:
        a = tl.load(src + offs).to(tl.float32)
        b = tl.load(src + HALF + offs).to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _mla_prep_kernel(q_ptr, q_latent_ptr, kv_ptr, cos_ptr, sin_ptr, norm_w_ptr, pos_ptr,
                     q_full_ptr, cache_ptr, q_stride, cache_stride, eps,
                     H: tl.constexpr, N: tl.constexpr, C: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_C: tl.constexpr, INTERLEAVE: tl.constexpr):
    head = tl.program_id(0)
    offs_r = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + offs_r)
    sin = tl.load(sin_ptr + offs_r)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dtype = q_full_ptr.dtype.element_ty
    if head < H:  # q_full[h] = [q_latent[h], rotated q_rope[h]]
        latent = tl.load(q_latent_ptr + head * C + offs_c, mask=mask_c)
        dst = q_full_ptr + head * (C + 2 * HALF)
        tl.store(dst + offs_c, latent, mask=mask_c)
        lo, hi = _rope_pair(q_ptr + head * q_stride + N, cos, sin, offs_r, HALF, INTERLEAVE)
        tl.store(dst + C + offs_r, lo.to(dtype))
        tl.store(dst + C + HALF + offs_r, hi.to(dtype))
    else:  # cache[pos] = [RMSNorm(kv latent), rotated k_rope]
        pos = tl.load(pos_ptr)
        dst = cache_ptr + pos * cache_stride
        c = tl.load(kv_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / C + eps)
        w = tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        normed = w * (c * rstd).to(dtype).to(tl.float32)
        tl.store(dst + offs_c, normed.to(dtype), mask=mask_c)
        lo, hi = _rope_pair(kv_ptr + C, cos, sin, offs_r, HALF, INTERLEAVE)
        tl.store(dst + C + offs_r, lo.to(dtype))
        tl.store(dst + C + HALF + offs_r, hi.to(dtype))


def mla_prep(q: torch.Tensor, q_latent: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, norm_weight: torch.Tensor, eps: float, pos: torch.Tensor,
             cache: torch.Tensor, q_full: torch.Tensor, interleave: bool) -> None:
    """q [H, N + R] (row stride any), q_latent [H, C], kv [C + R], cos/sin [R/2] float32,
    pos [1] -> q_full [H, C + R] and cache[pos] = [RMSNorm(kv[:C]), rotated kv[C:]]."""
    heads, latent = q_latent.shape
    half = cos.shape[-1]
    if half & (half - 1):
        raise ValueError(f"rope dims {2 * half} must be twice a power of two")
    nope = q.shape[-1] - 2 * half
    _mla_prep_kernel[(heads + 1,)](
        q, q_latent, kv, cos, sin, norm_weight, pos, q_full, cache, q.stride(0),
        cache.stride(0), eps, H=heads, N=nope, C=latent, HALF=half,
        BLOCK_C=triton.next_power_of_2(latent), INTERLEAVE=interleave, num_warps=4)


# -- attention probabilities --------------------------------------------------------------


@triton.jit
def _masked_softmax_kernel(scores_ptr, probs_ptr, pos_ptr, S, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    last = tl.load(pos_ptr)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, S, BLOCK):  # running max and sum per lane
        idx = start + offs
        valid = (idx < S) & (idx <= last)
        s = tl.load(scores_ptr + row * S + idx, mask=valid, other=float("-inf")).to(tl.float32)
        s = s * scale
        new_m = tl.maximum(m, s)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        total = total * tl.exp(m - safe) + tl.exp(s - safe)
        m = new_m
    row_max = tl.max(m, axis=0)
    row_sum = tl.sum(total * tl.exp(m - row_max), axis=0)
    for start in range(0, S, BLOCK):
        idx = start + offs
        valid = (idx < S) & (idx <= last)
        s = tl.load(scores_ptr + row * S + idx, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(s * scale - row_max) / row_sum
        tl.store(probs_ptr + row * S + idx, p.to(probs_ptr.dtype.element_ty), mask=idx < S)


def masked_softmax(scores: torch.Tensor, pos: torch.Tensor, scale: float,
                   probs: torch.Tensor) -> None:
    """scores [H, S] -> probs [H, S] = softmax(scores * scale) over positions <= pos[0]."""
    heads, span = scores.shape
    _masked_softmax_kernel[(heads,)](scores, probs, pos, span, scale,
                                     BLOCK=min(1024, triton.next_power_of_2(span)), num_warps=4)


# -- router -------------------------------------------------------------------------------


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, E, D, BLOCK_E: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # out [T, E] float32 = x [T, D] @ w [E, D].T, in float32 whatever the stored dtypes
    row = tl.program_id(1)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * D + offs_d[None, :],
                    mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(out_ptr + row * E + offs_e, tl.sum(acc, axis=1), mask=mask_e)


def router_logits(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                  block_e: int = 2) -> torch.Tensor:
    """float32 logits [T, E] of x [T, D] against the router weight [E, D], both read in their
    stored dtypes and multiplied in float32 (as the model's router does), in one launch.

    Few experts per program and a whole row per load: with one token the kernel is bound by
    the latency of its loads (on the H200, 4 experts per program and 256-wide steps took
    6.8 us for DeepSeek-V2-Lite's 64 x 2048 router)."""
    rows, hidden = x.shape
    experts = weight.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(rows, experts, dtype=torch.float32, device=x.device) if out is None else out
    block_d = min(triton.next_power_of_2(hidden), 4096)
    _router_logits_kernel[(triton.cdiv(experts, block_e), rows)](
        x, weight, out, experts, hidden, BLOCK_E=block_e, BLOCK_D=block_d,
        num_warps=4 if block_d <= 2048 else 8)
    return out


@triton.jit
def _router_topk_kernel(logits_ptr, ids_ptr, weights_ptr, counts_ptr, E, scaling,
                        K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr,
                        NORMALISE: tl.constexpr, COUNT: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    logits = tl.load(logits_ptr + row * E + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.where(mask, 1.0 / (1.0 + tl.exp(-logits)), float("-inf"))
    else:
        e = tl.exp(logits - tl.max(logits, axis=0))
        scores = tl.where(mask, e / tl.sum(e, axis=0), float("-inf"))
    offs_k = tl.arange(0, K_PAD)
    chosen = tl.zeros([K_PAD], tl.int64)
    values = tl.zeros([K_PAD], tl.float32)
    for k in tl.static_range(K):  # greedy: the best remaining expert, lowest id on ties
        best = tl.max(scores, axis=0)
        idx = tl.min(tl.where(scores == best, offs, BLOCK_E), axis=0)
        chosen = tl.where(offs_k == k, idx.to(tl.int64), chosen)
        values = tl.where(offs_k == k, best, values)
        scores = tl.where(offs == idx, float("-inf"), scores)
    if NORMALISE:
        values = values / (tl.sum(values, axis=0) + 1e-20)
    tl.store(ids_ptr + row * K + offs_k, chosen, mask=offs_k < K)
    tl.store(weights_ptr + row * K + offs_k, values * scaling, mask=offs_k < K)
    if COUNT:  # expert heat: one more route for each chosen expert
        tl.atomic_add(counts_ptr + chosen, tl.full([K_PAD], 1, tl.int64), mask=offs_k < K)


def router_topk(logits: torch.Tensor, config, ids: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> None:
    """Greedy routing of float32 logits [T, E] into ids [T, K] int64 and weights [T, K]
    float32, as krasisd.engine.models.moe.Router does for ``topk_method == "greedy"``;
    ``counts`` (int64 [E], e.g. a layer's row of ExpertHeat.counts) gains 1 per route."""
    rows, experts = logits.shape
    k = ids.shape[1]
    normalise, scaling = weight_rule(config)
    _router_topk_kernel[(rows,)](
        logits, ids, weights, ids if counts is None else counts, experts, scaling, K=k,
        K_PAD=triton.next_power_of_2(k), SIGMOID=config.scoring_func == "sigmoid",
        NORMALISE=normalise, COUNT=counts is not None,
        BLOCK_E=triton.next_power_of_2(experts), num_warps=1)


def fusable_router(config) -> bool:
    """Whether ``router_topk`` computes this model's routing (greedy top-K)."""
    return config.topk_method == "greedy" and config.num_experts_per_tok > 0


def _warps(dim: int) -> int:
    return 4 if dim <= 2048 else 8
