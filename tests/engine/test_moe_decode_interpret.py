"""The decode matrix-vector kernels (krasisd.engine.gpu.moe_decode) in the Triton interpreter.

The reference is float32 on the exactly dequantized weights with h = silu(gate) * up rounded
to bf16 as the kernel stores it; the interpreter rounds float32 -> bf16 by truncation (the GPU
rounds to nearest), so the reference truncates too. What remains is float32 summation order
(about 1e-7 here) and the rare h that lands on the other side of a bf16 step (2^-8 of one
element's share): 1e-4 allows for that, while a wrong nibble, scale or split shows as 1e-2.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if torch.cuda.is_available():  # kernels imported earlier in the session are compiled for CUDA
    pytest.skip("Triton interpreter tests run without a GPU", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from krasisd.engine.gpu import moe_decode  # noqa: E402
from krasisd.engine.gpu.format import ExpertLayout, QuantSpec, dequantize_kmajor  # noqa: E402
from krasisd.engine.gpu.moe_decode import (  # noqa: E402
    GEMV_CANDIDATES,
    GemvConfig,
    moe_gemv,
    resident_slots,
)

REL_TOL = 1e-4
E = 6
SLOTS = torch.tensor([5, 0, 3, 8, 1, 6], dtype=torch.int32)  # expert -> arena slot


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bf16_truncated(t):
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


def _arena(d, i, bits, group, seed=0):
    """Views of an arena of E + 3 slots holding E random experts at SLOTS, the rest 0xFF."""
    g = torch.Generator().manual_seed(seed)
    layout = ExpertLayout(d, i, QuantSpec(bits, group))
    blobs = layout.pack_experts(torch.randn(E, i, d, generator=g) / d**0.5,
                                torch.randn(E, i, d, generator=g) / d**0.5,
                                torch.randn(E, d, i, generator=g) / i**0.5)
    arena = torch.full((E + 3, layout.expert_bytes), 255, dtype=torch.uint8)
    arena[SLOTS.long()] = blobs
    return layout, layout.views(arena)


def _reference(x, layout, views, resident, ids, weights):
    """float32 [T, D]: sum over each token's resident experts of weight * down(h)."""
    spec, i = layout.spec, layout.intermediate
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t, k in ((t, k) for t in range(ids.shape[0]) for k in range(ids.shape[1])):
        e = int(ids[t, k])
        if not resident[e]:
            continue
        s = int(SLOTS[e])
        gate_up = x[t].float() @ dequantize_kmajor(views["w13_q"][s], views["w13_s"][s], spec)
        h = _bf16_truncated(torch.nn.functional.silu(gate_up[:i]) * gate_up[i:])  # [I]
        out[t] += weights[t, k] * (h @ dequantize_kmajor(views["w2_q"][s], views["w2_s"][s],
                                                         spec))
    return out


def _routing(tokens, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])  # [T, K]
    return ids, torch.rand(tokens, k, generator=g)


def _check(d, i, bits, group, tokens, cfg, seed=0):
    layout, views = _arena(d, i, bits, group, seed)
    resident = torch.tensor([True, True, False, True, False, True])
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(tokens, d, generator=g) + 0.5).bfloat16()  # a mean: the INT4 correction
    ids, w = _routing(tokens, 3, seed + tokens)
    out = moe_gemv(x, views, resident_slots(SLOTS, resident), ids, w, bits, group, cfg)
    assert out.shape == (tokens, d) and out.dtype == torch.float32
    assert _rel(out, _reference(x, layout, views, resident, ids, w)) < REL_TOL


@triton.jit
def _unpack_all(w_ptr, single_ptr, pair_ptr):
    offs = tl.arange(0, 16)
    words = tl.load(w_ptr + offs)  # [16] int32
    for j in tl.static_range(8):
        tl.store(single_ptr + j * 16 + offs, moe_decode._nibble(words, j))
    for m in tl.static_range(4):
        lo, hi = moe_decode._nibble_pair(words, m, moe_decode.F256_BITS)
        tl.store(pair_ptr + 2 * m * 16 + offs, lo)
        tl.store(pair_ptr + (2 * m + 1) * 16 + offs, hi)


def test_float_unpack_tricks_are_exact_for_every_nibble_at_every_position():
    nibbles = (torch.arange(16).view(16, 1) + torch.arange(8).view(1, 8) * 3) % 16  # [word, j]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles.to(torch.int64) << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # [16]
    single, pair = torch.empty(8, 16), torch.empty(8, 16)
    _unpack_all[(1,)](words, single, pair)
    want = nibbles.T.float()  # [j, word]
    assert torch.equal(single, want - 8)  # 2^23 + n, minus 2^23 + 8
    assert torch.equal(pair[0::2], 256 + want[0::2])
    assert torch.equal(pair[1::2], 16 + want[1::2])


@pytest.mark.parametrize("cfg", GEMV_CANDIDATES, ids=[f"cfg{n}" for n in
                                                       range(len(GEMV_CANDIDATES))])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_candidate_matches_the_float_reference(bits, cfg):
    tokens = 1 + 2 * (GEMV_CANDIDATES.index(cfg) % 2)  # 1 or 3 tokens, alternating
    group = max(32, cfg.block_k)  # the candidate's own K step: 2 steps of gate/up, 1 of down
    _check(2 * group, group, bits, group, tokens, cfg)


