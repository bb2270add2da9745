"""Routed experts for a few tokens (decode), as matrix-vector products in Triton.

The grouped kernels of krasisd.engine.gpu.moe_triton pad every routed slot to a block of
rows for the tensor cores; with one token that is 1 useful row of 16 and, measured on the
H200 at DeepSeek-V2-Lite's shape, 29 us + 22 us per layer for 26 MB of weights (about
0.5 TB/s). Here each program streams one weight tile of one slot's expert and reduces it
against the slot's activation row on the CUDA cores:

- ``_gate_up_gemv``: program (slot, N tile, K split) computes its split's part of
  ``x @ gate`` and ``x @ up`` into a small float32 buffer (split K: enough programs in
  flight to keep the memory busy);
- ``_silu_parts``: sums those parts into h [P, I] = ``silu(gate) * up`` (bf16, as the
  grouped kernel stores it);
- ``_down_gemv``: program (slot, D tile, K split) computes its part of ``h @ down``, scales
  it by the routing weight and adds it atomically into the float32 [T, D] output, which sums
  the K slots of a token and the K splits in the same pass (the order of those float32
  additions is not fixed: the last bits can differ between runs).

Slots whose expert is not resident (``slot_of_expert[e] < 0``) return at once, so the
caller needs no compaction and no host sync: the kernels can be captured in a CUDA graph.
Weights are the GPU format's k-major tiles (krasisd.engine.gpu.format); a K block never
crosses a scale group.

Legend: T = tokens, K = experts per token, P = T*K slots, D = hidden, I = expert width,
BN = output columns per program, BK = inputs per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from krasisd.engine.gpu.moe_triton import _load_weight_tile


@dataclass(frozen=True)
class GemvConfig:
    """Tile of the kernels: output columns and inputs per step, K splits of each product."""

    block_n: int = 32
    block_k: int = 128
    split_k: int = 4
    num_warps: int = 4


GEMV_CANDIDATES = (
    GemvConfig(32, 128, 4, 4), GemvConfig(32, 128, 8, 4), GemvConfig(16, 128, 8, 4),
    GemvConfig(32, 128, 4, 8), GemvConfig(64, 128, 4, 8), GemvConfig(64, 128, 8, 8),
    GemvConfig(32, 64, 8, 4),
)


@triton.jit
def _gate_up_gemv(
    x_ptr, w_ptr, s_ptr, part_ptr, ids_ptr, slot_ptr, N, K, top_k, num_slots, steps_per_split,
    stride_xm, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x [T, K=D] bf16; w [S, D(/8), 2N] gate cols [0, N), up cols [N, 2N);
    # part [SPLIT, P, 2, N] float32: this split's gate and up sums (the down kernel adds them)
    slot = tl.program_id(0)
    wslot = tl.load(slot_ptr + tl.load(ids_ptr + slot)).to(tl.int64)
    if wslot < 0:
        return
    token = slot // top_k
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base, s_base = w_ptr + wslot * stride_we, s_ptr + wslot * stride_se
    acc_g = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced over K once, at the end
    acc_u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    split = tl.program_id(2)
    first = split * steps_per_split * BLOCK_K
    last = tl.minimum(first + steps_per_split * BLOCK_K, K)
    for k0 in range(first, last, BLOCK_K):
        xk = tl.load(x_ptr + token * stride_xm + k0 + offs_k).to(tl.float32)  # [BK]
        qg, sg = _load_weight_tile(w_base, s_base, k0, offs_k, offs_n, n_mask, stride_wk,
                                   stride_wn, stride_sk, stride_sn, GROUP, BITS, BLOCK_K, BLOCK_N,
                                   True)
        qu, su = _load_weight_tile(w_base, s_base, k0, offs_k, offs_n + N, n_mask, stride_wk,
                                   stride_wn, stride_sk, stride_sn, GROUP, BITS, BLOCK_K, BLOCK_N,
                                   True)
        acc_g += xk[:, None] * (qg * sg[None, :])
        acc_u += xk[:, None] * (qu * su[None, :])
    dst = part_ptr + (split * num_slots + slot).to(tl.int64) * 2 * N + offs_n
    tl.store(dst, tl.sum(acc_g, axis=0), mask=n_mask)
    tl.store(dst + N, tl.sum(acc_u, axis=0), mask=n_mask)


@triton.jit
def _silu_parts(part_ptr, h_ptr, ids_ptr, slot_ptr, N, num_slots, SPLIT: tl.constexpr,
                BLOCK: tl.constexpr):
    # part [SPLIT, P, 2, N] float32 -> h [P, N] bf16 = silu(sum of gate) * sum of up
    slot = tl.program_id(0)
    if tl.load(slot_ptr + tl.load(ids_ptr + slot)) < 0:  # not resident: no parts written
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT):
        src = part_ptr + (split * num_slots + slot).to(tl.int64) * 2 * N + offs
        gate += tl.load(src, mask=mask, other=0.0)
        up += tl.load(src + N, mask=mask, other=0.0)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + slot.to(tl.int64) * N + offs, h.to(tl.bfloat16), mask=mask)


@triton.jit
def _down_gemv(
    h_ptr, w_ptr, s_ptr, out_ptr, ids_ptr, weights_ptr, slot_ptr, N, K, top_k, steps_per_split,
    stride_hm, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn, stride_om,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # h [P, K=I] bf16; w [S, I(/8), N=D]; out [T, D] float32 += weight * (h @ down)
    slot = tl.program_id(0)
    wslot = tl.load(slot_ptr + tl.load(ids_ptr + slot)).to(tl.int64)
    if wslot < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base, s_base = w_ptr + wslot * stride_we, s_ptr + wslot * stride_se
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced over K once, at the end
    first = tl.program_id(2) * steps_per_split * BLOCK_K
    last = tl.minimum(first + steps_per_split * BLOCK_K, K)
    for k0 in range(first, last, BLOCK_K):
        hk = tl.load(h_ptr + slot * stride_hm + k0 + offs_k).to(tl.float32)  # [BK]
        q, s = _load_weight_tile(w_base, s_base, k0, offs_k, offs_n, n_mask, stride_wk,
                                 stride_wn, stride_sk, stride_sn, GROUP, BITS, BLOCK_K, BLOCK_N,
                                 True)
        acc += hk[:, None] * (q * s[None, :])
    route_w = tl.load(weights_ptr + slot)
    token = slot // top_k
    tl.atomic_add(out_ptr + token * stride_om + offs_n, tl.sum(acc, axis=0) * route_w,
                  mask=n_mask)


def moe_gemv(x: torch.Tensor, views: dict, slot_of_expert: torch.Tensor, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor, bits: int, group_size: int,
             cfg: GemvConfig | None = None) -> torch.Tensor:
    """Routed experts of x [T, D] (bf16) whose ``slot_of_expert`` [E] (int32) is >= 0:
    float32 [T, D], the weighted sum over each token's resident slots."""
    cfg = cfg or GemvConfig()
    t, d = x.shape
    k = topk_ids.shape[1]
    w13, s13, w2, s2 = views["w13_q"], views["w13_s"], views["w2_q"], views["w2_s"]
    inter = w2.shape[1] * (8 if bits == 4 else 1)
    block_k = _block_k(cfg.block_k, group_size, d, inter)
    ids = topk_ids.reshape(-1)  # [P]
    weights = topk_weights.reshape(-1).to(torch.float32)  # [P]
    if d % block_k or inter % block_k:
        raise ValueError(f"widths {d} and {inter} must be multiples of the K step {block_k}")
    x = x.contiguous()
    out = torch.zeros(t, d, dtype=torch.float32, device=x.device)  # [T, D]
    gu_split, gu_steps = _splits(d // block_k, cfg.split_k)
    part = torch.empty(gu_split, t * k, 2, inter, dtype=torch.float32, device=x.device)
    _gate_up_gemv[(t * k, triton.cdiv(inter, cfg.block_n), gu_split)](
        x, w13, s13, part, ids, slot_of_expert, inter, d, k, t * k, gu_steps,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), s13.stride(0), s13.stride(1),
        s13.stride(2),
        GROUP=group_size, BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps)
    h = torch.empty(t * k, inter, dtype=torch.bfloat16, device=x.device)  # [P, I]
    _silu_parts[(t * k, triton.cdiv(inter, 1024))](part, h, ids, slot_of_expert, inter, t * k,
                                                   SPLIT=gu_split, BLOCK=1024)
    down_split, down_steps = _splits(inter // block_k, cfg.split_k)
    _down_gemv[(t * k, triton.cdiv(d, cfg.block_n), down_split)](
        h, w2, s2, out, ids, weights, slot_of_expert, d, inter, k, down_steps,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), s2.stride(0), s2.stride(1),
        s2.stride(2), out.stride(0),
        GROUP=group_size, BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps)
    return out


def _splits(steps: int, wanted: int) -> tuple[int, int]:
    """(splits, K steps per split) for ``steps`` K steps cut into about ``wanted`` parts."""
    per_split = triton.cdiv(steps, min(wanted, steps))
    return triton.cdiv(steps, per_split), per_split


def resident_slots(slot_of_expert: torch.Tensor, resident: torch.Tensor) -> torch.Tensor:
    """[E] int32 arena slots with -1 where the expert is not resident (made once per
    placement, outside any graph capture)."""
    return torch.where(resident, slot_of_expert, torch.full_like(slot_of_expert, -1))


def _block_k(block_k: int, group_size: int, *dims: int) -> int:
    """The largest power-of-two K step <= block_k inside one group that divides ``dims``."""
    block_k = min(block_k, group_size)
    while block_k > 8 and (group_size % block_k or any(d % block_k for d in dims)):
        block_k //= 2
    return block_k
