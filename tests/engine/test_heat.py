"""Expert heat: counting routes, calibration, the registry round trip, re-placement."""

import numpy as np
import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.experts import ExpertBackend, TorchExperts
from krasisd.engine.gpu.format import QuantSpec
from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.hybrid import HybridExperts
from krasisd.engine.gpu.placement import PlacementRequest, plan_placement
from krasisd.engine.gpu.prefill import GpuExperts
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    synthetic_expert_weights,
    synthetic_model,
)
from krasisd.engine.heat import (
    CALIBRATION_PROMPTS,
    ExpertHeat,
    HeatRecorder,
    calibrate,
    check_heat,
    heat_for,
    hit_rate,
    moe_layers_of,
    prompt_ids,
    replace_experts,
)

CONFIG = ModelConfig.from_dict(TINY_DEEPSEEK_V2)  # 4 layers (1 dense), 8 experts, top-2


def _experts(seed=0):
    return {layer: synthetic_expert_weights(CONFIG, layer, "cpu", seed)
            for layer in moe_layers_of(CONFIG)}


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    model = synthetic_model(CONFIG, "cpu", torch.float32, seed=3)
    return Engine(CONFIG, model, TorchExperts(_experts()), eos_token_ids=set())


def test_record_counts_every_route_per_layer():
    heat = ExpertHeat([1, 2, 3], 8, initial={2: [1] * 8})
    gen = torch.Generator().manual_seed(0)
    expected = {layer: np.zeros(8, dtype=int) for layer in (1, 2, 3)}
    for layer in (1, 2, 2, 3):
        ids = torch.randint(0, 8, (5, 2), generator=gen)
        heat.record(layer, ids)
        np.add.at(expected[layer], ids.reshape(-1).numpy(), 1)
    recorded = heat.as_dict(include_initial=False)
    assert {k: list(v) for k, v in expected.items()} == recorded
    assert heat.as_dict()[2] == [c + 1 for c in recorded[2]]
    assert heat.total_routes == 4 * 5 * 2
    with pytest.raises(KeyError):
        heat.record(0, torch.zeros(1, 2, dtype=torch.long))


def test_take_new_returns_only_what_is_new():
    heat = ExpertHeat([1], 4)
    heat.record(1, torch.tensor([[0, 1]]))
    assert heat.take_new() == {1: [1, 1, 0, 0]}
    assert heat.take_new() == {}
    heat.record(1, torch.tensor([[3, 3]]))
    assert heat.take_new() == {1: [0, 0, 0, 2]}


def test_layer_counts_is_the_layers_row_of_the_counts():
    heat = ExpertHeat([1, 4], 3)
    heat.layer_counts(4)[2] += 5  # what a routing kernel counting in place does
    heat.record(1, torch.tensor([[0, 2]]))
    assert heat.as_dict() == {1: [1, 0, 1], 4: [0, 0, 5]}
    with pytest.raises(KeyError):
        heat.layer_counts(2)


def test_check_heat_rejects_malformed_counts():
    with pytest.raises(ValueError, match="4 counts"):
        check_heat({1: [1, 2]}, [1], 4)
    with pytest.raises(ValueError):
        check_heat({1: [1, -1, 0, 0]}, [1], 4)
    assert check_heat({"1": [1, 2, 3, 4], 7: [0] * 4}, [1], 4) == {1: [1, 2, 3, 4]}
    with pytest.raises(ValueError):
        ExpertHeat([1], 0)


def test_recorder_counts_and_returns_the_backend_result(engine):
    heat = ExpertHeat(moe_layers_of(CONFIG), CONFIG.n_routed_experts)
    backend = engine.expert_backend
    recorder = HeatRecorder(backend, heat)
    x = torch.randn(3, CONFIG.hidden_size)
    ids, weights = torch.tensor([[0, 1], [2, 3], [0, 7]]), torch.rand(3, 2)
    torch.testing.assert_close(recorder(1, x, ids, weights), backend(1, x, ids, weights))
    assert heat.as_dict()[1] == [2, 1, 1, 1, 0, 0, 0, 1]


def test_recorder_passes_the_backend_contract_through():
    """A wrapped backend still gets the prefill hook and the close, and shows its dense
    linears: the recorder implements the whole ExpertBackend contract."""
    calls = []

    class Backend(ExpertBackend):
        dense = {"lm_head": "stored"}

        def __call__(self, layer_idx, x, topk_ids, topk_weights):
            return x

        def begin_forward(self, num_tokens, top_k):
            calls.append(("begin", num_tokens, top_k))

        def close(self):
            calls.append(("close",))

    recorder = HeatRecorder(Backend(), ExpertHeat([1], 4))
    recorder.begin_forward(9, 2)
    assert recorder.dense == {"lm_head": "stored"}
    recorder.close()
    assert calls == [("begin", 9, 2), ("close",)]


