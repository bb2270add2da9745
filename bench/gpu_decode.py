"""GPU hybrid decode benchmark: the seed's decode table for S1 (16 GiB) and S2 (4 GiB), and S2
with GPU experts off (every routed expert on the CPU), or S3 (8 GiB) with --model
qwen3-30b-a3b, plus TTFT of a 10K-token prompt, load time from the dual-format cache (warm
and cold), cache size on disk, the share of experts resident on the GPU, and 1 / 4 / 8
concurrent streams.

The shapes of --model (bench/configs/NAME.json; DeepSeek-V2-Lite by default), synthetic
weights drawn on the GPU and quantized there straight into both cache formats (INT4, the
group size a cache build picks for the model); the dense weights go to one bf16
safetensors file. A load reads them back as a runner would: dense to the GPU, the GPU cache
into pinned memory, the CPU cache memory-mapped; nothing is re-quantized. Each decode row gives ms per token (avg, p50, min, max over all timed tokens
of several runs) and the physical limits beside it: CPU expert bytes per token over the
host read rate measured here with the native thread pool, and GPU bytes per token over the
device copy rate measured here.

    PYTHONPATH=. python3 bench/gpu_decode.py --out results.json     # on the GPU machine
    PYTHONPATH=. python3 bench/gpu_decode.py --model qwen3-30b-a3b  # S3 and S3-cpu
    python3 bench/gpu_decode.py --smoke [--model NAME]              # tiny model, CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if "--smoke" in sys.argv:  # the tiny model runs the Triton kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_cli import log, make_dir, positive_int, positive_ints  # noqa: E402
from decode_caches import (  # noqa: E402
    DEFAULT_MODEL,
    MODELS,
    TUNING,
    bench_config,
    build_caches,
    check_cache_model,
    drop_page_cache,
    load_caches,
    measure_bandwidths,
    place_experts,
    release_loaded,
    small_cpu_engine,
    sync,
)
from decode_timing import decode_table, streams_table  # noqa: E402

from krasisd.config import parse_size_bytes  # noqa: E402
from krasisd.engine.gpu.dense_decode import replace_module  # noqa: E402
from krasisd.engine.gpu.graphs import HybridEngine  # noqa: E402
from krasisd.engine.gpu.hybrid import HybridExperts  # noqa: E402
from krasisd.engine.gpu.synthetic import dense_bytes  # noqa: E402
from krasisd.engine.heat import ExpertHeat, hit_rate  # noqa: E402
from krasisd.engine.kv_cache import new_kv_cache  # noqa: E402
from krasisd.engine.native_experts import NativeExperts  # noqa: E402

SEED_DECODE = {100: (177.0, 5.6)}  # context: (ms/token, tok/s) of the seed, docs/PERFORMANCE.md
TARGETS = {"S1": 500.0, "S2": 80.0, "S2-cpu": 80.0}  # tok/s at context 1000 (issue 7)

# Scenarios: name=budget[:mode[+mode]], comma-separated. A new mode is one entry here and
# its effect in run_scenario.
SCENARIO_MODES = {
    "off": "no GPU experts: every routed expert on the CPU",
    "unfused": "torch ops instead of the fused Triton kernels",
    "grouped": "decode experts through the prefill's grouped kernels, not moe_decode's",
    "bf16": "dense linears in bf16 (the default: the CPU cache's quantized ones)",
}
DEFAULT_SCENARIOS = {"deepseek-v2-lite": "S1=16GiB,S2=4GiB,S2-cpu=4GiB:off",
                     "qwen3-30b-a3b": "S3=8GiB,S3-cpu=8GiB:off"}
SMOKE_SCENARIOS = {"deepseek-v2-lite": "S1=1GiB,S2-cpu=1GiB:off",
                   "qwen3-30b-a3b": "S3=1GiB,S3-cpu=1GiB:off"}


@dataclass(frozen=True)
class Scenario:
    """One placement to measure: a VRAM budget ("16GiB") and the modes of SCENARIO_MODES."""

    name: str
    budget: str
    modes: frozenset[str] = frozenset()


def parse_scenarios(text: str) -> list[Scenario]:
    """Scenarios from ``name=budget[:mode[+mode]],...``; ValueError names the bad one."""
    scenarios = []
    for spec in text.split(","):
        name, equals, rest = spec.strip().partition("=")
        budget, _, mode_text = rest.partition(":")
        if not (name and equals and budget):
            raise ValueError(f"scenario {spec!r}: use name=budget[:mode[+mode]], "
                             "e.g. S2-cpu=4GiB:off")
        try:
            parse_size_bytes(budget)
        except ValueError as exc:
            raise ValueError(f"scenario {spec!r}: {exc}") from None
        modes = frozenset(mode for mode in mode_text.split("+") if mode)
        unknown = sorted(modes - SCENARIO_MODES.keys())
        if unknown:
            raise ValueError(f"scenario {spec!r}: unknown mode {', '.join(unknown)} "
                             f"(modes: {', '.join(SCENARIO_MODES)})")
        if any(s.name == name for s in scenarios):
            raise ValueError(f"scenario name {name!r} given twice")
        scenarios.append(Scenario(name, budget, modes))
    return scenarios


# -- measurements of the machine ----------------------------------------------------------

def make_engine(loaded, budget, gpu_experts: bool, threads: int, max_tokens: int,
                use_graphs: bool, fused: bool = True) -> tuple[HybridEngine, dict]:
    """A HybridEngine over the loaded caches, placed under ``budget``."""
    config, model, host = loaded["config"], loaded["model"], loaded["host"]
    device = model.model.embed_tokens.weight.device
    dense = dense_bytes(model)
    kv_bytes = new_kv_cache(config, max_tokens, torch.bfloat16, "meta").nbytes
    start = time.perf_counter()
    gpu, chunk = place_experts(host, config, device, parse_size_bytes(budget), dense, kv_bytes,
                               max_tokens)
    sync(device)
    arena_s = time.perf_counter() - start
    heat = ExpertHeat(sorted(host.layers), host.num_experts, device)
    backend = HybridExperts(gpu, NativeExperts(loaded["cpu_cache"], threads=threads), device,
                            use_gpu_experts=gpu_experts, heat=heat, tuning=TUNING)
    engine = HybridEngine(config, model, backend, eos_token_ids=set(), use_graphs=use_graphs,
                          fused_kernels=fused)
    info = dict(gpu.plan.summary(), chunk_tokens=chunk, arena_upload_s=arena_s,
                decode_resident_fraction=backend.resident_fraction())
    return engine, info


def set_dense(loaded, quantized: bool) -> None:
    """Put the model's quantized dense linears (from the CPU cache, as load_hybrid does by
    default) or its bf16 ones in place (both kept by decode_caches.load_caches)."""
    for name, module in loaded["dense_swaps"]["quant" if quantized else "float"].items():
        replace_module(loaded["model"], name, module)


def release(engine) -> None:
    import gc

    model = engine.model
    engine.close()  # with its decode steps and their graphs
    model.expert_backend = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def physical_limits(engine, bw: dict) -> dict:
    """Bytes per token on each side over the measured rates, with the routes seen so far."""
    backend, config = engine.expert_backend, engine.config
    resident = {layer: tuple(int(e) for e in mask.nonzero()[0])
                for layer, mask in backend.resident_np.items()}
    hits = hit_rate(backend.heat.as_dict(), resident)
    slots = len(backend.moe_layers) * config.num_experts_per_tok  # routed experts per token
    cpu_layer_bytes = statistics.mean(r["bytes"] for r in backend.cpu.cache.manifest["layers"]
                                      .values()) if backend.cpu.cache.layers else 0
    cpu_expert_bytes = cpu_layer_bytes / config.n_routed_experts
    cpu_bytes = slots * (1 - hits) * cpu_expert_bytes
    model = engine.model
    embed = model.model.embed_tokens.weight  # read one row per token
    dense = dense_bytes(model) - embed.numel() * embed.element_size()
    gpu_bytes = dense + slots * hits * backend.gpu.layout.expert_bytes
    cpu_s, gpu_s = cpu_bytes / bw["host_read_bytes_s"], gpu_bytes / bw["hbm_bytes_s"]
    return {"hit_rate": hits, "cpu_bytes_per_token": cpu_bytes,
            "gpu_bytes_per_token": gpu_bytes, "cpu_limit_tok_s": 1 / cpu_s if cpu_s else None,
            "gpu_limit_tok_s": 1 / gpu_s, "limit_tok_s": 1 / max(cpu_s, gpu_s)}


def stream_steps(row: dict) -> str:
    """The timed decode steps of a streams row, and the time inside their forwards."""
    return (f"{row['steps']} decode steps, "
            f"{100 * row['in_steps_fraction']:.0f} % of the time inside forwards")


def run_scenario(scenario: Scenario, loaded, args, bw, rng) -> dict:
    """One scenario, its modes as SCENARIO_MODES describes them."""
    name, budget, modes = scenario.name, scenario.budget, scenario.modes
    gpu_experts, fused = "off" not in modes, "unfused" not in modes
    set_dense(loaded, quantized="bf16" not in modes)
    engine, plan_info = make_engine(loaded, budget, gpu_experts, args.threads,
                                    max_tokens=max(args.contexts) + args.steps + 2,
                                    use_graphs=not args.no_graphs, fused=fused)
    if "grouped" in modes:  # the prefill's grouped kernels for one token too
        engine.expert_backend.gemv_max_slots = 0
    log(f"\n{name}: budget {budget}, GPU experts {'on' if gpu_experts else 'off'}, "
        f"{'fused' if fused else 'unfused'} kernels, dense "
        f"{'bf16' if 'bf16' in modes else 'from the CPU cache (quantized)'}, {plan_info}")
    rows = decode_table(engine, plan_info["chunk_tokens"], args.contexts, args.steps, args.runs,
                        args.ttft_runs, rng)
    limits = physical_limits(engine, bw)
    if args.profile:
        from decode_profile import profile_decode

        if engine.expert_backend.has_cpu_part(engine.expert_backend.moe_layers[0]):
            from decode_profile import profile_host  # first: torch.profiler slows later steps

            log(profile_host(engine, min(args.contexts[-1], 1000), steps=32))
        log(profile_decode(engine, min(args.contexts[-1], 1000), steps=16))
        if not args.skip_streams and max(args.streams) > 1:
            from decode_profile import profile_batched

            log(profile_batched(engine, max(args.streams)))
    for row in rows:
        log(f"{name} ctx {row['context']:>6}: avg {row['avg_ms']:7.2f} ms  p50 "
            f"{row['p50_ms']:7.2f}  min {row['min_ms']:7.2f}  max {row['max_ms']:7.2f}  "
            f"{row['tok_s']:7.1f} tok/s   TTFT {row['ttft_s'] * 1e3:8.1f} ms   "
            f"limit {limits['limit_tok_s']:.0f} tok/s")
    streams = []
    if not args.skip_streams:
        streams = streams_table(engine, args.streams, args.stream_steps, 100, rng)
        for row in streams:
            log(f"{name} {row['streams']} streams: {row['tok_s']:.1f} tok/s "
                f"({row['per_stream_tok_s']:.1f} per stream; {stream_steps(row)})")
    replacement = engine.rebalance(min_gain=0.0)  # by the heat of this run: its cost
    log(f"{name} re-placement: hit rate {replacement['hit_rate_before']:.3f} -> "
        f"{replacement['hit_rate_after']:.3f}, {replacement['experts_changed']} experts moved, "
        f"{replacement['bytes_copied'] / 1e9:.2f} GB copied in {replacement['ms']:.0f} ms")
    result = {"scenario": name, "budget": budget, "modes": sorted(modes),
              "gpu_experts": gpu_experts, "fused": fused, "plan": plan_info,
              "rows": rows, "limits": limits, "streams": streams, "replacement": replacement,
              "graph_failures": engine.graph_failures}
    release(engine)
    return result


def print_summary(results, bw, loads, sizes) -> None:
    log(f"\nmeasured: host read {bw['host_read_bytes_s'] / 1e9:.1f} GB/s "
        f"({bw['threads']} threads), device copy {bw['hbm_bytes_s'] / 1e12:.2f} TB/s, "
        f"pinned H2D {bw['h2d_bytes_s'] / 1e9:.1f} GB/s")
    log(f"cache on disk: cpu {sizes['cpu'] / 1e9:.2f} GB, gpu {sizes['gpu'] / 1e9:.2f} GB, "
        f"dense {sizes['dense'] / 1e9:.2f} GB")
    for kind, times in loads.items():
        log(f"load ({kind}): " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    log("\n| scenario | resident | context | avg ms | p50 ms | min ms | max ms | tok/s "
        "| limit tok/s | TTFT |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        frac = res["plan"]["decode_resident_fraction"]
        for r in res["rows"]:
            log(f"| {res['scenario']} | {100 * frac:.0f}% | {r['context']} | {r['avg_ms']:.2f} "
                f"| {r['p50_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} "
                f"| {r['tok_s']:.1f} | {res['limits']['limit_tok_s']:.0f} "
                f"| {r['ttft_s'] * 1e3:.0f} ms |")
    for res in results:
        if res["streams"]:
            log(f"{res['scenario']} streams: " + ", ".join(
                f"{r['streams']}: {r['tok_s']:.1f} tok/s" for r in res["streams"]))


def cpu_streams(args) -> int:
    """1 / 4 / 8 streams on the CPU alone: a small model of --model's shape, native INT4
    experts."""
    torch.set_num_threads(1)  # torch's OpenMP pool beside the native pool oversubscribes
    engine = small_cpu_engine(args.model, args.threads)
    config = engine.config
    rows = streams_table(engine, args.streams, args.stream_steps, 100,
                         torch.Generator().manual_seed(0))
    log(f"CPU only ({args.threads} threads), {args.model} shape, hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.n_routed_experts} INT4 experts "
        f"top-{config.num_experts_per_tok}:")
    for row in rows:
        log(f"  {row['streams']} streams: {row['tok_s']:.1f} tok/s "
            f"({row['per_stream_tok_s']:.1f} per stream; {stream_steps(row)})")
    return 0


def load_only(root: Path, device: str, smoke: bool, model: str) -> int:
    """Build the caches under ``root`` when missing, then time one load in this process: run
    twice, the second run is a fresh process's load with the page cache full (warm)."""
    config = bench_config(smoke, model)
    if not (root / "gpu" / "manifest.json").is_file():
        build_caches(root, device, smoke, model)
        log("caches built; run again for a fresh process's load")
    try:
        check_cache_model(root, model, smoke)
    except (OSError, ValueError) as exc:
        log(f"--load-only: {exc}")
        return 2
    _, times = load_caches(root, config, device)
    log(f"load in this process: {json.dumps({k: round(v, 2) for k, v in times.items()})} s")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL,
                        help="the shapes to benchmark (bench/configs/MODEL.json)")
    parser.add_argument("--contexts", type=positive_ints, default=[100, 1000, 10000])
    parser.add_argument("--steps", type=positive_int, default=32, help="tokens per timed run")
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--ttft-runs", type=positive_int, default=3)
    parser.add_argument("--streams", type=positive_ints, default=[1, 4, 8])
    parser.add_argument("--stream-steps", type=positive_int, default=24)
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument("--scenarios", default=None,
                        help="name=budget[:mode[+mode]],... with modes "
                        f"{', '.join(SCENARIO_MODES)} (default: {DEFAULT_SCENARIOS[DEFAULT_MODEL]}"
                        "; with --model qwen3-30b-a3b: "
                        f"{DEFAULT_SCENARIOS['qwen3-30b-a3b']})")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU expert threads "
                        "(default: cores minus one)")
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print each scenario's kernels per decode step (torch.profiler)")
    parser.add_argument("--cache-dir", default=None,
                        help="where to write the caches (created when missing)")
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--load-only", metavar="DIR", default=None,
                        help="only time a load from the caches in DIR (built when missing)")
    parser.add_argument("--cpu-streams", action="store_true",
                        help="only 1/4/8 streams of a small model on the CPU (no GPU needed)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.steps, args.runs, args.ttft_runs = [20, 60], 4, 2, 1
        args.stream_steps = 3
    default = (SMOKE_SCENARIOS if args.smoke else DEFAULT_SCENARIOS)[args.model]
    try:
        args.scenarios = parse_scenarios(args.scenarios or default)
    except ValueError as exc:
        parser.error(f"--scenarios: {exc}")
    for flag in ("cache_dir", "load_only"):
        if getattr(args, flag) is not None:
            setattr(args, flag, make_dir(parser, getattr(args, flag),
                                         "--" + flag.replace("_", "-")))
    return args


def measure_loads(root: Path, config, device: str, smoke: bool) -> tuple[dict, dict]:
    """A cold load (page cache dropped where permitted), then a warm one: (loaded, times)."""
    loads = {}
    cold = False if smoke else drop_page_cache()  # never on a shared dev machine
    loaded, loads["cold" if cold else "cold (not permitted: page cache kept)"] = (
        load_caches(root, config, device))
    release_loaded(loaded)
    loaded, loads["warm"] = load_caches(root, config, device)
    for kind, times in loads.items():
        log(f"load {kind}: {json.dumps({k: round(v, 2) for k, v in times.items()})} s")
    return loaded, loads


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_streams:
        args.threads = args.threads or 2
        return cpu_streams(args)
    if not args.smoke and not torch.cuda.is_available():
        log("needs a CUDA GPU (or --smoke)")
        return 2
    device = "cpu" if args.smoke else "cuda"
    if args.load_only:
        return load_only(args.load_only, device, args.smoke, args.model)
    torch.set_num_threads(1)  # the CPU's cores belong to the native expert pool
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    args.threads = threads
    bw = measure_bandwidths(device, threads, small=args.smoke)
    log(f"host read {bw['host_read_bytes_s'] / 1e9:.1f} GB/s with {threads} threads, device copy "
        f"{bw['hbm_bytes_s'] / 1e9:.0f} GB/s, pinned H2D {bw['h2d_bytes_s'] / 1e9:.1f} GB/s")
    rng = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        start = time.perf_counter()
        config, sizes = build_caches(Path(tmp), device, args.smoke, args.model)
        log(f"{args.model} caches built in {time.perf_counter() - start:.1f} s: "
            f"{json.dumps({k: round(v / 1e9, 2) for k, v in sizes.items()})} GB")
        if device == "cuda":
            torch.cuda.empty_cache()
        loaded, loads = measure_loads(Path(tmp), config, device, args.smoke)
        results = []
        for scenario in args.scenarios:
            try:
                results.append(run_scenario(scenario, loaded, args, bw, rng))
            except Exception as exc:  # report and go on with the other scenarios
                log(f"{scenario.name} failed: {type(exc).__name__}: {exc}")
                if args.smoke:
                    raise
    print_summary(results, bw, loads, sizes)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "bandwidths": bw, "cache_bytes": sizes,
                       "loads": loads, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
