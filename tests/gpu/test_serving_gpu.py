"""The runners' loader on a GPU machine: krasis-tiny served by the hybrid engine."""

from pathlib import Path

import pytest
import torch

from krasisd.engine.options import SamplingOptions
from krasisd.engine.serving import load_for_serving

TINY = Path(__file__).resolve().parents[2] / "registry" / "bundled" / "krasis-tiny"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tiny_is_served_by_the_hybrid_engine(cuda, tmp_path, quant):
    from krasisd.engine.gpu.graphs import HybridEngine

    engine = load_for_serving(TINY, quant=quant, device="auto", threads=2,
                              cache_dir=tmp_path / "cpu")
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
