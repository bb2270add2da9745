"""The loader runner processes use: the hybrid GPU+CPU engine when a GPU is there, else the CPU.

``load(device="cuda")`` alone moves the dense model to the GPU but keeps every routed expert on
the CPU; a server wants hot experts resident on the GPU, streaming prefill for long prompts and
graph-captured decode steps, which ``krasisd.engine.gpu.graphs.load_hybrid`` assembles from the
dual-format cache. The VRAM budget comes from ``KRASIS_VRAM_BUDGET`` (see gpu/placement.py);
where the dense linears come from, from ``KRASIS_GPU_DENSE`` (the runner's ``--gpu-dense``).
"""

from __future__ import annotations

import logging

from krasisd.config import DEFAULT_GPU_DENSE, gpu_dense_value

log = logging.getLogger("krasisd.engine.serving")


def wants_gpu(device: str) -> bool:
    """Whether ``device`` ("auto", "cpu" or "cuda") resolves to a CUDA GPU here."""
    if device == "cpu":
        return False
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return torch.cuda.is_available()


def load_for_serving(model_dir, quant: str = "int4", device: str = "auto",
                     threads: int | None = None, cache_dir=None, gpu_cache_dir=None,
                     gpu_dense: str = DEFAULT_GPU_DENSE):
    """An Engine for a runner: hybrid for quantized models on a GPU machine, else ``load()``.

    ``cache_dir`` and ``gpu_cache_dir`` are the registry's CPU- and GPU-format caches; a
    missing one is found or built where the engine keeps its own, inside the model folder.
    ``gpu_dense`` ("quant" or "bf16", KRASIS_GPU_DENSE) is the hybrid engine's ``dense``: the
    CPU cache's quantized dense linears or the checkpoint's bf16 ones. The other path (no GPU,
    or quant "none") does not use it, but refuses a bad value all the same.
    """
    from krasisd.engine.engine import load

    gpu_dense = gpu_dense_value(gpu_dense)
    if quant == "none" or not wants_gpu(device):
        return load(model_dir, quant=quant, device="cpu" if device == "auto" else device,
                    threads=threads, cache_dir=cache_dir)
    from krasisd.engine.gpu.graphs import load_hybrid

    log.info("loading %s for hybrid GPU+CPU serving (%s, dense linears %s)", model_dir, quant,
             gpu_dense)
    return load_hybrid(model_dir, quant=quant, device="cuda", threads=threads,
                       cpu_cache_dir=cache_dir, gpu_cache_dir=gpu_cache_dir, dense=gpu_dense)
