"""Fused MoE kernels: every ISA against a torch reference and each other, on awkward shapes."""

import os
import subprocess
import sys

import krasis_native
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from krasisd.engine.experts import TorchExperts
from krasisd.engine.quant import dequantize, quantize

ISAS = ["scalar", "avx2", "avx512"]
# (bits, group, D, I, M, K, E): M not a multiple of the 4-token tile, odd multiples of 32
# (half-unit paths),
# k = 1 and k = 8; every case also routes one expert twice for token 0 when K >= 2.
CASES = [
    (8, 32, 96, 160, 13, 3, 6),
    (8, 64, 192, 128, 5, 8, 8),
    (8, 128, 256, 384, 1, 1, 4),
    (8, 96, 192, 96, 6, 2, 5),
    (4, 32, 128, 192, 13, 3, 6),
    (4, 64, 192, 128, 5, 8, 8),
    (4, 128, 256, 128, 1, 1, 4),
    (4, 96, 192, 192, 7, 2, 5),
    (8, 128, 384, 256, 7, 3, 6),  # whole-unit tiles with 4- and 3-token tails
    (4, 128, 384, 256, 7, 3, 6),  # AVX-512 INT4 two-unit path (G % 128 == 0)
]


@pytest.fixture
def use_isa():
    def select(name):
        if name not in krasis_native.supported_isas():
            pytest.skip(f"this CPU cannot run {name}")
        krasis_native.set_isa(name)
    yield select
    krasis_native.set_isa("auto")


def fake_quant_act(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernels' activation quantization (int8, one scale per group), dequantized. [T, K]"""
    groups = x.float().reshape(x.shape[0], -1, group_size)  # [T, K/G, G]
    amax = groups.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inv) * (amax / 127.0)).reshape(x.shape)


def reference_moe(x, ids, weights, deq, group_size):
    """Same math as the kernels in float64 over dequantized weights. [T, D]"""
    gate, up, down = (w.double() for w in deq)
    xq = fake_quant_act(x, group_size).double()  # [T, D]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = (F.silu(gate[e] @ xq[t]) * (up[e] @ xq[t])).float()  # [I]
            hq = fake_quant_act(h[None], group_size)[0].double()
            out[t] += float(weights[t, k]) * (down[e] @ hq)
    return out.float()


def make_case(bits, group, hidden, width, tokens, top_k, n_experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    raw = [torch.randn(n_experts, width, hidden, generator=gen) * 0.05,
           torch.randn(n_experts, width, hidden, generator=gen) * 0.05,
           torch.randn(n_experts, hidden, width, generator=gen) * 0.05]
    packed = [quantize(w, bits, group) for w in raw]
    deq = [dequantize(q, s, bits, group) for q, s in packed]
    x = torch.randn(tokens, hidden, generator=gen)  # [M, D]
    ids = torch.randint(0, n_experts, (tokens, top_k), generator=gen)  # [M, K]
    if top_k >= 2:
        ids[0, 1] = ids[0, 0]
    weights = torch.rand(tokens, top_k, generator=gen)  # [M, K]
    arrays = [a.numpy() for q, s in packed for a in (q, s)]
    return x, ids, weights, arrays, deq


def run_native(x, ids, weights, arrays, bits, group, threads=1):
    out = np.empty(tuple(x.shape), dtype=np.float32)
    krasis_native.MoE(threads).forward(x.numpy(), ids.numpy(), weights.numpy(), *arrays, bits,
                                       group, out)
    return torch.from_numpy(out)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "int{}-g{}-D{}-I{}-M{}-K{}".format(*c[:6]))
def test_kernel_matches_torch_reference(isa, case, use_isa):
    bits, group = case[:2]
    x, ids, weights, arrays, deq = make_case(*case)
    use_isa(isa)
    got = run_native(x, ids, weights, arrays, bits, group)
    want = reference_moe(x, ids, weights, deq, group)
    scale = float(want.abs().max())
    # integer dots are exact; left: float summation order and rare +-1 flips of h's rounding
    assert float((got - want).abs().max()) <= 2e-3 * scale
    # against float activations the int8 activation quantization costs ~1% (measured)
    float_ref = TorchExperts({0: tuple(deq)})(0, x, ids, weights)
    assert float((got - float_ref).abs().max()) <= 5e-2 * scale


