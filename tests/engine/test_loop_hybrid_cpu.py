"""The hybrid engine (krasisd.engine.gpu.graphs.HybridEngine, its GPU pieces on CPU tensors)
served through the generation loop as a runner on a GPU machine serves it: its decode_batch
runs each sequence through its own decode step, its caches come from its pool (allocated
whole, never growing), and concurrent streams with chunked prompts give the greedy tokens of
the CPU-only engine over the same INT8 cache."""

from __future__ import annotations

import pytest
import torch

from krasisd.engine import load
from krasisd.engine.engine_options import EngineOptions
from krasisd.engine.generate import Generation
from krasisd.engine.loop import GenerationLoop
from krasisd.engine.options import SamplingOptions

pytest.importorskip("triton")

from krasisd.engine.gpu.graphs import HybridEngine, load_hybrid  # noqa: E402

PROMPTS = [[3, 17, 42, 8, 90, 5], [7, 7, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def test_hybrid_engine_through_the_loop_answers_as_the_cpu_engine(v2_model_dir, v2_int8_cache,
                                                                 tmp_path):
    torch.set_num_threads(1)
    options = EngineOptions(quant="int8", device="cpu", threads=1, cache_dir=v2_int8_cache[0],
                            gpu_cache_dir=tmp_path / "gpu", vram_budget_bytes=1 << 30,
                            gpu_prefill_min_tokens=4, autotune=False)
    # every routed expert on the CPU part: the resident ones would run in Triton's interpreter
    hybrid = load_hybrid(v2_model_dir, options=options, max_tokens=64, use_gpu_experts=False)
    cpu = load(v2_model_dir, quant="int8", threads=1, cache_dir=v2_int8_cache[0])
    try:
        assert isinstance(hybrid, HybridEngine)
        # greedy() keeps an end-of-sequence token, which a generation ends on, unemitted
        expected = [[t for t in cpu.greedy(p, 6) if t not in cpu.eos_token_ids] for p in PROMPTS]
        loop = GenerationLoop(hybrid, hybrid.loop_options(max_batch=3, prefill_chunk_tokens=4),
                              hybrid.context_spec())
        assert hybrid.pooled_caches == 2
        hybrid.plan_sequences(3)
        assert hybrid.pooled_caches == 3
        hybrid.plan_sequences(2)
        assert hybrid.pooled_caches == 3  # never lowered
        greedy = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=6, num_ctx=64)
        for key, prompt in enumerate(PROMPTS):
            loop.add(Generation(hybrid, prompt, greedy, key=key))
        got: dict[int, list[int]] = {key: [] for key in range(len(PROMPTS))}
        while loop.has_work():
            emitted_step = loop.step()
            caches = [g.cache for g in loop.running if g.cache is not None]
            assert all(not c.grow and c.capacity == 64 for c in caches)
            for emitted in emitted_step:
                assert emitted.error is None, emitted.error
                if not emitted.chunk.done:
                    got[emitted.generation.key].append(emitted.chunk.token_id)
        assert [got[key] for key in range(len(PROMPTS))] == expected
        assert loop.stats.decode_tokens > loop.stats.decode_steps  # steps held several
        assert loop.stats.prefill_chunks == 2 + 1 + 3  # prompts of 6, 3, 11 in chunks of 4
    finally:
        hybrid.close()
        cpu.close()
