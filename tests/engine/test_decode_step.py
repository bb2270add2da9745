"""The graph-ready decode step (krasisd.engine.gpu.graphs.DecodeStep) against the model's own
decode path, on the CPU: the torch ops and the fused Triton kernels (in Triton's interpreter)
over a fixed attention window. Float32 models with the float expert reference, so both
sides compute the same sums; 1e-4 on logits of magnitude about 1 allows summation order only.
On the GPU the hybrid engine is checked in tests/gpu/test_hybrid.py."""

import copy

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.gpu.graphs import DecodeStep, bucket_for
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    TINY_QWEN3_MOE,
    synthetic_engine,
    synthetic_expert_weights,
    synthetic_model,
)

pytest.importorskip("triton")
ATOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's interpreter on the CPU
MODELS = {"deepseek-v2": TINY_DEEPSEEK_V2, "qwen3-moe": TINY_QWEN3_MOE,
          "deepseek-v2-k3": dict(TINY_DEEPSEEK_V2, num_experts_per_tok=3, norm_topk_prob=True)}
PROMPT = [5, 17, 33, 2, 9]


def _engine(raw: dict) -> Engine:
    return synthetic_engine(ModelConfig.from_dict(raw), DEVICE, torch.float32, seed=4)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_step_equals_the_model_decode(name, fused):
    torch.set_num_threads(1)
    engine = _engine(MODELS[name])
    steps = 6
    want_cache = engine.new_cache(32)
    engine.forward(PROMPT, want_cache)
    got_cache = engine.new_cache(32)
    engine.forward(PROMPT, got_cache)
    step = DecodeStep(engine.model, got_cache, use_graphs=False, min_bucket=8,
                      fused_kernels=fused)
    assert step.fused == fused
    for i in range(steps):
        token = 3 + 7 * i
        want = engine.forward([token], want_cache)[-1]
        got = step(token, got_cache)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert got_cache.length == want_cache.length == len(PROMPT) + steps


def test_window_masks_positions_past_the_token():
    """A bucket wider than the context must not attend to stale entries."""
    engine = _engine(TINY_DEEPSEEK_V2)
    cache = engine.new_cache(64)
    engine.forward(PROMPT, cache)
    for layer in cache.entries:
        layer[len(PROMPT) + 1 :] = 1e3  # garbage beyond the next position
    want = _engine(TINY_DEEPSEEK_V2)
    clean = want.new_cache(64)
    want.forward(PROMPT, clean)
    step = DecodeStep(engine.model, cache, use_graphs=False, min_bucket=64, fused_kernels=True)
    torch.testing.assert_close(step(3, cache), want.forward([3], clean)[-1], rtol=0, atol=ATOL)


def test_bucket_is_a_power_of_two_within_capacity():
    assert bucket_for(1, 4096) == 256
    assert bucket_for(257, 4096) == 512
    assert bucket_for(3000, 2048) == 2048


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_hybrid_step_with_every_expert_on_the_cpu_equals_the_native_engine(fused):
    """HybridEngine's step on the CPU (hand-off buffers, the CPU part, the merge) with no
    expert resident computes what the plain engine does with the same native experts."""
    import copy

    from krasisd.engine.cpu_cache import CpuCache, LayerExperts
    from krasisd.engine.gpu.format import QuantSpec
    from krasisd.engine.gpu.graphs import HybridEngine
    from krasisd.engine.gpu.host import HostExperts
    from krasisd.engine.gpu.hybrid import HybridExperts
    from krasisd.engine.gpu.placement import PlacementPlan, PlacementRequest
    from krasisd.engine.gpu.prefill import GpuExperts
    from krasisd.engine.native_experts import NativeExperts
    from krasisd.engine.quant import quantize

    if fused and torch.cuda.is_available():
        pytest.skip("the fused kernels run on CPU tensors only in Triton's interpreter; "
                    "tests/gpu/test_hybrid.py runs them on the GPU")
    torch.set_num_threads(1)
    config = ModelConfig.from_dict(TINY_DEEPSEEK_V2)
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    weights = {layer: synthetic_expert_weights(config, layer, "cpu", 4) for layer in layers}
    tables = {}
    for layer, stacks in weights.items():
        arrays = []
        for w in stacks:
            q, s = quantize(w, 8, 32)
            arrays += [q.numpy(), s.numpy()]
        tables[layer] = LayerExperts(*arrays)
    cache = CpuCache({"bits": 8, "group_size": 32, "hidden": config.hidden_size,
                      "n_experts": config.n_routed_experts}, tables)
    model = synthetic_model(config, "cpu", torch.float32, seed=4)
    twin = copy.deepcopy(model)
    plain = Engine(config, model, NativeExperts(cache, threads=1), eos_token_ids=set())
    host = HostExperts.from_stacked(weights, QuantSpec(8, 32), pin=False)
    num, per = host.num_experts, host.layout.expert_bytes
    request = PlacementRequest(2 * num * per, 0, 0, 0, per, tuple(layers), num)
    plan = PlacementPlan(request, {layer: () for layer in layers}, 2 * num)
    backend = HybridExperts(GpuExperts(host, plan, "cpu", impl="grouped_mm"),
                            NativeExperts(cache, threads=1), "cpu")
    hybrid = HybridEngine(config, twin, backend, eos_token_ids=set(), use_graphs=False,
                          fused_kernels=fused)
    assert backend.resident_fraction() == 0.0
    want_cache, got_cache = plain.new_cache(32), hybrid.new_cache(32)
    plain.forward(PROMPT, want_cache)
    hybrid.forward(PROMPT, got_cache)
    for token in (3, 10, 17, 24):
        want = plain.forward([token], want_cache)[-1]
        got = hybrid.forward([token], got_cache)[-1]
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_cpu_slots_zero_resident_slots_without_reading_another_expert():
    import numpy as np

    from krasisd.engine.gpu.hybrid import cpu_slots

    resident = np.array([True, False, True, False])
    ids = np.array([[0, 1], [2, 0], [3, 1]], dtype=np.int64)
    weights = np.array([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4]], dtype=np.float32)
    got_ids, got_weights = cpu_slots(ids, weights, resident)
    assert got_ids.tolist() == [[1, 1], [1, 1], [3, 1]]  # token 1 has no CPU expert: any
    np.testing.assert_allclose(got_weights, [[0.0, 0.5], [0.0, 0.0], [0.6, 0.4]])
    assert set(got_ids.flatten()) <= {1, 3}  # only experts the CPU computes anyway
    assert cpu_slots(ids[:1, :1], weights[:1, :1], resident) == (None, None)
    all_cpu = np.zeros(4, dtype=bool)
    same_ids, same_weights = cpu_slots(ids, weights, all_cpu)
    assert same_ids is ids and same_weights is weights


