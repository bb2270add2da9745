"""CPU expert kernel benchmark (issue 3): GB/s of expert weights streamed at M=1 next to the
machine's read bandwidth measured here (the fraction is the figure of merit), and GFLOP/s of
CPU prefill at M=64 and M=512. Shapes default to DeepSeek-V2-Lite (D=2048, I=1408, top-6 of 64).

    python3 bench/cpu_kernel.py [--threads 1 2] [--quant int4 int8] [--group-size 128]
    python3 bench/cpu_kernel.py --accuracy [--seeds 3] [--tokens 64]
    python3 bench/cpu_kernel.py --fixed-cost [--threads 1 2] [--gap-us 0 200] [--spin-us 0 2000]

--accuracy measures instead the max and mean logit error of INT8 and INT4 against the float
model, through load(), on random transformers DeepSeek-V2 models, and the round-to-nearest
weight error of each format.

--fixed-cost shows the fixed cost of one M=1 call directly: per-call time of a layer whose
weights stay in cache (one expert of --fixed-width rows, top-1) beside the full layer and its
bandwidth roofline (expert bytes / read GB/s), with an idle gap of --gap-us busy-waited between
calls (hybrid decode leaves ~100-200 us of GPU attention between two layers' calls), and the
binding's own cost (an M=0 call, which returns after the argument checks). --spin-us 0 2000
compares workers that sleep at once (each call pays their wake-up) with spinning ones.

Weights are random bytes in the CPU layout (the kernel's speed does not depend on values);
each M=1 call routes to fresh random experts of the next of --layers layers (default 4 layers,
1.1 GB in INT4), so weights come from memory, not from a large L3.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import krasis_native
import numpy as np
import torch

from krasisd.engine import engine as engine_mod
from krasisd.engine.quant import BITS, quantization_error


def make_layer(n_experts: int, hidden: int, width: int, bits: int, group_size: int, rng):
    """Random (gate_q, gate_s, up_q, up_s, down_q, down_s) arrays in the CPU layout."""
    div = 2 if bits == 4 else 1
    qdtype = np.uint8 if bits == 4 else np.int8

    def proj(rows: int, cols: int):
        q = rng.integers(0, 256, size=(n_experts, rows, cols // div), dtype=np.uint8).view(qdtype)
        s = rng.uniform(1e-3, 2e-3, size=(n_experts, rows, cols // group_size)).astype(np.float32)
        return q, s

    return (*proj(width, hidden), *proj(width, hidden), *proj(hidden, width))


def layer_bytes_per_expert(layer) -> int:
    return sum(a[0].nbytes for a in layer)


def time_forward(runner, layers, bits, group_size, tokens, n_experts, top_k, calls, rng) -> float:
    """Median seconds per fused MoE call over ``calls`` calls, cycling through ``layers``
    with fresh random routing."""
    hidden = layers[0][4].shape[1]
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)  # [M, D]
    weights = np.full((tokens, top_k), 1.0 / top_k, dtype=np.float32)  # [M, K]
    out = np.empty((tokens, hidden), dtype=np.float32)  # [M, D]
    times = []
    for call in range(calls):
        layer = layers[call % len(layers)]
        ids = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(tokens)])  # [M, K]
        t0 = time.perf_counter()
        runner.forward(x, ids.astype(np.int64), weights, *layer, bits, group_size, out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def busy_wait(seconds: float) -> None:
    """Holds the caller busy (as a thread waiting on the GPU would be) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def call_times(runner, layers, bits, group_size, routes, weights, gap_s) -> list[float]:
    """Seconds of each M=1 call, routes precomputed ([calls] of [1, K] ids), ``gap_s`` of busy
    idle before each call."""
    hidden = layers[0][4].shape[1]
    x = np.random.default_rng(1).standard_normal((1, hidden)).astype(np.float32)  # [1, D]
    out = np.empty((1, hidden), dtype=np.float32)  # [1, D]
    times = []
    for call, ids in enumerate(routes):
        layer = layers[call % len(layers)]
        busy_wait(gap_s)
        t0 = time.perf_counter()
        runner.forward(x, ids, weights, *layer, bits, group_size, out)
        times.append(time.perf_counter() - t0)
    return times


