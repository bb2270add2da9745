"""Continuous batching: a shared decode step equals each sequence decoded on its own.

The models are small random DeepSeek-V2 (MLA) and Qwen3-MoE (GQA) models in float32 on the
CPU with the float expert reference. Batched and sequential steps run the same operations on
different row counts, so matmul kernels may sum in another order: 1e-4 absolute on logits
of magnitude about 1 is far above that rounding and far below any real mistake.
"""

import threading
import time

import pytest
import torch

from krasisd.engine.batch import BatchingEngine, batched_decode
from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, TINY_QWEN3_MOE, synthetic_engine
from krasisd.engine.options import SamplingOptions

ATOL = 1e-4


def _engine(raw: dict, seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    return synthetic_engine(ModelConfig.from_dict(raw), "cpu", torch.float32, seed=seed)


@pytest.fixture(scope="module", params=["deepseek-v2", "qwen3-moe"])
def engine(request):
    torch.set_num_threads(1)
    raw = TINY_DEEPSEEK_V2 if request.param == "deepseek-v2" else TINY_QWEN3_MOE
    return _engine(raw)


PROMPTS = [[5, 6, 7], [9, 3, 2, 8, 8, 4, 30], [11], [40, 41, 42, 43, 44]]


def test_batched_decode_equals_sequential_decode(engine):
    steps = 8
    expected_tokens, expected_logits = [], []
    for prompt in PROMPTS:  # one sequence at a time, through Engine.forward
        cache = engine.new_cache(len(prompt) + steps)
        logits = engine.forward(prompt, cache)[-1]
        tokens, rows = [], []
        for _ in range(steps):
            tokens.append(int(logits.argmax()))
            logits = engine.forward([tokens[-1]], cache)[-1]
            rows.append(logits)
        expected_tokens.append(tokens)
        expected_logits.append(torch.stack(rows))
    caches = [engine.new_cache(len(p) + steps) for p in PROMPTS]
    last = [engine.forward(p, c)[-1] for p, c in zip(PROMPTS, caches, strict=True)]
    got_tokens, got_logits = [[] for _ in PROMPTS], [[] for _ in PROMPTS]
    for _ in range(steps):
        tokens = [int(row.argmax()) for row in last]
        logits = batched_decode(engine.model, tokens, caches)  # [B, V]
        for b, token in enumerate(tokens):
            got_tokens[b].append(token)
            got_logits[b].append(logits[b])
        last = list(logits)
    assert got_tokens == expected_tokens
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(torch.stack(got_logits[b]), expected_logits[b], rtol=0,
                                   atol=ATOL)
    assert [c.length for c in caches] == [len(p) + steps for p in PROMPTS]


def test_batched_decode_rejects_bad_batches(engine):
    cache = engine.new_cache(4)
    with pytest.raises(ValueError, match="one token per cache"):
        batched_decode(engine.model, [1, 2], [cache])
    with pytest.raises(ValueError, match="twice"):
        batched_decode(engine.model, [1, 2], [cache, cache])
    full = engine.new_cache(1)
    engine.forward([3], full)
    with pytest.raises(ValueError, match="context full"):
        batched_decode(engine.model, [1, 2], [cache, full])
    assert cache.length == 0 and full.length == 1  # nothing half-written


def _greedy(num_predict: int) -> SamplingOptions:
    return SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=num_predict,
                           num_ctx=64)


def test_concurrent_generations_share_steps_and_match_single_streams(engine):
    num_predict = 6
    expected = [[c.token_id for c in engine.generate(p, _greedy(num_predict)) if not c.done]
                for p in PROMPTS]
    batching = BatchingEngine(engine, max_batch=8, max_wait_ms=200)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            chunks = list(batching.generate(PROMPTS[i], _greedy(num_predict)))
            assert chunks[-1].done and chunks[-1].done_reason == "length"
            results[i] = [c.token_id for c in chunks if not c.done]
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == expected
    stats = batching.stats
    # every token after the first of each stream went through a shared step, and so did
    # one-token prompts (a one-token forward with a cache is a decode step)
    one_token_prompts = sum(len(p) == 1 for p in PROMPTS)
    assert stats.tokens == len(PROMPTS) * (num_predict - 1) + one_token_prompts
    assert stats.steps < stats.tokens  # some steps held more than one sequence
    assert stats.prefills == len(PROMPTS) - one_token_prompts


