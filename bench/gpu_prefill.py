"""GPU prefill benchmark: the seed's prefill table for scenarios S1 (16 GiB) and S2 (4 GiB).

DeepSeek-V2-Lite shapes (the real config, below), synthetic weights drawn on the GPU and
quantized there straight into the GPU format (INT4, group 128), so no 31 GB bf16 files.
The whole model runs through the engine's own model code (MLA attention, router, shared
experts) with GpuExperts and the prefill driver. For each prompt length: median wall time
of several passes, tok/s, bytes copied per pass and copy-stream busy time, peak memory, and
the physical floors (bytes over the measured pinned host-to-device rate, FLOPs over the
measured bf16 matmul rate).

Run on the GPU machine:  PYTHONPATH=. python3 bench/gpu_prefill.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from bench_cli import log
from decode_caches import copy_rate, place_experts, sync

from krasisd.config import parse_size_bytes
from krasisd.engine.config import ModelConfig
from krasisd.engine.gpu.driver import prefill_logits
from krasisd.engine.gpu.format import QuantSpec
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    dense_bytes,
    synthetic_host_experts,
    synthetic_model,
)
from krasisd.engine.kv_cache import new_kv_cache

# configs/deepseek-v2-lite.json of the product (the real model's config), verbatim in substance
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
SEED_TABLE = {100: (11.13, 9.0), 500: (10.61, 47.1), 1000: (10.69, 93.6), 2000: (10.96, 182.5),
              5000: (11.97, 417.9), 10000: (14.28, 693.3)}  # tokens: (wall s, tok/s); 9,903 tokens


def measure_bf16_flops_per_s(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3)


def prefill_flops(cfg: ModelConfig, t: int) -> float:
    """Matmul FLOPs of one prefill of t tokens (causal attention counted as half)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    proj = d * h * qk + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    proj += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + v) + h * v * d
    attn = h * (t * t / 2) * (qk + v)
    moe = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    moe += d * cfg.n_routed_experts
    dense_mlp = 3 * d * cfg.intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    per_token = cfg.num_hidden_layers * proj + n_moe * moe + n_dense * dense_mlp
    return 2 * (t * per_token + cfg.num_hidden_layers * attn + d * cfg.vocab_size)


def time_prompt(model, backend, cache, t, runs, chunk, device):
    ids = torch.randint(0, model.config.vocab_size, (t,), device=device)
    walls, stats = [], []
    for i in range(runs + 1):  # the first run warms up (Triton compiles, cuDNN plans)
        cache.reset()
        sync(device)
        start = time.perf_counter()
        logits = prefill_logits(model, ids, cache, chunk_tokens=chunk)
        sync(device)
        wall = time.perf_counter() - start
        s = backend.take_stats()
        if i:
            walls.append(wall)
            stats.append(s)
    assert torch.isfinite(logits).all(), "non-finite logits"
    return walls, stats


def run_scenario(name, budget, model, host, cfg, dense, sizes, runs, impl, h2d, rate):
    device = model.lm_head.weight.device
    on_cuda = device.type == "cuda"
    budget_bytes = parse_size_bytes(budget)
    max_tokens = max(sizes)
    cache = new_kv_cache(cfg, max_tokens, model.lm_head.weight.dtype, device)
    kv_bytes = cache.nbytes
    backend, chunk = place_experts(host, cfg, device, budget_bytes, dense, kv_bytes, max_tokens,
                                   impl=impl, time_copies=True)
    model.expert_backend = backend
    summary = backend.plan.summary()
    log(f"\n{name} budget {budget} impl {impl} chunk {chunk}: {json.dumps(summary)}")
    rows = []
    for t in sizes:
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        walls, stats = time_prompt(model, backend, cache, t, runs, chunk, device)
        wall = statistics.median(walls)
        copied = statistics.median(s.bytes_copied for s in stats)
        busy_ms = statistics.median(s.copy_busy_ms for s in stats)
        flops = prefill_flops(cfg, t)
        row = {"scenario": name, "impl": impl, "tokens": t, "wall_s": wall, "tok_s": t / wall,
               "walls_s": walls, "bytes_copied": copied, "copy_busy_ms": busy_ms,
               "copy_floor_ms": 1e3 * copied / h2d, "flops": flops,
               "compute_floor_ms": 1e3 * flops / rate,
               "peak_alloc_bytes": torch.cuda.max_memory_allocated() if on_cuda else 0}
        rows.append(row)
        log(f"{name} {t:>6} tok  {1e3 * wall:9.1f} ms  {t / wall:9.0f} tok/s  copied "
            f"{copied / 1e9:6.2f} GB  busy {busy_ms:7.1f} ms  floors: copy "
            f"{row['copy_floor_ms']:6.1f} ms, compute {row['compute_floor_ms']:6.1f} ms  peak "
            f"{row['peak_alloc_bytes'] / 2**30:5.2f} GiB")
    model.expert_backend = None
    del backend, cache
    if on_cuda:
        torch.cuda.empty_cache()
    return {"scenario": name, "budget": budget, "impl": impl, "chunk_tokens": chunk,
            "plan": summary, "rows": rows}


