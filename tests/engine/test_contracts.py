"""Declared contracts: every expert backend implements the whole ExpertBackend contract (the
split CPU/GPU one SplitExpertBackend's too), and KV caches say their kind, so callers call
methods and read attributes instead of probing for them."""

from __future__ import annotations

import copy

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.experts import ExpertBackend, SplitExpertBackend, TorchExperts
from krasisd.engine.gpu.prefill import GpuExperts
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, TINY_QWEN3_MOE
from krasisd.engine.heat import HeatRecorder
from krasisd.engine.kv_cache import GQAKVCache, MLAKVCache, new_kv_cache
from krasisd.engine.native_experts import NativeExperts

pytest.importorskip("triton")  # the hybrid backend's kernels (a test dependency on x86-64)

from krasisd.engine.gpu.hybrid import HybridExperts  # noqa: E402


@pytest.mark.parametrize("backend", [TorchExperts, NativeExperts, GpuExperts, HybridExperts,
                                     HeatRecorder])
def test_every_backend_declares_the_contract(backend):
    assert issubclass(backend, ExpertBackend)
    assert not getattr(backend, "__abstractmethods__", None)  # everything implemented


def test_the_split_backend_is_declared_as_such():
    assert issubclass(HybridExperts, SplitExpertBackend)
    assert not issubclass(GpuExperts, SplitExpertBackend)
    assert not issubclass(NativeExperts, SplitExpertBackend)


def test_a_backend_without_the_call_cannot_be_made():
    class Incomplete(ExpertBackend):
        pass

    with pytest.raises(TypeError):
        Incomplete()


def test_defaults_do_nothing_and_store_nothing():
    experts = TorchExperts({})
    experts.begin_forward(100, 2)
    assert dict(experts.dense) == {}
    experts.close()


@pytest.mark.parametrize("config, kind, compressed", [
    (TINY_DEEPSEEK_V2, MLAKVCache, True), (TINY_QWEN3_MOE, GQAKVCache, False)])
def test_caches_declare_their_kind_and_storage(config, kind, compressed):
    cache = new_kv_cache(ModelConfig.from_dict(dict(config)), 16, torch.float32)
    assert isinstance(cache, kind) and cache.compressed is compressed
    handle = copy.copy(cache)  # shares the tensors, as HybridEngine's pooled handles do
    assert handle.storage_key() == cache.storage_key()
    other = new_kv_cache(ModelConfig.from_dict(dict(config)), 16, torch.float32)
    assert other.storage_key() != cache.storage_key()