def test_batching_engine_checks_its_settings_and_prompts(engine):
    with pytest.raises(ValueError):
        BatchingEngine(engine, max_batch=0)
    with pytest.raises(ValueError):
        BatchingEngine(engine, max_wait_ms=-1)
    with pytest.raises(ValueError, match="empty"):
        BatchingEngine(engine).generate([], _greedy(2))


def test_step_clock_shares_while_sharing_is_faster_and_retries_the_other_way():
    from krasisd.engine.batch import StepClock

    clock = StepClock(retry_steps=4, smoothing=1.0, warm_measures=2)
    assert not clock.share(1)  # one sequence: always the engine's own path
    picks = []
    for seconds_shared, seconds_single in ((0.030, 0.050), (0.030, 0.005)):  # 1st: a capture
        picks.append(clock.share(3))
        clock.record(3, True, seconds_shared)
        picks.append(clock.share(3))
        clock.record(3, False, seconds_single)
    assert picks == [True, False, True, False]  # the two ways alternate while warming up
    assert clock.single_s == 0.005  # a faster time is taken at once
    picks = [clock.share(3) for _ in range(8)]
    assert picks == [False, False, False, True] * 2  # 3 x 5 ms < 30 ms; sharing re-tried
    clock.record(3, True, 0.012)  # sharing got faster than 15 ms
    assert [clock.share(3) for _ in range(4)] == [True, True, True, False]


def test_steps_run_one_by_one_when_that_measured_faster(engine):
    """With a clock that says one-by-one wins, concurrent streams still get their own
    greedy answers, and the steps are counted as run one by one."""
    from krasisd.engine.batch import StepClock

    num_predict = 4
    expected = [[c.token_id for c in engine.generate(p, _greedy(num_predict)) if not c.done]
                for p in PROMPTS]
    batching = BatchingEngine(engine, max_batch=8, max_wait_ms=200)

    class OneByOne(StepClock):
        def share(self, size: int) -> bool:
            return False

    batching.clock = OneByOne()
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, [
        c.token_id for c in batching.generate(PROMPTS[i], _greedy(num_predict)) if not c.done]))
        for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    assert batching.stats.one_by_one > 0
    assert batching.clock.single_s is not None and batching.clock.shared_s == {}


def test_registered_sequences_share_forward_steps(engine):
    """Callers that drive forward() themselves register with sequence(): their one-token
    forwards wait for each other and share steps, with the answers of sequential decoding."""
    batching = BatchingEngine(engine, max_batch=4, max_wait_ms=500)
    caches = [engine.new_cache(16) for _ in range(3)]
    twins = [engine.new_cache(16) for _ in range(3)]
    for i in range(3):
        engine.forward([5 + i, 7], caches[i])
        engine.forward([5 + i, 7], twins[i])
    want = [engine.forward([9 + i], twins[i])[-1] for i in range(3)]
    got: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(3)

    def run(i: int) -> None:
        with batching.sequence():
            barrier.wait(timeout=10)
            got[i] = batching.forward([9 + i], caches[i])[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert batching.stats.tokens == 3 and batching.stats.steps == 1  # one shared step
    assert 0 < batching.stats.step_s < time.perf_counter() - start  # inside the step only
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], atol=1e-4, rtol=1e-4)


def test_batching_keeps_a_pooled_cache_per_sequence(engine):
    """An engine that pools KV caches (HybridEngine) keeps at least max_batch of them, so
    each concurrent sequence keeps its cache and captured graphs; others are left alone."""
    engine.pooled_caches = 2
    try:
        BatchingEngine(engine, max_batch=6)
        assert engine.pooled_caches == 6
        BatchingEngine(engine, max_batch=3)
        assert engine.pooled_caches == 6  # never lowered
    finally:
        del engine.pooled_caches
    BatchingEngine(engine, max_batch=4)
    assert not hasattr(engine, "pooled_caches")