@pytest.mark.parametrize("case", CASES, ids=lambda c: "int{}-g{}".format(*c[:2]))
def test_isas_agree_with_scalar(case, use_isa):
    bits, group = case[:2]
    x, ids, weights, arrays, _ = make_case(*case, seed=1)
    use_isa("scalar")
    ref = run_native(x, ids, weights, arrays, bits, group)
    for isa in [i for i in ISAS[1:] if i in krasis_native.supported_isas()]:
        krasis_native.set_isa(isa)
        got = run_native(x, ids, weights, arrays, bits, group)
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), isa


def test_expert_routed_twice_adds_its_weights():
    x, _, _, arrays, _ = make_case(8, 64, 192, 128, 3, 2, 4)
    twice = run_native(x, torch.tensor([[2, 2]] * 3), torch.tensor([[0.25, 0.5]] * 3), arrays, 8, 64)
    once = run_native(x, torch.tensor([[2]] * 3), torch.tensor([[0.75]] * 3), arrays, 8, 64)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_results():
    x, ids, weights, arrays, _ = make_case(4, 64, 192, 128, 9, 4, 8)
    one = run_native(x, ids, weights, arrays, 4, 64, threads=1)
    two = run_native(x, ids, weights, arrays, 4, 64, threads=2)
    assert torch.equal(one, two)  # each output row is summed by one task in a fixed order


def test_module_reports_and_forces_isa(use_isa):
    supported = krasis_native.supported_isas()
    assert supported[0] == "scalar"
    assert krasis_native.isa() == supported[-1]  # auto picks the widest
    for isa in supported:
        use_isa(isa)
        assert krasis_native.isa() == isa
    with pytest.raises(ValueError):
        krasis_native.set_isa("sse9")


def test_env_var_forces_avx2():
    if "avx2" not in krasis_native.supported_isas():
        pytest.skip("no AVX2")
    env = dict(os.environ, KRASIS_NATIVE_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", "import krasis_native; print(krasis_native.isa())"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "avx2"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group", [(8, 32), (8, 128), (4, 64), (4, 128)])
def test_linear_matches_reference(isa, bits, group, use_isa):
    from krasisd.engine.native_experts import NativeLinear

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(100, 256, generator=gen) * 0.05  # [N, K], N not a multiple of 16
    x = torch.randn(2, 3, 256, generator=gen)  # [2, 3, K]: 6 tokens, a 4 + 2 tile split
    use_isa(isa)
    layer = NativeLinear(weight, bits=bits, group_size=group, runner=krasis_native.MoE(2))
    got = layer(x)
    deq = dequantize(torch.from_numpy(layer.qweight), torch.from_numpy(layer.scales), bits, group)
    want = fake_quant_act(x.reshape(6, 256), group).double() @ deq.double().T  # [6, N]
    assert got.shape == (2, 3, 100)
    assert float((got.reshape(6, 100) - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_bad_inputs_raise_value_error():
    x, ids, weights, arrays, _ = make_case(8, 64, 192, 128, 2, 2, 4)
    runner = krasis_native.MoE(1)
    out = np.empty((2, 192), dtype=np.float32)
    ok = (x.numpy(), ids.numpy(), weights.numpy(), *arrays, 8, 64)
    with pytest.raises(ValueError, match="dtype"):
        runner.forward(x.double().numpy(), *ok[1:], out)
    with pytest.raises(ValueError, match="out of range"):
        runner.forward(ok[0], np.full((2, 2), 4, dtype=np.int64), *ok[2:], out)
    with pytest.raises(ValueError, match="shape"):
        runner.forward(*ok[:-1], 32, out)  # scales were made for group 64
    with pytest.raises(ValueError, match="bits"):
        runner.forward(*ok[:-2], 5, 64, out)
    with pytest.raises(ValueError, match="shape"):
        runner.linear(ok[0], arrays[0][0], arrays[1][0], 8, 64, np.empty((2, 100), np.float32))
    out.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        runner.forward(*ok, out)
