"""The generation loop (krasisd.engine.loop): continuous batching, chunked prefill, cancels
between steps, context limits and growing KV caches, on small random DeepSeek-V2 (MLA) and
Qwen3-MoE (GQA) models in float32 on the CPU with the float expert reference.

Batched and one-by-one forwards run the same operations on different row counts, so matmul
kernels may sum in another order: 1e-4 absolute on logits of magnitude about 1 is far above
that rounding and far below any real mistake."""

from __future__ import annotations

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.generate import Generation
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, TINY_QWEN3_MOE, synthetic_engine
from krasisd.engine.loop import ContextLimitError, GenerationLoop, LoopOptions, run_alone
from krasisd.engine.options import SamplingOptions

ATOL = 1e-4
MODELS = {"deepseek-v2": TINY_DEEPSEEK_V2, "qwen3-moe": TINY_QWEN3_MOE}
PROMPTS = [[5, 6, 7], [9, 3, 2, 8, 8, 4, 30], [11], [40, 41, 42, 43, 44]]
LONG_PROMPT = [(7 * i) % 90 + 2 for i in range(40)]


def _engine(raw: dict, **overrides) -> Engine:
    torch.set_num_threads(1)
    return synthetic_engine(ModelConfig.from_dict({**raw, **overrides}), "cpu", torch.float32,
                            seed=0)


@pytest.fixture(scope="module", params=list(MODELS))
def engine(request) -> Engine:
    return _engine(MODELS[request.param])


def _greedy(num_predict: int, **extra) -> SamplingOptions:
    return SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=num_predict,
                           num_ctx=128, **extra)


def _alone(engine, prompt, num_predict) -> list[int]:
    return [c.token_id for c in engine.generate(prompt, _greedy(num_predict)) if not c.done]


def _run(loop: GenerationLoop, max_steps: int = 500, chunks: dict | None = None,
         until_idle: bool = True) -> dict:
    """Step until idle (or ``max_steps``): {key: [chunk, ...]}, and under "steps" each
    step's Emitted list (step n of the loop at index n - 1)."""
    chunks = {"steps": []} if chunks is None else chunks
    for _ in range(max_steps):
        if not loop.has_work():
            return chunks
        emitted = loop.step()
        assert all(e.error is None for e in emitted), [e.error for e in emitted]
        chunks["steps"].append(emitted)
        for e in emitted:
            chunks.setdefault(e.generation.key, []).append(e.chunk)
    assert not until_idle, "the loop did not finish"
    return chunks


def test_concurrent_streams_give_each_ones_own_tokens_in_shared_steps(engine):
    num_predict = 6
    expected = [_alone(engine, p, num_predict) for p in PROMPTS]
    loop = GenerationLoop(engine, LoopOptions(max_batch=4), engine.context_spec())
    for key, prompt in enumerate(PROMPTS):
        loop.add(Generation(engine, prompt, _greedy(num_predict), key=key))
    chunks = _run(loop)
    for key in range(len(PROMPTS)):
        assert [c.token_id for c in chunks[key] if not c.done] == expected[key]
        assert chunks[key][-1].done_reason == "length"
        assert chunks[key][-1].prompt_eval_count == len(PROMPTS[key])
    # every token after each stream's first was forwarded in a decode step, shared
    assert loop.stats.decode_tokens == len(PROMPTS) * (num_predict - 1)
    assert loop.stats.decode_steps < loop.stats.decode_tokens
    assert not loop.running and not loop.waiting


def test_more_streams_than_max_batch_wait_and_still_match(engine):
    expected = [_alone(engine, p, 4) for p in PROMPTS]
    loop = GenerationLoop(engine, LoopOptions(max_batch=2), engine.context_spec())
    for key, prompt in enumerate(PROMPTS):
        loop.add(Generation(engine, prompt, _greedy(4), key=key))
    first_step = loop.step()
    assert len(loop.running) == 2 and len(loop.waiting) == 2
    chunks = _run(loop)
    for e in reversed(first_step):
        chunks[e.generation.key].insert(0, e.chunk)
    assert [[c.token_id for c in chunks[k] if not c.done] for k in range(4)] == expected


