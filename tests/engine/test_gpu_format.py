"""GPU expert format: quantization, packing, blob layout, host store (CPU only)."""

import pytest
import torch

from krasisd.engine.gpu.format import (
    ExpertLayout,
    QuantSpec,
    dequantize_kmajor,
    pack_int4,
    quantize_kmajor,
    unpack_int4,
)
from krasisd.engine.gpu.host import HostExperts


def test_int4_pack_roundtrip_covers_every_nibble():
    q = torch.randint(-8, 8, (5, 64, 24), dtype=torch.int32)
    q[0, :16, 0] = torch.arange(-8, 8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8, 24)
    assert torch.equal(unpack_int4(packed), q.to(torch.int8))


def test_int4_packing_bit_order_is_k_major_low_nibble_first():
    q = torch.zeros(8, 1, dtype=torch.int32)
    q[1, 0] = 1  # k=1 -> nibble 1 holds 9
    word = pack_int4(q)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x88888898


@pytest.mark.parametrize("bits, rel_tol", [(4, 0.12), (8, 0.01)])
def test_quantize_error_and_exact_requantization(bits, rel_tol):
    spec = QuantSpec(bits, 32)
    w = torch.randn(3, 48, 96)  # [E, N, K]
    q, s = quantize_kmajor(w, spec)
    assert s.shape == (3, 96 // 32, 48) and s.dtype == torch.bfloat16
    deq = dequantize_kmajor(q, s, spec).transpose(-1, -2)  # [E, N, K]
    assert ((deq - w).norm() / w.norm()).item() < rel_tol
    q2, s2 = quantize_kmajor(deq, spec)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_quantize_zero_group_gives_zero_weights():
    w = torch.zeros(4, 32)
    w[1] = 1.0
    q, s = quantize_kmajor(w, QuantSpec(4, 32))
    deq = dequantize_kmajor(q, s, QuantSpec(4, 32))
    assert torch.isfinite(deq).all()
    assert torch.equal(deq.T[0], w[0]) and torch.allclose(deq.T[1], w[1], rtol=0.01)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError):
        QuantSpec(3, 128)
    with pytest.raises(ValueError):
        QuantSpec(4, 100)
    with pytest.raises(ValueError):
        QuantSpec.from_quant("fp8")
    with pytest.raises(ValueError):
        ExpertLayout(hidden=96, intermediate=32, spec=QuantSpec(4, 64))


@pytest.mark.parametrize("bits", [4, 8])
def test_expert_blob_roundtrip_and_alignment(bits):
    layout = ExpertLayout(hidden=64, intermediate=32, spec=QuantSpec(bits, 32))
    gate, up = torch.randn(3, 32, 64), torch.randn(3, 32, 64)
    down = torch.randn(3, 64, 32)
    blobs = layout.pack_experts(gate, up, down)
    assert blobs.shape == (3, layout.expert_bytes) and layout.expert_bytes % 256 == 0
    assert all(off % 256 == 0 for off, _ in layout.part_offsets().values())
    g2, u2, d2 = layout.unpack_experts(blobs)
    tol = 0.12 if bits == 4 else 0.01
    for a, b in ((g2, gate), (u2, up), (d2, down)):
        assert ((a - b).norm() / b.norm()).item() < tol
    assert torch.equal(layout.pack_experts(g2, u2, d2), blobs)


def test_views_reject_wrong_blobs():
    layout = ExpertLayout(hidden=64, intermediate=32, spec=QuantSpec(4, 32))
    with pytest.raises(ValueError):
        layout.views(torch.zeros(2, layout.expert_bytes + 1, dtype=torch.uint8))


def test_host_experts_from_stacked():
    weights = {1: (torch.randn(4, 32, 64), torch.randn(4, 32, 64), torch.randn(4, 64, 32))}
    host = HostExperts.from_stacked(weights, QuantSpec(8, 32), pin=False)
    assert host.num_experts == 4 and list(host.layers) == [1]
    assert host.total_bytes == 4 * host.layout.expert_bytes
    gate, _, _ = host.unpack()[1]
    assert ((gate - weights[1][0]).norm() / weights[1][0].norm()).item() < 0.01
