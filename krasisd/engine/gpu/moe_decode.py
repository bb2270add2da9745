"""Routed experts for a few tokens (decode), as matrix-vector products in Triton.

The grouped kernels of krasisd.engine.gpu.moe_triton pad every routed slot to a block of
rows for the tensor cores; with one token that is 1 useful row of 16. Here each program
streams one weight tile of one slot's expert from HBM and reduces it against the slot's
activation row on the CUDA cores. Two kernels per call:

- ``_gate_up_gemv``: program (slot, column tile of gate or of up, K split) sums its part of
  ``x @ w13`` into a small float32 buffer; the last of the 2 * splits programs of a column
  tile to finish (an arrival counter) adds the parts and writes h = ``silu(gate) * up``
  (rounded to bf16 as the grouped kernel stores it, kept in float32 so the down kernel
  converts nothing). No third kernel for the SiLU.
- ``_down_gemv``: program (slot, D tile, K split) computes its part of ``h @ down``, scales
  it by the routing weight and adds it atomically into the float32 [T, D] output, which sums
  the K slots of a token and the K splits in the same pass (the order of those float32
  additions is not fixed: the last bits can differ between runs).

The inner step (``tile_sum``), for a weight tile of BK inputs and BN columns:
- INT4 keeps the int32 words [BK/8, BN] as loaded (8 nibbles along K per word, format.py)
  and walks the nibble positions with shifts; the activations of a row, x[k0 + 8*k8 + j]
  for j = 0..7, come in as one 16-byte load. No reshape of weights, no layout conversion.
- No int -> float conversion instruction: a nibble OR-ed under the exponent bits of a float
  constant is read as a float. ``_nibble_pair`` (the default): one shift places nibbles 2m
  and 2m+1 at mantissa bits 15..18 and 19..22, read as 256 + n and 16 + n (n = q + 8),
  so each nibble costs one LOP3 and one FFMA, half a shift; the constant parts
  (264 and 24 times x, per row) enter as the first addend. ``_nibble``: 2^23 + n minus
  2^23 + 8, one shift, LOP3, FADD and FFMA per nibble (kept as a candidate to compare).
- A K step never crosses a scale group, so the scale multiplies the step's [BK/8, BN]
  partial sums once (not every weight); the sum over K rows happens once per program.
- The next step's words and scales are loaded before the current step is computed.
- INT8 reads [BK/8, BN] int8 slices 8 times per step (2^23 + 128 + q, minus the constant)
  with the same scaling after the step.
Compiled for sm_90 (Triton 3.9) the INT4 loop takes 27-30 instructions per int32 word (21 of
them the arithmetic: 8 LOP3, 8 FFMA, 4 shifts, 1 scale) and no register spills
(``bench/gpu_decode_gemv.py --sass``); the single-nibble unpack takes 43-45.

Slots whose expert is not resident (``slot_of_expert[e] < 0``) return at once, so the
caller needs no compaction and no host sync: the kernels can be captured in a CUDA graph.
Weights are the GPU format's k-major tiles (krasisd.engine.gpu.format).

Legend: T = tokens, K = experts per token, P = T*K slots, D = hidden, I = expert width,
BN = output columns per program, BK = inputs per step, BK8 = BK / 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MIN_BLOCK_K = 16
F256_BITS = 0x43800000  # the float 256.0: exponent of the INT4 pair unpack


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of the two kernels: columns per program and K splits of gate/up and of down,
    the K step, warps, and the INT4 unpack (two nibbles per shift, or one)."""

    block_n: int = 128
    block_k: int = 32
    split_k: int = 8
    num_warps: int = 1
    down_block_n: int = 256
    down_split_k: int = 8
    down_num_warps: int = 2
    pair_unpack: bool = True

    def __post_init__(self):
        check_tile(self, ("block_n", "block_k", "down_block_n", "num_warps", "down_num_warps"),
                   ("split_k", "down_split_k"))


