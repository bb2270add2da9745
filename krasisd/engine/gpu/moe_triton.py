"""Grouped MoE for many tokens on quantized k-major experts (w4a16 / w8a16), in Triton.

Two kernels over tokens sorted by expert (each expert's rows padded to BLOCK_M):
``_gate_up_kernel`` computes ``silu(x @ gate) * (x @ up)`` for one (row block, I tile) and
writes it in sorted order; ``_down_kernel`` multiplies by ``down``, scales by the routing
weight and scatters to ``[T*K, D]``; the K slots of a token are then summed. Weights are
dequantized in registers, one K block (inside one scale group) at a time: by default
``acc = dot(x, bf16(q * scale), acc)``, which keeps the tensor-core accumulation in place
across K blocks; ``scale_after_dot`` computes ``acc += dot(x, q) * scale`` instead, with
the integer weights entering the tensor cores exactly. The tile autotune picks per shape.

Legend: T = tokens, K = experts per token, E = experts, D = hidden, I = intermediate,
S = weight slots (an expert's position in the arena), P = padded sorted rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from krasisd.engine.gpu import tuning
from krasisd.engine.gpu.tuning import KernelTuning


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of both kernels."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    reshape_unpack: bool = False  # INT4: load each word once and reshape (else gather + shift)
    scale_after_dot: bool = False  # exact integer weights in the dot, scaled after (no
    # in-place accumulation across K blocks); else dequantize to bf16 first and accumulate


def default_config(rows_per_expert: float, device_type: str) -> KernelConfig:
    """Fixed tiles (used when autotuning is off): small M blocks when experts see few rows.

    Chosen from sm_90 builds without register spills (see docs/gpu-format.md).
    """
    if device_type != "cuda":
        return KernelConfig(16, 32, 32, 8, 1, 1, reshape_unpack=True)
    if rows_per_expert <= 16:
        return KernelConfig(16, 64, 128, 8, 4, 4, reshape_unpack=True)
    if rows_per_expert <= 64:
        return KernelConfig(64, 64, 64, 8, 4, 3, reshape_unpack=True)
    return KernelConfig(64, 128, 64, 8, 8, 4, reshape_unpack=True)


# Autotune candidates. INT4 "gather" tiles pipeline 8x the weight bytes through shared memory
# (155-311 KB on sm_90), so only one stays, for comparison; scale_after_dot spills registers.
CANDIDATES = (
    KernelConfig(16, 64, 128, 8, 4, 4, True), KernelConfig(16, 128, 128, 8, 4, 4, True),
    KernelConfig(64, 64, 64, 8, 4, 3, True), KernelConfig(64, 128, 64, 8, 8, 4, True),
    KernelConfig(128, 64, 64, 8, 8, 4, True), KernelConfig(128, 128, 64, 8, 8, 3, True),
    KernelConfig(64, 128, 64, 8, 8, 3, True, True), KernelConfig(64, 128, 64, 8, 8, 3, False),
)
_TUNER = tuning.Tuner("moe_triton", CANDIDATES, KernelConfig, tuning.time_events)
log = logging.getLogger(__name__)


def _bucket(rows_per_expert: float) -> int:
    for edge in (2, 8, 32, 128, 512, 2048):
        if rows_per_expert <= edge:
            return edge
    return 1 << 30


def tuned_config(key: tuple, run, tuning: KernelTuning) -> KernelConfig:
    """The fastest candidate for ``key``, timed once with ``run(config)`` on the real inputs."""
    return _TUNER.pick(key, run, tuning)


@dataclass
class SortedRoutes:
    """Token slots sorted by expert, each expert's run padded to ``block_m`` rows."""

    sorted_ids: torch.Tensor  # [P] int32 flat slot t*K+k, or T*K for padding
    block_expert: torch.Tensor  # [P / block_m] int32 expert of each row block (E past the end)
    num_rows: torch.Tensor  # [1] int32 used rows of sorted_ids
    num_slots: int  # T*K
    top_k: int
    block_m: int


