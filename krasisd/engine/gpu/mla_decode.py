"""Flash-decoding for absorbed MLA: one token's attention over a window of the compressed KV
cache in two launches, reading the cache once.

It replaces, in ``decode_attention.mla``, the three launches

    scores = q_full @ window.T                         # [H, S]
    probs = masked_softmax(scores * scale, pos)        # positions > pos -> -inf
    out_latent = probs @ window[:, :C]                 # [H, C]

- ``_mla_split_kernel``: grid (splits, head blocks of 16). Each program walks its block
  range of the window in tiles of BLOCK_S cache rows, loaded once as K (all C + R columns, in
  a C part and an R part since C + R is not a power of two, each padded with masked columns
  to a power of two of at least 16) and as V (the C part); online softmax in float32; its partial
  output (normalised) and log-sum-exp go to a float32 workspace. A split wholly past the
  position reads nothing and writes only lse = -inf.
- ``_mla_combine_kernel``: grid (H, C blocks): the splits' partials weighted by their
  log-sum-exp, into [H, C].

The position is a device int64 [1] read by the split kernel, and the bucket a Python int, so the
launch replays in a CUDA graph captured per bucket (the workspace then comes from the graph's
pool).

Legend: H = heads, C = kv_lora_rank (latent), R = rope dims, S = attended positions (bucket),
P = splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_SPLIT_POSITIONS = 64  # below this a split's partial [H, C] costs about its share of cache
MAX_SPLITS = 256  # about two programs per SM on a 132-SM H200 for the longest windows
BLOCK_H = 16  # heads per program: the smallest M of tl.dot; fewer heads are masked
BLOCK_S = 32  # cache rows per tile: [32, 512 + 64] bf16 is 36 KiB, two stages in flight
SPLIT_STAGES = 2
COMBINE_TILE = 4096  # float32 values of [P, BLOCK_C] the combine kernel loads at once
_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b in float32; DOT_F32 gives f32 operands for the CPU interpreter, whose bf16 dot
    is wrong (the values are the same: bf16 widens exactly)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _load_rows(ptrs, rows_ok, cols, N: tl.constexpr, N_PAD: tl.constexpr):
    """A [rows, N_PAD] tile of N-wide rows, zero in rows not ok and in the padding columns;
    the column mask only where there is padding (it would cost vector width)."""
    if N_PAD == N:
        return tl.load(ptrs + cols[None, :], mask=rows_ok[:, None], other=0.0)
    return tl.load(ptrs + cols[None, :], mask=rows_ok[:, None] & (cols[None, :] < N), other=0.0)


@triton.jit
def _mla_split_kernel(q_ptr, kv_ptr, pos_ptr, part_ptr, lse_ptr, H, S, q_stride, kv_stride,
                      blocks_per_split, qk_scale, C: tl.constexpr, R: tl.constexpr,
                      C_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr):
    split = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    head_ok = heads < H
    offs_c = tl.arange(0, C_PAD)
    offs_r = tl.arange(0, R_PAD)
    lo = split * blocks_per_split * BLOCK_S
    last = tl.load(pos_ptr).to(tl.int32)  # the token's position: later rows are stale
    hi = tl.minimum(tl.minimum(lo + blocks_per_split * BLOCK_S, S), last + 1)  # rows [lo, hi)

    q_rows = q_ptr + heads[:, None] * q_stride
    q_c = _load_rows(q_rows, head_ok, offs_c, C, C_PAD)  # [BLOCK_H, C_PAD]
    q_r = _load_rows(q_rows + C, head_ok, offs_r, R, R_PAD)  # [BLOCK_H, R_PAD]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (log2 units)
    total = tl.zeros([BLOCK_H], tl.float32)  # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_H, C_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        live = rows < hi
        kv_rows = kv_ptr + rows[:, None].to(tl.int64) * kv_stride
        k_c = _load_rows(kv_rows, live, offs_c, C, C_PAD)  # [BLOCK_S, C_PAD]
        k_r = _load_rows(kv_rows + C, live, offs_r, R, R_PAD)  # [BLOCK_S, R_PAD]
        # scores [BLOCK_H, BLOCK_S] = q_c @ k_c^T + q_r @ k_r^T
        s = _dot(q_c, tl.trans(k_c), DOT_F32) + _dot(q_r, tl.trans(k_r), DOT_F32)
        s = tl.where(live[None, :], s * qk_scale, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a live row
        alpha = tl.exp2(m - new_m)
        p = tl.exp2(s - new_m[:, None])  # [BLOCK_H, BLOCK_S]
        total = total * alpha + tl.sum(p, axis=1)
        # p in the cache's dtype, as the unfused probs @ V GEMM takes it; V = the C part of K
        acc = acc * alpha[:, None] + _dot(p.to(k_c.dtype), k_c, DOT_F32)  # [BLOCK_H, C_PAD]
        m = new_m

    worked = hi > lo
    lse = tl.where(worked, m + tl.log2(tl.where(worked, total, 1.0)), float("-inf"))  # [BLOCK_H]
    tl.store(lse_ptr + split * H + heads, lse, mask=head_ok)
    if worked:
        part = acc / total[:, None]  # [BLOCK_H, C_PAD]
        part_rows = part_ptr + (split * H + heads[:, None]).to(tl.int64) * C
        tl.store(part_rows + offs_c[None, :], part, mask=head_ok[:, None] & (offs_c[None, :] < C))


@triton.jit
def _mla_combine_kernel(part_ptr, lse_ptr, out_ptr, H, P, out_stride, C: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    head = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    splits = tl.arange(0, BLOCK_P)
    lse = tl.load(lse_ptr + splits * H + head, mask=splits < P, other=float("-inf"))  # [BLOCK_P]
    worked = lse > float("-inf")  # split 0 always holds position 0
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # [BLOCK_P]
    rows = (splits[:, None] * H + head).to(tl.int64) * C
    cols_ok = offs_c < C
    part = tl.load(part_ptr + rows + offs_c[None, :], mask=worked[:, None] & cols_ok[None, :],
                   other=0.0)  # [BLOCK_P, BLOCK_C]
    out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)  # [BLOCK_C]
    tl.store(out_ptr + head * out_stride + offs_c, out.to(out_ptr.dtype.element_ty), mask=cols_ok)


def split_warps(block_s: int) -> int:
    """Warps of the split kernel: on sm_90 at C = 512, 4 for 32-row tiles (174 registers),
    8 for 64-row ones (4 would spill)."""
    return 8 if block_s >= 64 else 4


def default_num_splits(bucket: int) -> int:
    """Splits of a window of ``bucket`` positions: few for short windows (each split's partial
    costs a workspace round trip), up to MAX_SPLITS (about two per SM) for long ones."""
    return max(1, min(MAX_SPLITS, bucket // MIN_SPLIT_POSITIONS))


def mla_decode_attention(q_full: torch.Tensor, entries: torch.Tensor, pos: torch.Tensor,
                         bucket: int, scale: float, latent_dim: int,
                         out: torch.Tensor | None = None, num_splits: int | None = None,
                         block_s: int = BLOCK_S) -> torch.Tensor:
    """softmax(q_full @ window.T * scale, positions <= pos) @ window[:, :latent_dim] over
    window = entries[:bucket]: the absorbed query [H, C + R] and cache entries [M, C + R]
    -> [H, C] (into ``out`` when given), with no host sync."""
    _check(q_full, entries, pos, bucket, latent_dim, out, block_s)
    heads, width = q_full.shape
    rope_dim = width - latent_dim
    num_blocks = triton.cdiv(bucket, block_s)
    splits = num_splits if num_splits is not None else default_num_splits(bucket)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    blocks_per_split = triton.cdiv(num_blocks, min(splits, num_blocks))
    splits = triton.cdiv(num_blocks, blocks_per_split)  # none of them empty by construction
    if out is None:
        out = torch.empty(heads, latent_dim, dtype=entries.dtype, device=entries.device)
    part = torch.empty(splits, heads, latent_dim, dtype=torch.float32, device=entries.device)
    lse = torch.empty(splits, heads, dtype=torch.float32, device=entries.device)  # [P, H]
    _mla_split_kernel[(splits, triton.cdiv(heads, BLOCK_H))](
        q_full, entries, pos, part, lse, heads, bucket, q_full.stride(0), entries.stride(0),
        blocks_per_split, scale * _LOG2E, C=latent_dim, R=rope_dim,
        C_PAD=_dot_width(latent_dim), R_PAD=_dot_width(rope_dim), BLOCK_H=BLOCK_H,
        BLOCK_S=block_s, DOT_F32=entries.device.type != "cuda",
        num_warps=split_warps(block_s), num_stages=SPLIT_STAGES)
    block_p = triton.next_power_of_2(splits)
    block_c = min(triton.next_power_of_2(latent_dim), max(16, COMBINE_TILE // block_p))
    _mla_combine_kernel[(heads, triton.cdiv(latent_dim, block_c))](
        part, lse, out, heads, splits, out.stride(0), C=latent_dim, BLOCK_P=block_p,
        BLOCK_C=block_c, num_warps=4)
    return out


def _check(q_full, entries, pos, bucket, latent_dim, out, block_s) -> None:
    """ValueError for any argument the kernels cannot take (shapes, dtypes, devices)."""
    if q_full.dim() != 2 or entries.dim() != 2 or q_full.shape[1] != entries.shape[1]:
        raise ValueError(f"q_full [H, C + R] and entries [M, C + R] must share their width, "
                         f"got {tuple(q_full.shape)} and {tuple(entries.shape)}")
    heads, width = q_full.shape
    if heads < 1 or not 1 <= latent_dim < width:
        raise ValueError(f"q_full [H, C + R] needs H >= 1 and C ({latent_dim}) < C + R "
                         f"({width}), got {tuple(q_full.shape)}")
    if block_s not in (16, 32, 64):
        raise ValueError(f"block_s must be 16, 32 or 64, got {block_s}")
    if not 1 <= bucket <= entries.shape[0]:
        raise ValueError(f"bucket must be in 1..{entries.shape[0]} (cache rows), got {bucket}")
    if q_full.dtype != entries.dtype or entries.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"q_full and entries must both be bf16 or fp16, got {q_full.dtype} "
                         f"and {entries.dtype}")
    if q_full.stride(1) != 1 or entries.stride(1) != 1:
        raise ValueError("q_full and entries must be contiguous along their last dim")
    if pos.dtype != torch.int64 or pos.numel() != 1:
        raise ValueError(f"pos must be an int64 tensor of one element, got {pos.dtype} "
                         f"{tuple(pos.shape)}")
    if not (q_full.device == entries.device == pos.device):
        raise ValueError(f"q_full, entries and pos must share a device, got {q_full.device}, "
                         f"{entries.device} and {pos.device}")
    if out is not None and (out.shape != (heads, latent_dim) or out.dtype != entries.dtype
                            or out.stride(1) != 1 or out.device != entries.device):
        raise ValueError(f"out must be [{heads}, {latent_dim}] {entries.dtype} on "
                         f"{entries.device}, contiguous along its last dim")


def _dot_width(n: int) -> int:
    """Columns of a tile holding n: a power of two, at least tl.dot's smallest K (16)."""
    return max(16, triton.next_power_of_2(n))
