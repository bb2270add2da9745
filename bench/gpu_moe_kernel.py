"""Micro-benchmark of the routed-expert kernels on one DeepSeek-V2-Lite MoE layer.

E = 64 experts, K = 6 per token, D = 2048, I = 1408, INT4 and INT8 with group 128, uniform
random routing. For several token counts M: the Triton w4a16/w8a16 kernels (every candidate
tile configuration), dequantize + ``torch._grouped_mm``, and ``torch._grouped_mm`` on
already-bf16 weights (the ceiling of that path). Times are medians of
``triton.testing.do_bench``; TFLOP/s counts 2*M*K*3*D*I; GB/s counts the quantized bytes of
the experts the tokens touch.

Run on the GPU machine:  PYTHONPATH=. python3 bench/gpu_moe_kernel.py --out kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

if "--smoke" in sys.argv:  # the kernels must be defined in interpreter mode
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from bench_cli import log  # noqa: E402

from krasisd.engine.gpu.format import ExpertLayout, QuantSpec, dequantize_kmajor  # noqa: E402
from krasisd.engine.gpu.moe_grouped import moe_grouped_mm  # noqa: E402
from krasisd.engine.gpu.moe_triton import CANDIDATES, default_config, moe_triton_tiled  # noqa: E402

E, K, D, I = 64, 6, 2048, 1408  # noqa: E741
GROUP, DEVICE = 128, "cuda"


def bench_ms(fn) -> float:
    if DEVICE != "cuda":  # --smoke: one timed call on the CPU
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bf16_grouped(x, w13, w2, ids, weights):
    """_grouped_mm on predequantized bf16 experts: the ceiling of the dequant path."""
    t = x.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    xs = x[order // K]
    gate_up = torch._grouped_mm(xs, w13, offs=offs)
    h = (torch.nn.functional.silu(gate_up[:, :I].float()) * gate_up[:, I:].float()).bfloat16()
    ys = torch._grouped_mm(h, w2, offs=offs).float() * weights.reshape(-1)[order, None]
    return torch.zeros(t, D, device=x.device).index_add_(0, order // K, ys)


def measure_m(m: int, bits: int, layout, views, w13, w2) -> list[dict]:
    """Every variant at M tokens; one row per variant."""
    slots = torch.arange(E, dtype=torch.int32, device=DEVICE)
    x = torch.randn(m, D, device=DEVICE).bfloat16()
    ids = torch.rand(m, E, device=DEVICE).topk(K, dim=-1).indices
    weights = torch.rand(m, K, device=DEVICE)
    touched = torch.unique(ids).numel()
    flops = 2 * m * K * 3 * D * I
    ref = bf16_grouped(x, w13, w2, ids, weights)
    variants = {}
    for cfg in CANDIDATES:
        unpack = "reshape" if cfg.reshape_unpack else "gather"
        order = " scale-after" if cfg.scale_after_dot else ""
        name = (f"triton[{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} "
                f"s{cfg.num_stages} {unpack}{order}]")
        if DEVICE != "cuda":
            cfg = default_config(1, DEVICE)
        variants[name] = partial(moe_triton_tiled, x, views, slots, ids, weights, bits, GROUP, cfg)
    variants["dequant+grouped_mm"] = partial(moe_grouped_mm, x, views, slots, ids, weights,
                                             layout.spec)
    variants["bf16 grouped_mm (no dequant)"] = partial(bf16_grouped, x, w13, w2, ids, weights)
    times = {}
    for name, fn in variants.items():
        try:
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            times[name] = (bench_ms(fn), err)
        except Exception as exc:  # e.g. a tile that needs more shared memory than there is
            log(f"  {name} failed at M={m}: {type(exc).__name__}: {str(exc)[:120]}")
    triton_names = [k for k in times if k.startswith("triton")]
    best = min(triton_names, key=lambda k: times[k][0]) if triton_names else None
    heuristic = default_config(m * K / E, "cuda")
    log(f"int{bits} M={m:>5}: best {best} {times.get(best, (0,))[0]:.3f} ms; "
        + "; ".join(f"{k} {v[0]:.3f} ms" for k, v in times.items() if not k.startswith("triton"))
        + f" (heuristic tile {heuristic.block_m}x{heuristic.block_n}x{heuristic.block_k})")
    return [{"bits": bits, "tokens": m, "variant": name, "ms": ms, "rel_err": err,
             "tflops": flops / ms / 1e9, "weight_gb_s": touched * layout.expert_bytes / ms / 1e6,
             "best_triton": name == best}
            for name, (ms, err) in sorted(times.items(), key=lambda kv: kv[1][0])]


def run_bits(bits: int, sizes: list[int]) -> list[dict]:
    layout = ExpertLayout(D, I, QuantSpec(bits, GROUP))
    gen = torch.Generator(device=DEVICE).manual_seed(bits)
    gate = torch.randn(E, I, D, device=DEVICE, generator=gen) / D**0.5
    up = torch.randn(E, I, D, device=DEVICE, generator=gen) / D**0.5
    down = torch.randn(E, D, I, device=DEVICE, generator=gen) / I**0.5
    blobs = layout.pack_experts(gate, up, down)
    del gate, up, down
    views = layout.views(blobs)
    w13 = dequantize_kmajor(views["w13_q"], views["w13_s"], layout.spec, torch.bfloat16)
    w2 = dequantize_kmajor(views["w2_q"], views["w2_s"], layout.spec, torch.bfloat16)
    rows = []
    for m in sizes:
        rows += measure_m(m, bits, layout, views, w13, w2)
    return rows


def attention_backends(tokens: int) -> list[dict]:
    """Causal SDPA at MLA's head sizes (q/k 192, v 128, 16 heads) with each fused backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 16, tokens, 192, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 16, tokens, 192, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(1, 16, tokens, 128, device=DEVICE, dtype=torch.bfloat16)
    flops = 2 * 16 * tokens * tokens / 2 * (192 + 128)
    rows = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.FLASH_ATTENTION):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            run()
            ms = bench_ms(run)
            rows.append({"backend": backend.name, "tokens": tokens, "ms": ms,
                         "tflops": flops / ms / 1e9})
            log(f"attention {backend.name} T={tokens}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
        except Exception as exc:  # this backend refuses these head sizes
            log(f"attention {backend.name} T={tokens}: refused ({str(exc).splitlines()[0][:100]})")
    return rows


def absorbed_attention(tokens: int) -> dict:
    """Causal MLA attention in absorbed form (scores over the 576-wide latent, 16 heads), as the
    decode path computes it, for comparison with expanded SDPA at the same prompt length."""
    heads, latent, rope, v_dim = 16, 512, 64, 128
    q_lat = torch.randn(heads, tokens, latent + rope, device=DEVICE, dtype=torch.bfloat16)
    kv = torch.randn(tokens, latent + rope, device=DEVICE, dtype=torch.bfloat16)
    w_uv = torch.randn(heads, latent, v_dim, device=DEVICE, dtype=torch.bfloat16)
    mask = torch.ones(tokens, tokens, device=DEVICE, dtype=torch.bool).tril()

    def run():
        scores = (q_lat @ kv.T).float() * (192**-0.5)  # [H, T, S]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).bfloat16()
        return torch.bmm(probs @ kv[:, :latent], w_uv)  # [H, T, Dv]

    ms = bench_ms(run)
    flops = 2 * heads * tokens * tokens * (latent + rope + latent) + 2 * heads * tokens * latent * v_dim
    log(f"attention ABSORBED (bmm + softmax) T={tokens}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    return {"backend": "ABSORBED_BMM", "tokens": tokens, "ms": ms, "tflops": flops / ms / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,128,512,2048,8192")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--attention-tokens", default="2000,10000")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreter): checks this script")
    args = parser.parse_args(argv)
    if args.smoke:
        global E, K, D, I, GROUP, DEVICE  # noqa: E741
        E, K, D, I, GROUP, DEVICE = 8, 2, 64, 32, 32, "cpu"  # noqa: E741
        args.attention_tokens = ""
    elif not torch.cuda.is_available():
        log("needs a CUDA GPU (or --smoke)")
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    attention = []
    for tokens in (int(t) for t in args.attention_tokens.split(",") if t):
        attention += attention_backends(tokens)
        if tokens <= 4096:  # [H, T, T] float scores: 16 x 4096^2 x 4 bytes = 1 GiB
            attention.append(absorbed_attention(tokens))
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        rows += run_bits(bits, sizes)
    log("\n| bits | M | variant | ms | TFLOP/s | weights GB/s | rel err |")
    log("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if r["best_triton"] or not r["variant"].startswith("triton"):
            log(f"| {r['bits']} | {r['tokens']} | {r['variant']} | {r['ms']:.3f} | "
                f"{r['tflops']:.0f} | {r['weight_gb_s']:.0f} | {r['rel_err']:.1e} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"moe": rows, "attention": attention}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