def _bf16_mla_engine(seed: int) -> Engine:
    """A bf16 DeepSeek-V2 model with latent 32 and rope 16, float experts in bf16."""
    torch.set_num_threads(1)
    config = ModelConfig.from_dict(dict(TINY_DEEPSEEK_V2, kv_lora_rank=32, qk_rope_head_dim=16))
    return synthetic_engine(config, DEVICE, torch.bfloat16, seed=seed)


def test_fused_step_with_flash_decoding_attention(monkeypatch):
    """A bf16 MLA model (latent 32, rope 16):
    the fused step runs them (counted) and gives the logits of the same fused step with the
    three-launch attention, up to the bf16 rounding of the probabilities that path makes."""
    from krasisd.engine.gpu import decode_attention

    calls = []
    flash = decode_attention.mla_decode_attention
    monkeypatch.setattr(decode_attention, "mla_decode_attention",
                        lambda *a, **k: calls.append(1) or flash(*a, **k))
    engine = _bf16_mla_engine(seed=5)
    config = engine.config
    logits = []
    for flash_on in (True, False):
        monkeypatch.setattr(decode_attention, "_flash_fits", lambda *a, on=flash_on: on)
        cache = engine.new_cache(32)
        engine.forward(PROMPT, cache)
        step = DecodeStep(engine.model, cache, use_graphs=False, min_bucket=8,
                          fused_kernels=True)
        logits.append(torch.stack([step(3 + 7 * i, cache) for i in range(4)]))  # [4, V]
    assert len(calls) == 4 * config.num_hidden_layers
    got, want = logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_mla_rows_equals_each_sequence_decoded_alone():
    """Batched MLA attention (one projection over B rows, flash-decoding per sequence) gives
    each sequence's own decode, at different lengths, and writes each cache's new entry."""
    from krasisd.engine.gpu.decode_attention import mla_rows

    engine = _bf16_mla_engine(seed=6)
    config, model = engine.config, engine.model
    caches = [engine.new_cache(32) for _ in range(3)]
    for i, cache in enumerate(caches):
        engine.forward(PROMPT[: 2 + i], cache)  # lengths 2, 3, 4
    twins = [copy.deepcopy(c) for c in caches]
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, config.hidden_size, device=DEVICE).bfloat16()
    positions = torch.tensor([c.length for c in caches], device=DEVICE)
    cos, sin = model.rotary.cos_sin(positions)
    got = mla_rows(attn, x, [c.entries[0] for c in caches], positions,
                   [c.length for c in caches], cos, sin)
    for b, twin in enumerate(twins):
        want = attn.decode(x[b : b + 1], cos[b : b + 1], sin[b : b + 1], twin)  # [1, D]
        assert (got[b] - want[0]).float().abs().max() < 0.03 * want.float().abs().max()
        new = caches[b].length
        torch.testing.assert_close(caches[b].entries[0, new], twin.entries[0, new],
                                   atol=2e-2, rtol=2e-2)
