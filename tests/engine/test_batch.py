"""Batched decode steps: a shared decode step equals each sequence decoded on its own.

The models are small random DeepSeek-V2 (MLA) and Qwen3-MoE (GQA) models in float32 on the
CPU with the float expert reference. Batched and sequential steps run the same operations on
different row counts, so matmul kernels may sum in another order: 1e-4 absolute on logits
of magnitude about 1 is far above that rounding and far below any real mistake.
"""

import pytest
import torch

from krasisd.engine.batch import batched_decode
from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, TINY_QWEN3_MOE, synthetic_engine

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


def test_engine_decode_batch_checks_token_ids_and_matches_batched_decode(engine):
    caches = [engine.new_cache(16) for _ in range(2)]
    twins = [engine.new_cache(16) for _ in range(2)]
    for i in range(2):
        engine.forward([5 + i, 7], caches[i])
        engine.forward([5 + i, 7], twins[i])
    with pytest.raises(ValueError, match="token ids"):
        engine.decode_batch([1, engine.config.vocab_size], caches)
    assert [c.length for c in caches] == [2, 2]
    torch.testing.assert_close(engine.decode_batch([9, 10], caches),
                               batched_decode(engine.model, [9, 10], twins), rtol=0, atol=0)


def test_one_by_one_decode_equals_the_shared_step(engine):
    """decode_one_by_one (HybridEngine.decode_batch: each sequence through its own graph
    step) gives the logits of the shared CPU step and advances every cache once."""
    from krasisd.engine.loop import decode_one_by_one

    caches = [engine.new_cache(16) for _ in range(3)]
    twins = [engine.new_cache(16) for _ in range(3)]
    for i in range(3):
        engine.forward([5 + i, 7, 8 + i], caches[i])
        engine.forward([5 + i, 7, 8 + i], twins[i])
    torch.testing.assert_close(decode_one_by_one(engine, [9, 10, 11], caches),
                               engine.decode_batch([9, 10, 11], twins), rtol=0, atol=ATOL)
    assert [c.length for c in caches] == [4, 4, 4]


def test_batched_decode_grows_the_caches_it_writes(engine):
    """CPU caches grow with the sequence: a step that crosses their capacity reallocates them
    and keeps what they held."""
    from krasisd.engine.kv_cache import INITIAL_TOKENS, new_kv_cache

    prompt = [(7 * i) % 90 + 2 for i in range(INITIAL_TOKENS)]
    grown = engine.new_cache(10_000)
    whole = new_kv_cache(engine.config, INITIAL_TOKENS + 1, torch.float32, "cpu", grow=False)
    assert grown.grow and grown.capacity == INITIAL_TOKENS
    assert whole.capacity == INITIAL_TOKENS + 1
    engine.forward(prompt, grown)
    engine.forward(prompt, whole)
    torch.testing.assert_close(engine.decode_batch([3], [grown]),
                               engine.decode_batch([3], [whole]), rtol=0, atol=ATOL)
    assert grown.capacity == 2 * INITIAL_TOKENS and grown.length == INITIAL_TOKENS + 1
