"""Synthetic caches for the decode benchmark (bench/gpu_decode.py), in the shapes of a model of
bench/configs/ (DeepSeek-V2-Lite or Qwen3-30B-A3B): dense weights as one bf16 safetensors file
and both expert formats (INT4, the model's group size), quantized on the device; loading them
back as a runner would; the machine's read and copy rates beside which the benchmark prints
its results."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from krasisd.config import default_home
from krasisd.engine.config import ModelConfig
from krasisd.engine.cpu_cache import FORMAT as CPU_FORMAT
from krasisd.engine.cpu_cache import cache_manifest, load_cpu_cache
from krasisd.engine.cpu_cache import file_record as cpu_file_record
from krasisd.engine.dense_plan import dense_plan
from krasisd.engine.gpu.backend import gpu_experts_for
from krasisd.engine.gpu.cache import cache_manifest as gpu_manifest
from krasisd.engine.gpu.cache import file_record as gpu_file_record
from krasisd.engine.gpu.cache import load_gpu_cache
from krasisd.engine.gpu.dense_decode import quantized_linears, set_tuning
from krasisd.engine.gpu.format import ExpertLayout, QuantSpec
from krasisd.engine.gpu.placement import PlacementError
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    TINY_QWEN3_MOE,
    synthetic_expert_weights,
    synthetic_model,
)
from krasisd.engine.gpu.tuning import KernelTuning
from krasisd.engine.models import build_model
from krasisd.engine.quant import pick_group_size, quantize

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL = "deepseek-v2-lite"
# model name (a config in configs/) -> the tiny config of the same architecture for --smoke
SMOKE_CONFIGS = {"deepseek-v2-lite": TINY_DEEPSEEK_V2, "qwen3-30b-a3b": TINY_QWEN3_MOE}
MODELS = tuple(SMOKE_CONFIGS)
SMOKE_SIZES = dict(hidden_size=128, moe_intermediate_size=64)  # INT4 packs 64-wide units
EXPERT_BITS = 4
DENSE_FILE = "dense_all.safetensors"  # the CPU cache's quantized dense linears
CHUNK_CHOICES = (8192, 4096, 2048, 1024)  # prefill chunk tokens, largest first
# kernel tiles timed once per shape and kept where a runner keeps them ($KRASIS_HOME/tuning)
TUNING = KernelTuning(default_home() / "tuning")


def measure_bandwidths(device: str, threads: int, small: bool) -> dict:
    """Host read rate with the native pool, device copy rate and pinned host-to-device rate."""
    import krasis_native
    import numpy as np

    nbytes = (64 << 20) if small else (4 << 30)
    buf = np.ones(nbytes // 8, dtype=np.uint64)  # touched: no page faults while timed
    runner = krasis_native.MoE(threads)
    best_s = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        runner.stream_read(buf)
        best_s = min(best_s, time.perf_counter() - start)
    out = {"host_read_bytes_s": nbytes / best_s, "threads": threads,
           "hbm_bytes_s": 3.35e12, "h2d_bytes_s": 55e9}  # placeholders off the GPU
    del buf, runner
    if device == "cuda":
        out["hbm_bytes_s"] = copy_rate(torch.empty(2 << 30, dtype=torch.uint8, device="cuda"),
                                        torch.empty(2 << 30, dtype=torch.uint8, device="cuda"), 2)
        out["h2d_bytes_s"] = copy_rate(torch.empty(1 << 30, dtype=torch.uint8, device="cuda"),
                                        torch.ones(1 << 30, dtype=torch.uint8, pin_memory=True), 1)
    return out


def copy_gb_s(device, nbytes: int = 1 << 30) -> float:
    """Device copy rate, read + write GB per second, of a ``nbytes`` tensor (NaN off the GPU)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return copy_rate(torch.empty_like(src), src, 2) / 1e9


def time_us(run, repeats: int, device, batches: int = 1) -> float:
    """Microseconds per call of ``run``: replays of a CUDA graph of it, the median over
    ``batches`` of the mean over ``repeats`` replays (CPU: one plain call)."""
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return 1e6 * (time.perf_counter() - start)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / repeats)
    return statistics.median(times)


def copy_rate(dst, src, passes: int) -> float:
    """Bytes moved per second by dst.copy_(src) (read + write when ``passes`` is 2)."""
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return passes * dst.numel() / statistics.median(times[1:])


def place_experts(host, config, device, budget_bytes: int, dense_bytes: int, kv_bytes: int,
                  max_tokens: int, **kwargs):
    """GpuExperts under the budget with the largest prefill chunk that fits: (gpu, chunk);
    its kernels tune their tiles as a runner's do (TUNING) unless ``tuning`` says."""
    kwargs.setdefault("tuning", TUNING)
    last = None
    for chunk in CHUNK_CHOICES:
        try:
            return gpu_experts_for(host, config, device, budget_bytes, dense_bytes, kv_bytes,
                                   max_tokens, chunk_tokens=chunk, **kwargs), chunk
        except PlacementError as exc:
            last = exc
    raise last