def check_tile(tile, powers_of_two: tuple[str, ...], splits: tuple[str, ...]) -> None:
    """ValueError unless the named fields of a matrix-vector tile are powers of two (K step at
    least MIN_BLOCK_K) and its K splits at least 1."""
    kind = type(tile).__name__
    for name in powers_of_two:
        value = getattr(tile, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{kind}.{name} must be a power of two, got {value}")
    if tile.block_k < MIN_BLOCK_K:
        raise ValueError(f"{kind}.block_k must be >= {MIN_BLOCK_K}, got {tile.block_k}")
    for name in splits:
        if getattr(tile, name) < 1:
            raise ValueError(f"{kind}.{name} must be >= 1, got {getattr(tile, name)}")


# Spans the tile (BN 64..512 columns: 256 B..2 KB per K row; 8 or 16 words per thread), K
# splits (4..16: programs in flight per SM), warps and the INT4 unpack (the last one, single
# nibbles, for comparison). For DeepSeek-V2-Lite (D=2048, I=1408, 6 slots) 288..4224 gate/up
# programs. Picked by timing on each machine (hybrid.py, bench/gpu_decode_gemv.py).
GEMV_CANDIDATES = (
    GemvConfig(128, 32, 8, 1, 256, 8, 2, True),
    GemvConfig(256, 32, 8, 2, 256, 8, 2, True),
    GemvConfig(128, 32, 16, 1, 256, 16, 2, True),
    GemvConfig(128, 32, 8, 1, 128, 8, 1, True),
    GemvConfig(512, 32, 8, 4, 512, 8, 4, True),
    GemvConfig(128, 64, 8, 2, 128, 8, 2, True),
    GemvConfig(64, 128, 4, 4, 128, 4, 4, True),
    GemvConfig(64, 64, 16, 2, 64, 8, 2, True),
    GemvConfig(128, 32, 8, 1, 128, 8, 1, False),
)


@triton.jit
def _nibble(words, J: tl.constexpr):
    """Nibble J of each int32 word as the float q - 8: (nibble | 0x4B000000) read as a float
    is 2^23 + nibble exactly."""
    return (((words >> 4 * J) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _nibble_pair(words, M: tl.constexpr, exp_bits):
    """Nibbles 2M and 2M+1 of each word as the floats 256 + n and 16 + n (n = q + 8): one
    shift puts them at mantissa bits 15..18 and 19..22, under the exponents of 256.0
    (``exp_bits``, its bit pattern) and of 16.0. ``exp_bits`` is a run-time value so that
    the compiler keeps it in a register and takes the masks as LOP3 immediates (two
    constants in a register each were rematerialized before every use)."""
    if 15 - 8 * M >= 0:
        t = words << (15 - 8 * M)
    else:
        t = words >> (8 * M - 15)
    lo = ((t & 0x78000) | exp_bits).to(tl.float32, bitcast=True)  # 256 + n
    hi = ((t & 0x780000) | (exp_bits - (4 << 23))).to(tl.float32, bitcast=True)  # 16 + n
    return lo, hi


@triton.jit
def _int4_partial(words, a_ptrs, exp_bits, PAIRS: tl.constexpr):
    """[BK8, BN] float32: sum over j of a[k0 + 8*k8 + j] * q, for words [BK8, BN] int32 and
    a_ptrs [BK8] pointing at a[k0 + 8*k8] (unscaled)."""
    if PAIRS:
        a8 = tl.load(a_ptrs[:, None] + tl.arange(0, 8)[None, :]).to(tl.float32)  # [BK8, 8]
        a_even, a_odd = tl.split(tl.reshape(a8, (a8.shape[0], 4, 2)))  # j = 2m, 2m + 1
        a04, a26 = tl.split(tl.reshape(a_even, (a8.shape[0], 2, 2)))  # [BK8, 2] each
        a0, a4 = tl.split(a04)  # [BK8] each
        a2, a6 = tl.split(a26)
        a15, a37 = tl.split(tl.reshape(a_odd, (a8.shape[0], 2, 2)))
        a1, a5 = tl.split(a15)
        a3, a7 = tl.split(a37)
        # the constant parts 256 + 8 and 16 + 8, as the first addend: n - 8 = q
        corr = (a0 + a2 + a4 + a6) * 264.0 + (a1 + a3 + a5 + a7) * 24.0  # [BK8]
        acc = _pair_fma(-corr[:, None], words, 0, exp_bits, a0, a1)
        acc = _pair_fma(acc, words, 1, exp_bits, a2, a3)
        acc = _pair_fma(acc, words, 2, exp_bits, a4, a5)
        return _pair_fma(acc, words, 3, exp_bits, a6, a7)
    acc = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        acc += tl.load(a_ptrs + j).to(tl.float32)[:, None] * _nibble(words, j)
    return acc


@triton.jit
def _pair_fma(acc, words, M: tl.constexpr, exp_bits, a_lo, a_hi):
    """acc [BK8, BN] + a_lo * (256 + n) + a_hi * (16 + n) of nibble pair M."""
    lo, hi = _nibble_pair(words, M, exp_bits)
    acc = acc + a_lo[:, None] * lo  # one FFMA per nibble
    return acc + a_hi[:, None] * hi


@triton.jit
def _load_cols(ptrs, n_mask, EVEN_N: tl.constexpr):
    """A tile's load, masked by columns only where the tile can pass the last column (masked
    lanes are left unset: their columns are never stored)."""
    if EVEN_N:
        value = tl.load(ptrs)
    else:
        value = tl.load(ptrs, mask=n_mask)
    return value


@triton.jit
def _int8_partial(w_base, k0, offs_r, offs_n, n_mask, stride_wk, a_row, BK8: tl.constexpr,
                  EVEN_N: tl.constexpr):
    """[BK8, BN] float32: the K step at k0 of int8 weights, as 8 slices of BK8 rows."""
    acc = tl.zeros((BK8, offs_n.shape[0]), dtype=tl.float32)
    for j in tl.static_range(8):
        rows = k0 + j * BK8 + offs_r  # [BK8]
        q = _load_cols(w_base + rows[:, None] * stride_wk + offs_n[None, :], n_mask[None, :],
                       EVEN_N)  # [BK8, BN] int8
        w = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # q
        acc += tl.load(a_row + rows).to(tl.float32)[:, None] * w
    return acc


@triton.jit
def tile_sum(a_row, w_base, s_base, first, last, offs_n, n_mask, stride_wk, stride_sk, exp_bits,
              GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PAIRS: tl.constexpr, EVEN_N: tl.constexpr):
    """[BN] float32: sum over k in [first, last) of a[k] * w[k, n] for the columns offs_n
    (a: activation row, bf16 or float32; w: k-major quantized weights, scales [K/G, N])."""
    BK8: tl.constexpr = BLOCK_K // 8
    offs_r = tl.arange(0, BK8)
    acc = tl.zeros((BK8, BLOCK_N), dtype=tl.float32)  # reduced over K once, at the end
    if BITS == 4:
        words = _load_cols(w_base + (first // 8 + offs_r)[:, None] * stride_wk
                           + offs_n[None, :], n_mask[None, :], EVEN_N)  # [BK8, BN] int32
        scale = _load_cols(s_base + (first // GROUP) * stride_sk + offs_n, n_mask, EVEN_N)
        for k0 in range(first, last, BLOCK_K):
            nxt = k0 + BLOCK_K  # its words are in flight while this step computes
            # after the last step this reloads the last step (cheaper than a mask per step)
            k_next = tl.minimum(nxt, last - BLOCK_K)
            next_words = _load_cols(w_base + (k_next // 8 + offs_r)[:, None] * stride_wk
                                    + offs_n[None, :], n_mask[None, :], EVEN_N)
            next_scale = _load_cols(s_base + (k_next // GROUP) * stride_sk + offs_n, n_mask,
                                    EVEN_N)
            part = _int4_partial(words, a_row + k0 + 8 * offs_r, exp_bits, PAIRS)  # [BK8, BN]
            acc += part * scale.to(tl.float32)[None, :]
            words, scale = next_words, next_scale
    else:
        for k0 in range(first, last, BLOCK_K):
            scale = _load_cols(s_base + (k0 // GROUP) * stride_sk + offs_n, n_mask, EVEN_N)
            part = _int8_partial(w_base, k0, offs_r, offs_n, n_mask, stride_wk, a_row, BK8,
                                 EVEN_N)
            acc += part * scale.to(tl.float32)[None, :]
    return tl.sum(acc, axis=0)


@triton.jit
def _gate_up_gemv(
    x_ptr, w_ptr, s_ptr, sw_ptr, ss_ptr, part_ptr, h_ptr, count_ptr, ids_ptr, slot_ptr, N, K,
    top_k, num_slots, steps_per_split, num_splits,
    stride_xm, stride_we, stride_wk, stride_se, stride_sk, stride_swk, stride_ssk, exp_bits,
    SHARED: tl.constexpr, SHARED_UP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr, EVEN_N: tl.constexpr,
):
    # x [T, K=D] bf16; w [S, D(/8), 2N]: gate columns [0, N), up [N, 2N)
    # SHARED pieces per token after the P routed slots: the shared experts' fused [gate | up]
    # sw [D(/8), 2 SHARED_UP] (scales ss), piece j its columns j*N.. of gate and of up
    # part [SPLIT, P', 2N] float32: each split's sums; count [P', N tiles] int32 arrivals
    # h [P', N] float32 = silu(gate) * up rounded to bf16 (as the grouped kernel stores it; in
    # float32 so that the down kernel converts nothing), written by the last program of a tile
    slot = tl.program_id(0)
    if slot < num_slots:
        wslot = tl.load(slot_ptr + tl.load(ids_ptr + slot)).to(tl.int64)
        if wslot >= 0:
            _gate_up_program(x_ptr + (slot // top_k) * stride_xm, w_ptr + wslot * stride_we,
                             s_ptr + wslot * stride_se, 0, N, part_ptr, h_ptr, count_ptr, slot,
                             N, K, steps_per_split, num_splits, stride_wk, stride_sk, exp_bits,
                             GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS, EVEN_N)
    else:
        piece = (slot - num_slots) % SHARED
        token = (slot - num_slots) // SHARED
        _gate_up_program(x_ptr + token * stride_xm, sw_ptr, ss_ptr, piece * N, SHARED_UP,
                         part_ptr, h_ptr, count_ptr, slot, N, K, steps_per_split, num_splits,
                         stride_swk, stride_ssk, exp_bits, GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS,
                         EVEN_N)


@triton.jit
def _gate_up_program(x_row, w_base, s_base, col0, up_offset, part_ptr, h_ptr, count_ptr, slot,
                     N, K, steps_per_split, num_splits, stride_wk, stride_sk, exp_bits,
                     GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PAIRS: tl.constexpr, EVEN_N: tl.constexpr):
    """One (slot, column tile of gate or up, K split) program: its part, and for the last
    program of the tile the sum of the parts and h (gate at col0.., up at up_offset + col0..)."""
    num_tiles = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(1) % num_tiles
    half = tl.program_id(1) // num_tiles  # 0: gate, 1: up
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    split = tl.program_id(2)
    first = split * steps_per_split * BLOCK_K
    last = tl.minimum(first + steps_per_split * BLOCK_K, K)
    total = tile_sum(x_row, w_base, s_base, first, last, offs + col0 + half * up_offset, mask,
                     stride_wk, stride_sk, exp_bits, GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS,
                     EVEN_N)
    row = part_ptr + slot * 2 * N + offs
    split_stride = tl.num_programs(0) * 2 * N
    tl.store(row + split * split_stride + half * N, total, mask=mask)
    tl.debug_barrier()  # every thread's part is written before the arrival is counted
    arrived = tl.atomic_add(count_ptr + slot * num_tiles + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == 2 * num_splits - 1:  # the last: all parts of this tile are visible
        gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(num_splits):
            src = row + s * split_stride
            gate += tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")  # from L2
            up += tl.load(src + N, mask=mask, other=0.0, cache_modifier=".cg")
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(h_ptr + slot.to(tl.int64) * N + offs, h.to(tl.bfloat16).to(tl.float32),
                 mask=mask)


@triton.jit
def _down_gemv(
    h_ptr, w_ptr, s_ptr, sw_ptr, ss_ptr, out_ptr, ids_ptr, weights_ptr, slot_ptr, N, K, top_k,
    num_slots, steps_per_split, stride_hm, stride_we, stride_wk, stride_se, stride_sk,
    stride_swk, stride_ssk, stride_om, exp_bits,
    SHARED: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PAIRS: tl.constexpr, EVEN_N: tl.constexpr,
):
    # h [P', K=I] float32; w [S, I(/8), N=D]; out [T, D] float32 += weight * (h @ down)
    # shared piece j: rows j*I.. of the shared down sw [SHARED * I(/8), D], weight 1
    slot = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    first = tl.program_id(2) * steps_per_split * BLOCK_K
    last = tl.minimum(first + steps_per_split * BLOCK_K, K)
    if slot < num_slots:
        wslot = tl.load(slot_ptr + tl.load(ids_ptr + slot)).to(tl.int64)
        if wslot >= 0:
            total = tile_sum(h_ptr + slot * stride_hm, w_ptr + wslot * stride_we,
                             s_ptr + wslot * stride_se, first, last, offs, mask, stride_wk,
                             stride_sk, exp_bits, GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS, EVEN_N)
            route_w = tl.load(weights_ptr + slot)
            tl.atomic_add(out_ptr + (slot // top_k) * stride_om + offs, total * route_w,
                          mask=mask, sem="relaxed")
    else:
        piece = (slot - num_slots) % SHARED
        rows = piece * K  # the piece's first input row of the shared down
        w_rows = rows // 8 if BITS == 4 else rows
        total = tile_sum(h_ptr + slot * stride_hm, sw_ptr + w_rows * stride_swk,
                         ss_ptr + (rows // GROUP) * stride_ssk, first, last, offs, mask,
                         stride_swk, stride_ssk, exp_bits, GROUP, BITS, BLOCK_N, BLOCK_K,
                         PAIRS, EVEN_N)
        token = (slot - num_slots) // SHARED
        tl.atomic_add(out_ptr + token * stride_om + offs, total, mask=mask, sem="relaxed")


@dataclass(frozen=True)
class SharedExperts:
    """A layer's shared experts for ``moe_gemv``, in its k-major format and group size: the
    fused [gate | up] (w13 [D(/8), 2 Is], scales [D/G, 2 Is]) and down (w2 [Is(/8), D],
    scales [Is/G, D]); run as Is / I pieces of the routed experts' width I, weight 1."""

    w13_q: torch.Tensor
    w13_s: torch.Tensor
    w2_q: torch.Tensor
    w2_s: torch.Tensor

    @property
    def width(self) -> int:
        return self.w13_s.shape[1] // 2


# the two launched kernels by name, for tools that read their builds (bench/gpu_decode_gemv.py)
KERNELS = {"gate_up": _gate_up_gemv, "down": _down_gemv}

def moe_gemv(x: torch.Tensor, views: dict, slot_of_expert: torch.Tensor, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor, bits: int, group_size: int,
             cfg: GemvConfig | None = None, shared: SharedExperts | None = None
             ) -> torch.Tensor:
    """Routed experts of x [T, D] (bf16) whose ``slot_of_expert`` [E] (int32) is >= 0:
    float32 [T, D], the weighted sum over each token's resident slots; plus the ``shared``
    experts in the same two launches (check ``shared_fits`` first)."""
    cfg = cfg or GemvConfig()
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    t, d = x.shape
    k = topk_ids.shape[1]
    inter = views["w2_q"].shape[1] * (8 if bits == 4 else 1)
    pieces = 0 if shared is None else shared.width // inter
    rows = t * (k + pieces)  # P' = routed slots, then each token's shared pieces
    block_k = k_block(cfg.block_k, group_size, d, inter)
    gu_tiles = triton.cdiv(inter, cfg.block_n)
    scratch = torch.zeros(t * d + rows * gu_tiles, dtype=torch.float32, device=x.device)
    out = scratch[: t * d].view(t, d)  # [T, D]
    count = scratch[t * d :].view(torch.int32)  # [P', I tiles] arrivals: zeros in one memset
    h = gemv_gate_up(x.contiguous(), views, slot_of_expert, topk_ids, bits, group_size, cfg,
                     block_k, count, shared, pieces)  # [P', I]
    gemv_down(h, views, slot_of_expert, topk_ids, topk_weights, bits, group_size, cfg,
              block_k, out, shared, pieces)
    return out


def shared_fits(shared: SharedExperts, views: dict, bits: int, group_size: int,
                shared_bits: int, shared_group: int) -> bool:
    """Whether ``moe_gemv`` can run these shared experts beside the routed ones: same bits
    and group size, and a width that is whole pieces of the routed experts' width."""
    inter = views["w2_q"].shape[1] * (8 if bits == 4 else 1)
    return ((shared_bits, shared_group) == (bits, group_size) and shared.width % inter == 0
            and shared.w13_q.shape[0] == views["w13_q"].shape[1])


def gemv_gate_up(x, views, slot_of_expert, topk_ids, bits, group_size, cfg, block_k, count,
                 shared=None, pieces=0):
    """h [P', I] float32 = silu(x @ gate) * (x @ up), rounded to bf16, of each resident slot
    and shared piece (other rows unset); ``count`` [P' * I tiles] int32 must be zero."""
    t, d = x.shape
    k = topk_ids.shape[1]
    w13, s13 = views["w13_q"], views["w13_s"]
    sw, ss = (w13, s13) if shared is None else (shared.w13_q, shared.w13_s)
    inter = w13.shape[2] // 2
    rows = t * (k + pieces)
    splits, steps = k_splits(d // block_k, cfg.split_k)
    part = torch.empty(splits, rows, 2, inter, dtype=torch.float32, device=x.device)
    h = torch.empty(rows, inter, dtype=torch.float32, device=x.device)  # [P', I]
    grid = (rows, 2 * triton.cdiv(inter, cfg.block_n), splits)
    _gate_up_gemv[grid](
        x, w13, s13, sw, ss, part, h, count, topk_ids.reshape(-1), slot_of_expert, inter, d, k,
        t * k, steps, splits, x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0),
        s13.stride(1), sw.stride(-2), ss.stride(-2), F256_BITS,
        SHARED=max(pieces, 1), SHARED_UP=0 if shared is None else shared.width,
        GROUP=group_size, BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        PAIRS=cfg.pair_unpack, EVEN_N=inter % cfg.block_n == 0, num_warps=cfg.num_warps)
    return h


def gemv_down(h, views, slot_of_expert, topk_ids, topk_weights, bits, group_size, cfg, block_k,
              out, shared=None, pieces=0):
    """out [T, D] float32 += routing weight * (h @ down) of each resident slot, and the
    shared pieces' h @ down at weight 1."""
    w2, s2 = views["w2_q"], views["w2_s"]
    sw, ss = (w2, s2) if shared is None else (shared.w2_q, shared.w2_s)
    inter, d = h.shape[1], out.shape[1]
    splits, steps = k_splits(inter // block_k, cfg.down_split_k)
    weights = topk_weights.reshape(-1).to(torch.float32)  # [P]
    grid = (h.shape[0], triton.cdiv(d, cfg.down_block_n), splits)
    _down_gemv[grid](
        h, w2, s2, sw, ss, out, topk_ids.reshape(-1), weights, slot_of_expert, d, inter,
        topk_ids.shape[1], topk_ids.numel(), steps, h.stride(0), w2.stride(0), w2.stride(1),
        s2.stride(0), s2.stride(1), sw.stride(-2), ss.stride(-2), out.stride(0), F256_BITS,
        SHARED=max(pieces, 1), GROUP=group_size, BITS=bits, BLOCK_N=cfg.down_block_n,
        BLOCK_K=block_k, PAIRS=cfg.pair_unpack, EVEN_N=d % cfg.down_block_n == 0,
        num_warps=cfg.down_num_warps)


def k_splits(steps: int, wanted: int) -> tuple[int, int]:
    """(splits, K steps per split) for ``steps`` K steps cut into about ``wanted`` parts."""
    per_split = triton.cdiv(steps, min(wanted, steps))
    return triton.cdiv(steps, per_split), per_split


def resident_slots(slot_of_expert: torch.Tensor, resident: torch.Tensor) -> torch.Tensor:
    """[E] int32 arena slots with -1 where the expert is not resident (made once per
    placement, outside any graph capture)."""
    return torch.where(resident, slot_of_expert, torch.full_like(slot_of_expert, -1))


def k_block(block_k: int, group_size: int, *dims: int) -> int:
    """The largest power-of-two K step <= block_k inside one group that divides ``dims``."""
    block_k = min(block_k, group_size)
    while block_k > MIN_BLOCK_K and (group_size % block_k or any(d % block_k for d in dims)):
        block_k //= 2
    if group_size % block_k or any(d % block_k for d in dims):
        raise ValueError(f"widths {dims} and group {group_size} need a K step of "
                         f">= {MIN_BLOCK_K} dividing them")
    return block_k
