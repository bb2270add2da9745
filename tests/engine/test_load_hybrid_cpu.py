"""load_hybrid on the CPU (its GPU pieces on CPU tensors, the Triton kernels in the
interpreter): the EngineOptions a runner passes reach placement, the hybrid backend and the
kernels' tuning, and the engine answers as the CPU-only path over the same caches."""

from __future__ import annotations

import pytest
import torch

from krasisd.engine import load
from krasisd.engine.engine_options import EngineOptions

pytest.importorskip("triton")
if torch.cuda.is_available():  # the kernels run on CPU tensors only in Triton's interpreter
    pytest.skip("Triton interpreter tests run without a GPU; tests/gpu loads on the GPU",
                allow_module_level=True)

from krasisd.engine.gpu.dense_decode import GpuQuantLinear  # noqa: E402
from krasisd.engine.gpu.graphs import HybridEngine, load_hybrid  # noqa: E402

PROMPT = [3, 17, 42, 8, 90, 5]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def _options(caches, **overrides) -> EngineOptions:
    settings = dict(quant="int8", device="cpu", threads=1, cache_dir=caches / "cpu",
                    gpu_cache_dir=caches / "gpu", vram_budget_bytes=1 << 30,
                    gpu_prefill_min_tokens=4, autotune=False)
    return EngineOptions(**{**settings, **overrides})


def test_options_reach_placement_backend_and_kernels(v2_model_dir, caches):
    engine = load_hybrid(v2_model_dir, options=_options(caches), max_tokens=64)
    try:
        assert isinstance(engine, HybridEngine)
        backend = engine.expert_backend
        assert backend.prefill_min_tokens == 4 and backend.tuning is None
        assert backend.gpu.plan.request.budget_bytes == 1 << 30
        assert backend.gpu.tuning is None
        linears = [m for m in engine.model.modules() if isinstance(m, GpuQuantLinear)]
        assert linears and all(linear.tuning is None for linear in linears)
        assert (caches / "gpu").is_dir()
    finally:
        engine.close()


def test_tuning_folder_reaches_the_kernels(v2_model_dir, caches):
    engine = load_hybrid(v2_model_dir, options=_options(caches, autotune=True,
                                                        tuning_dir=caches / "tiles"))
    try:
        backend = engine.expert_backend
        assert backend.tuning.table_dir == caches / "tiles"
        assert backend.gpu.tuning == backend.tuning
        assert all(m.tuning == backend.tuning for m in engine.model.modules()
                   if isinstance(m, GpuQuantLinear))
    finally:
        engine.close()


def test_hybrid_answers_as_the_cpu_path(v2_model_dir, caches):
    """Prompt of 6 tokens >= the threshold of 4: the streaming prefill path, then one-token
    decode steps; the same greedy tokens as the CPU-only engine over the same INT8 cache."""
    torch.set_num_threads(1)
    hybrid = load_hybrid(v2_model_dir, options=_options(caches), max_tokens=64)
    cpu = load(v2_model_dir, quant="int8", threads=1, cache_dir=caches / "cpu")
    try:
        assert hybrid.greedy(PROMPT, 6) == cpu.greedy(PROMPT, 6)
    finally:
        hybrid.close()
        cpu.close()


def test_keywords_make_the_same_options(v2_model_dir, caches):
    """The Python API's keywords (budget as a size) build the same EngineOptions."""
    engine = load_hybrid(v2_model_dir, quant="int8", device="cpu", threads=1, budget="1GiB",
                         cpu_cache_dir=caches / "cpu", gpu_cache_dir=caches / "gpu",
                         max_tokens=64)
    try:
        assert engine.expert_backend.gpu.plan.request.budget_bytes == 1 << 30
        tuning = engine.expert_backend.tuning  # keywords: tiles timed, kept in this process
        assert tuning is not None and tuning.table_dir is None
    finally:
        engine.close()
    with pytest.raises(ValueError, match="dense must be one of"):
        load_hybrid(v2_model_dir, quant="int8", device="cpu", dense="fp8")
