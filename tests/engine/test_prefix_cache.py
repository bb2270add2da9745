"""The prefix cache (krasisd.engine.prefix_cache) in the generation loop: a prompt that
extends an earlier one prefills only its new tokens and answers as a fresh prefill does, on
small random DeepSeek-V2 (MLA) and Qwen3-MoE (GQA) models in float32 on the CPU; eviction
under a small bound; model identities never share blocks; a cancelled request stores only
complete blocks of what its forwards wrote.

Restored KV was written by other forwards (a chunk of another length, or decode steps), so
logits may differ from a fresh prefill's by rounding; greedy tokens are compared."""

from __future__ import annotations

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.generate import Generation
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, TINY_QWEN3_MOE, synthetic_engine
from krasisd.engine.kv_cache import new_kv_cache
from krasisd.engine.loop import GenerationLoop, LoopOptions
from krasisd.engine.options import SamplingOptions
from krasisd.engine.prefix_cache import PrefixCache, block_keys

MODELS = {"deepseek-v2": TINY_DEEPSEEK_V2, "qwen3-moe": TINY_QWEN3_MOE}
BLOCK = 4
BASE = [(7 * i) % 90 + 2 for i in range(30)]  # 30 tokens: 7 complete blocks and 2 more


def _engine(raw: dict, seed: int = 0):
    torch.set_num_threads(1)
    return synthetic_engine(ModelConfig.from_dict(raw), "cpu", torch.float32, seed=seed)


@pytest.fixture(scope="module", params=list(MODELS))
def engine(request):
    return _engine(MODELS[request.param])


def _greedy(num_predict: int = 6) -> SamplingOptions:
    return SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=num_predict,
                           num_ctx=128)


def _options(capacity_bytes: int = 1 << 30, **extra) -> LoopOptions:
    return LoopOptions(max_batch=2, prefill_chunk_tokens=8, prefix_cache_bytes=capacity_bytes,
                       prefix_block_tokens=BLOCK, **extra)


def _serve(loop: GenerationLoop, engine, prompt: list[int], num_predict: int = 6,
           should_cancel=None) -> tuple[list[int], Generation, int]:
    """(tokens, the generation, prompt tokens it forwarded)."""
    before = loop.stats.prefill_tokens
    generation = Generation(engine, prompt, _greedy(num_predict), should_cancel)
    loop.add(generation)
    tokens = []
    while loop.has_work():
        for emitted in loop.step():
            assert emitted.error is None, emitted.error
            if not emitted.chunk.done:
                tokens.append(emitted.chunk.token_id)
    return tokens, generation, loop.stats.prefill_tokens - before


def _fresh(engine, prompt: list[int], num_predict: int = 6) -> list[int]:
    loop = GenerationLoop(engine, LoopOptions(prefill_chunk_tokens=8), engine.context_spec())
    return _serve(loop, engine, prompt, num_predict)[0]


def test_an_extended_prompt_prefills_only_its_new_tokens_and_answers_as_fresh(engine):
    loop = GenerationLoop(engine, _options(), engine.context_spec())
    first, generation, forwarded = _serve(loop, engine, BASE)
    assert first == _fresh(engine, BASE) and forwarded == len(BASE)
    assert generation.cached_tokens == 0
    # the next turn: the earlier prompt, the answer, then new tokens
    second_prompt = BASE + first + [5, 9, 13, 17, 21]
    second, generation, forwarded = _serve(loop, engine, second_prompt)
    assert second == _fresh(engine, second_prompt)
    # the cache held the prompt and the answer's forwarded tokens (the last was not)
    held = (len(BASE) + len(first) - 1) // BLOCK * BLOCK
    assert generation.cached_tokens == held
    assert forwarded == len(second_prompt) - held  # only the new tokens, up to a block
    stats = loop.prefix_stats()
    assert stats["hit_tokens"] == held and stats["miss_tokens"] == len(BASE) + forwarded
    assert stats["blocks"] == len(loop.prefix) and stats["bytes"] > 0