def test_calibration_routes_every_prompt_token(engine):
    heat = calibrate(engine, max_tokens=32)
    routes = sum(len(prompt_ids(engine, p, 32)) for p in CALIBRATION_PROMPTS)
    assert set(heat) == set(moe_layers_of(CONFIG))
    for counts in heat.values():
        assert sum(counts) == routes * CONFIG.num_experts_per_tok
    assert engine.model.expert_backend is engine.expert_backend  # the wrapper is gone
    with pytest.raises(ValueError):
        calibrate(engine, prompts=())


class FakeRegistry:
    def __init__(self):
        self.heat, self.adds = {}, 0

    def expert_heat(self, name):
        return self.heat

    def add_expert_heat(self, name, counts):
        self.adds += 1
        for layer, values in counts.items():
            old = self.heat.get(layer, [0] * len(values))
            self.heat[layer] = [a + b for a, b in zip(old, values, strict=True)]


def test_heat_for_calibrates_once_then_reads_the_registry(engine):
    registry = FakeRegistry()
    first = heat_for(registry, "tiny", engine)
    assert registry.adds == 1 and registry.heat == first
    assert heat_for(registry, "tiny", engine) == first
    assert registry.adds == 1  # no second calibration


def test_hit_rate():
    heat = {1: [6, 2, 1, 1], 2: [0, 0, 0, 10]}
    assert hit_rate(heat, {1: (0,), 2: (3,)}) == pytest.approx(16 / 20)
    assert hit_rate(heat, {}) == 0.0
    assert hit_rate({}, {1: (0,)}) == 0.0


def _hybrid(cold_first: bool):
    host = HostExperts.from_stacked(_experts(), QuantSpec(8, 32))
    layers, per = tuple(sorted(host.layers)), host.layout.expert_bytes
    # room for the two streaming halves plus 6 resident experts over the 3 layers
    budget = (2 * host.num_experts + 6) * per
    heat = {layer: [1] * 6 + [50, 60] for layer in layers} if cold_first else None
    plan = plan_placement(PlacementRequest(budget, 0, 0, 0, per, layers, host.num_experts,
                                           heat=heat))
    gpu = GpuExperts(host, plan, "cpu", impl="grouped_mm")
    return HybridExperts(gpu, cpu=_FakeCpu(), device="cpu"), per


class _FakeCpu:
    """Stands in for NativeExperts where only residency bookkeeping is tested."""

    hidden = CONFIG.hidden_size


def test_replacement_moves_the_hottest_experts_to_the_gpu():
    hybrid, per = _hybrid(cold_first=True)
    generation = hybrid.generation
    heat = {layer: [100, 90, 80, 0, 0, 0, 1, 1] for layer in hybrid.moe_layers}
    report = replace_experts(hybrid, heat)
    assert report["replaced"] and report["hit_rate_after"] > report["hit_rate_before"]
    assert report["bytes_copied"] == 6 * per and report["ms"] > 0
    resident = {layer: tuple(np.flatnonzero(mask)) for layer, mask in hybrid.resident_np.items()}
    assert hit_rate(heat, resident) == pytest.approx(report["hit_rate_after"])
    assert all(set(ids) <= {0, 1, 2} for ids in resident.values())
    assert hybrid.generation > generation  # captured decode graphs know they are stale
    again = replace_experts(hybrid, heat)
    assert not again["replaced"] and again["experts_changed"] == 0


def test_replacement_skips_small_gains():
    hybrid, _ = _hybrid(cold_first=True)
    before = {layer: mask.copy() for layer, mask in hybrid.resident_np.items()}
    heat = {layer: [10, 10, 10, 10, 10, 10, 11, 10] for layer in hybrid.moe_layers}
    report = replace_experts(hybrid, heat, min_gain=0.5)
    assert not report["replaced"]
    assert all((hybrid.resident_np[k] == v).all() for k, v in before.items())


def test_prompts_from_the_prefill_threshold_stream_through_the_gpu():
    """EngineOptions.gpu_prefill_min_tokens (KRASIS_GPU_PREFILL_MIN_TOKENS): from that many
    tokens a forward streams its experts through the GPU; fewer take the hybrid decode path."""
    gpu = _hybrid(cold_first=False)[0].gpu
    hybrid = HybridExperts(gpu, cpu=_FakeCpu(), device="cpu", prefill_min_tokens=4)
    started = []
    gpu.begin_forward = lambda num_tokens, top_k: started.append(num_tokens)
    for num_tokens in (1, 3, 4, 40):
        hybrid.begin_forward(num_tokens, 2)
    assert started == [4, 40]
    with pytest.raises(ValueError, match="prefill_min_tokens"):
        HybridExperts(gpu, cpu=_FakeCpu(), device="cpu", prefill_min_tokens=0)