# -- the dual-format cache of a synthetic model --------------------------------------------


def config_path(model: str = DEFAULT_MODEL) -> Path:
    """The real config of ``model`` (one of MODELS)."""
    if model not in SMOKE_CONFIGS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    return CONFIG_DIR / f"{model}.json"


def bench_config(smoke: bool, model: str = DEFAULT_MODEL) -> ModelConfig:
    """The model's real shapes, or a tiny config of the same architecture for ``smoke``."""
    path = config_path(model)
    if smoke:
        return ModelConfig.from_dict(dict(SMOKE_CONFIGS[model], **SMOKE_SIZES))
    return ModelConfig.from_file(path)


def cache_fingerprint(model: str, smoke: bool) -> str:
    """The model fingerprint the synthetic caches of ``model`` are recorded under."""
    return f"synthetic:{model}" + (":smoke" if smoke else "")


def check_cache_model(root: Path, model: str, smoke: bool) -> None:
    """Raise ValueError unless the caches under ``root`` were built for ``model``."""
    manifest = json.loads((root / "cpu" / "manifest.json").read_text())
    found, wanted = manifest.get("model_fingerprint"), cache_fingerprint(model, smoke)
    if found != wanted:
        raise ValueError(f"the caches in {root} are {found!r}, not {wanted!r}: pass the --model "
                         "(and --smoke) they were built with, or an empty folder")


def expert_group_size(config: ModelConfig) -> int:
    """The INT4 group size of the config's routed experts, as a cache build picks it."""
    return pick_group_size(config.hidden_size, config.moe_intermediate_size, bits=EXPERT_BITS)


