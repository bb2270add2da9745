"""The GPU prefill driver and synthetic models, run on the CPU."""

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.driver import prefill_logits
from krasisd.engine.gpu.format import QuantSpec
from krasisd.engine.gpu.placement import PlacementRequest, plan_placement
from krasisd.engine.gpu.prefill import GpuExperts
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2 as TINY_V2,
)
from krasisd.engine.gpu.synthetic import (
    dense_bytes,
    synthetic_host_experts,
    synthetic_model,
)
from krasisd.engine.kv_cache import new_kv_cache


@pytest.fixture
def tiny():
    config = ModelConfig.from_dict(dict(TINY_V2))
    model = synthetic_model(config, "cpu", torch.float32, seed=3)
    host = synthetic_host_experts(config, QuantSpec(4, 32), "cpu", seed=3, pin=False)
    return config, model, host


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_synthetic_experts_cover_moe_layers(tiny):
    config, model, host = tiny
    assert sorted(host.layers) == [1, 2, 3] and host.num_experts == 8
    assert dense_bytes(model) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_driver_matches_model_prefill_with_chunks_and_cache(tiny):
    config, model, host = tiny
    model.expert_backend = TorchExperts(host.unpack())
    ids = torch.randint(0, config.vocab_size, (11,))
    expected = model.prefill(ids, None)  # [T, V]
    got = prefill_logits(model, ids, None, chunk_tokens=4, last_only=False)
    assert got.shape == expected.shape and _rel(got, expected) < 1e-5
    last = prefill_logits(model, ids, None, chunk_tokens=3)
    assert last.shape == (1, config.vocab_size) and _rel(last[0], expected[-1]) < 1e-5
    cache = new_kv_cache(config, 16, torch.float32, "cpu")
    prefill_logits(model, ids[:6], cache)
    cache.advance(6)
    tail = prefill_logits(model, ids[6:], cache, chunk_tokens=2, last_only=False)
    assert _rel(tail, expected[6:]) < 1e-4


@pytest.mark.parametrize("fraction_slots", [0, 5, 24])
def test_driver_with_gpu_experts_backend_on_cpu(tiny, fraction_slots):
    config, model, host = tiny
    ids = torch.randint(0, config.vocab_size, (9,))
    model.expert_backend = TorchExperts(host.unpack())
    expected = prefill_logits(model, ids)
    per_expert = host.layout.expert_bytes
    budget = (16 + fraction_slots) * per_expert if fraction_slots < 24 else 24 * per_expert
    plan = plan_placement(PlacementRequest(budget, 0, 0, 0, per_expert, (1, 2, 3), 8))
    assert plan.num_resident == fraction_slots
    model.expert_backend = GpuExperts(host, plan, "cpu", impl="grouped_mm", chunk_tokens=4)
    got = prefill_logits(model, ids, chunk_tokens=5)
    assert _rel(got, expected) < 2e-2  # bf16 activations inside the expert kernels only


def test_driver_rejects_bad_chunk(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError):
        prefill_logits(model, torch.tensor([1, 2]), chunk_tokens=0)


def test_sdpa_preference_keeps_an_enclosing_exclusion():
    """The driver prefers cuDNN among the backends the caller allows: a caller (such as the
    GPU test that forbids the math backend) keeps its exclusion inside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from krasisd.engine.gpu.driver import sdpa_backends

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        with sdpa_backends():
            assert not torch.backends.cuda.math_sdp_enabled()
            assert torch.backends.cuda.mem_efficient_sdp_enabled()
    with sdpa_backends():
        assert torch.backends.cuda.math_sdp_enabled()
