"""Scenario C1 (docs/architecture.md): CPU decode of DeepSeek-V2-Lite shapes cut to 4 layers (q_lora_rank
1536), random weights, krasis INT4 group 128 against llama.cpp Q4_0 on the same weights and the
same thread count, in the same run.

    python3 bench/c1_llamacpp.py --work DIR [--threads 2] [--contexts 100 1000] [--decode 32]
        [--llama-src PATH]   # llama.cpp source (convert_hf_to_gguf.py, conversion/, gguf-py/)

Needs llama-cpp-python (built from source) importable, and its llama.cpp sources for the
conversion (the sdist's vendor/llama.cpp). Each step reuses its output in --work when present:
the random checkpoint (bf16 safetensors and a small byte-level BPE tokenizer), the krasis CPU
cache, model-bf16.gguf and model-q4_0.gguf. Decode speed: a prompt of N tokens is prefilled,
then --decode single tokens are timed (same token each step; speed does not depend on it).

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads OpenMP): with torch's OpenMP
workers spinning between ops, a 2-core decode measured 3-8x slower (set OMP_WAIT_POLICY=ACTIVE
to see it). The engine should set this itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from llamacpp import convert_to_gguf, quantize_q4_0, write_bpe_tokenizer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from krasisd.engine import engine as engine_mod  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "configs" / "deepseek-v2-lite.json"
STD = 0.02


def c1_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    config.update(num_hidden_layers=4, q_lora_rank=1536, bos_token_id=0, eos_token_id=1)
    return config


def tensor_shapes(config: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Checkpoint tensor names and shapes, grouped into one shard per layer (HF names)."""
    d, inter, moe_i = config["hidden_size"], config["intermediate_size"], config["moe_intermediate_size"]
    heads, nope, rope, v = (config[k] for k in ("num_attention_heads", "qk_nope_head_dim",
                                                 "qk_rope_head_dim", "v_head_dim"))
    q_rank, kv_rank, vocab = config["q_lora_rank"], config["kv_lora_rank"], config["vocab_size"]
    shards = {"embed": {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
                        "lm_head.weight": (vocab, d)}}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        s = {f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
             f"{p}.self_attn.q_a_proj.weight": (q_rank, d), f"{p}.self_attn.q_a_layernorm.weight": (q_rank,),
             f"{p}.self_attn.q_b_proj.weight": (heads * (nope + rope), q_rank),
             f"{p}.self_attn.kv_a_proj_with_mqa.weight": (kv_rank + rope, d),
             f"{p}.self_attn.kv_a_layernorm.weight": (kv_rank,),
             f"{p}.self_attn.kv_b_proj.weight": (heads * (nope + v), kv_rank),
             f"{p}.self_attn.o_proj.weight": (d, heads * v)}
        if layer < config["first_k_dense_replace"]:
            s.update({f"{p}.mlp.gate_proj.weight": (inter, d), f"{p}.mlp.up_proj.weight": (inter, d),
                      f"{p}.mlp.down_proj.weight": (d, inter)})
        else:
            shared = moe_i * config["n_shared_experts"]
            s[f"{p}.mlp.gate.weight"] = (config["n_routed_experts"], d)
            for name, shape in (("gate_proj", (shared, d)), ("up_proj", (shared, d)), ("down_proj", (d, shared))):
                s[f"{p}.mlp.shared_experts.{name}.weight"] = shape
            for e in range(config["n_routed_experts"]):
                for name, shape in (("gate_proj", (moe_i, d)), ("up_proj", (moe_i, d)), ("down_proj", (d, moe_i))):
                    s[f"{p}.mlp.experts.{e}.{name}.weight"] = shape
        shards[f"layer{layer}"] = s
    return shards


