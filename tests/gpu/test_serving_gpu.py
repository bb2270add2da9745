"""The runners' loader on a GPU machine: krasis-tiny served by the hybrid engine."""

from pathlib import Path

import pytest
import torch

from krasisd.engine.engine_options import EngineOptions
from krasisd.engine.options import SamplingOptions
from krasisd.engine.serving import load_for_serving

TINY = Path(__file__).resolve().parents[2] / "registry" / "bundled" / "krasis-tiny"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tiny_is_served_by_the_hybrid_engine(cuda, tmp_path, quant):
    from krasisd.engine.gpu.graphs import HybridEngine

    options = EngineOptions(quant=quant, device="auto", threads=2, cache_dir=tmp_path / "cpu",
                            autotune=False)  # fixed tiles: no timing in the tests
    engine = load_for_serving(TINY, options=options)
    assert isinstance(engine, HybridEngine)
    prompt = engine.tokenizer.encode(engine.chat_prompt([{"role": "user", "content": "What is a list?"}]),
                                     add_special_tokens=False)
    chunks = list(engine.generate(prompt, SamplingOptions(temperature=0, num_predict=24)))
    assert chunks[-1].done and chunks[-1].eval_count > 0
    text = "".join(c.text for c in chunks)
    assert text.strip(), "the hybrid engine produced no text"
    logits = engine.forward(torch.tensor(prompt), None)
    assert torch.isfinite(logits).all()
    engine.close()


def test_served_prefill_attention_takes_a_fused_backend(cuda, tmp_path):
    """Served prefill (HybridEngine.forward over a prompt, then over more tokens after that
    cached prefix, which needs a mask) runs with SDPA's math backend forbidden: torch raises
    "No available kernel" when the attention's form suits only math (3-D or odd strides),
    which materializes the [H, T, S] scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options = EngineOptions(quant="int8", device="cuda", threads=2, cache_dir=tmp_path / "cpu",
                            autotune=False)
    engine = load_for_serving(TINY, options=options)
    ids = [3 + (7 * i) % 1000 for i in range(48)]
    cache = engine.new_cache(64)
    fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(fused):
        head = engine.forward(ids[:40], cache)  # causal, no cached prefix
        tail = engine.forward(ids[40:], cache)  # 8 tokens after 40 cached ones
    assert cache.length == 48
    reference = engine.forward(ids, None).float()  # every backend allowed
    got = torch.cat([head, tail]).float()
    assert torch.isfinite(got).all()
    assert ((got - reference).norm() / reference.norm()).item() < 5e-2  # bf16, other kernels
    engine.close()
