"""The flash-decoding MLA kernels (krasisd.engine.gpu.mla_decode) on the CPU through Triton's
interpreter, against decode_attention.mla's three lines (scores, masked softmax, probs @ V)
in float32 on the same bf16 inputs.

Only the kernels' bf16 rounding of the probabilities and of the output separates them: about
2^-8 relative each (the interpreter truncates where the GPU rounds), so 1e-2 relative.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if torch.cuda.is_available():  # kernels imported earlier in the session are compiled for CUDA
    pytest.skip("Triton interpreter tests run without a GPU", allow_module_level=True)

from krasisd.engine.config import ModelConfig  # noqa: E402
from krasisd.engine.gpu import decode_attention  # noqa: E402
from krasisd.engine.gpu.decode_attention import Position  # noqa: E402
from krasisd.engine.gpu.mla_decode import (  # noqa: E402
    MAX_SPLITS,
    default_num_splits,
    mla_decode_attention,
)
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, synthetic_model  # noqa: E402

REL_TOL = 1e-2
STALE = 1e3  # what a stale cache row past the position holds


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(heads, latent, rope, rows, pos, seed=0):
    """q_full [H, C + R] and entries [rows, C + R] (bf16) with garbage past the position."""
    g = torch.Generator().manual_seed(seed)
    q_full = torch.randn(heads, latent + rope, generator=g).bfloat16()
    entries = torch.randn(rows, latent + rope, generator=g).bfloat16()
    entries[pos + 1:] = STALE
    return q_full, entries


def _reference(q_full, entries, pos, bucket, scale, latent):
    """decode_attention.mla's unfused lines in float32: [H, C]."""
    window = entries[:bucket].float()  # [S, C + R]
    scores = q_full.float() @ window.T * scale  # [H, S]
    masked = torch.arange(bucket) > pos
    probs = scores.masked_fill(masked[None, :], float("-inf")).softmax(dim=-1)
    return probs @ window[:, :latent]  # [H, C]


@pytest.mark.parametrize(
    ("heads", "latent", "rope", "bucket", "pos", "splits"),
    [
        (16, 64, 16, 64, 40, None),  # default splits, last tile partly past pos
        (4, 32, 16, 128, 0, 2),  # pos 0, H < 16
        (8, 64, 32, 128, 127, 3),  # pos = bucket - 1, splits not dividing the blocks
        (16, 128, 64, 512, 20, 8),  # bucket much larger than pos + 1: 7 splits exit early
        (20, 32, 16, 96, 70, 2),  # two head blocks, bucket not a multiple of the tile
        (1, 512, 64, 64, 33, 1),  # DeepSeek-V2-Lite's C and R, one head, one split
        (4, 16, 8, 64, 45, 2),  # the tiny test model's C and R: padded to tl.dot's 16
        (6, 48, 24, 80, 79, 3),  # neither C nor R a power of two
    ],
)
def test_matches_float_reference(heads, latent, rope, bucket, pos, splits):
    q_full, entries = _inputs(heads, latent, rope, bucket + 16, pos)
    scale = (latent + rope) ** -0.5
    out = mla_decode_attention(q_full, entries, torch.tensor([pos]), bucket, scale, latent,
                               num_splits=splits)
    assert out.shape == (heads, latent) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert _rel(out, _reference(q_full, entries, pos, bucket, scale, latent)) < REL_TOL


def test_split_counts_agree_and_stale_rows_are_never_read():
    q_full, entries = _inputs(8, 32, 16, 256, 150)
    entries[151:] = float("nan")  # a NaN read anywhere past the position would spread
    pos = torch.tensor([150])
    outs = [mla_decode_attention(q_full, entries, pos, 256, 0.5, 32, num_splits=n, block_s=s)
            for n, s in ((1, 16), (5, 32), (16, 16))]
    entries[151:] = 0.0
    ref = _reference(q_full, entries, 150, 256, 0.5, 32)
    for out in outs:
        assert torch.isfinite(out).all() and _rel(out, ref) < REL_TOL


def test_writes_into_out_and_reads_pos_from_the_tensor():
    q_full, entries = _inputs(4, 32, 16, 64, 63)
    out = torch.full((4, 32), 7.0, dtype=torch.bfloat16)
    pos = torch.tensor([10])
    returned = mla_decode_attention(q_full, entries, pos, 64, 0.3, 32, out=out, num_splits=2)
    assert returned is out
    assert _rel(out, _reference(q_full, entries, 10, 64, 0.3, 32)) < REL_TOL
    pos.fill_(40)  # the same call, a later token: the position is only read on the device
    mla_decode_attention(q_full, entries, pos, 64, 0.3, 32, out=out, num_splits=2)
    assert _rel(out, _reference(q_full, entries, 40, 64, 0.3, 32)) < REL_TOL


