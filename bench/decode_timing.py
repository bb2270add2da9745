"""Timed decode runs of the GPU decode benchmark (bench/gpu_decode.py): the seed's decode table
(ms per token after a prefilled context, TTFT) and tok/s of several concurrent streams."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import torch
from decode_caches import sync

from krasisd.engine.batch import BatchingEngine
from krasisd.engine.gpu.driver import prefill_logits


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
    """Aggregate tok/s of B sequences decoding at once, one thread each, through
    BatchingEngine as a runner serves them: steps shared, or run one by one where that
    measured faster (krasisd.engine.batch.StepClock)."""
    device, vocab, rows = engine.device, engine.config.vocab_size, []
    for count in counts:
        batching = BatchingEngine(engine, max_batch=count, max_wait_ms=5)
        caches = [engine.new_cache(context + 3 * steps + 4) for _ in range(count)]
        tokens = []
        for cache in caches:
            ids = torch.randint(0, vocab, (context,), generator=rng).to(device)
            tokens.append(int(engine.forward(ids, cache)[-1].argmax()))
        for num in (2 * steps, steps):  # warm-up (captures, the clock's first measures), timed
            before = dataclasses.replace(batching.stats)
            threads = [threading.Thread(target=_decode_stream,
                                        args=(batching, caches, tokens, i, num))
                       for i in range(count)]
            sync(device)
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - start
        stats = batching.stats  # the timed part's: steps, one-by-one steps, time inside steps
        rows.append({"streams": count, "tok_s": count * steps / seconds,
                     "per_stream_tok_s": steps / seconds,
                     "steps": stats.steps - before.steps,
                     "one_by_one_steps": stats.one_by_one - before.one_by_one,
                     "in_steps_fraction": (stats.step_s - before.step_s) / seconds})
        del caches
    return rows


def _decode_stream(batching, caches, tokens, i: int, num: int) -> None:
    """Sequence i decodes ``num`` greedy tokens through the batching engine."""
    with batching.sequence():
        for _ in range(num):
            tokens[i] = int(batching.forward([tokens[i]], caches[i])[-1].argmax())