def binding_seconds(runner, layer, bits, group_size, calls: int) -> float:
    """Median seconds of an M=0 call: the argument checks alone (no kernel runs)."""
    hidden = layer[4].shape[1]
    x = np.empty((0, hidden), dtype=np.float32)  # [0, D]
    ids, weights = np.empty((0, 1), dtype=np.int64), np.empty((0, 1), dtype=np.float32)
    out = np.empty((0, hidden), dtype=np.float32)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.forward(x, ids, weights, *layer, bits, group_size, out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_runner(threads: int, spin_us: int | None):
    """A runner whose workers spin ``spin_us`` (None: KRASIS_NATIVE_SPIN_US as set)."""
    if spin_us is None:
        return krasis_native.MoE(threads)
    saved = os.environ.get("KRASIS_NATIVE_SPIN_US")
    os.environ["KRASIS_NATIVE_SPIN_US"] = str(spin_us)
    try:
        return krasis_native.MoE(threads)
    finally:
        if saved is None:
            del os.environ["KRASIS_NATIVE_SPIN_US"]
        else:
            os.environ["KRASIS_NATIVE_SPIN_US"] = saved


def fixed_cost(args) -> None:
    """Per-call time of a cached one-expert layer vs the full M=1 layer and its roofline."""
    rng = np.random.default_rng(0)
    read_buf = np.ones(args.read_mib << 20, dtype=np.uint8)
    print(f"isa={krasis_native.isa()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"D={args.hidden} I={args.width} top-{args.top_k} of {args.experts}, group "
          f"{args.group_size}; cached layer: 1 expert x {args.fixed_width} rows, top-1; "
          f"medians of {args.rounds} rounds x {args.calls} calls, times in us")
    for quant in args.quant:
        bits = BITS[quant]
        layers = [make_layer(args.experts, args.hidden, args.width, bits, args.group_size, rng)
                  for _ in range(args.layers)]
        small = [make_layer(1, args.hidden, args.fixed_width, bits, args.group_size, rng)]
        full_bytes = args.top_k * layer_bytes_per_expert(layers[0])
        small_bytes = layer_bytes_per_expert(small[0])
        for threads in args.threads:
            for spin in args.spin_us or [None]:
                runner = make_runner(threads, spin)
                bind_us = binding_seconds(runner, layers[0], bits, args.group_size,
                                          args.calls) * 1e6
                for gap_us in args.gap_us:
                    row = fixed_cost_row(runner, layers, small, bits, args, gap_us * 1e-6,
                                         read_buf, rng)
                    roof_us = full_bytes / (row["read_gbs"] * 1e9) * 1e6
                    print(f"{quant} threads={threads} spin={getattr(runner, 'spin_us', '?')} "
                          f"gap={gap_us:g}: cached {row['small_s'] * 1e6:.1f} "
                          f"({small_bytes >> 10} KiB), full {row['full_s'] * 1e6:.1f} "
                          f"({full_bytes >> 20} MiB), roofline {roof_us:.1f} at "
                          f"{row['read_gbs']:.1f} GB/s read, full - roofline "
                          f"{row['full_s'] * 1e6 - roof_us:.1f}; binding {bind_us:.1f}")
                del runner
        del layers


def fixed_cost_row(runner, layers, small, bits, args, gap_s, read_buf, rng) -> dict:
    """Medians over rounds of (read GB/s, cached-layer call s, full-layer call s)."""
    top1 = np.ones((1, 1), dtype=np.float32)  # [1, 1]
    topk = np.full((1, args.top_k), 1.0 / args.top_k, dtype=np.float32)  # [1, K]
    reads, smalls, fulls = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        runner.stream_read(read_buf)
        reads.append(read_buf.nbytes / (time.perf_counter() - t0) / 1e9)
        zero = [np.zeros((1, 1), dtype=np.int64)] * args.calls
        smalls += call_times(runner, small, bits, args.group_size, zero, top1, gap_s)
        routes = [rng.permutation(args.experts)[None, :args.top_k].astype(np.int64)
                  for _ in range(args.calls)]
        fulls += call_times(runner, layers, bits, args.group_size, routes, topk, gap_s)
    return {"read_gbs": statistics.median(reads), "small_s": statistics.median(smalls),
            "full_s": statistics.median(fulls)}


def save_random_deepseek(path: Path, seed: int) -> None:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=64,
        q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    )
    DeepseekV2ForCausalLM(config).save_pretrained(path)


def logit_errors(model_dir: Path, cache_root: Path, prompt: list[int]) -> dict[str, dict]:
    ref = engine_mod.load(model_dir, quant="none").logits(prompt)  # [T, V]
    scale = float(ref.abs().max())
    out = {}
    for quant in ("int8", "int4"):
        engine = engine_mod.load(model_dir, quant=quant, cache_dir=cache_root / quant)
        logits = engine.logits(prompt)  # [T, V]
        diff = (logits - ref).abs()  # [T, V]
        top1 = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        out[quant] = {"max": float(diff.max()) / scale, "mean": float(diff.mean()) / scale,
                      "top1": top1}
        engine.close()
    return out