def test_replaces_the_three_launches_of_decode_attention_mla():
    """decode_attention.mla(fused=False) against its own query, this kernel in place of its
    scores / masked softmax / probs @ V, then its w_uv and o_proj: the tiny DeepSeek-V2."""
    config = ModelConfig.from_dict(dict(TINY_DEEPSEEK_V2))
    attn = synthetic_model(config, "cpu", torch.bfloat16, seed=2).model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    entries = torch.randn(96, attn.latent_dim + attn.rope_dim, generator=g).bfloat16()
    entries[30:] = STALE  # past the position the cache holds old rows
    x = torch.randn(1, config.hidden_size, generator=g).bfloat16()
    pos = torch.tensor([29])
    at = Position(pos, *attn.rotary.cos_sin(pos), bucket=64)
    want = decode_attention.mla(attn, x, entries.clone(), at, fused=False)  # [1, D]

    q_full = decode_attention._mla_query(attn, x, entries, at)  # [H, C + R]
    out_latent = mla_decode_attention(q_full, entries, at.pos, at.bucket, attn.scale,
                                      attn.latent_dim)  # [H, C]
    _, w_uv_t = attn.absorbed_weights()  # [H, C, Dv]
    got = attn.o_proj(torch.bmm(out_latent[:, None, :], w_uv_t).view(1, -1))  # [1, D]
    assert _rel(got, want) < 2 * REL_TOL  # the reference also rounds its scores to bf16


def test_default_splits_grow_with_the_bucket():
    counts = [default_num_splits(bucket) for bucket in (1, 64, 256, 1024, 4096, 16384, 1 << 20)]
    assert counts == sorted(counts) and counts[0] == 1
    assert default_num_splits(256) <= 8  # few programs for short windows
    assert default_num_splits(16384) >= 132  # every SM of an H200 busy for long ones
    assert counts[-1] == MAX_SPLITS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latent_dim": 48}, "C"),
        ({"latent_dim": 0}, "C"),
        ({"bucket": 0}, "bucket"),
        ({"bucket": 65}, "bucket"),
        ({"pos": torch.tensor([3], dtype=torch.int32)}, "pos"),
        ({"q_full": torch.zeros(4, 40, dtype=torch.bfloat16)}, "width"),
        ({"q_full": torch.zeros(4, 48)}, "bf16 or fp16"),
        ({"q_full": torch.zeros(0, 48, dtype=torch.bfloat16)}, "H >= 1"),
        ({"out": torch.zeros(4, 16, dtype=torch.bfloat16)}, "out must be"),
        ({"num_splits": 0}, "num_splits"),
        ({"block_s": 24}, "block_s"),
        ({"block_s": 128}, "block_s"),
    ],
)
def test_bad_arguments_raise_value_error(change, message):
    q_full, entries = _inputs(4, 32, 16, 64, 10)
    args = {"q_full": q_full, "entries": entries, "pos": torch.tensor([10]), "bucket": 64,
            "scale": 0.5, "latent_dim": 32} | change
    with pytest.raises(ValueError, match=message):
        mla_decode_attention(**args)


# -- the same kernels built for Hopper (sm_90) without a GPU --------------------------------

CUOBJDUMP = os.path.join(os.path.dirname(pytest.importorskip("triton").__file__), "backends",
                         "nvidia", "bin", "cuobjdump")
# Triton ahead of time for a named target with its bundled ptxas, in a child process (this one
# is in interpreter mode). Arguments are specialised as a launch at DeepSeek-V2-Lite's shape
# would be: pointers and multiples of 16 marked divisible by 16, so loads vectorise and
# pipeline as on the GPU.
BUILD = r"""
import json, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from krasisd.engine.gpu import mla_decode as m

def build(kernel, consts, ints, num_warps, num_stages):
    names = kernel.arg_names
    types = {n: ("*bf16" if n in ("q_ptr", "kv_ptr", "out_ptr") else "*i64" if n == "pos_ptr"
                 else "*fp32" if n.endswith("_ptr") else "fp32" if n == "qk_scale" else "i32")
             for n in names}
    signature = {n: "constexpr" if n in consts else types[n] for n in names}
    divisible = [n for n in names if n.endswith("_ptr") or ints.get(n, 1) % 16 == 0]
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([sys.argv[1], "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {"shared": compiled.metadata.shared, "async_loads": "LDGSTS" in sass,
            "spills": "LDL" in sass or "STL" in sass}

C, R, H, S = 512, 64, 16, 1024
split = build(m._mla_split_kernel, dict(C=C, R=R, C_PAD=C, R_PAD=R, BLOCK_H=m.BLOCK_H,
                                        BLOCK_S=m.BLOCK_S, DOT_F32=False),
              dict(H=H, S=S, q_stride=C + R, kv_stride=C + R, blocks_per_split=2),
              m.split_warps(m.BLOCK_S), m.SPLIT_STAGES)
combine = build(m._mla_combine_kernel, dict(C=C, BLOCK_P=256, BLOCK_C=16),
                dict(H=H, P=256, out_stride=C), 4, 1)
print(json.dumps({"split": split, "combine": combine}))
"""


def test_kernels_build_for_sm90_with_pipelined_loads_and_no_spills():
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("Triton's CUDA tools are not bundled here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", BUILD, CUOBJDUMP], env=env,
                          capture_output=True, text=True, timeout=240)
    if done.returncode and ("ptxas" in done.stderr or "No such file" in done.stderr):
        pytest.skip(f"no CUDA toolchain for sm_90 here: {done.stderr.strip().splitlines()[-1:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    split, combine = report["split"], report["combine"]
    assert split["async_loads"] and not split["spills"]  # cache tiles stream through cp.async
    assert split["shared"] <= 227 * 1024 // 2  # two programs fit an SM's shared memory
    assert not combine["spills"]
