"""Dense linears from the CPU cache: a load with a built cache quantizes nothing, and gives the
same weights and logits as quantizing at load time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krasisd.engine import cpu_cache, dense_plan, dense_quant, native_experts, quant
from krasisd.engine.dense_quant import QuantLinear, quantize_dense_linears
from krasisd.engine.engine import Engine
from krasisd.engine.loader import load_model

IDS = [5, 17, 33, 2, 61, 8, 40]


@pytest.fixture
def model_dir(v2_model_dir):
    return v2_model_dir


@pytest.fixture
def cache_dir(v2_int8_cache):
    return v2_int8_cache[0]


def _engine(model_dir, cache_dir, stored: bool) -> Engine:
    """What load(quant="int8") on the CPU assembles, with or without the cached dense."""
    loaded = load_model(model_dir, with_experts=False)
    backend = native_experts.native_expert_backend(model_dir, loaded.config, "int8", cache_dir,
                                                   threads=1)
    quantize_dense_linears(loaded.model, 8, runner=backend.runner,
                           stored=backend.dense if stored else None)
    return Engine(loaded.config, loaded.model, backend, model_dir=model_dir)


def _quant_linears(engine: Engine) -> dict[str, QuantLinear]:
    return {n: m for n, m in engine.model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture
def no_quantizer(monkeypatch):
    """Every quantize entry point raises: a load that still reaches one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the quantizer was called during a load from the cache")

    for module in (quant, dense_plan, cpu_cache, native_experts):
        monkeypatch.setattr(module, "quantize", refuse)
    for module in (dense_plan, dense_quant, cpu_cache):
        monkeypatch.setattr(module, "quantize_weight", refuse)


def test_load_from_a_cache_with_dense_does_not_quantize(model_dir, cache_dir, no_quantizer):
    engine = _engine(model_dir, cache_dir, stored=True)
    linears = _quant_linears(engine)
    assert set(linears) == set(engine.expert_backend.dense)  # all of them, from the cache
    assert torch.isfinite(engine.logits(IDS)).all()


def test_without_the_cache_the_quantizer_runs(model_dir, cache_dir, no_quantizer):
    with pytest.raises(AssertionError, match="quantizer was called"):
        _engine(model_dir, cache_dir, stored=False)


def test_cached_dense_equals_quantizing_at_load(model_dir, cache_dir):
    cached, fresh = _engine(model_dir, cache_dir, True), _engine(model_dir, cache_dir, False)
    a, b = _quant_linears(cached), _quant_linears(fresh)
    assert set(a) == set(b) and len(a) == 19  # 25 linears less 3 q_b_proj and 3 kv_b_proj
    for name in a:
        assert np.array_equal(a[name].native.qweight, b[name].native.qweight), name
        assert np.array_equal(a[name].native.scales, b[name].native.scales), name
        assert (a[name].bits, a[name].group_size) == (b[name].bits, b[name].group_size)
    assert torch.equal(cached.logits(IDS), fresh.logits(IDS))


def test_a_linear_the_cache_lacks_is_quantized_at_load(model_dir, cache_dir, caplog):
    engine = _engine(model_dir, cache_dir, stored=True)
    stored = dict(engine.expert_backend.dense)
    missing = stored.pop("lm_head")
    loaded = load_model(model_dir, with_experts=False)
    count = quantize_dense_linears(loaded.model, 8, runner=engine.expert_backend.runner,
                                   stored=stored)
    assert count == len(stored) + 1
    head = loaded.model.lm_head
    assert isinstance(head, QuantLinear) and head.native.qweight is not missing.qweight
    assert np.array_equal(head.native.qweight, missing.qweight)
    assert "1 of 19 not in the CPU cache" in caplog.text


def test_a_stored_entry_of_other_bits_is_not_used(model_dir, cache_dir):
    engine = _engine(model_dir, cache_dir, stored=True)
    loaded = load_model(model_dir, with_experts=False)
    # an INT4 head is asked for; the cache holds an INT8 one, so the head is quantized anew
    quantize_dense_linears(loaded.model, 8, runner=engine.expert_backend.runner,
                           stored=engine.expert_backend.dense, head_bits=4)
    head = loaded.model.lm_head
    assert head.bits == 4 and head.native.qweight.dtype == np.uint8
    assert head.native.qweight is not engine.expert_backend.dense["lm_head"].qweight
