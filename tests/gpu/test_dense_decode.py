"""Quantized dense linears on the GPU (krasisd.engine.gpu.dense_decode): the compiled
matrix-vector kernel at DeepSeek-V2-Lite's widths against float32 on the dequantized weights,
inside CUDA graphs (the arrival counters must reset themselves between replays), and tuned."""

import pytest
import torch

from krasisd.engine.gpu import dense_decode
from krasisd.engine.gpu.dense_decode import LINEAR_CANDIDATES, GpuQuantLinear
from krasisd.engine.gpu.format import QuantSpec, dequantize_kmajor
from krasisd.engine.gpu.tuning import KernelTuning


def _linear(k: int, n: int, bits: int, group: int, device, seed: int = 0) -> GpuQuantLinear:
    gen = torch.Generator(device=device).manual_seed(seed)
    if bits == 4:
        q = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device,
                          generator=gen)
    else:
        q = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device, generator=gen)
    scales = torch.rand(k // group, n, device=device, generator=gen) / (8 * k ** 0.5)
    return GpuQuantLinear(q, scales, bits, group, k)


def _reference(linear, x, gated=False):
    w = dequantize_kmajor(linear.qweight, linear.scales, QuantSpec(linear.bits,
                                                                   linear.group_size))
    y = x.float() @ w  # [T, N]
    if gated:
        gate, up = y.to(x.dtype).float().chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", LINEAR_CANDIDATES, ids=lambda t: f"{t.block_n}x{t.block_k}"
                         f"s{t.split_k}w{t.num_warps}")
def test_every_tile_matches_float32(cuda, bits, tile):
    linear = _linear(2048, 2 * 1408 + 64, bits, 128, cuda)  # a partial last tile
    linear.tile = tile
    x = torch.randn(2, 2048, device=cuda, dtype=torch.bfloat16)
    for gated in (False, True):
        got = linear.gemv(x, gated)
        assert _rel(got, _reference(linear, x, gated)) < 8e-3  # bf16 outputs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(2048, 3648, False), (2816, 2048, False),
                                   (2048, 2 * 2816, True), (10944, 2048, False)],
                         ids=["q_kv", "down", "gate_up", "dense-down"])
def test_model_widths_match_float32(cuda, bits, shape):
    k, n, gated = shape
    linear = _linear(k, n, bits, 64 if k % 128 else 128, cuda)
    x = torch.randn(1, k, device=cuda, dtype=torch.bfloat16)
    assert _rel(linear.gemv(x, gated), _reference(linear, x, gated)) < 8e-3


def test_graph_replays_reset_the_counters(cuda):
    linear = _linear(2048, 2 * 1408, 4, 128, cuda)
    linear.tile = dense_decode.LinearTile(128, 32, 8, 1)
    x = torch.randn(1, 2048, device=cuda, dtype=torch.bfloat16)
    out = torch.empty(1, 1408, device=cuda, dtype=torch.bfloat16)
    linear.swiglu(x)  # warm-up: compiles, allocates the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(linear.swiglu(x))
    for seed in range(3):
        x.copy_(torch.randn(1, 2048, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert _rel(out, _reference(linear, x, gated=True)) < 8e-3
    assert not any(c.any() for c in linear._counts.values())


def test_tuned_tile_is_one_of_the_candidates_and_right(cuda, tmp_path):
    linears = [_linear(2048, 2048, 4, 128, cuda, seed) for seed in range(3)]
    for linear in linears:
        linear.tuning = KernelTuning(tmp_path)  # as load_hybrid sets with autotune on
    x = torch.randn(1, 2048, device=cuda, dtype=torch.bfloat16)
    got = linears[0](x)
    assert linears[0]._tile(x, False) in LINEAR_CANDIDATES
    assert list(tmp_path.glob("*.json")), "the timed tile was not kept in the tuning folder"
    assert _rel(got, _reference(linears[0], x)) < 8e-3
    many = torch.randn(40, 2048, device=cuda, dtype=torch.bfloat16)  # prefill: dequantized
    assert _rel(linears[1](many), _reference(linears[1], many)) < 8e-3
