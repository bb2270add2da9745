"""Micro-benchmark of a decode step's dense projections: bf16 through cuBLAS against the
CPU cache's quantized weights through krasisd.engine.gpu.dense_decode.

The projections of one DeepSeek-V2-Lite decode step (bench/configs/deepseek-v2-lite.json):
per MoE layer the fused q + kv_a projection, o_proj, the shared experts' fused gate/up (with
the SiLU) and down; the dense first layer's; the output head. Every layer has its own random
weights, and the whole step is one CUDA graph, replayed: 2.1 GB of bf16 weights per step is
far beyond the 50 MB L2, so every weight comes from HBM as in a real step.

Printed: microseconds per step for each way, bytes read, and TB/s beside the device's copy
rate (read + write of 1 GiB), the limit being chased. The quantized way runs the dense plan
of an INT4 model (INT4 group 128, the head INT8) and of an INT8 one. Layer 0's outputs are
checked against float32 on the dequantized weights.

Run on the GPU machine:  PYTHONPATH=. python3 bench/gpu_dense_gemv.py
Check on the CPU (Triton interpreter, two tiny layers):  ... --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # the kernels must be defined in interpreter mode
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from decode_caches import copy_gb_s, time_us  # noqa: E402

from krasisd.engine.dense_plan import HEAD_BITS, pick_dense_group  # noqa: E402
from krasisd.engine.gpu import fused  # noqa: E402
from krasisd.engine.gpu.dense_decode import LINEAR_CANDIDATES, GpuQuantLinear  # noqa: E402
from krasisd.engine.gpu.format import QuantSpec, dequantize_kmajor  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "deepseek-v2-lite.json"
SMOKE = dict(hidden=128, q_out=160, o_in=128, shared=64, dense_inter=192, vocab=512, layers=2)


def shapes(smoke: bool) -> dict:
    """Widths of the step's projections (from the model config)."""
    if smoke:
        return SMOKE
    cfg = json.loads(CONFIG.read_text())
    heads, rope = cfg["num_attention_heads"], cfg["qk_rope_head_dim"]
    q_out = heads * (cfg["qk_nope_head_dim"] + rope) + cfg["kv_lora_rank"] + rope
    return dict(hidden=cfg["hidden_size"], q_out=q_out, o_in=heads * cfg["v_head_dim"],
                shared=cfg["moe_intermediate_size"] * cfg["n_shared_experts"],
                dense_inter=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                layers=cfg["num_hidden_layers"] - cfg["first_k_dense_replace"])


def projections(s: dict) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, gated) of one step, in order: out is 2x the width when gated."""
    rows = []
    for layer in range(s["layers"] + 1):
        inter = s["dense_inter"] if layer == 0 else s["shared"]
        rows += [(f"{layer}.q_kv", s["hidden"], s["q_out"], False),
                 (f"{layer}.o", s["o_in"], s["hidden"], False),
                 (f"{layer}.gate_up", s["hidden"], 2 * inter, True),
                 (f"{layer}.down", inter, s["hidden"], False)]
    return rows + [("head", s["hidden"], s["vocab"], False)]


def random_quant(k: int, n: int, bits: int, device, gen) -> GpuQuantLinear:
    """A GpuQuantLinear of random k-major values and scales (the kernels' cost does not
    depend on the values)."""
    group = pick_dense_group(k, bits)
    if bits == 4:
        q = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device,
                          generator=gen)
    else:
        q = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device, generator=gen)
    scales = torch.rand(k // group, n, device=device, generator=gen) * 2e-3 / k ** 0.5
    return GpuQuantLinear(q, scales, bits, group, k)


def build(s: dict, bits: int, device) -> tuple[list, list]:
    """Per projection: a bf16 weight [out, in] and a GpuQuantLinear on the bits' plan."""
    gen = torch.Generator(device=device).manual_seed(0)
    floats, quants = [], []
    for name, k, n, _ in projections(s):
        floats.append(torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16)
                      / k ** 0.5)
        quants.append(random_quant(k, n, HEAD_BITS if name == "head" else bits, device, gen))
    return floats, quants