def sort_routes(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> SortedRoutes:
    """moe_align_block_size in torch, without host syncs (buffers sized for the worst case)."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)  # [T*K]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]; bincount would sync the host
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_end = torch.cumsum(padded, 0)  # [E]
    order = torch.argsort(flat, stable=True)  # [T*K]
    expert_of = flat[order]  # [T*K]
    rank = torch.arange(t * k, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    dest = (pad_end - padded)[expert_of] + rank  # [T*K]
    max_rows = t * k + num_experts * (block_m - 1)
    max_rows = (max_rows + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((max_rows,), t * k, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, max_rows, block_m, device=flat.device)  # [P/BM]
    block_expert = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)
    return SortedRoutes(sorted_ids, block_expert, pad_end[-1:].to(torch.int32), t * k, k, block_m)


@triton.jit
def _load_weight_tile(w_ptr, s_ptr, k0, offs_k, offs_n, n_mask, stride_wk, stride_wn,
                      stride_sk, stride_sn, GROUP: tl.constexpr, BITS: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RESHAPE: tl.constexpr):
    """Integer weights [BLOCK_K, BLOCK_N] and their scales [BLOCK_N], both as f32."""
    if BITS == 4:
        if RESHAPE:  # each word loaded once, its 8 nibbles spread over 8 rows by a reshape
            offs_k8 = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(w_ptr + offs_k8[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=n_mask[None, :], other=0)  # [BK/8, BN] int32
            shifts = tl.arange(0, 8) * 4
            nib = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/8, 8, BN]
            q = tl.reshape(nib - 8, (BLOCK_K, BLOCK_N))
        else:  # each word gathered by the 8 rows it holds (L1 hits), then shifted
            words = tl.load(w_ptr + ((k0 + offs_k) // 8)[:, None] * stride_wk
                            + offs_n[None, :] * stride_wn, mask=n_mask[None, :], other=0)
            q = ((words >> ((offs_k % 8) * 4)[:, None]) & 0xF) - 8  # [BK, BN]
    else:
        q = tl.load(w_ptr + (k0 + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=n_mask[None, :], other=0)  # [BK, BN] int8
    scale = tl.load(s_ptr + (k0 // GROUP) * stride_sk + offs_n * stride_sn, mask=n_mask, other=0.0)
    # via f32: a direct int -> bf16 cast misbehaves in the interpreter
    return q.to(tl.float32), scale.to(tl.float32)


@triton.jit
def _mma(acc, a, q, scale, SCALE_AFTER: tl.constexpr, DOT_F32: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] @ (q [BK, BN] * scale [BN]), in one of two orders.

    DOT_F32 gives f32 operands for the CPU interpreter, whose bf16 dot is wrong.
    """
    if SCALE_AFTER:  # integer weights are exact in bf16 (|q| <= 127)
        if DOT_F32:
            return acc + tl.dot(a.to(tl.float32), q) * scale[None, :]
        return acc + tl.dot(a, q.to(tl.bfloat16)) * scale[None, :]
    w = q * scale[None, :]  # [BK, BN] dequantized
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w.to(tl.bfloat16).to(tl.float32), acc)
    return tl.dot(a, w.to(tl.bfloat16), acc)