def test_a_long_prompt_is_prefilled_in_chunks_while_running_streams_decode(engine):
    """The long prompt's chunks alternate with decode steps: the running streams emit tokens
    between its first and its last chunk, and everyone's tokens are their own."""
    chunk_tokens = 8
    expected_short = [_alone(engine, p, 30) for p in PROMPTS[:2]]
    expected_long = _alone(engine, LONG_PROMPT, 5)
    loop = GenerationLoop(engine, LoopOptions(max_batch=3, prefill_chunk_tokens=chunk_tokens),
                          engine.context_spec())
    prefills: list[tuple[int, int]] = []  # (step, chunk length) of the long prompt
    forward = engine.forward

    def recording_forward(ids, cache=None, last_only=False):
        if len(ids) > 1 and cache is long_generation.cache:
            prefills.append((loop.stats.steps, len(ids)))
        return forward(ids, cache, last_only=last_only)

    for key, prompt in enumerate(PROMPTS[:2]):
        loop.add(Generation(engine, prompt, _greedy(30), key=key))
    chunks = _run(loop, max_steps=3, until_idle=False)  # both are decoding
    long_generation = Generation(engine, LONG_PROMPT, _greedy(5), key="long")
    loop.add(long_generation)
    engine.forward = recording_forward
    try:
        _run(loop, chunks=chunks)
    finally:
        del engine.forward
    assert [n for _, n in prefills] == [8, 8, 8, 8, 8]  # 40 tokens in 5 chunks
    first, last = prefills[0][0], prefills[-1][0]
    between = [e for emitted in chunks["steps"][first - 1:last - 1] for e in emitted
               if e.generation.key != "long"]
    assert len(between) == 2 * (last - first)  # both streams emitted a token every step
    assert [c.token_id for c in chunks["long"] if not c.done] == expected_long
    for key in range(2):
        assert [c.token_id for c in chunks[key] if not c.done] == expected_short[key]


def test_a_short_prompt_arriving_mid_prefill_is_read_before_the_long_one_ends(engine):
    """The prompt with the fewest tokens left is read first: a short request that comes
    while a long prompt is being read gets its first token before the long prompt's."""
    expected_short = _alone(engine, PROMPTS[0], 4)
    loop = GenerationLoop(engine, LoopOptions(max_batch=2, prefill_chunk_tokens=4),
                          engine.context_spec())
    long_generation = Generation(engine, LONG_PROMPT, _greedy(2), key="long")
    loop.add(long_generation)
    loop.step()
    loop.step()
    assert long_generation.prefilled == 8
    loop.add(Generation(engine, PROMPTS[0], _greedy(4), key="short"))
    chunks = _run(loop)
    first_short = next(i for i, step in enumerate(chunks["steps"])
                       if any(e.generation.key == "short" for e in step))
    first_long = next(i for i, step in enumerate(chunks["steps"])
                      if any(e.generation.key == "long" for e in step))
    assert first_short == 0 and first_long > 3  # 3 tokens in one step; 32 left of the long
    assert [c.token_id for c in chunks["short"] if not c.done] == expected_short
    assert [c.token_id for c in chunks["long"] if not c.done] == _alone(engine, LONG_PROMPT, 2)


def test_the_step_token_budget_shrinks_the_chunk_next_to_decodes(engine):
    loop = GenerationLoop(engine, LoopOptions(max_batch=3, prefill_chunk_tokens=8,
                                              step_token_budget=6), engine.context_spec())
    for key in range(2):
        loop.add(Generation(engine, [11 + key], _greedy(20), key=key))
    loop.step()
    loop.step()  # both decode now: 2 of the 6 tokens
    long_generation = Generation(engine, LONG_PROMPT, _greedy(2), key="long")
    loop.add(long_generation)
    loop.step()
    assert long_generation.prefilled == 4


