"""Where the GPU-format cache load spends its time: pinning memory, reading, or registering.

Writes one file of --gib GiB (random bytes), drops it from nothing (it stays in the page
cache: this measures the warm load), then times, median of --runs:
  alloc     torch.empty(pin_memory=True) of the file's size, nothing read;
  read      that plus readinto() from the file (what load_gpu_cache does today);
  register  mmap the file and cudaHostRegister the mapping (no copy), then unregister;
  h2d       one host-to-device copy of the pinned buffer, for scale.

    python3 bench/pinned_load.py [--gib 4] [--runs 3] [--dir .]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time

import torch

REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    nbytes = int(args.gib * (1 << 30))
    path = os.path.join(args.dir, ".pinned-load-bench.bin")
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as out:
        for _ in range(nbytes // len(chunk)):
            out.write(chunk)
    nbytes = os.path.getsize(path)
    gb = nbytes / 1e9
    cudart = torch.cuda.cudart()

    def alloc():
        torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def read():
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        with open(path, "rb") as handle:
            handle.readinto(memoryview(buf.numpy()))

    def register():
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), nbytes, prot=mmap.PROT_READ)
        view = torch.frombuffer(mapped, dtype=torch.uint8)
        err = cudart.cudaHostRegister(view.data_ptr(), nbytes, REGISTER_READ_ONLY)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {err}")
        cudart.cudaHostUnregister(view.data_ptr())
        del view
        mapped.close()

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def h2d():
        device.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    h2d()
    results = {}
    for name, fn in (("alloc", alloc), ("read", read), ("register", register), ("h2d", h2d)):
        try:
            results[name] = timed(fn, args.runs)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name}: failed: {exc}")
    os.remove(path)
    print(f"file {gb:.2f} GB (page cache warm), median of {args.runs}")
    for name, seconds in results.items():
        print(f"{name:9s} {seconds:7.3f} s  {gb / seconds:7.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
