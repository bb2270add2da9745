"""Quantized dense linears for the GPU (krasisd.engine.gpu.dense_decode), kernels in the
Triton interpreter: the CPU cache's weights laid out k-major without a change of value, the
matrix-vector kernel (plain, K-split, gated) against float32 on the dequantized weights, the
fused gate/up and q/kv views, and the swap of a model's linears."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton")
if torch.cuda.is_available():  # kernels imported earlier in the session are compiled for CUDA
    pytest.skip("Triton interpreter tests run without a GPU", allow_module_level=True)

from krasisd.engine import quant  # noqa: E402
from krasisd.engine.config import ModelConfig  # noqa: E402
from krasisd.engine.cpu_cache import DenseWeight  # noqa: E402
from krasisd.engine.dense_plan import dense_plan, quantize_weight  # noqa: E402
from krasisd.engine.gpu import dense_decode, fused  # noqa: E402
from krasisd.engine.gpu.dense_decode import GpuQuantLinear, LinearTile  # noqa: E402
from krasisd.engine.gpu.format import QuantSpec, dequantize_kmajor  # noqa: E402
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, synthetic_model  # noqa: E402
from krasisd.engine.models.common import DenseMLP  # noqa: E402


def _stored(n: int, k: int, bits: int, group: int, seed: int = 0) -> tuple[DenseWeight,
                                                                            torch.Tensor]:
    """A CPU-cache DenseWeight of a random W [N, K] and its dequantized float32 values."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    qweight, scales = quantize_weight(w, bits, group)
    stored = DenseWeight(qweight, scales, bits, group, k)
    return stored, quant.dequantize(torch.from_numpy(qweight), torch.from_numpy(scales), bits,
                                    group)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _x(rows: int, k: int, seed: int = 9) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


# float32 rows: summation order, and the INT4 pair unpack's constant parts (264 and 24 times
# each activation) cancelling in float32 (relative 1e-6..3e-5 seen); a wrong nibble, scale or
# split shows as 1e-2 and more
REL_TOL = 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_weights_are_laid_out_without_a_change_of_value(bits):
    stored, w = _stored(96, 256, bits, 64)
    linear = GpuQuantLinear.from_stored(stored, "cpu")
    back = dequantize_kmajor(linear.qweight, linear.scales, QuantSpec(bits, 64))  # [K, N]
    assert torch.equal(back.T, w)
    assert (linear.in_features, linear.out_features) == (256, 96)


TILES = [LinearTile(64, 64, 1, 2), LinearTile(32, 32, 4, 1), LinearTile(64, 32, 3, 2, False)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", TILES, ids=["direct", "split", "uneven-single-nibble"])
@pytest.mark.parametrize("n", [128, 80])
def test_gemv_matches_float32_on_the_dequantized_weights(bits, tile, n):
    stored, w = _stored(n, 256, bits, 64, seed=n)
    linear = GpuQuantLinear.from_stored(stored, "cpu")
    x = _x(3, 256)
    counts = torch.zeros(3 * 4, dtype=torch.int32)
    got = dense_decode.linear_gemv(x, linear.qweight, linear.scales, bits, 64, tile, counts)
    assert _rel(got, x @ w.T) < REL_TOL
    assert not counts.any()  # reset by the last program of each tile
    again = dense_decode.linear_gemv(x, linear.qweight, linear.scales, bits, 64, tile, counts)
    assert _rel(again, got) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", TILES[:2], ids=["one-split", "split"])
def test_gated_gemv_is_silu_gate_times_up(bits, tile):
    gate, w_gate = _stored(64, 128, bits, 64, seed=1)
    up, w_up = _stored(64, 128, bits, 64, seed=2)
    owner = nn.Module()
    linears = (GpuQuantLinear.from_stored(gate, "cpu"), GpuQuantLinear.from_stored(up, "cpu"))
    gate_up = dense_decode.fuse(owner, "_gate_up_q", linears)
    x = _x(2, 128)
    counts = torch.zeros(2 * 2, dtype=torch.int32)
    got = dense_decode.linear_gemv(x, gate_up.qweight, gate_up.scales, bits, 64, tile, counts,
                                   gated=True)
    want = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)
    assert _rel(got, want) < REL_TOL
    assert not counts.any()