@pytest.mark.parametrize("chunk_tokens", [3, 16, 64])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(engine, chunk_tokens):
    expected = _alone(engine, LONG_PROMPT, 6)
    loop = GenerationLoop(engine, LoopOptions(prefill_chunk_tokens=chunk_tokens),
                          engine.context_spec())
    chunks = list(run_alone(loop, Generation(engine, LONG_PROMPT, _greedy(6))))
    assert [c.token_id for c in chunks if not c.done] == expected
    assert chunks[-1].prompt_eval_count == len(LONG_PROMPT)
    assert loop.stats.prefill_chunks == -(-len(LONG_PROMPT) // chunk_tokens)


def test_cancel_mid_prompt_ends_at_the_next_step_and_frees_the_cache(engine):
    cancelled = []
    loop = GenerationLoop(engine, LoopOptions(max_batch=2, prefill_chunk_tokens=8),
                          engine.context_spec())
    short = Generation(engine, PROMPTS[0], _greedy(20), key="short")
    long_generation = Generation(engine, LONG_PROMPT, _greedy(5), lambda: bool(cancelled),
                                 key="long")
    loop.add(short)
    loop.add(long_generation)
    loop.step()  # the short prompt: one chunk
    loop.step()  # the long prompt's first chunk, next to the short one's decode
    loop.step()
    assert long_generation.prefilled == 16 and long_generation.cache is not None
    chunks_before = loop.stats.prefill_chunks
    cancelled.append(True)
    emitted = loop.step()
    ends = [e.chunk for e in emitted if e.generation is long_generation]
    assert len(ends) == 1 and ends[0].done and ends[0].done_reason == "cancel"
    assert ends[0].prompt_eval_count == 0 and ends[0].eval_count == 0
    assert loop.stats.prefill_chunks == chunks_before  # no further chunk of it ran
    assert long_generation.cache is None and long_generation not in loop.running
    assert [e.generation for e in emitted if e.generation is short] == [short]  # went on


def test_cancel_of_a_decoding_stream_frees_it_within_one_step(engine):
    stop = []
    loop = GenerationLoop(engine, LoopOptions(max_batch=2), engine.context_spec())
    leaving = Generation(engine, PROMPTS[0], _greedy(50), lambda: bool(stop), key="leaving")
    staying = Generation(engine, PROMPTS[1], _greedy(50), key="staying")
    loop.add(leaving)
    loop.add(staying)
    for _ in range(4):
        loop.step()
    stop.append(True)
    tokens_before = loop.stats.decode_tokens
    emitted = loop.step()
    final = [e.chunk for e in emitted if e.generation is leaving]
    assert [c.done_reason for c in final] == ["cancel"] and leaving.cache is None
    assert loop.running == [staying]
    assert loop.stats.decode_tokens == tokens_before + 1  # the cancelled one: not forwarded


def test_num_ctx_beyond_the_model_maximum_names_both_numbers(engine):
    maximum = engine.config.max_position_embeddings
    with pytest.raises(ContextLimitError, match=rf"num_ctx 2000000 .* {maximum} tokens"):
        list(engine.generate([1, 2], SamplingOptions(num_ctx=2_000_000)))
    unset = list(engine.generate([1, 2], SamplingOptions(num_predict=1)))
    assert unset[-1].done  # unset: the default, capped by the model
    loop = GenerationLoop(engine, LoopOptions(), engine.context_spec())
    assert loop.num_ctx(None) == min(4096, maximum) and loop.num_ctx(maximum) == maximum


def test_generate_stream_on_an_engine_takes_its_limits_and_chunk(engine):
    """generate_stream (JSON mode and grammars call it with their pick) gives an Engine its
    own context limits and prefill chunk, as Engine.generate does."""
    from krasisd.engine.generate import generate_stream

    with pytest.raises(ContextLimitError, match="max_position_embeddings"):
        generate_stream(engine, [1, 2], SamplingOptions(num_ctx=10**6),
                        pick=lambda logits, history: (3, 0.0, True))
    assert engine.loop_options().prefill_chunk_tokens == 512  # the CPU's


def test_the_kv_budget_refuses_what_never_fits_and_queues_what_fits_later(engine):
    per_token = engine.context_spec().kv_bytes_per_token
    loop = GenerationLoop(engine, LoopOptions(max_batch=4, kv_budget_bytes=100 * per_token),
                          engine.context_spec())
    with pytest.raises(ContextLimitError, match=r"num_ctx 101 needs .* KV budget .*100 tokens"):
        loop.num_ctx(101)
    assert loop.num_ctx(None) == 100
    sixty = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=3, num_ctx=60)
    first = Generation(engine, PROMPTS[0], sixty, key=0)
    second = Generation(engine, PROMPTS[1], sixty, key=1)
    loop.add(first)
    loop.add(second)
    loop.step()
    assert loop.running == [first] and list(loop.waiting) == [second]  # 120 > 100 tokens
    chunks = _run(loop)
    assert chunks[1][-1].done_reason == "length"  # it ran once the first had finished


def test_kv_memory_grows_with_the_sequence_not_num_ctx():
    """A num_ctx of 2,000,000 on a tiny model holds memory for the tokens it has."""
    engine = _engine(TINY_DEEPSEEK_V2, max_position_embeddings=4_000_000)
    caches = []
    new_cache = engine.new_cache
    engine.new_cache = lambda max_tokens: caches.append(new_cache(max_tokens)) or caches[-1]
    options = SamplingOptions(temperature=0, num_predict=20, num_ctx=2_000_000)
    chunks = list(engine.generate(LONG_PROMPT * 8, options))  # 320 + 20 tokens
    assert chunks[-1].done_reason == "length" and chunks[-1].eval_count == 20
    cache = caches[0]
    per_token = engine.context_spec().kv_bytes_per_token
    assert cache.max_tokens == 2_000_000 and cache.length == 320 + 19
    assert cache.capacity == 512 and cache.nbytes == 512 * per_token  # not 2M tokens' worth


@pytest.mark.parametrize("chunk_tokens", [2, 5, 16, 64])
def test_prefill_onto_a_cache_gives_the_logits_of_one_whole_prefill(engine, chunk_tokens):
    """The models' prefill with cached tokens before the chunk (MLA expands every cached
    latent, GQA reads the cached K and V, both under the causal mask) gives every row of
    one whole prefill; 300 tokens also cross a growing cache's first capacity (256)."""
    from krasisd.engine.kv_cache import new_kv_cache

    prompt = (LONG_PROMPT * 8)[:300]
    whole_cache = new_kv_cache(engine.config, 300, torch.float32, "cpu", grow=False)
    whole = engine.forward(prompt, whole_cache)  # [300, V]
    cache = engine.new_cache(300)
    rows = [engine.forward(prompt[i:i + chunk_tokens], cache)
            for i in range(0, len(prompt), chunk_tokens)]
    torch.testing.assert_close(torch.cat(rows), whole, rtol=0, atol=ATOL)
    assert cache.length == 300 and cache.capacity == 300  # grew from 256 to its maximum
    for layer in range(engine.config.num_hidden_layers):  # the same cache contents
        for got, want in zip(cache._tensors(), whole_cache._tensors(), strict=True):
            torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=ATOL)
