"""The loader runner processes use: the hybrid GPU+CPU engine when a GPU is there, else the CPU.

``load(device="cuda")`` alone moves the dense model to the GPU but keeps every routed expert on
the CPU; a server wants hot experts resident on the GPU, streaming prefill for long prompts and
graph-captured decode steps, which ``krasisd.engine.gpu.graphs.load_hybrid`` assembles from the
dual-format cache. Every setting (the VRAM budget, where the dense linears come from, kernel
tuning, ...) arrives in one EngineOptions, built by the runner from its command line.
"""

from __future__ import annotations

import dataclasses
import logging

from krasisd.config import DEFAULT_GPU_DENSE
from krasisd.engine.engine_options import EngineOptions

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
                     gpu_dense: str = DEFAULT_GPU_DENSE, options: EngineOptions | None = None):
    """An Engine for a runner: hybrid for quantized models on a GPU machine, else ``load()``
(on the CPU for the models the hybrid engine refuses: Gated DeltaNet, Qwen3-Next and
Qwen3.5/3.6 MoE).

    ``options`` carries every setting (a runner passes it); without it the keywords make one:
    ``cache_dir`` and ``gpu_cache_dir`` are the registry's CPU- and GPU-format caches (a
    missing one is found or built inside the model folder), ``gpu_dense`` ("quant" or "bf16",
    KRASIS_GPU_DENSE) the hybrid engine's dense linears. The CPU path (no GPU, or quant
    "none") uses neither the GPU settings nor ``gpu_dense``, but they are checked all the same.
    """
    from krasisd.engine.engine import load

    if options is None:
        options = EngineOptions(quant=quant, device=device, threads=threads, cache_dir=cache_dir,
                                gpu_cache_dir=gpu_cache_dir, gpu_dense=gpu_dense)
    if options.quant == "none" or not wants_gpu(options.device):
        return load(model_dir, quant=options.quant,
                    device="cpu" if options.device == "auto" else options.device,
                    threads=options.threads, cache_dir=options.cache_dir)
    from krasisd.engine.gpu.graphs import linear_attention_architecture, load_hybrid

    architecture = linear_attention_architecture(model_dir)
    if architecture is not None:  # Qwen3-Next, Qwen3.5/3.6 MoE: the CPU engine serves them
        log.warning("%s (Gated DeltaNet) is not supported by the hybrid GPU engine; loading %s "
                    "on the CPU engine", architecture, model_dir)
        return load(model_dir, quant=options.quant, device="cpu", threads=options.threads,
                    cache_dir=options.cache_dir)
    log.info("loading %s for hybrid GPU+CPU serving (%s, dense linears %s)", model_dir,
             options.quant, options.gpu_dense)
    return load_hybrid(model_dir, options=dataclasses.replace(options, device="cuda"))