def test_requests_that_come_together_with_one_context_read_it_once(engine):
    loop = GenerationLoop(engine, _options(), engine.context_spec())
    first = Generation(engine, BASE, _greedy(), key="first")
    second = Generation(engine, BASE + [50, 51], _greedy(), key="second")
    loop.add(first)
    loop.add(second)  # both admitted at the first step
    tokens: dict[str, list[int]] = {"first": [], "second": []}
    while loop.has_work():
        for emitted in loop.step():
            assert emitted.error is None, emitted.error
            if not emitted.chunk.done:
                tokens[emitted.generation.key].append(emitted.chunk.token_id)
    # the first prompt is read first (fewest tokens left); the second then copies its blocks
    assert first.cached_tokens == 0 and second.cached_tokens == 28
    assert loop.stats.prefill_tokens == len(BASE) + 4
    assert tokens == {"first": _fresh(engine, BASE), "second": _fresh(engine, BASE + [50, 51])}


def test_the_same_prompt_again_still_prefills_its_last_token(engine):
    prompt = BASE[:24]  # exactly 6 blocks
    loop = GenerationLoop(engine, _options(), engine.context_spec())
    first = _serve(loop, engine, prompt)[0]
    again, generation, forwarded = _serve(loop, engine, prompt)
    assert again == first
    assert generation.cached_tokens == 20 and forwarded == 4  # the last block is read again


def test_the_answer_counts_the_whole_prompt(engine):
    loop = GenerationLoop(engine, _options(), engine.context_spec())
    _serve(loop, engine, BASE)
    generation = Generation(engine, BASE + [3], _greedy(2))
    loop.add(generation)
    finals = [e.chunk for _ in range(20) if loop.has_work() for e in loop.step()
              if e.chunk.done]
    assert generation.cached_tokens > 0
    assert finals[0].prompt_eval_count == len(BASE) + 1  # Ollama's meaning: cached ones too


def test_eviction_under_a_small_bound_keeps_answers_right(engine):
    block_bytes = new_kv_cache(engine.config, BLOCK, torch.float32).nbytes
    capacity = 5 * block_bytes
    loop = GenerationLoop(engine, _options(capacity), engine.context_spec())
    prompts = [BASE, [(3 * i) % 80 + 4 for i in range(26)], BASE[:18] + [60, 61, 62]]
    for _ in range(2):
        for prompt in prompts:
            tokens, _, _ = _serve(loop, engine, prompt)
            assert tokens == _fresh(engine, prompt)
            assert loop.prefix.stats.bytes <= capacity and len(loop.prefix) <= 5
    stats = loop.prefix_stats()
    assert stats["evicted_blocks"] > 0 and stats["hit_tokens"] > 0


def test_least_recently_used_chains_go_first_tail_before_head():
    cache = PrefixCache(capacity_bytes=3 * 16, block_tokens=2)

    class Span:  # a stand-in cache: every block is 16 bytes
        def __init__(self, length):
            self.length = length

        def read_span(self, start, end):
            return (torch.zeros(4, dtype=torch.float32),)

    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    cache.store("m", a, Span(6))
    assert len(cache) == 3
    cache.store("m", b, Span(4))  # two more blocks: a's last two (its tail) go
    keys_a, keys_b = block_keys("m", a, 2), block_keys("m", b, 2)
    assert cache.matched_blocks("m", a + [0]) == keys_a[:1]
    assert cache.matched_blocks("m", b + [0]) == keys_b
    assert cache.stats.evicted_blocks == 2 and cache.stats.bytes == 48


def test_a_chain_longer_than_the_cache_keeps_its_head():
    cache = PrefixCache(capacity_bytes=3 * 16, block_tokens=2)

    class Span:  # every block is 16 bytes; counts the copies made
        length, copies = 10, 0

        def read_span(self, start, end):
            Span.copies += 1
            return (torch.zeros(4, dtype=torch.float32),)

    tokens = list(range(10))
    assert cache.store("m", tokens, Span()) == 3 and Span.copies == 3  # not 5, then evicted
    assert cache.matched_blocks("m", tokens + [0]) == block_keys("m", tokens, 2)[:3]
    assert cache.stats.bytes == 48 and cache.stats.evicted_blocks == 0


