"""The native runner's thread pool and activation quantization: spin policy, results that do
not depend on the thread count, and every ISA's quantization against the scalar reference."""

import time

import krasis_native
import numpy as np
import pytest
import torch
from test_kernels import make_case, run_native

MIN_ACT_AMAX = np.float32(127.0) / np.finfo(np.float32).max  # kernels.h kMinActAmax


def quantize_reference(x: np.ndarray, group_size: int):
    """The documented activation quantization in numpy: (q [M, K], scale, sum [M, K/G])."""
    groups = x.reshape(x.shape[0], -1, group_size)  # [M, K/G, G]
    amax = np.abs(groups).max(axis=-1, keepdims=True)  # [M, K/G, 1]
    with np.errstate(divide="ignore", over="ignore"):  # np.where evaluates both sides
        inv = np.where(amax > MIN_ACT_AMAX, np.float32(127.0) / amax, np.float32(0.0)
                       ).astype(np.float32)
    q = np.rint(groups * inv).astype(np.int32)  # round half to even, like nearbyint
    scale = (amax[..., 0] / np.float32(127.0)).astype(np.float32)
    return q.reshape(x.shape).astype(np.int8), scale, q.sum(axis=-1).astype(np.int32)


def awkward_rows(group_size: int) -> np.ndarray:
    """[6, 4G] float32: random rows, an all-zero group, exact ties (k + 0.5 steps), tiny
    and huge magnitudes, and groups so small that 127 / amax overflows."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4 * group_size)).astype(np.float32)
    x[1, :group_size] = 0.0
    x[2, :group_size] = np.arange(group_size, dtype=np.float32) % 8 - 3.5  # amax 4: ties
    x[2, group_size - 1] = 127.0  # amax 127, so the steps are 1 and .5s are ties
    x[3] *= np.float32(1e-30)
    x[4] *= np.float32(1e30)
    x[5, :group_size] = np.where(np.arange(group_size) % 2, 1e-39, -1e-39)  # subnormal
    x[5, group_size:2 * group_size] = MIN_ACT_AMAX  # exactly at the bound: zeros too
    return x


@pytest.mark.parametrize("group_size", [32, 64, 96, 128])
def test_every_isa_quantizes_like_the_scalar_reference(group_size):
    x = awkward_rows(group_size)
    want = quantize_reference(x, group_size)
    try:
        for isa in krasis_native.supported_isas():
            krasis_native.set_isa(isa)
            got = krasis_native.quantize_activations(x, group_size)
            for name, a, b in zip(("q", "scale", "sum"), got, want, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), f"{isa}: {name} differs"
    finally:
        krasis_native.set_isa("auto")


def test_quantize_activations_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        krasis_native.quantize_activations(np.zeros((1, 96), np.float32), 64)


@pytest.mark.parametrize("case", [(4, 128, 256, 256, 1, 6, 8), (8, 64, 192, 128, 9, 4, 8),
                                  (4, 32, 128, 192, 13, 3, 6)],
                         ids=["int4-M1", "int8-M9", "int4-g32-M13"])
def test_results_do_not_depend_on_thread_count(case):
    """More threads than cores: ranges are stolen from descheduled threads; each output row is
    still summed by one task in a fixed order."""
    x, ids, weights, arrays, _ = make_case(*case, seed=4)
    one = run_native(x, ids, weights, arrays, case[0], case[1], threads=1)
    for threads in (2, 3, 5):
        got = run_native(x, ids, weights, arrays, case[0], case[1], threads=threads)
        assert torch.equal(one, got), threads


def test_back_to_back_calls_reuse_the_pool():
    """Many calls on one runner (phases, barrier and job hand-over every time) give the same
    result as a fresh single-thread runner."""
    x, ids, weights, arrays, _ = make_case(4, 64, 192, 128, 1, 4, 8, seed=5)
    want = run_native(x, ids, weights, arrays, 4, 64, threads=1)
    runner = krasis_native.MoE(3)
    out = np.empty(tuple(x.shape), dtype=np.float32)
    for _ in range(200):
        out[:] = np.nan
        runner.forward(x.numpy(), ids.numpy(), weights.numpy(), *arrays, 4, 64, out)
        assert torch.equal(torch.from_numpy(out), want)


def test_spin_time_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("KRASIS_NATIVE_SPIN_US", raising=False)
    assert krasis_native.MoE(2).spin_us == 2000
    monkeypatch.setenv("KRASIS_NATIVE_SPIN_US", "0")
    assert krasis_native.MoE(2).spin_us == 0
    for bad in ("abc", "-5", "1.5", "99999999999"):
        monkeypatch.setenv("KRASIS_NATIVE_SPIN_US", bad)
        with pytest.raises(ValueError, match="KRASIS_NATIVE_SPIN_US"):
            krasis_native.MoE(2)


@pytest.mark.parametrize("spin_us", ["0", "20000"])
def test_idle_workers_sleep_after_the_spin(monkeypatch, spin_us):
    """After a call, the workers spin at most spin_us, then sleep: a runner idle for 0.5 s
    costs little CPU (a spinning worker would burn ~0.5 s per thread)."""
    monkeypatch.setenv("KRASIS_NATIVE_SPIN_US", spin_us)
    x, ids, weights, arrays, _ = make_case(8, 64, 192, 128, 2, 2, 4)
    runner = krasis_native.MoE(3)
    out = np.empty(tuple(x.shape), dtype=np.float32)
    runner.forward(x.numpy(), ids.numpy(), weights.numpy(), *arrays, 8, 64, out)
    cpu0 = time.process_time()
    time.sleep(0.5)
    spent_s = time.process_time() - cpu0
    assert spent_s < 0.15, f"idle runner used {spent_s:.3f} s of CPU in 0.5 s"
