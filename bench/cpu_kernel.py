"""CPU expert kernel benchmark (issue 3): GB/s of expert weights streamed at M=1 next to the
machine's read bandwidth measured here (the fraction is the figure of merit), and GFLOP/s of
CPU prefill at M=64 and M=512. Shapes default to DeepSeek-V2-Lite (D=2048, I=1408, top-6 of 64).

    python3 bench/cpu_kernel.py [--threads 1 2] [--quant int4 int8] [--group-size 128]

Weights are random bytes in the CPU layout (the kernel's speed does not depend on values);
each M=1 call routes to fresh random experts of the next of --layers layers (default 4 layers,
1.1 GB in INT4), so weights come from memory, not from a large L3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import krasis_native
import numpy as np


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


def read_bandwidth_gbs(runner, n_bytes: int, repeats: int) -> float:
    buf = np.ones(n_bytes, dtype=np.uint8)
    runner.stream_read(buf)  # touch pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.stream_read(buf)
        times.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(times) / 1e9


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--quant", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--calls", type=int, default=60, help="M=1 calls per figure")
    parser.add_argument("--layers", type=int, default=4, help="distinct layers cycled at M=1")
    parser.add_argument("--read-mib", type=int, default=1024)
    parser.add_argument("--prefill", type=int, nargs="*", default=[64, 512])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"isa={krasis_native.isa()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"D={args.hidden} I={args.width} "
          f"top-{args.top_k} of {args.experts}, group {args.group_size}")
    for threads in args.threads:
        runner = krasis_native.MoE(threads)
        read_gbs = read_bandwidth_gbs(runner, args.read_mib << 20, repeats=5)
        print(f"\nthreads={threads}: memory read {read_gbs:.1f} GB/s (native sum over "
              f"{args.read_mib} MiB, median of 5)")
        for quant in args.quant:
            bits = 4 if quant == "int4" else 8
            layers = [make_layer(args.experts, args.hidden, args.width, bits, args.group_size, rng)
                      for _ in range(args.layers)]
            per_call = [time_forward(runner, layers, bits, args.group_size, 1, args.experts,
                                     args.top_k, args.calls, rng) for _ in range(3)]
            seconds = statistics.median(per_call)
            gbs = args.top_k * layer_bytes_per_expert(layers[0]) / seconds / 1e9
            print(f"  {quant} M=1: {seconds * 1e3:.3f} ms/layer, {gbs:.1f} GB/s of expert "
                  f"weights = {gbs / read_gbs:.0%} of read bandwidth")
            for tokens in args.prefill:
                seconds = statistics.median(
                    [time_forward(runner, layers[:1], bits, args.group_size, tokens, args.experts,
                                  args.top_k, 1, rng) for _ in range(3)])
                flops = 2 * tokens * args.top_k * 3 * args.hidden * args.width
                print(f"  {quant} M={tokens}: {seconds * 1e3:.1f} ms/layer, "
                      f"{flops / seconds / 1e9:.1f} GFLOP/s")
            del layers


if __name__ == "__main__":
    main()
