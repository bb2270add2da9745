"""CPU decode speed of a DeepSeek-V2-Lite-shaped model with random weights (scenario C1).

Prints ms/token and tok/s at each context length (median of several runs), beside the bytes
read per token and the read bandwidth measured on this machine, i.e. the roofline.

    python3 bench/cpu_decode.py                       # 4 layers, bf16, 2 threads, ctx 100 and 1000
    python3 bench/cpu_decode.py --write-checkpoint DIR   # also save the weights as safetensors
    python3 bench/cpu_decode.py --model-dir DIR --quant int4   # load() a folder, native experts

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads OpenMP): OpenMP threads that
spin at barriers while their partner is descheduled, or beside the native kernels' thread pool,
make 2-thread runs several times slower. With --quant int8/int4 the dense weights are quantized
too (CPU-only path); "dense" read per token then counts their packed bytes.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from krasisd.engine.config import ModelConfig  # noqa: E402
from krasisd.engine.dense_quant import QuantLinear  # noqa: E402
from krasisd.engine.engine import Engine, load  # noqa: E402
from krasisd.engine.experts import TorchExperts  # noqa: E402
from krasisd.engine.models import build_model  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "deepseek-v2-lite.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--q-lora-rank", default=None, help="override q_lora_rank (int or 'none')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="100,1000")
    parser.add_argument("--steps", type=int, default=16, help="decode tokens per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quant", choices=("none", "int8", "int4"), default="none")
    parser.add_argument("--model-dir", type=Path, help="load() this folder instead")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="with --model-dir: convert the weights (default: as stored)")
    parser.add_argument("--write-checkpoint", type=Path, help="save the random weights here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def bench_config(args) -> ModelConfig:
    raw = json.loads(args.config.read_text())
    raw["num_hidden_layers"] = args.layers
    if args.q_lora_rank is not None:
        raw["q_lora_rank"] = None if args.q_lora_rank == "none" else int(args.q_lora_rank)
    return ModelConfig.from_dict(raw)


def random_engine(config: ModelConfig, seed: int) -> tuple[Engine, dict[str, torch.Tensor]]:
    """bf16 random weights generated in memory: dense ones in the model, experts stacked."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = build_model(config)
    state = {}
    for name, meta in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            state[name] = torch.randn(meta.shape, dtype=torch.bfloat16) * 0.02
    model.load_state_dict(state, strict=True, assign=True)
    experts, inter, hidden = {}, config.moe_intermediate_size, config.hidden_size
    for layer in range(config.num_hidden_layers):
        if config.is_moe_layer(layer):
            num = config.n_routed_experts
            shapes = ((num, inter, hidden), (num, inter, hidden), (num, hidden, inter))
            experts[layer] = tuple(torch.randn(s, dtype=torch.bfloat16) * 0.02 for s in shapes)
            projs = ("gate_proj", "up_proj", "down_proj")
            for proj, tensor in zip(projs, experts[layer], strict=True):
                for e in range(num):
                    state[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = tensor[e]
    engine = Engine(config, model.eval(), TorchExperts(experts), eos_token_ids=set())
    return engine, state


def write_checkpoint(config_path: Path, config: ModelConfig, state: dict, out: Path) -> None:
    """The random weights as a safetensors folder (one file per layer), for load()."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(config_path.read_text())
    raw["num_hidden_layers"] = config.num_hidden_layers
    raw["q_lora_rank"] = config.q_lora_rank
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "other"
        shards.setdefault(part, {})[name] = tensor.contiguous()
    weight_map = {}
    for part, tensors in shards.items():
        file_name = f"model-{part}.safetensors"
        save_file(tensors, out / file_name)
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def read_bandwidth_gbs(threads: int, nbytes: int = 1 << 30) -> float:
    """Read bandwidth in GB/s: the best of several sums over a buffer far larger than caches."""
    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best_s = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best_s = min(best_s, time.perf_counter() - start)
    return nbytes / best_s / 1e9


def bytes_per_token(engine: Engine, context: int, quant_bits: int) -> dict[str, int]:
    """Weights and cache read to decode one token at ``context`` cached tokens."""
    config, model = engine.config, engine.model
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if n != "model.embed_tokens.weight")
    dense += sum(m.native.qweight.nbytes + m.native.scales.nbytes  # quantized dense linears
                 for m in model.modules() if isinstance(m, QuantLinear))
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    expert_params = 3 * config.hidden_size * config.moe_intermediate_size
    expert_bytes = expert_params * quant_bits // 8
    routed = moe_layers * config.num_experts_per_tok * expert_bytes
    cache = config.num_hidden_layers * context * config.kv_cache_width * engine.dtype.itemsize
    return {"dense": dense, "routed": routed, "kv_cache": cache}


def time_decode(engine: Engine, context: int, steps: int, runs: int) -> list[float]:
    """Per-run median ms/token: prefill ``context`` tokens once, then decode ``steps`` tokens
    per run from the same cached context."""
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, engine.config.vocab_size, (context,), generator=gen)
    cache = engine.new_cache(context + steps)
    engine.forward(prompt, cache)
    run_ms = []
    for _ in range(runs):
        cache.length = context
        token = int(prompt[-1])
        step_ms = []
        for _ in range(steps):
            start = time.perf_counter()
            token = int(engine.forward([token], cache)[-1].argmax())
            step_ms.append((time.perf_counter() - start) * 1e3)
        run_ms.append(statistics.median(step_ms))
    return run_ms


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = bench_config(args)
    if args.model_dir:
        engine = load(args.model_dir, quant=args.quant, threads=args.threads, dtype=args.dtype)
        config = engine.config
    elif args.quant != "none":
        print("--quant int8/int4 needs --model-dir (write one with --write-checkpoint)")
        return 2
    else:
        engine, state = random_engine(config, args.seed)
        if args.write_checkpoint:
            write_checkpoint(args.config, config, state, args.write_checkpoint)
            print(f"wrote {args.write_checkpoint}")
        del state
    bits = {"none": 8 * engine.dtype.itemsize, "int8": 8, "int4": 4}[args.quant]
    bandwidth_gbs = read_bandwidth_gbs(args.threads)
    print(f"{config.architecture} {config.num_hidden_layers} layers, q_lora_rank="
          f"{config.q_lora_rank}, experts {args.quant}, {args.threads} threads, "
          f"backend {type(engine.expert_backend).__name__}")
    print(f"measured read bandwidth: {bandwidth_gbs:.1f} GB/s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    for context in (int(c) for c in args.contexts.split(",")):
        run_ms = time_decode(engine, context, args.steps, args.runs)
        ms = statistics.median(run_ms)
        read = bytes_per_token(engine, context, bits)
        total = sum(read.values())
        roofline = bandwidth_gbs * 1e9 / total
        print(f"context {context:5d}: {ms:7.2f} ms/token  {1e3 / ms:6.2f} tok/s  "
              f"(runs: {', '.join(f'{r:.1f}' for r in run_ms)} ms)  "
              f"read/token {total / 1e6:.0f} MB (dense {read['dense'] / 1e6:.0f}, "
              f"routed {read['routed'] / 1e6:.0f}, kv {read['kv_cache'] / 1e6:.1f})  "
              f"-> {total / ms / 1e6:.1f} GB/s, roofline {roofline:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