def write_checkpoint(model_dir: Path, config: dict, seed: int = 0) -> None:
    """Random bf16 weights (norms = 1) in one safetensors shard per layer, plus a tokenizer."""
    model_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for shard, shapes in tensor_shapes(config).items():
        tensors = {name: (torch.ones(shape) if len(shape) == 1 else
                          torch.randn(shape, generator=gen) * STD).to(torch.bfloat16)
                   for name, shape in shapes.items()}
        save_file(tensors, str(model_dir / f"{shard}.safetensors"), metadata={"format": "pt"})
        weight_map.update({name: f"{shard}.safetensors" for name in tensors})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    write_bpe_tokenizer(model_dir)


def krasis_decode(model_dir: Path, cache_dir: Path, threads: int, contexts, n_decode: int,
                  runs: int = 1):
    engine = engine_mod.load(model_dir, quant="int4", threads=threads, cache_dir=cache_dir)
    backend = engine.model.expert_backend
    spent = {"s": 0.0}

    def timed(*args):
        t0 = time.perf_counter()
        out = backend(*args)
        spent["s"] += time.perf_counter() - t0
        return out

    engine.model.expert_backend = timed
    results = {}
    for ctx in contexts:
        cache = engine.new_cache(ctx + runs * n_decode + 2)
        engine.forward(list(range(2, ctx + 2)), cache)
        engine.forward([5], cache)  # warm-up step
        per_run = []
        for _ in range(runs):  # each run decodes n_decode more tokens (context grows slightly)
            spent["s"] = 0.0
            t0 = time.perf_counter()
            for _ in range(n_decode):
                engine.forward([5], cache)
            seconds = time.perf_counter() - t0
            per_run.append((n_decode / seconds, spent["s"] / n_decode * 1e3))
        results[ctx] = (statistics.median(r[0] for r in per_run),
                        statistics.median(r[1] for r in per_run))
    engine.close()
    return results


def llama_decode(gguf: Path, threads: int, contexts, n_decode: int, extra_bufts: bool = True,
                 runs: int = 1):
    import llama_cpp
    import llama_cpp.llama as llama_module

    if not extra_bufts:  # the high-level API has no switch for llama_model_params.use_extra_bufts
        default_params = llama_cpp.llama_model_default_params

        def params_without_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = params_without_extra_bufts

    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(contexts) + runs * n_decode + 8, n_batch=512, verbose=False)
    results = {}
    for ctx in contexts:
        llm.reset()
        llm.eval(list(range(2, ctx + 2)))
        llm.eval([5])
        per_run = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(n_decode):
                llm.eval([5])
            per_run.append(n_decode / (time.perf_counter() - t0))
        results[ctx] = statistics.median(per_run)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--llama-src", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs of --decode steps per context; the median is printed")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--no-extra-bufts", action="store_true",
                        help="llama.cpp without repacked/AMX weight buffers (a build on an AMX "
                             "Xeon aborted creating the Q4_0 context with them)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_dir = args.work / "model"
    if not (model_dir / "config.json").is_file():
        write_checkpoint(model_dir, c1_config(args.config))
    krasis = krasis_decode(model_dir, args.work / "cpu-int4-g128", args.threads, args.contexts,
                           args.decode, args.runs)
    llama = {}
    if not args.skip_llama:
        q4 = args.work / "model-q4_0.gguf"
        if not q4.is_file():
            bf16 = args.work / "model-bf16.gguf"
            if not bf16.is_file():
                convert_to_gguf(model_dir, args.llama_src, bf16)
            quantize_q4_0(bf16, q4, args.threads)
        llama = llama_decode(q4, args.threads, args.contexts, args.decode,
                             extra_bufts=not args.no_extra_bufts, runs=args.runs)
    print(f"C1: DeepSeek-V2-Lite shapes, 4 layers, random weights, threads={args.threads}, "
          f"median of {args.runs} x {args.decode} decode steps, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for ctx in args.contexts:
        tok_s, experts_ms = krasis[ctx]
        line = (f"context {ctx}: krasis INT4 g128 {tok_s:.1f} tok/s "
                f"(routed experts {experts_ms:.1f} ms/token)")
        if ctx in llama:
            line += f"; llama.cpp Q4_0 {llama[ctx]:.1f} tok/s; ratio {tok_s / llama[ctx]:.2f}"
        print(line)


if __name__ == "__main__":
    main()