def test_bf16_rows_round_like_a_bf16_linear():
    stored, w = _stored(128, 256, 4, 64, seed=3)
    linear = GpuQuantLinear.from_stored(stored, "cpu")
    x = _x(1, 256).to(torch.bfloat16)
    got = linear.gemv(x)
    assert got.dtype == torch.bfloat16
    assert _rel(got, x.float() @ w.T) < 1e-2  # bf16 output (the interpreter truncates)


def test_fused_views_project_like_the_separate_linears():
    q, w_q = _stored(96, 128, 4, 64, seed=4)
    kv, w_kv = _stored(32, 128, 4, 64, seed=5)
    owner = nn.Module()
    owner.q_proj, owner.kv = GpuQuantLinear.from_stored(q, "cpu"), GpuQuantLinear.from_stored(
        kv, "cpu")
    x = _x(1, 128)
    both = fused.project(owner, "_q_kv", (owner.q_proj, owner.kv), x)  # one fused linear
    assert both.shape == (1, 128)
    assert owner.__dict__["_q_kv_q"].qweight.data_ptr() == owner.q_proj.qweight.data_ptr()
    assert _rel(both, x @ torch.cat([w_q, w_kv]).T) < REL_TOL
    assert _rel(owner.kv.gemv(x), x @ w_kv.T) < REL_TOL  # a column view of the fused weight
    assert "_q_kv_q" not in dict(owner.named_modules())  # not registered: bytes counted once


def test_fuse_declines_linears_of_different_formats():
    a, _ = _stored(32, 128, 4, 64)
    b, _ = _stored(32, 128, 8, 64)
    owner = nn.Module()
    pair = (GpuQuantLinear.from_stored(a, "cpu"), GpuQuantLinear.from_stored(b, "cpu"))
    assert dense_decode.fuse(owner, "_pair", pair) is None
    x = _x(1, 128)
    assert fused.project(owner, "_pair", pair, x).shape == (1, 64)


def test_many_rows_dequantize_in_column_chunks(monkeypatch):
    monkeypatch.setattr(dense_decode, "DEQUANT_COLS", 48)
    stored, w = _stored(128, 256, 8, 64, seed=6)
    linear = GpuQuantLinear.from_stored(stored, "cpu", bias=torch.ones(128))
    x = _x(20, 256)
    assert _rel(linear(x), x @ w.T + 1) < REL_TOL  # CPU rows: the dequantized path


def test_swiglu_of_a_quantized_mlp_matches_the_float_mlp():
    mlp = DenseMLP(128, 64)
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.normal_(0, 0.1)
    stored = {name: DenseWeight(*quantize_weight(linear.weight, 8, 64), 8, 64,
                                linear.in_features)
              for name, linear in mlp.named_children()}
    assert dense_decode.quantized_linears(mlp, stored, "cpu") > 0
    assert all(isinstance(m, GpuQuantLinear) for m in mlp.children())
    x = _x(2, 128)
    want = mlp(x)  # the module's own forward over the quantized linears
    assert _rel(fused.swiglu(mlp, x), want) < REL_TOL


def test_quantized_linears_follow_the_cpu_caches_plan():
    config = ModelConfig.from_dict(dict(TINY_DEEPSEEK_V2, num_hidden_layers=2))
    model = synthetic_model(config, "cpu", torch.float32, seed=1)
    plan = dense_plan(model, 4, 64)
    stored = {name: DenseWeight(*quantize_weight(linear.weight, bits, group), bits, group,
                                linear.in_features) for name, linear, bits, group in plan}
    freed = dense_decode.quantized_linears(model, stored, "cpu")
    assert freed == sum(linear.weight.numel() * 4 for _, linear, _, _ in plan)
    swapped = {name for name, m in model.named_modules() if isinstance(m, GpuQuantLinear)}
    assert swapped == set(stored)
    assert model.lm_head.bits == 8  # the head keeps the plan's INT8
    assert isinstance(model.model.layers[0].self_attn.kv_b_proj, nn.Linear)  # kept float


def test_a_weight_of_another_shape_is_refused():
    mlp = DenseMLP(128, 64)
    stored, _ = _stored(32, 128, 8, 64)
    with pytest.raises(ValueError, match="the cache holds"):
        dense_decode.quantized_linears(mlp, {"gate_proj": stored}, "cpu")


@pytest.mark.parametrize("fields", [dict(block_n=96), dict(block_k=8), dict(split_k=0),
                                    dict(num_warps=3)])
def test_bad_tiles_are_refused(fields):
    with pytest.raises(ValueError, match="LinearTile"):
        LinearTile(**fields)
