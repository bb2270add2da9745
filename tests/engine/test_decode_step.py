"""The graph-ready decode step (krasisd.engine.gpu.graphs.DecodeStep) against the model's own
decode path, on the CPU: the torch ops and the fused Triton kernels (in Triton's interpreter)
over a fixed attention window. Float32 models with the float expert reference, so both
sides compute the same sums; 1e-4 on logits of magnitude about 1 allows summation order only.
On the GPU the hybrid engine is checked in tests/gpu/test_hybrid.py."""

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.graphs import DecodeStep, bucket_for
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    TINY_QWEN3_MOE,
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
    config = ModelConfig.from_dict(raw)
    model = synthetic_model(config, DEVICE, torch.float32, seed=4)
    experts = {layer: synthetic_expert_weights(config, layer, DEVICE, 4)
               for layer in range(config.num_hidden_layers) if config.is_moe_layer(layer)}
    return Engine(config, model, TorchExperts(experts), eos_token_ids=set())


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
