"""The Triton MoE kernels build for Hopper (sm_90) on this machine, without a GPU.

Triton compiles ahead of time for a named target with its bundled ptxas; the SASS then shows
whether the dot became warpgroup MMAs (HGMMA) and whether registers spilled (LDL/STL). The
build runs in a child process, since other tests put this one in interpreter mode.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

BUILD = r"""
import json, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from krasisd.engine.gpu import moe_triton

kernel = getattr(moe_triton, sys.argv[1])
cfg = moe_triton.default_config(float(sys.argv[2]), "cuda")
pointers = {"x_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16", "weights_ptr": "*fp32",
            "w_ptr": "*i32", "s_ptr": "*bf16", "sorted_ids_ptr": "*i32",
            "block_slot_ptr": "*i32", "num_rows_ptr": "*i32"}
consts = dict(GROUP=128, BITS=4, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              GROUP_M=cfg.group_m, DOT_F32=False, RESHAPE=cfg.reshape_unpack,
              SCALE_AFTER=cfg.scale_after_dot)
names = kernel.arg_names
signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
src = ASTSource(fn=kernel, signature=signature,
                constexprs={(names.index(k),): v for k, v in consts.items()})
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(compiled.asm["cubin"])
    f.flush()
    sass = subprocess.run([sys.argv[3], "-sass", f.name], capture_output=True, text=True,
                          check=True).stdout
print(json.dumps({"shared": compiled.metadata.shared, "hgmma": "HGMMA" in sass,
                  "spills": "LDL" in sass or "STL" in sass}))
"""


def test_large_tile_int4_gate_up_uses_wgmma_without_spills():
    kernel = "_gate_up_kernel"  # the heavier of the two: two accumulators
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("Triton's CUDA tools are not bundled here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BUILD, kernel, "1000", CUOBJDUMP], env=env,
                          capture_output=True, text=True, timeout=240)
    if done.returncode and ("ptxas" in done.stderr or "No such file" in done.stderr):
        pytest.skip(f"no CUDA toolchain for sm_90 here: {done.stderr.strip().splitlines()[-1:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["hgmma"] and not report["spills"]
    assert report["shared"] <= 100 * 1024
