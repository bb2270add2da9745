"""Timed decode runs of the GPU decode benchmark (bench/gpu_decode.py): the seed's decode table
(ms per token after a prefilled context, TTFT) and tok/s of several concurrent streams."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from decode_caches import sync

from krasisd.engine.generate import Generation
from krasisd.engine.gpu.driver import prefill_logits
from krasisd.engine.loop import GenerationLoop
from krasisd.engine.options import SamplingOptions


def decode_run(engine, cache, context: int, steps: int, first_token: int) -> list[float]:
    """ms of each of ``steps`` greedy tokens after ``context`` cached tokens."""
    cache.length = context  # the prefilled prefix stays valid; later positions are rewritten
    token, times_ms = first_token, []
    for _ in range(steps):
        start = time.perf_counter()
        logits = engine.forward([token], cache)[-1]
        token = int(logits.argmax())  # syncs
        times_ms.append(1e3 * (time.perf_counter() - start))
    return times_ms


def prefill(engine, cache, ids, chunk: int) -> tuple[float, int]:
    """Prefill ``ids`` into an empty cache: (seconds to the first token, that token)."""
    device = engine.device
    cache.reset()
    sync(device)
    start = time.perf_counter()
    logits = prefill_logits(engine.model, ids, cache, chunk_tokens=chunk)
    token = int(logits[-1].argmax())
    seconds = time.perf_counter() - start
    cache.advance(ids.shape[0])
    return seconds, token


def decode_table(engine, chunk, contexts, steps, runs, ttft_runs, rng) -> list[dict]:
    device, vocab = engine.device, engine.config.vocab_size
    cache = engine.new_cache(max(contexts) + steps + 1)
    rows = []
    for context in contexts:
        ids = torch.randint(0, vocab, (context,), generator=rng).to(device)
        ttfts = []
        for _ in range(ttft_runs if context == max(contexts) else 1):
            seconds, token = prefill(engine, cache, ids, chunk)
            ttfts.append(seconds)
        decode_run(engine, cache, context, steps, token)  # warm-up: captures this window's graphs
        times = [ms for _ in range(runs) for ms in decode_run(engine, cache, context, steps, token)]
        avg = statistics.mean(times)
        rows.append({"context": context, "avg_ms": avg, "p50_ms": statistics.median(times),
                     "min_ms": min(times), "max_ms": max(times), "tok_s": 1e3 / avg,
                     "ttft_s": statistics.median(ttfts), "tokens_timed": len(times)})
    return rows


def streams_table(engine, counts, steps, context, rng) -> list[dict]:
    """Aggregate tok/s of B sequences decoding at once through the generation loop, as a
    runner serves them (krasisd.engine.loop: one engine thread, every decoding sequence's
    token in one ``decode_batch`` per step)."""
    vocab, rows = engine.config.vocab_size, []
    greedy = SamplingOptions(temperature=0.0, repeat_penalty=1.0, top_k=0, top_p=1.0,
                             num_ctx=context + 3 * steps + 4)
    for count in counts:
        loop = GenerationLoop(engine, engine.loop_options(max_batch=count), engine.context_spec())
        prompts = [torch.randint(0, vocab, (context,), generator=rng).tolist()
                   for _ in range(count)]
        for num in (2 * steps, steps):  # warm-up (graph captures), timed
            for key, prompt in enumerate(prompts):
                loop.add(Generation(engine, prompt, replace(greedy, num_predict=num + 1),
                                    key=key))
            while any(g.prefill_left for g in [*loop.waiting, *loop.running]):
                loop.step()  # prompts in, each stream's first token drawn
            before = replace(loop.stats)
            sync(engine.device)
            start = time.perf_counter()
            while loop.has_work():
                loop.step()
            seconds = time.perf_counter() - start
        stats = loop.stats  # the timed part's: tokens, decode steps, time inside forwards
        tok_s = (stats.decode_tokens - before.decode_tokens) / seconds
        rows.append({"streams": count, "tok_s": tok_s, "per_stream_tok_s": tok_s / count,
                     "steps": stats.decode_steps - before.decode_steps,
                     "in_steps_fraction": (stats.forward_s - before.forward_s) / seconds})
    return rows
