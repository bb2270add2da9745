"""Triton MoE kernels and the _grouped_mm path on CUDA against a float32 reference.

The reference uses the exact dequantized weights in float32; the kernels round x, the SiLU
product and each expert's output to bf16 (2^-8 relative each), so 1.5e-2 relative L2 leaves
a margin of about 3 over what those roundings give.
"""

import pytest
import torch

from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.format import QuantSpec
from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.moe_grouped import moe_grouped_mm
from krasisd.engine.gpu.moe_triton import KernelConfig, moe_triton

REL_TOL = 1.5e-2
E, D, I, K = 16, 1024, 512, 4  # noqa: E741


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module", params=[4, 8])
def experts(request):
    torch.manual_seed(request.param)
    gate, up = torch.randn(E, I, D) / D**0.5, torch.randn(E, I, D) / D**0.5
    down = torch.randn(E, D, I) / I**0.5
    host = HostExperts.from_stacked({0: (gate, up, down)}, QuantSpec(request.param, 128))
    arena = host.layers[0].cuda()
    perm = torch.randperm(E)
    scattered = torch.empty(E + 5, host.layout.expert_bytes, dtype=torch.uint8, device="cuda")
    scattered.fill_(0x77)
    scattered[perm.cuda() + 5] = arena
    slots = (perm + 5).to(torch.int32).cuda()
    ref = TorchExperts({0: tuple(t.cuda() for t in host.unpack()[0])})
    return host.layout, host.layout.views(scattered), slots, ref


@pytest.mark.parametrize("tokens", [1, 5, 77, 1500])
@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
def test_kernel_matches_reference(experts, cuda, tokens, impl):
    layout, views, slots, ref = experts
    x = torch.randn(tokens, D, device=cuda).bfloat16()
    ids = torch.stack([torch.randperm(E, device=cuda)[:K] for _ in range(tokens)])
    w = torch.rand(tokens, K, device=cuda)
    expected = ref(0, x.float(), ids, w)
    if impl == "triton":
        out = moe_triton(x, views, slots, ids, w, layout.spec.bits, layout.spec.group_size)
    else:
        out = moe_grouped_mm(x, views, slots, ids, w, layout.spec)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert _rel(out, expected) < REL_TOL


@pytest.mark.parametrize("cfg", [
    KernelConfig(16, 64, 128, 8, 4, 4, True), KernelConfig(64, 64, 64, 8, 4, 3, True),
    KernelConfig(128, 64, 64, 8, 8, 4, True), KernelConfig(64, 128, 64, 8, 8, 3, True, True),
    KernelConfig(64, 128, 64, 8, 8, 3, False),
])
def test_kernel_configs_agree(experts, cuda, cfg):
    layout, views, slots, ref = experts
    if layout.spec.bits == 8:
        pytest.skip("tile variants differ only in the INT4 unpack; INT8 runs the default tiles")
    x = torch.randn(600, D, device=cuda).bfloat16()
    ids = torch.randint(0, E, (600, K), device=cuda)
    w = torch.rand(600, K, device=cuda)
    out = moe_triton(x, views, slots, ids, w, layout.spec.bits, layout.spec.group_size, cfg)
    assert _rel(out, ref(0, x.float(), ids, w)) < REL_TOL
