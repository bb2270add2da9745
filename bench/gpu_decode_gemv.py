"""Micro-benchmark of the decode matrix-vector MoE kernels (krasisd.engine.gpu.moe_decode).

A decode step's routed experts as the hybrid engine runs them on the GPU: L = 26 MoE layers
of DeepSeek-V2-Lite shape (E = 64 experts, K = 6 per token, D = 2048, I = 1408, INT4 group
128 by default), each layer with its own random weights, routing and activations, all 26
captured in one CUDA graph and replayed. 26 layers of 6 experts read about 0.7 GB per step,
far beyond the 50 MB L2, so every layer's weights come from HBM as in a real step.

For every candidate tile (GEMV_CANDIDATES): microseconds per layer for gate/up with the SiLU,
for down, and for the whole moe_gemv call; GB/s of the expert bytes the routing touches,
beside the device's copy rate (read + write of a 1 GiB tensor), the limit being chased; and
the relative error of layer 0 against float32 on the dequantized weights.

``--sass`` needs no GPU: it compiles every candidate for sm_90 with Triton's own ptxas and
prints registers, spills and the instructions per 32 bits of weights in the inner loop (for
INT4 about 21 are the arithmetic itself; at 4 warp-instructions per clock per SM, 30 per word
is 4.4 TB/s at 1.98 GHz, about the H200's HBM rate, so the count matters).

Run on the GPU machine:  PYTHONPATH=. python3 bench/gpu_decode_gemv.py --out gemv.json
Anywhere:  ... --sass;  check this script on the CPU (Triton interpreter):  ... --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

if "--smoke" in sys.argv:  # the kernels must be defined in interpreter mode
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from bench_cli import log  # noqa: E402
from decode_caches import copy_gb_s, time_us  # noqa: E402

from krasisd.engine.gpu import moe_decode  # noqa: E402
from krasisd.engine.gpu.format import QMAX, ExpertLayout, QuantSpec, dequantize_kmajor  # noqa: E402

SMOKE_SHAPE = dict(layers=2, experts=8, top_k=2, hidden=64, inter=32, group=32)


def expert_read_bytes(layout: ExpertLayout) -> int:
    """Bytes a kernel reads per expert: the four parts, without alignment padding."""
    return sum(size for _, size in layout.part_offsets().values())


def build(args, layout: ExpertLayout, device) -> list[dict]:
    """Per layer: expert views over random quantized bytes, routing, weights and x."""
    gen = torch.Generator(device=device).manual_seed(0)
    arena = torch.randint(0, 256, (args.layers, args.experts, layout.expert_bytes),
                          dtype=torch.uint8, device=device, generator=gen)  # [L, E, bytes]
    qmax = QMAX[layout.spec.bits]
    layers = []
    for layer in range(args.layers):
        views = layout.views(arena[layer])
        for name, fan_in in (("w13_s", args.hidden), ("w2_s", args.inter)):
            scale = torch.rand(views[name].shape, device=device, generator=gen) + 0.5
            views[name].copy_(scale / (qmax * fan_in**0.5))
        scores = torch.rand(args.tokens, args.experts, device=device, generator=gen)
        layers.append(dict(
            views=views, ids=scores.topk(args.top_k, dim=-1).indices,  # [T, K]
            weights=torch.rand(args.tokens, args.top_k, device=device, generator=gen),
            x=torch.randn(args.tokens, args.hidden, device=device, generator=gen).bfloat16()))
    return layers


def reference(layer: dict, spec: QuantSpec, inter: int) -> torch.Tensor:
    """float32 [T, D] of one layer on the dequantized weights (h rounded to bf16)."""
    views, x = layer["views"], layer["x"].float()
    out = torch.zeros_like(x)
    for t, k in ((t, k) for t in range(x.shape[0]) for k in range(layer["ids"].shape[1])):
        e = int(layer["ids"][t, k])
        gate_up = x[t] @ dequantize_kmajor(views["w13_q"][e], views["w13_s"][e], spec)
        h = (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]).bfloat16().float()
        out[t] += layer["weights"][t, k] * (h @ dequantize_kmajor(views["w2_q"][e],
                                                                 views["w2_s"][e], spec))
    return out


def measure(cfg, layers, layout, slots, args, device) -> dict:
    """us per layer of gate/up, down and the whole call for one tile, and layer 0's error."""
    spec, block_k = layout.spec, moe_decode.k_block(cfg.block_k, args.group, args.hidden,
                                                     args.inter)
    p, tiles = args.tokens * args.top_k, -(-args.inter // cfg.block_n)

    def full():
        return [moe_decode.moe_gemv(lay["x"], lay["views"], slots, lay["ids"], lay["weights"],
                                    spec.bits, args.group, cfg) for lay in layers]

    def gate_up():
        for lay in layers:
            count = torch.zeros(p * tiles, dtype=torch.int32, device=device)
            moe_decode.gemv_gate_up(lay["x"], lay["views"], slots, lay["ids"], spec.bits,
                                    args.group, cfg, block_k, count)

    hs = []
    for lay in layers:
        count = torch.zeros(p * tiles, dtype=torch.int32, device=device)
        hs.append(moe_decode.gemv_gate_up(lay["x"], lay["views"], slots, lay["ids"], spec.bits,
                                          args.group, cfg, block_k, count))

    def down():
        for lay, h in zip(layers, hs, strict=True):
            out = torch.zeros(args.tokens, args.hidden, dtype=torch.float32, device=device)
            moe_decode.gemv_down(h, lay["views"], slots, lay["ids"], lay["weights"], spec.bits,
                                 args.group, cfg, block_k, out)

    ref = reference(layers[0], spec, args.inter)
    err = ((full()[0] - ref).norm() / ref.norm()).item()
    n = len(layers)
    return {"gate_up_us": time_us(gate_up, args.repeats, device) / n,
            "down_us": time_us(down, args.repeats, device) / n,
            "layer_us": time_us(full, args.repeats, device) / n, "rel_err": err}


POINTER_TYPES = {"x_ptr": "*bf16", "s_ptr": "*bf16", "part_ptr": "*fp32", "h_ptr": "*fp32",
                 "count_ptr": "*i32", "ids_ptr": "*i64", "slot_ptr": "*i32", "out_ptr": "*fp32",
                 "weights_ptr": "*fp32"}
NOT_ALIGNED = {"top_k", "num_slots", "steps_per_split", "num_splits", "exp_bits"}


def compile_sm90(fn, consts: dict, bits: int, num_warps: int):
    """The kernel compiled for sm_90 as a launch with 16-aligned pointers and widths would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else POINTER_TYPES.get(
            name, ("*i32" if bits == 4 else "*i8") if name == "w_ptr" else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
             if kind != "constexpr" and name not in NOT_ALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def loop_stats(kernel) -> tuple[str, int]:
    """(register/stack use, instructions of the longest loop) from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(kernel.asm["cubin"])
        handle.flush()
        usage = subprocess.run([tool, "-res-usage", handle.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    addrs, loop = [], 0
    for line in sass.splitlines():
        at = re.match(r"\s+/\*([0-9a-f]{4,})\*/", line)
        if at:
            addrs.append(int(at.group(1), 16))
            back = re.search(r"BRA (0x[0-9a-f]+)", line)
            if back and int(back.group(1), 16) < addrs[-1]:
                loop = max(loop, (addrs[-1] - int(back.group(1), 16)) // 16 + 1)
    return (f"{found.group(1)} regs, {found.group(2)} B stack" if found else "?"), loop


def sass_report(args) -> list[dict]:
    """Registers and inner-loop instructions per int32 word of each candidate on sm_90."""
    rows = []
    for cfg in moe_decode.GEMV_CANDIDATES:
        row = {"config": short_name(cfg)}
        block_k = min(cfg.block_k, args.group)
        kernels = (("gate_up", cfg.block_n, cfg.num_warps, args.inter),
                   ("down", cfg.down_block_n, cfg.down_num_warps, args.hidden))
        for name, block_n, warps, width in kernels:
            fn = moe_decode.KERNELS[name]
            consts = {"GROUP": args.group, "BITS": args.bits, "BLOCK_N": block_n,
                      "BLOCK_K": block_k, "PAIRS": cfg.pair_unpack,
                      "EVEN_N": width % block_n == 0}
            usage, loop = loop_stats(compile_sm90(fn, consts, args.bits, warps))
            words = block_n * block_k * args.bits // 32 // (32 * warps)  # per thread per step
            row[name] = f"{usage}, {loop / words:.1f} instr/word"
        log(f"{row['config']}: gate/up {row['gate_up']}; down {row['down']}")
        rows.append(row)
    return rows


def short_name(cfg) -> str:
    """gate/up tile x K step / splits / warps, the same for down, and the INT4 unpack."""
    unpack = "pair" if cfg.pair_unpack else "single"
    return (f"gu {cfg.block_n}x{cfg.block_k}/s{cfg.split_k}/w{cfg.num_warps} "
            f"dn {cfg.down_block_n}/s{cfg.down_split_k}/w{cfg.down_num_warps} {unpack}")


def report(rows: list[dict], copy_rate: float) -> None:
    log("\n| config | gate/up+SiLU us | down us | layer us | GB/s | of copy | rel err |")
    log("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            log(f"| {r['config']} | failed: {r['error'][:80]} |")
            continue
        log(f"| {r['config']} | {r['gate_up_us']:.1f} | {r['down_us']:.1f} | {r['layer_us']:.1f}"
            f" | {r['gb_s']:.0f} | {r['gb_s'] / copy_rate:.0%} | {r['rel_err']:.1e} |")
    timed = [r for r in rows if "error" not in r]
    if timed:
        best = min(timed, key=lambda r: r["layer_us"])
        log(f"\nbest: {best['config']}: {best['layer_us']:.1f} us per layer, "
            f"{best['gb_s']:.0f} GB/s (device copy {copy_rate:.0f} GB/s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--experts", type=int, default=64, help="per layer")
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=1408)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50, help="graph replays timed")
    parser.add_argument("--candidates", default="all", help="'all' or indices like 0,3")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    parser.add_argument("--sass", action="store_true",
                        help="no GPU needed: registers and loop instructions on sm_90")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape on the CPU (Triton interpreter): checks this script")
    args = parser.parse_args(argv)
    if args.sass:
        rows = sass_report(args)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump({"sass": rows}, handle, indent=1)
        return 0
    if args.smoke:
        vars(args).update(SMOKE_SHAPE)
        args.candidates = "0,8" if args.candidates == "all" else args.candidates
    elif not torch.cuda.is_available():
        log("needs a CUDA GPU (or --smoke)")
        return 2
    if args.top_k > args.experts:
        log(f"--top-k {args.top_k} is more than --experts {args.experts}")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.set_num_threads(2)
    picks = (range(len(moe_decode.GEMV_CANDIDATES)) if args.candidates == "all"
             else [int(i) for i in args.candidates.split(",")])
    layout = ExpertLayout(args.hidden, args.inter, QuantSpec(args.bits, args.group))
    layers = build(args, layout, device)
    slots = torch.arange(args.experts, dtype=torch.int32, device=device)  # all resident
    step_bytes = sum(torch.unique(lay["ids"]).numel() for lay in layers) * expert_read_bytes(
        layout)
    copy_rate = copy_gb_s(device)
    log(f"{args.layers} layers x {args.experts} experts, T={args.tokens} K={args.top_k} "
        f"D={args.hidden} I={args.inter} INT{args.bits} g{args.group}: "
        f"{step_bytes / 1e6:.0f} MB of experts per step; device copy {copy_rate:.0f} GB/s")
    rows = []
    for index in picks:
        cfg = moe_decode.GEMV_CANDIDATES[index]
        row = {"index": index, "config": short_name(cfg), "fields": dataclasses.asdict(cfg)}
        try:
            row.update(measure(cfg, layers, layout, slots, args, device))
            row["gb_s"] = step_bytes / (row["layer_us"] * args.layers * 1e3)
        except Exception as exc:  # e.g. a tile this device cannot compile
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        log(f"{row['config']}: " + ("failed" if "error" in row else
                                   f"{row['layer_us']:.1f} us/layer"))
    report(rows, copy_rate)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"shape": {k: v for k, v in vars(args).items() if k != "out"},
                       "copy_gb_s": copy_rate, "step_bytes": step_bytes, "rows": rows},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