def test_two_model_identities_never_share_blocks():
    shared = PrefixCache(1 << 30, BLOCK)
    first, second = _engine(TINY_DEEPSEEK_V2, seed=0), _engine(TINY_DEEPSEEK_V2, seed=1)
    loop_a = GenerationLoop(first, _options(), first.context_spec(), shared, identity="a:int4")
    loop_b = GenerationLoop(second, _options(), second.context_spec(), shared,
                            identity="b:int4")
    tokens_a, _, _ = _serve(loop_a, first, BASE)
    held = len(shared)
    tokens_b, generation, forwarded = _serve(loop_b, second, BASE)
    assert generation.cached_tokens == 0 and forwarded == len(BASE)  # the same tokens: a miss
    assert tokens_b == _fresh(second, BASE) and tokens_a == _fresh(first, BASE)
    assert len(shared) > held  # b's blocks sit beside a's
    assert not set(block_keys("a:int4", BASE, BLOCK)) & set(block_keys("b:int4", BASE, BLOCK))
    # each identity still finds its own
    again_a, generation, _ = _serve(loop_a, first, BASE + [8])
    assert generation.cached_tokens == 28 and again_a == _fresh(first, BASE + [8])


def test_a_cancelled_prompt_stores_only_complete_blocks_it_wrote(engine):
    cancelled = []
    loop = GenerationLoop(engine, LoopOptions(prefill_chunk_tokens=6, prefix_cache_bytes=1 << 30,
                                              prefix_block_tokens=BLOCK),
                          engine.context_spec())
    generation = Generation(engine, BASE, _greedy(), lambda: bool(cancelled))
    loop.add(generation)
    loop.step()
    loop.step()  # 12 tokens written: 3 blocks
    loop.step()  # 18 tokens: 4 complete blocks, and half of a fifth
    cancelled.append(True)
    ends = [e.chunk for e in loop.step()]
    assert ends[-1].done_reason == "cancel" and not loop.has_work()
    assert len(loop.prefix) == 4  # not the half-written fifth
    assert loop.prefix.matched_blocks(loop.identity, BASE) == \
        block_keys(loop.identity, BASE, BLOCK)[:4]
    tokens, again, forwarded = _serve(loop, engine, BASE)
    assert again.cached_tokens == 16 and forwarded == len(BASE) - 16
    assert tokens == _fresh(engine, BASE)


def test_a_request_cancelled_while_decoding_stores_its_forwarded_tokens(engine):
    cancelled = []
    loop = GenerationLoop(engine, _options(), engine.context_spec())
    generation = Generation(engine, BASE, _greedy(20), lambda: bool(cancelled))
    loop.add(generation)
    for _ in range(4):
        loop.step()  # prompt chunks of 8, 8, 8, 6: the first token is picked
    for _ in range(3):
        loop.step()  # 3 decode steps: 33 tokens in the cache
    cancelled.append(True)
    loop.step()
    assert not loop.has_work()
    assert len(loop.prefix) == 33 // BLOCK
    follow_up = generation.history[:33] + [40, 41]
    tokens, again, _ = _serve(loop, engine, follow_up)
    assert again.cached_tokens == 32 and tokens == _fresh(engine, follow_up)


def test_off_when_the_bound_is_zero(engine):
    loop = GenerationLoop(engine, LoopOptions(prefix_cache_bytes=0), engine.context_spec())
    _serve(loop, engine, BASE)
    assert loop.prefix is None and loop.prefix_stats() is None
    _, generation, forwarded = _serve(loop, engine, BASE)
    assert generation.cached_tokens == 0 and forwarded == len(BASE)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        LoopOptions(prefix_cache_bytes=-1)
    with pytest.raises(ValueError, match="prefix_block_tokens"):
        LoopOptions(prefix_block_tokens=0)