@pytest.mark.parametrize("bits", [4, 8])
def test_partial_tiles_and_uneven_k_splits(bits):
    # I = 96: gate/up tiles of 64 end half-empty and up starts mid-tile; D = 192 is 6 K
    # steps of 32 in 3 splits of 2, I = 96 is 3 down steps in splits of 2 and 1
    cfg = GemvConfig(64, 32, 4, 2, 64, 2, 2, True)
    _check(192, 96, bits, 32, 2, cfg, seed=7)


def test_single_nibble_unpack_and_group_64():
    _check(128, 64, 4, 64, 2, GemvConfig(32, 128, 2, 2, 32, 1, 2, False), seed=3)


def test_no_resident_expert_gives_exact_zeros():
    _, views = _arena(64, 32, 4, 32)
    ids, w = _routing(2, 3, seed=5)
    out = moe_gemv(torch.randn(2, 64).bfloat16(), views, torch.full((E,), -1, dtype=torch.int32),
                   ids, w, 4, 32)
    assert torch.equal(out, torch.zeros(2, 64))


@pytest.mark.parametrize("fields", [dict(block_n=48), dict(block_k=8), dict(split_k=0),
                                    dict(down_num_warps=3)])
def test_config_rejects_bad_tiles(fields):
    with pytest.raises(ValueError):
        GemvConfig(**fields)


def test_bad_bits_or_widths_are_value_errors():
    _, views = _arena(64, 32, 4, 32)
    ids, w = _routing(1, 3, seed=2)
    with pytest.raises(ValueError, match="bits"):
        moe_gemv(torch.randn(1, 64).bfloat16(), views, SLOTS, ids, w, 6, 32)
    with pytest.raises(ValueError, match="K step"):
        moe_gemv(torch.randn(1, 64).bfloat16(), views, SLOTS, ids, w, 4, 24)


def test_each_gate_up_tile_counts_every_split_of_gate_and_up_once():
    cfg = GemvConfig(64, 32, 4, 2, 64, 2, 2, True)
    _, views = _arena(128, 96, 4, 32)
    resident = torch.tensor([True, False, True, True, False, True])
    ids, _ = _routing(2, 3, seed=4)
    tiles = 2  # I = 96 in tiles of 64
    count = torch.zeros(ids.numel() * tiles, dtype=torch.int32)
    x = torch.randn(2, 128).bfloat16()
    moe_decode.gemv_gate_up(x, views, resident_slots(SLOTS, resident), ids.to(torch.int32), 4,
                            32, cfg, 32, count)
    splits = 4  # 128 / 32 K steps, one per split
    want = resident[ids.reshape(-1)].repeat_interleave(tiles).to(torch.int32) * 2 * splits
    assert torch.equal(count, want)


@pytest.mark.parametrize("bits", [4, 8])
def test_shared_experts_run_beside_the_routed_ones(bits):
    """Shared experts twice the routed width, quantized from the CPU cache's layout
    (dense_decode), as two pieces per token in the same two launches, weight 1."""
    from krasisd.engine.cpu_cache import DenseWeight
    from krasisd.engine.dense_plan import quantize_weight
    from krasisd.engine.gpu.dense_decode import GpuQuantLinear, moe_shared
    from krasisd.engine.models.common import DenseMLP

    d, i, group, tokens = 128, 64, 32, 2
    layout, views = _arena(d, i, bits, group, seed=11)
    mlp = DenseMLP(d, 2 * i)
    g = torch.Generator().manual_seed(12)
    for name in ("gate_proj", "up_proj", "down_proj"):
        linear = getattr(mlp, name)
        weight = torch.randn(linear.weight.shape, generator=g) / linear.in_features ** 0.5
        stored = DenseWeight(*quantize_weight(weight, bits, group), bits, group,
                             linear.in_features)
        setattr(mlp, name, GpuQuantLinear.from_stored(stored, "cpu"))
    shared = moe_shared(mlp, views, bits, group)
    assert shared is not None and shared.width == 2 * i
    assert moe_shared(mlp, views, bits, 2 * group) is None  # another group: run apart
    resident = torch.tensor([True, False, True, True, False, True])
    x = (torch.randn(tokens, d, generator=g) + 0.5).bfloat16()
    ids, w = _routing(tokens, 3, seed=13)
    cfg = GemvConfig(32, 32, 2, 1, 64, 2, 1, True)
    out = moe_gemv(x, views, resident_slots(SLOTS, resident), ids, w, bits, group, cfg, shared)
    spec = QuantSpec(bits, group)
    gate_up = x.float() @ dequantize_kmajor(shared.w13_q, shared.w13_s, spec)  # [T, 4I]
    h = _bf16_truncated(torch.nn.functional.silu(gate_up[:, :2 * i]) * gate_up[:, 2 * i:])
    want = _reference(x, layout, views, resident, ids, w) + h @ dequantize_kmajor(
        shared.w2_q, shared.w2_s, spec)
    assert _rel(out, want) < REL_TOL