def accuracy(args) -> None:
    """Logit error of INT8/INT4 vs float through load(), on random DeepSeek-V2 models."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    weights = torch.randn(256, 2048)
    for bits in (8, 4):
        err = quantization_error(weights, bits, 128)
        print(f"INT{bits} g128 round-to-nearest weight error: rel RMS {err['rel_rms']:.2%}")
    results: dict[str, list[dict]] = {"int8": [], "int4": []}
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            save_random_deepseek(model_dir, seed)
            prompt = torch.randint(0, 512, (args.tokens,), generator=torch.Generator().manual_seed(seed))
            for quant, err in logit_errors(model_dir, Path(tmp) / "cache", prompt.tolist()).items():
                results[quant].append(err)
    for quant, runs in results.items():
        print(f"{quant}: logit error / max|float logit| over {args.seeds} random models, "
              f"{args.tokens} tokens: max {max(r['max'] for r in runs):.2%}, "
              f"mean {statistics.mean(r['mean'] for r in runs):.3%}, "
              f"top-1 agreement {statistics.mean(r['top1'] for r in runs):.1%}")


def m1_rounds(runner, layers, bits, args, read_buf, rng) -> tuple[float, float, float]:
    """Interleaved rounds of (read probe, M=1 kernel calls), so both see the same load on a
    shared machine; returns medians of (read GB/s, kernel GB/s, kernel / read)."""
    bytes_per_call = args.top_k * layer_bytes_per_expert(layers[0])
    reads, kernels, fractions = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        runner.stream_read(read_buf)
        read_gbs = read_buf.nbytes / (time.perf_counter() - t0) / 1e9
        seconds = time_forward(runner, layers, bits, args.group_size, 1, args.experts, args.top_k,
                               args.calls, rng)
        reads.append(read_gbs)
        kernels.append(bytes_per_call / seconds / 1e9)
        fractions.append(kernels[-1] / read_gbs)
    return statistics.median(reads), statistics.median(kernels), statistics.median(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--quant", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--calls", type=int, default=30, help="M=1 calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of read probe + M=1 calls")
    parser.add_argument("--layers", type=int, default=4, help="distinct layers cycled at M=1")
    parser.add_argument("--read-mib", type=int, default=1024)
    parser.add_argument("--prefill", type=int, nargs="*", default=[64, 512])
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: logit error of INT8/INT4 on random models through load()")
    parser.add_argument("--fixed-cost", action="store_true",
                        help="instead: per-call time of a cached layer vs the full M=1 layer")
    parser.add_argument("--fixed-width", type=int, default=128,
                        help="rows of the cached layer's expert for --fixed-cost")
    parser.add_argument("--gap-us", type=float, nargs="+", default=[0.0, 200.0],
                        help="busy idle before each call for --fixed-cost (us)")
    parser.add_argument("--spin-us", type=int, nargs="*", default=[],
                        help="--fixed-cost: runners with these idle spins (0: workers sleep "
                             "at once, so each call pays their wake-up); default: as set")
    parser.add_argument("--seeds", type=int, default=3, help="random models for --accuracy")
    parser.add_argument("--tokens", type=int, default=64, help="prompt tokens for --accuracy")
    args = parser.parse_args()
    if args.accuracy:
        return accuracy(args)
    if args.fixed_cost:
        return fixed_cost(args)
    rng = np.random.default_rng(0)
    print(f"isa={krasis_native.isa()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"D={args.hidden} I={args.width} top-{args.top_k} of {args.experts}, "
          f"group {args.group_size}")
    read_buf = np.ones(args.read_mib << 20, dtype=np.uint8)
    for quant in args.quant:
        bits = BITS[quant]
        layers = [make_layer(args.experts, args.hidden, args.width, bits, args.group_size, rng)
                  for _ in range(args.layers)]
        for threads in args.threads:
            runner = krasis_native.MoE(threads)
            read_gbs, kernel_gbs, fraction = m1_rounds(runner, layers, bits, args, read_buf, rng)
            ms = args.top_k * layer_bytes_per_expert(layers[0]) / kernel_gbs / 1e6
            print(f"{quant} threads={threads} M=1: {ms:.3f} ms/layer, {kernel_gbs:.1f} GB/s of "
                  f"expert weights; memory read {read_gbs:.1f} GB/s; fraction {fraction:.0%}")
            for tokens in args.prefill:
                seconds = statistics.median(
                    [time_forward(runner, layers[:1], bits, args.group_size, tokens,
                                  args.experts, args.top_k, 1, rng) for _ in range(3)])
                flops = 2 * tokens * args.top_k * 3 * args.hidden * args.width
                print(f"{quant} threads={threads} M={tokens}: {seconds * 1e3:.1f} ms/layer, "
                      f"{flops / seconds / 1e9:.1f} GFLOP/s")
        del layers
    print(f"load at end={os.getloadavg()[0]:.1f} (medians over {args.rounds} rounds; "
          "read = native sum of a buffer larger than L3 with the same threads)")


if __name__ == "__main__":
    main()
