"""Quantized dense linears on the GPU: the decode step's projections read INT4/INT8 weights.

With every routed expert resident (S1), a DeepSeek-V2-Lite decode step read 2.1 GB of bf16
dense weights (attention projections, shared experts, the dense MLP layer, the output head)
against 0.4 GB of INT4 experts, and cuBLAS' one-row kernels read them at about 2.4 TB/s:
0.88 ms of a 2.4 ms step. The CPU cache already holds those linears quantized (dense_plan:
the model's bits, INT8 for the head; the weights the CPU-only path runs), so here they are
laid out again for the GPU at load, not quantized again:

- INT4: the CPU's 64-element units (krasisd.engine.quant) are unpacked and packed k-major,
  eight nibbles along K per int32 word (krasisd.engine.gpu.format), values unchanged;
- INT8: the int8 matrix transposed to [K, N];
- scales: the CPU's float32 [N, K/G], transposed to [K/G, N].

So the GPU computes with the CPU path's weights exactly, and the same model answers alike
with and without a GPU (up to summation order and bf16 activations).

A few rows (decode) go through ``linear_gemv``: the routed experts' matrix-vector inner
step (``moe_decode.tile_sum``) over one weight tile per program, with K split over programs
whose float32 parts the last program of a column tile adds up (an arrival counter, reset by
that program, so no memset per call). ``gated`` computes SwiGLU's ``silu(gate) * up`` in
that last program, over a fused [gate | up] weight: a shared expert or dense MLP is two
kernels. More rows (prefill) dequantize the weight to bf16 in column chunks and use cuBLAS.

Legend: T = rows, K = in features, N = out features, G = group size, BN = columns per
program, BK = inputs per K step.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from krasisd.engine import quant
from krasisd.engine.gpu import tuning
from krasisd.engine.gpu.format import QuantSpec, dequantize_kmajor, pack_int4
from krasisd.engine.gpu.moe_decode import (
    F256_BITS,
    SharedExperts,
    check_tile,
    k_block,
    k_splits,
    shared_fits,
    tile_sum,
)

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 8  # up to this many rows, the matrix-vector kernel; more: dequantize + cuBLAS
DEQUANT_COLS = 8192  # columns dequantized at a time for many rows (bounds the bf16 copy)
TUNE_SIBLINGS = 32  # linears of one shape a tile is timed over
_SIBLINGS: dict[tuple, weakref.WeakSet] = {}  # shape -> live GpuQuantLinears of that shape


@dataclass(frozen=True)
class LinearTile:
    """Columns per program, inputs per K step, K splits, warps, INT4 pair unpack."""

    block_n: int = 128
    block_k: int = 64
    split_k: int = 4
    num_warps: int = 2
    pair_unpack: bool = True

    def __post_init__(self):
        check_tile(self, ("block_n", "block_k", "num_warps"), ("split_k",))


# 2048-wide inputs are 16-64 K steps: splits of 1..16 keep 100-1000 programs in flight for
# outputs of 2048..100K columns. Picked by timing per shape on each machine (tuning.py).
LINEAR_CANDIDATES = (
    LinearTile(64, 64, 8, 2),  # the best of the first sweep for 2048-wide inputs
    LinearTile(64, 128, 16, 2),  # one K step per program: every load in flight at once
    LinearTile(128, 128, 16, 4),
    LinearTile(64, 64, 32, 2),
    LinearTile(32, 128, 16, 1),
    LinearTile(64, 128, 8, 2),
    LinearTile(128, 64, 16, 2),
    LinearTile(128, 64, 4, 2),
    LinearTile(128, 32, 8, 1),
    LinearTile(256, 32, 8, 2),
    LinearTile(128, 128, 1, 4),  # the best for the 100K-column output head
    LinearTile(256, 128, 1, 8),
    LinearTile(64, 32, 16, 1),
)
_TUNER = tuning.Tuner("dense_gemv", LINEAR_CANDIDATES, LinearTile, tuning.time_graph)


@triton.jit
def _linear_gemv(
    x_ptr, w_ptr, s_ptr, part_ptr, out_ptr, count_ptr, N, K, steps_per_split, num_splits,
    stride_xm, stride_wk, stride_sk, stride_om, exp_bits,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PAIRS: tl.constexpr, EVEN_N: tl.constexpr, GATED: tl.constexpr, DIRECT: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    # x [T, K]; w k-major [K(/8), W] with scales [K/G, W]: W = N, or 2N when GATED (gate
    # columns [0, N), up [N, 2N)); out [T, N] in out's dtype
    # part [SPLITS, T, W] float32: each split's sums; count [T, N tiles] int32 arrivals
    row = tl.program_id(0)
    num_tiles = tl.cdiv(N, BLOCK_N)
    if GATED:
        tile = tl.program_id(1) % num_tiles
        half = tl.program_id(1) // num_tiles  # 0: gate, 1: up
    else:
        tile = tl.program_id(1)
        half = 0
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    split = tl.program_id(2)
    first = split * steps_per_split * BLOCK_K
    last = tl.minimum(first + steps_per_split * BLOCK_K, K)
    total = tile_sum(x_ptr + row * stride_xm, w_ptr, s_ptr, first, last, offs + half * N, mask,
                     stride_wk, stride_sk, exp_bits, GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS,
                     EVEN_N)
    dst = out_ptr + row * stride_om + offs
    if DIRECT:  # one split, no gate: the sums are the output
        tl.store(dst, total.to(out_ptr.dtype.element_ty), mask=mask)
        return
    width = 2 * N if GATED else N
    parts = part_ptr + row * width + offs
    split_stride = tl.num_programs(0) * width
    tl.store(parts + split * split_stride + half * N, total, mask=mask)
    tl.debug_barrier()  # every thread's part is written before the arrival is counted
    counter = count_ptr + row * num_tiles + tile
    arrivals = 2 * num_splits if GATED else num_splits
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == arrivals - 1:  # the last: every part of this tile is visible
        # all splits' parts in one load each (from L2): one round trip, not one per split
        offs_s = tl.arange(0, SPLITS_P2)
        src = parts[None, :] + offs_s[:, None] * split_stride  # [SPLITS_P2, BN]
        both = (offs_s[:, None] < num_splits) & mask[None, :]
        first_sum = tl.sum(tl.load(src, mask=both, other=0.0, cache_modifier=".cg"), axis=0)
        if GATED:
            second_sum = tl.sum(tl.load(src + N, mask=both, other=0.0, cache_modifier=".cg"),
                                axis=0)
        dtype = out_ptr.dtype.element_ty
        if GATED:  # rounded where the unfused MLP rounds: gate, up, silu(gate), product
            gate = first_sum.to(dtype).to(tl.float32)
            up = second_sum.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            tl.store(dst, (act * up).to(dtype), mask=mask)
        else:
            tl.store(dst, first_sum.to(dtype), mask=mask)
        tl.atomic_xchg(counter, 0)  # ready for the next call


def linear_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                group_size: int, tile: LinearTile, counts: torch.Tensor,
                gated: bool = False) -> torch.Tensor:
    """x [T, K] (bf16 or float32) times k-major quantized weights (qweight [K/8, W] int32
    for INT4, [K, W] int8 for INT8; scales [K/G, W]; columns contiguous, rows may be a
    view's stride): [T, N] in x's dtype, N = W, or W / 2 with ``gated`` (silu(gate) * up).
    ``counts``: int32 with at least T * ceil(N / BN) zeros, left zero afterwards."""
    rows, k = x.shape
    width = scales.shape[1]
    n = width // 2 if gated else width
    block_k = k_block(tile.block_k, group_size, k)
    splits, steps = k_splits(k // block_k, tile.split_k)
    tiles = triton.cdiv(n, tile.block_n)
    if counts.numel() < rows * tiles:
        raise ValueError(f"counts holds {counts.numel()} arrivals, {rows * tiles} needed")
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    direct = splits == 1 and not gated
    part = out if direct else torch.empty(splits, rows, width, dtype=torch.float32,
                                          device=x.device)
    grid = (rows, (2 if gated else 1) * tiles, splits)
    _linear_gemv[grid](
        x, qweight, scales, part, out, counts, n, k, steps, splits, x.stride(0),
        qweight.stride(0), scales.stride(0), out.stride(0), F256_BITS,
        GROUP=group_size, BITS=bits, BLOCK_N=tile.block_n, BLOCK_K=block_k,
        PAIRS=tile.pair_unpack, EVEN_N=n % tile.block_n == 0, GATED=gated, DIRECT=direct,
        SPLITS_P2=triton.next_power_of_2(splits), num_warps=tile.num_warps)
    return out


class GpuQuantLinear(nn.Module):
    """A drop-in for a bias-free or biased ``nn.Linear`` over k-major INT4/INT8 weights."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        QuantSpec(bits, group_size)  # validates
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, scales.shape[1]
        self.register_buffer("qweight", qweight)  # [K/8, N] int32 or [K, N] int8
        self.register_buffer("scales", scales)  # [K/G, N] float32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self._counts: dict[tuple, torch.Tensor] = {}  # (device, arrivals) -> zeros
        self.tile: LinearTile | None = None  # set: this tile, not the tuned one
        self.tuning: tuning.KernelTuning | None = None  # None: LinearTile() unless ``tile``
        _SIBLINGS.setdefault(self._shape_key(), weakref.WeakSet()).add(self)

    @classmethod
    def from_stored(cls, stored, device, bias: torch.Tensor | None = None) -> GpuQuantLinear:
        """From a CPU cache's DenseWeight (krasisd.engine.cpu_cache): the same values, laid
        out k-major on ``device``."""
        qweight = _as_tensor(stored.qweight).to(device)  # [N, K/2] uint8 or [N, K] int8
        if stored.bits == 4:
            qweight = pack_int4(quant.unpack_int4(qweight).T)  # [K/8, N] int32
        else:
            qweight = qweight.T.contiguous()  # [K, N] int8
        scales = _as_tensor(stored.scales).to(device).T.contiguous()  # [K/G, N] float32
        return cls(qweight, scales, stored.bits, stored.group_size, stored.in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        rows = x.reshape(-1, self.in_features)
        y = self.gemv(rows) if _few_rows(rows) else self.dense(rows)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """For a fused [gate | up] weight: silu(x @ gate) * (x @ up), [T, N / 2]."""
        if _few_rows(x):
            return self.gemv(x, gated=True)
        gate, up = self.dense(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def gemv(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """The matrix-vector kernel over rows x [T, K] (any device Triton runs on)."""
        x = x.contiguous()
        tile = self._tile(x, gated)
        return linear_gemv(x, self.qweight, self.scales, self.bits, self.group_size, tile,
                           self.counts(x, tile, gated), gated)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x [T, K] against the weight dequantized to x's dtype, in column chunks."""
        spec = QuantSpec(self.bits, self.group_size)
        n = self.out_features
        out = None
        for start in range(0, n, DEQUANT_COLS):
            stop = min(start + DEQUANT_COLS, n)
            q_cols = self.qweight[:, start:stop]
            w = dequantize_kmajor(q_cols, self.scales[:, start:stop], spec, x.dtype)  # [K, n]
            if stop - start == n:
                return x @ w
            if out is None:
                out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
            out[:, start:stop] = x @ w
        return out

    def counts(self, x: torch.Tensor, tile: LinearTile, gated: bool) -> torch.Tensor:
        """Arrival counters for this shape, zeroed once and reset by the kernel."""
        n = self.out_features // 2 if gated else self.out_features
        need = x.shape[0] * triton.cdiv(n, tile.block_n)
        key = (x.device, need)
        if key not in self._counts:
            self._counts[key] = torch.zeros(need, dtype=torch.int32, device=x.device)
        return self._counts[key]

    def _shape_key(self) -> tuple:
        return (self.bits, self.group_size, self.in_features, self.out_features)

    def _tile(self, x: torch.Tensor, gated: bool) -> LinearTile:
        """The tuned tile of this shape. A candidate is timed over every linear of the shape
        in a row (up to TUNE_SIBLINGS), as a decode step runs them: one layer's weights fit
        in the L2, and timing one alone rewards tiles that are fast from cache."""
        if self.tile is not None:
            return self.tile
        if x.device.type != "cuda" or self.tuning is None:
            return LinearTile()
        siblings = [s for s in _SIBLINGS.get(self._shape_key(), ()) if s.qweight.device
                    == x.device][:TUNE_SIBLINGS] or [self]

        def run(tile):
            for linear in siblings:
                linear_gemv(x, linear.qweight, linear.scales, self.bits, self.group_size, tile,
                            linear.counts(x, tile, gated), gated)

        return _TUNER.pick(self._shape_key() + (x.shape[0], gated), run, self.tuning,
                           x.device, fallback=LinearTile())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


def fuse(owner: nn.Module, name: str, linears) -> GpuQuantLinear | None:
    """One GpuQuantLinear over bias-free quantized linears that read the same input
    (columns side by side), kept as ``owner.<name>`` (not a registered submodule); the
    linears then hold column views of it, so no copy is kept. None when they cannot be
    fused (bias, or different bits, groups or inputs). Idempotent."""
    fused = owner.__dict__.get(name)
    if fused is not None:
        return fused
    first = linears[0]
    if any(linear.bias is not None or (linear.bits, linear.group_size, linear.in_features)
           != (first.bits, first.group_size, first.in_features) for linear in linears):
        return None
    qweight = torch.cat([linear.qweight for linear in linears], dim=1)  # [K(/8), sum N]
    scales = torch.cat([linear.scales for linear in linears], dim=1)  # [K/G, sum N]
    fused = GpuQuantLinear(qweight, scales, first.bits, first.group_size, first.in_features)
    fused.tuning = first.tuning
    start = 0
    for linear in linears:
        width = linear.out_features
        linear.qweight = qweight[:, start:start + width]
        linear.scales = scales[:, start:start + width]
        start += width
    owner.__dict__[name] = fused
    return fused


def moe_shared(mlp: nn.Module, views: dict, bits: int, group_size: int) -> SharedExperts | None:
    """A SwiGLU MLP of quantized linears (a layer's shared experts) in the form moe_gemv runs
    beside the routed experts (``views``, ``bits``, ``group_size``: the GPU expert format),
    or None where it cannot: float linears, other bits or groups, a width that is not whole
    routed-expert widths."""
    linears = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(isinstance(linear, GpuQuantLinear) for linear in linears):
        return None
    gate_up, down = fuse(mlp, "_gate_up_q", linears[:2]), mlp.down_proj
    if gate_up is None or (down.bits, down.group_size) != (gate_up.bits, gate_up.group_size):
        return None
    shared = SharedExperts(gate_up.qweight, gate_up.scales, down.qweight, down.scales)
    if not shared_fits(shared, views, bits, group_size, gate_up.bits, gate_up.group_size):
        return None
    return shared


def quantized_linears(model: nn.Module, stored: dict, device) -> int:
    """Swap every ``nn.Linear`` of ``model`` whose weights the CPU cache stores quantized
    (``stored``: linear name -> cpu_cache.DenseWeight) for a GpuQuantLinear on ``device``.
    Returns the bytes of float weights this frees."""
    freed = 0
    for name, module in list(model.named_modules()):
        weights = stored.get(name)
        if weights is None or not isinstance(module, nn.Linear):
            continue
        if (weights.in_features, weights.scales.shape[0]) != (module.in_features,
                                                              module.out_features):
            raise ValueError(f"{name}: the cache holds a [{weights.scales.shape[0]}, "
                             f"{weights.in_features}] weight, the model "
                             f"[{module.out_features}, {module.in_features}]")
        replace_module(model, name, GpuQuantLinear.from_stored(weights, device, module.bias))
        freed += module.weight.numel() * module.weight.element_size()
    log.info("dense linears on the GPU from the CPU cache's quantized weights: %.2f GB of "
             "float weights replaced", freed / 1e9)
    return freed


def set_tuning(model: nn.Module, kernel_tuning: tuning.KernelTuning | None) -> int:
    """Give every GpuQuantLinear of ``model`` the tile tuning (None: fixed tiles); returns
    how many there are."""
    linears = [m for m in model.modules() if isinstance(m, GpuQuantLinear)]
    for linear in linears:
        linear.tuning = kernel_tuning
    return len(linears)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _few_rows(x: torch.Tensor) -> bool:
    """Whether rows x [T, K] take the matrix-vector kernel (a few rows, on the GPU)."""
    return x.is_cuda and x.shape[0] <= GEMV_MAX_ROWS


def _as_tensor(array) -> torch.Tensor:
    """A tensor over a (read-only, memory-mapped) numpy array, without a copy."""
    with warnings.catch_warnings():  # read only here: the array is copied to the device
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(array))