def build_caches(root: Path, device: str, smoke: bool,
                 model_name: str = DEFAULT_MODEL) -> tuple[ModelConfig, dict]:
    """Dense weights (bf16 safetensors) and both expert caches, quantized on ``device``."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    config = bench_config(smoke, model_name)
    group = expert_group_size(config)
    layout = ExpertLayout(config.hidden_size, config.moe_intermediate_size,
                          QuantSpec(EXPERT_BITS, group))
    model = synthetic_model(config, device, torch.bfloat16)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              str(root / "dense.safetensors"))
    (root / "cpu").mkdir(exist_ok=True)  # a build cut short is redone
    (root / "gpu").mkdir(exist_ok=True)
    dense_files, dense_linears = write_dense(root / "cpu", model)
    del model
    names = []
    for layer in range(config.num_hidden_layers):
        if not config.is_moe_layer(layer):
            continue
        gate, up, down = synthetic_expert_weights(config, layer, device)
        name = f"layer_{layer:03d}.safetensors"
        blobs = layout.pack_experts(gate, up, down).cpu()  # [E, B]
        save_file({"experts": blobs}, str(root / "gpu" / name),
                  metadata={"format": "krasis-gpu-experts"})
        tensors = {}
        for proj, w in (("gate", gate), ("up", up), ("down", down)):
            q, scales = quantize(w, EXPERT_BITS, group)
            tensors[f"{proj}.qweight"], tensors[f"{proj}.scales"] = q.cpu(), scales.cpu()
        save_file(tensors, str(root / "cpu" / name), metadata={"format": CPU_FORMAT,
                                                                "quant": "int4"})
        names.append((layer, name))
        del gate, up, down, blobs, tensors
    with ThreadPoolExecutor(8) as pool:  # checksums: hashlib releases the GIL
        cpu_records = list(pool.map(lambda n: cpu_file_record(root / "cpu" / n[1], n[1]), names))
        gpu_records = list(pool.map(lambda n: gpu_file_record(root / "gpu" / n[1]), names))
    fingerprint = cache_fingerprint(model_name, smoke)
    cpu_manifest = cache_manifest(config, "int4", group, fingerprint, {
        str(layer): r for (layer, _), r in zip(names, cpu_records, strict=True)},
        dense_files, dense_linears)
    files = {str(layer): r for (layer, _), r in zip(names, gpu_records, strict=True)}
    (root / "cpu" / "manifest.json").write_text(json.dumps(cpu_manifest))
    (root / "gpu" / "manifest.json").write_text(
        json.dumps(gpu_manifest(config, layout, fingerprint, files)))
    sizes = {part: sum(p.stat().st_size for p in (root / part).iterdir()) for part in ("cpu", "gpu")}
    sizes["dense"] = (root / "dense.safetensors").stat().st_size
    return config, sizes


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root); False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def write_dense(cpu_dir: Path, model) -> tuple[dict, dict]:
    """The dense linears quantized as a CPU cache build stores them (dense_plan at the
    experts' bits, the head INT8), in one file: its record and the linears' entries."""
    from safetensors.torch import save_file

    tensors, linears = {}, {}
    for name, linear, bits, group in dense_plan(model, EXPERT_BITS):
        qweight, scales = quantize(linear.weight, bits, group)  # on the model's device
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = qweight.cpu(), scales.cpu()
        linears[name] = {"file": DENSE_FILE, "bits": bits, "group_size": group,
                         "out_features": linear.out_features, "in_features": linear.in_features}
    save_file(tensors, str(cpu_dir / DENSE_FILE),
              metadata={"format": CPU_FORMAT, "quant": "int4", "part": "dense"})
    return {DENSE_FILE: cpu_file_record(cpu_dir / DENSE_FILE, DENSE_FILE)}, linears


def load_caches(root: Path, config: ModelConfig, device: str) -> tuple[dict, dict]:
    """What a runner loads: dense weights to the device, GPU cache pinned, CPU cache mapped."""
    from safetensors.torch import load_file

    from krasisd.engine.upload import header_spans, read_to_device

    times, start = {}, time.perf_counter()
    torch.zeros(1, device=device)  # the process's first device work: context, allocator
    sync(device)
    times["device_init_s"] = time.perf_counter() - start
    start = time.perf_counter()
    dense = root / "dense.safetensors"
    state = (read_to_device(dense, list(header_spans(dense)), device) if device == "cuda"
             else load_file(str(dense)))  # as the engine's loader reads a checkpoint
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    sync(device)
    times["dense_s"] = time.perf_counter() - start
    host = load_gpu_cache(root / "gpu", pin=device == "cuda")
    times["gpu_cache_s"] = time.perf_counter() - start - times["dense_s"]
    cpu_cache = load_cpu_cache(root / "cpu")
    times["cpu_cache_s"] = time.perf_counter() - start - times["dense_s"] - times["gpu_cache_s"]
    mark = time.perf_counter()
    swaps = quantized_dense(model, cpu_cache, device)
    sync(device)
    times["dense_quant_s"] = time.perf_counter() - mark
    times["total_s"] = time.perf_counter() - start + times["device_init_s"]
    return {"config": config, "model": model, "host": host, "cpu_cache": cpu_cache,
            "dense_swaps": swaps}, times


def quantized_dense(model, cpu_cache, device) -> dict:
    """The CPU cache's quantized dense linears put in the model, as load_hybrid does by
    default (dense_decode.quantized_linears); the bf16 ones are kept beside them, so a
    scenario can switch: {"float": {name: module}, "quant": {name: module}}."""
    stored = cpu_cache.dense
    floats = {name: m for name, m in model.named_modules() if name in stored}
    quantized_linears(model, stored, device)
    set_tuning(model, TUNING)
    return {"float": floats, "quant": {name: model.get_submodule(name) for name in floats}}


def release_loaded(loaded: dict) -> None:
    import gc

    loaded.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()  # give cached pinned blocks back, so the next load pins afresh


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- a small model of the same architecture on the CPU alone -------------------------------

SMALL_SIZES = dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2816,
                   num_hidden_layers=4, vocab_size=32000, num_attention_heads=8)


def small_config(model: str = DEFAULT_MODEL) -> ModelConfig:
    """``model``'s config shrunk to SMALL_SIZES, its query heads per KV head kept."""
    raw = json.loads(config_path(model).read_text())
    heads_per_kv = raw["num_attention_heads"] // raw["num_key_value_heads"]
    raw.update(SMALL_SIZES, num_key_value_heads=max(1, SMALL_SIZES["num_attention_heads"]
                                                    // heads_per_kv))
    return ModelConfig.from_dict(raw)


def small_cpu_engine(model: str, threads: int):
    """An Engine of small_config(model) on the CPU: float32 dense weights, native INT4
    experts on ``threads`` threads."""
    from krasisd.engine.cpu_cache import CpuCache, LayerExperts
    from krasisd.engine.engine import Engine
    from krasisd.engine.native_experts import NativeExperts

    config = small_config(model)
    group = expert_group_size(config)
    dense = synthetic_model(config, "cpu", torch.float32)  # CPU matmuls at one row: float32
    layers = {}
    for layer in range(config.num_hidden_layers):
        if config.is_moe_layer(layer):
            arrays = []
            for w in synthetic_expert_weights(config, layer, "cpu"):
                q, scales = quantize(w, EXPERT_BITS, group)
                arrays += [q.numpy(), scales.numpy()]
            layers[layer] = LayerExperts(*arrays)
    cache = CpuCache({"bits": EXPERT_BITS, "group_size": group, "hidden": config.hidden_size,
                      "n_experts": config.n_routed_experts}, layers)
    return Engine(config, dense, NativeExperts(cache, threads=threads), eos_token_ids=set())