@triton.jit
def _tile_ids(num_n_tiles, GROUP_M: tl.constexpr, num_m_blocks):
    """Grouped ordering of (row block, N tile) for L2 reuse of weight tiles."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit(do_not_specialize=["num_slots", "num_m_blocks"])  # vary with the prompt length
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, h_ptr, sorted_ids_ptr, block_slot_ptr, num_rows_ptr,
    num_slots, N, K, top_k, num_m_blocks,
    stride_xm, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn, stride_hm,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, RESHAPE: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
):
    # x [T, K=D] bf16; w [S, D(/8), 2N] gate cols [0, N), up cols [N, 2N); h [P, N] bf16
    pid_m, pid_n = _tile_ids(tl.cdiv(N, BLOCK_N), GROUP_M, num_m_blocks)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ids = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    row_mask = slot_ids < num_slots
    tokens = tl.where(row_mask, slot_ids // top_k, 0).to(tl.int64)
    wslot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + wslot * stride_we
    s_base = s_ptr + wslot * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + tokens[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=row_mask[:, None], other=0.0)  # [BM, BK]
        qg, sg = _load_weight_tile(w_base, s_base, k0, offs_k, offs_n, n_mask, stride_wk,
                                   stride_wn, stride_sk, stride_sn, GROUP, BITS, BLOCK_K, BLOCK_N,
                                   RESHAPE)
        qu, su = _load_weight_tile(w_base, s_base, k0, offs_k, offs_n + N, n_mask, stride_wk,
                                   stride_wn, stride_sk, stride_sn, GROUP, BITS, BLOCK_K, BLOCK_N,
                                   RESHAPE)
        acc_g = _mma(acc_g, a, qg, sg, SCALE_AFTER, DOT_F32)
        acc_u = _mma(acc_u, a, qu, su, SCALE_AFTER, DOT_F32)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, [BM, BN]
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(tl.bfloat16), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["num_slots", "num_m_blocks"])
def _down_kernel(
    h_ptr, w_ptr, s_ptr, y_ptr, weights_ptr, sorted_ids_ptr, block_slot_ptr, num_rows_ptr,
    num_slots, N, K, num_m_blocks,
    stride_hm, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, RESHAPE: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
):
    # h [P, K=I] bf16 sorted rows; w [S, I(/8), N=D]; y [T*K, D] bf16 scaled by routing weight
    pid_m, pid_n = _tile_ids(tl.cdiv(N, BLOCK_N), GROUP_M, num_m_blocks)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ids = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    row_mask = slot_ids < num_slots
    wslot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + wslot * stride_we
    s_base = s_ptr + wslot * stride_se
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(h_ptr + rows[:, None] * stride_hm + (k0 + offs_k)[None, :],
                    mask=row_mask[:, None], other=0.0)  # [BM, BK]
        q, s = _load_weight_tile(w_base, s_base, k0, offs_k, offs_n, n_mask, stride_wk,
                                 stride_wn, stride_sk, stride_sn, GROUP, BITS, BLOCK_K, BLOCK_N,
                                   RESHAPE)
        acc = _mma(acc, a, q, s, SCALE_AFTER, DOT_F32)
    route_w = tl.load(weights_ptr + slot_ids, mask=row_mask, other=0.0)  # [BM] f32
    acc = acc * route_w[:, None]
    y_ptrs = y_ptr + slot_ids.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(tl.bfloat16), mask=row_mask[:, None] & n_mask[None, :])


def _pick_block_k(cfg_block_k: int, group_size: int, *dims: int) -> int:
    block_k = min(cfg_block_k, group_size)
    while block_k > 16 and any(d % block_k for d in dims):
        block_k //= 2
    return block_k


def _grid(routes: SortedRoutes, n: int, block_n: int) -> tuple[int, tuple[int]]:
    num_m_blocks = routes.block_expert.numel()
    return num_m_blocks, (num_m_blocks * triton.cdiv(n, block_n),)


def moe_triton(
    x: torch.Tensor,  # [T, D] bf16
    views: dict[str, torch.Tensor],  # typed arena views [S, ...] (see format.ExpertLayout)
    slot_of_expert: torch.Tensor,  # [E] int32 arena slot of each expert
    topk_ids: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K] float32
    bits: int,
    group_size: int,
    config: KernelConfig | None = None,
    tuning: KernelTuning | None = None,
) -> torch.Tensor:  # [T, D] bf16
    """Routed experts for many tokens with the two Triton kernels: with ``config``, or the
    tile timed for the shape (with ``tuning``, on CUDA), else a fixed tile."""
    num_experts = slot_of_expert.numel()
    rows_per_expert = x.shape[0] * topk_ids.shape[1] / num_experts
    if config is None and x.is_cuda and tuning is not None:
        key = (bits, group_size, x.shape[1], views["w13_s"].shape[-1], num_experts,
               topk_ids.shape[1], _bucket(rows_per_expert))

        def run(cfg):
            return moe_triton_tiled(x, views, slot_of_expert, topk_ids, topk_weights, bits,
                               group_size, cfg)

        config = tuned_config(key, run, tuning)
    cfg = config or default_config(rows_per_expert, x.device.type)
    return moe_triton_tiled(x, views, slot_of_expert, topk_ids, topk_weights, bits, group_size, cfg)


def moe_triton_tiled(x, views, slot_of_expert, topk_ids, topk_weights, bits, group_size, cfg):
    t, d = x.shape
    num_experts = slot_of_expert.numel()
    inter = views["w2_q"].shape[1] * (8 if bits == 4 else 1)
    routes = sort_routes(topk_ids, num_experts, cfg.block_m)
    slots_ext = torch.cat([slot_of_expert, slot_of_expert[:1]])  # past-the-end blocks -> any slot
    block_slot = slots_ext[routes.block_expert.clamp(max=num_experts).long()].contiguous()  # [P/BM]
    x = x.contiguous()
    h = torch.empty(routes.sorted_ids.numel(), inter, dtype=torch.bfloat16, device=x.device)
    y = torch.empty(routes.num_slots, d, dtype=torch.bfloat16, device=x.device)
    launch_gate_up(x, views, h, routes, block_slot, bits, group_size, cfg)
    launch_down(h, views, y, topk_weights, routes, block_slot, bits, group_size, cfg)
    return y.view(t, routes.top_k, d).sum(dim=1, dtype=torch.float32).to(torch.bfloat16)


def launch_gate_up(x, views, h, routes, block_slot, bits, group_size, cfg):
    w, s = views["w13_q"], views["w13_s"]
    n, d = h.shape[1], x.shape[1]
    block_k = _pick_block_k(cfg.block_k, group_size, d)
    num_m_blocks, grid = _grid(routes, n, cfg.block_n)
    _gate_up_kernel[grid](
        x, w, s, h, routes.sorted_ids, block_slot, routes.num_rows,
        routes.num_slots, n, d, routes.top_k, num_m_blocks,
        x.stride(0), w.stride(0), w.stride(1), w.stride(2), s.stride(0), s.stride(1), s.stride(2),
        h.stride(0),
        GROUP=group_size, BITS=bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        GROUP_M=cfg.group_m, DOT_F32=h.device.type != "cuda", RESHAPE=cfg.reshape_unpack,
        SCALE_AFTER=cfg.scale_after_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_down(h, views, y, topk_weights, routes, block_slot, bits, group_size, cfg):
    w, s = views["w2_q"], views["w2_s"]
    n, inter = y.shape[1], h.shape[1]
    block_k = _pick_block_k(cfg.block_k, group_size, inter)
    num_m_blocks, grid = _grid(routes, n, cfg.block_n)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [T*K]
    _down_kernel[grid](
        h, w, s, y, weights, routes.sorted_ids, block_slot, routes.num_rows,
        routes.num_slots, n, inter, num_m_blocks,
        h.stride(0), w.stride(0), w.stride(1), w.stride(2), s.stride(0), s.stride(1), s.stride(2),
        y.stride(0),
        GROUP=group_size, BITS=bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        GROUP_M=cfg.group_m, DOT_F32=h.device.type != "cuda", RESHAPE=cfg.reshape_unpack,
        SCALE_AFTER=cfg.scale_after_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