def print_table(results, h2d, rate):
    log(f"\nmeasured: pinned H2D {h2d / 1e9:.1f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    log("| scenario | impl | tokens | wall | tok/s | seed tok/s | copied/pass | copy busy "
        "| copy floor | compute floor | peak VRAM |")
    log("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for r in res["rows"]:
            seed = SEED_TABLE.get(r["tokens"], (None, None))[1]
            log(f"| {r['scenario']} | {r['impl']} | {r['tokens']} | {r['wall_s'] * 1e3:.0f} ms "
                f"| {r['tok_s']:,.0f} | {seed or '-'} | {r['bytes_copied'] / 1e9:.2f} GB "
                f"| {r['copy_busy_ms']:.0f} ms | {r['copy_floor_ms']:.0f} ms "
                f"| {r['compute_floor_ms']:.0f} ms | {r['peak_alloc_bytes'] / 2**30:.2f} GiB |")


def write_json(path, h2d, rate, dense, expert_bytes, results) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"h2d_bytes_per_s": h2d, "bf16_flops_per_s": rate, "dense_bytes": dense,
                   "expert_bytes_total": expert_bytes, "results": results}, handle, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,500,1000,2000,5000,10000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenarios", default="S1,S2")
    parser.add_argument("--impls", default="triton,grouped_mm:S1")
    parser.add_argument("--budgets", default="S1=16GiB,S2=4GiB")
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU: checks this script, measures nothing")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        log("needs a CUDA GPU (or --smoke)")
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    budgets = dict(item.split("=") for item in args.budgets.split(","))
    raw, group, device = dict(DEEPSEEK_V2_LITE), 128, "cuda"
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the lazy Triton import
        raw, group, device = dict(TINY_DEEPSEEK_V2), 32, "cpu"
    cfg = ModelConfig.from_dict(raw)
    if device == "cuda":
        h2d = copy_rate(torch.empty(1 << 30, dtype=torch.uint8, device="cuda"),
                        torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True), 1)
        rate = measure_bf16_flops_per_s()
        log(f"{torch.cuda.get_device_name()}: pinned H2D {h2d / 1e9:.1f} GB/s, "
            f"bf16 {rate / 1e12:.0f} TFLOP/s")
    else:
        h2d, rate = 55e9, 600e12  # the GPU machine's figures from the design notes
    start = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = synthetic_model(cfg, device, dtype)
    dense = dense_bytes(model)
    host = synthetic_host_experts(cfg, QuantSpec(4, group), device, pin=device == "cuda")
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"synthetic model: dense {dense / 1e9:.2f} GB on the GPU, experts "
        f"{host.total_bytes / 1e9:.2f} GB pinned={host.is_pinned} "
        f"({time.perf_counter() - start:.1f} s)")
    results = []
    for spec in args.impls.split(","):
        impl, _, only = spec.partition(":")
        for name in args.scenarios.split(","):
            if only and name not in only.split("+"):
                continue
            try:
                results.append(run_scenario(name, budgets[name], model, host, cfg, dense, sizes,
                                            args.runs, impl, h2d, rate))
            except Exception as exc:  # report and go on with the other scenarios
                log(f"{name} {impl} failed: {type(exc).__name__}: {exc}")
                if args.smoke:
                    raise
            if args.out:  # after every scenario, so a run cut short keeps what it measured
                write_json(args.out, h2d, rate, dense, host.total_bytes, results)
    print_table(results, h2d, rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