def test_the_hybrid_engines_pooled_caches_take_restored_blocks(v2_model_dir, v2_int8_cache,
                                                                tmp_path):
    """The hybrid GPU engine (its GPU pieces on CPU tensors here) keeps fixed-address pooled
    caches for its decode graphs: restored blocks are written into that storage in place."""
    pytest.importorskip("triton")
    from krasisd.engine.engine_options import EngineOptions
    from krasisd.engine.gpu.graphs import load_hybrid

    options = EngineOptions(quant="int8", device="cpu", threads=1, cache_dir=v2_int8_cache[0],
                            gpu_cache_dir=tmp_path / "gpu", vram_budget_bytes=1 << 30,
                            gpu_prefill_min_tokens=4, autotune=False)
    hybrid = load_hybrid(v2_model_dir, options=options, max_tokens=64, use_gpu_experts=False)
    try:
        loop = GenerationLoop(hybrid, hybrid.loop_options(
            max_batch=2, prefill_chunk_tokens=8, prefix_cache_bytes=1 << 30,
            prefix_block_tokens=BLOCK), hybrid.context_spec())
        greedy = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=6, num_ctx=64)
        prompt = BASE[:20]
        first = Generation(hybrid, prompt, greedy)
        loop.add(first)
        tokens = []
        while loop.has_work():
            tokens += [e.chunk.token_id for e in loop.step() if not e.chunk.done]
        # a new question after the same context (the context's blocks were prefilled, so
        # this bf16 engine's rounding is that of a fresh prefill's chunks)
        follow_up = prompt + [4, 5, 6]
        second = Generation(hybrid, follow_up, greedy)
        loop.add(second)
        # admitted: the blocks are copied into a pooled cache, then the rest is prefilled
        again = [e.chunk.token_id for e in loop.step() if not e.chunk.done]
        assert tokens and second.cached_tokens == len(prompt)
        assert not second.cache.grow and second.cache.capacity == 64
        assert second.cache.storage_key() in {s.storage_key() for s, _ in hybrid._pool}
        while loop.has_work():
            again += [e.chunk.token_id for e in loop.step() if not e.chunk.done]
        # a fresh prefill of the same prompt on the hybrid engine (bf16 there, float32 in
        # the CPU engine, whose greedy tokens may differ a few steps in)
        fresh = GenerationLoop(hybrid, hybrid.loop_options(max_batch=2, prefill_chunk_tokens=8),
                               hybrid.context_spec())
        fresh.add(Generation(hybrid, follow_up, greedy))
        expected = []
        while fresh.has_work():
            expected += [e.chunk.token_id for e in fresh.step() if not e.chunk.done]
        assert again == expected
    finally:
        hybrid.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_spans_read_and_written_round_trip_and_grow_the_cache(name):
    config = ModelConfig.from_dict(MODELS[name])
    source = new_kv_cache(config, 600, torch.float32, grow=True)
    filled = [torch.randn_like(t) for t in source._tensors()]  # [L, 256, ...] each
    for stored, values in zip(source._tensors(), filled, strict=True):
        stored.copy_(values)
    source.advance(200)
    target = new_kv_cache(config, 600, torch.float32, grow=True)
    for start in range(0, 200, 50):  # 4 spans of 50 tokens: 200, then 200 more
        target.write_span(source.read_span(start, start + 50))
    for start in range(0, 200, 50):
        target.write_span(source.read_span(start, start + 50))
    assert target.length == 400 and target.capacity == 512  # grown from 256
    for stored, values in zip(target._tensors(), filled, strict=True):
        assert torch.equal(stored[:, :200], values[:, :200])
        assert torch.equal(stored[:, 200:400], values[:, :200])
    with pytest.raises(ValueError, match="outside"):
        source.read_span(150, 201)