def step_fn(s, weights, x_in, bf16: bool):
    """One step's projections in order; inputs of the right width, outputs kept."""
    plan = projections(s)
    xs = {width: x_in[:, :width] for width in {k for _, k, _, _ in plan}}

    def run():
        outs = []
        for (_, k, _, gated), w in zip(plan, weights, strict=True):
            x = xs[k]
            if bf16:
                y = x @ w.T
                outs.append(fused.silu_mul(y) if gated else y)
            else:
                outs.append(w.swiglu(x) if gated else w(x))
        return outs

    return run


def read_bytes(weights) -> int:
    total = 0
    for w in weights:
        if isinstance(w, GpuQuantLinear):
            total += w.qweight.numel() * w.qweight.element_size() + w.scales.numel() * 4
        else:
            total += w.numel() * w.element_size()
    return total


def check_layer0(s, quants, x) -> float:
    """Largest relative error of layer 0's quantized projections against float32."""
    worst = 0.0
    for (_, k, _, gated), w in zip(projections(s)[:4], quants[:4], strict=True):
        deq = dequantize_kmajor(w.qweight, w.scales, QuantSpec(w.bits, w.group_size))  # [K, N]
        ref = x[:, :k].float() @ deq
        if gated:
            gate, up = ref.chunk(2, dim=-1)
            ref = torch.nn.functional.silu(gate) * up
        got = w.gemv(x[:, :k], gated)  # the kernel, also on the CPU (--smoke)
        worst = max(worst, ((got.float() - ref).norm() / ref.norm()).item())
    return worst


def sweep(s: dict, quants: list, x, repeats: int, device) -> None:
    """Every candidate tile on each projection kind (all layers of that kind in one graph)."""
    plan = projections(s)
    for kind in ("q_kv", "o", "gate_up", "down", "head"):
        picked = [(k, gated, w) for (name, k, _, gated), w in zip(plan, quants, strict=True)
                  if name.split(".")[-1] == kind and not name.startswith("0.")]
        nbytes = read_bytes([w for _, _, w in picked])
        results = []
        for tile in LINEAR_CANDIDATES:
            for _, _, w in picked:
                w.tile = tile

            def run(picked=picked):
                for k, gated, w in picked:
                    w.gemv(x[:, :k], gated)

            us = time_us(run, 10, device, batches=repeats)
            results.append((us, tile))
        for _, _, w in picked:
            w.tile = None
        us, tile = min(results, key=lambda r: r[0])
        print(f"  {kind:8s} x{len(picked):2d}: best {us:7.1f} us {nbytes / us / 1e6:.2f} TB/s "
              f"{tile}; worst {max(r[0] for r in results):7.1f} us")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--sweep", action="store_true",
                        help="time every candidate tile per projection kind")
    args = parser.parse_args(argv)
    s = shapes(args.smoke)
    if args.smoke:
        floats, quants = build(s, 4, "cpu")
        x = torch.randn(1, max(s.values()), dtype=torch.float32)
        print(f"smoke: layer 0 relative error {check_layer0(s, quants, x):.2e}")
        return 0
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    device = torch.device("cuda")
    x = torch.randn(1, max(s["hidden"], s["o_in"], s["shared"], s["dense_inter"]),
                    device=device, dtype=torch.bfloat16)
    copy_tb_s = copy_gb_s(device) / 1e3
    print(f"device copy {copy_tb_s:.2f} TB/s; {s['layers']} MoE layers + 1 dense, "
          f"{len(projections(s))} projections per step")
    for bits in (4, 8):
        floats, quants = build(s, bits, device)
        if bits == 4:
            us = time_us(step_fn(s, floats, x, bf16=True), 10, device, batches=args.repeats)
            nbytes = read_bytes(floats)
            print(f"bf16 cuBLAS:        {us:8.1f} us/step  {nbytes / 1e9:.3f} GB  "
                  f"{nbytes / us / 1e6:.2f} TB/s")
        us = time_us(step_fn(s, quants, x, bf16=False), 10, device, batches=args.repeats)
        nbytes = read_bytes(quants)
        print(f"INT{bits} (head INT8): {us:8.1f} us/step  {nbytes / 1e9:.3f} GB  "
              f"{nbytes / us / 1e6:.2f} TB/s  layer 0 error {check_layer0(s, quants, x):.1e}")
        if args.sweep:
            sweep(s, quants, x, args.repeats, device)
        del floats, quants
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
