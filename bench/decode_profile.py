"""Where a decode step's GPU time goes: kernels per step, grouped by name, with torch.profiler.

Used by bench/gpu_decode.py --profile; on its own it needs an engine, so it has no CLI.
"""

from __future__ import annotations

import collections

import torch
from decode_caches import sync
from torch.profiler import ProfilerActivity, profile


def profile_decode(engine, context: int, steps: int = 16, top: int = 18) -> str:
    """A table of the kernels run by ``steps`` one-token steps after ``context`` tokens."""
    cache = engine.new_cache(context + steps + 4)
    ids = torch.randint(0, engine.config.vocab_size, (context,)).to(engine.device)
    token = int(engine.forward(ids, cache)[-1].argmax())
    for _ in range(3):  # warm-up: captures this window's graphs
        token = int(engine.forward([token], cache)[-1].argmax())
    sync(engine.device)
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


def profile_batched(engine, streams: int, context: int = 100, steps: int = 4,
                    top: int = 15) -> str:
    """Host and device time of ``steps`` steps shared by ``streams`` sequences."""
    from krasisd.engine.batch import batched_decode

    caches, tokens = [], []
    for _ in range(streams):
        cache = engine.new_cache(context + steps + 4)
        ids = torch.randint(0, engine.config.vocab_size, (context,)).to(engine.device)
        tokens.append(int(engine.forward(ids, cache)[-1].argmax()))
        caches.append(cache)
    tokens = batched_decode(engine.model, tokens, caches).argmax(-1).tolist()  # warm-up
    sync(engine.device)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tokens = batched_decode(engine.model, tokens, caches).argmax(-1).tolist()
        sync(engine.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"batched step of {streams} sequences, {steps} steps:\n{table}"

