"""Where a decode step's GPU time goes: kernels per step, grouped by name, with torch.profiler.

Used by bench/gpu_decode.py --profile; on its own it needs an engine, so it has no CLI.
"""

from __future__ import annotations

import collections

import torch
from decode_caches import sync
from torch.profiler import ProfilerActivity, profile


def _prefilled(engine, context: int, steps: int) -> tuple[object, int]:
    """A cache holding ``context`` random tokens, with room for ``steps`` more, and the greedy
    token after them."""
    cache = engine.new_cache(context + steps + 4)
    ids = torch.randint(0, engine.config.vocab_size, (context,)).to(engine.device)
    return cache, int(engine.forward(ids, cache)[-1].argmax())


def _warmed(engine, context: int, steps: int) -> tuple[object, int]:
    """``_prefilled``, then three one-token steps (warm-up: they capture this window's
    graphs); returns the cache and the next token."""
    cache, token = _prefilled(engine, context, steps)
    for _ in range(3):
        token = int(engine.forward([token], cache)[-1].argmax())
    sync(engine.device)
    return cache, token


def profile_decode(engine, context: int, steps: int = 16, top: int = 40) -> str:
    """A table of the kernels run by ``steps`` one-token steps after ``context`` tokens."""
    cache, token = _warmed(engine, context, steps)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = int(engine.forward([token], cache)[-1].argmax())
        sync(engine.device)
    kernels = collections.defaultdict(lambda: [0, 0.0])  # name -> [count, device us]
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name[:70]]
            entry[0] += 1
            entry[1] += event.device_time
    total_us = sum(us for _, us in kernels.values()) / steps
    launches = sum(count for count, _ in kernels.values()) / steps
    lines = [f"profile at context {context}: {launches:.0f} kernels and {total_us:.0f} us of "
             f"device time per step"]
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {us / steps:8.1f} us  {count / steps:6.1f}x  {name}")
    return "\n".join(lines)


def profile_host(engine, context: int, steps: int = 16) -> str:
    """Where a step's wall time goes on the host when routed experts run on the CPU: waiting
    for the GPU's hand-off (attention, router, copies), the native expert kernels, and the
    rest (graph launches, the merge, Python)."""
    import time

    backend = engine.expert_backend  # a HybridEngine's SplitExpertBackend
    if backend.cpu is None:
        return "host profile: no CPU experts"
    runner = backend.cpu.runner  # NativeExperts' thread pool
    totals = {"wait_gpu": 0.0, "native": 0.0, "calls": 0}
    run_cpu = backend.run_cpu

    class TimedRunner:
        def __getattr__(self, name):
            return getattr(runner, name)

        def forward(self, *args):
            start = time.perf_counter()
            runner.forward(*args)
            totals["native"] += time.perf_counter() - start
            totals["calls"] += 1

    def timed_run_cpu(layer, staging, event):
        start = time.perf_counter()
        if event is not None:
            event.synchronize()
        totals["wait_gpu"] += time.perf_counter() - start
        run_cpu(layer, staging, None)

    cache, token = _warmed(engine, context, steps)
    backend.run_cpu, backend.cpu.runner = timed_run_cpu, TimedRunner()
    try:
        start = time.perf_counter()
        for _ in range(steps):
            token = int(engine.forward([token], cache)[-1].argmax())
        wall = time.perf_counter() - start
    finally:
        del backend.run_cpu
        backend.cpu.runner = runner
    per = {k: v * 1e3 / steps for k, v in totals.items() if k != "calls"}
    other = wall * 1e3 / steps - per["wait_gpu"] - per["native"]
    return (f"host profile at context {context}: {wall * 1e3 / steps:.2f} ms per step = "
            f"waiting for the GPU's hand-off {per['wait_gpu']:.2f} + native experts "
            f"{per['native']:.2f} ({totals['calls'] / steps:.0f} calls) + the rest "
            f"{other:.2f} (launches, merges, Python)")


def profile_batched(engine, streams: int, context: int = 100, steps: int = 4,
                    top: int = 15) -> str:
    """Host and device time of ``steps`` steps shared by ``streams`` sequences."""
    from krasisd.engine.batch import batched_decode

    prefilled = [_prefilled(engine, context, steps) for _ in range(streams)]
    caches, tokens = [cache for cache, _ in prefilled], [token for _, token in prefilled]
    tokens = batched_decode(engine.model, tokens, caches).argmax(-1).tolist()  # warm-up
    sync(engine.device)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tokens = batched_decode(engine.model, tokens, caches).argmax(-1).tolist()
        sync(engine.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"batched step of {streams} sequences, {steps} steps:\n{table}"

