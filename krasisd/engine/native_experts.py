"""NativeExperts: the routed-expert backend over the memory-mapped CPU cache and the fused
native kernels (krasis_native). One ``MoE.forward`` call per layer, the GIL released inside.

Legend: T = tokens, D = hidden size, K = experts per token.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from krasisd.engine.cache_files import engine_cache_dir, load_or_build
from krasisd.engine.cpu_cache import CacheError, CpuCache, build_cpu_cache, load_cpu_cache
from krasisd.engine.errors import UnsupportedModelError
from krasisd.engine.experts import ExpertBackend
from krasisd.engine.quant import BITS, DEFAULT_GROUP_SIZE, pick_group_size, quantize

__all__ = ["DEFAULT_GROUP_SIZE", "NativeExperts", "NativeLinear", "create_backend",
           "native_expert_backend", "pick_group_size"]

log = logging.getLogger(__name__)


def _native():
    try:
        import krasis_native
    except ImportError as exc:
        raise ValueError(f"the native CPU kernels (krasis_native) are not built: {exc}") from exc
    return krasis_native


class NativeExperts(ExpertBackend):
    """ExpertBackend over a CpuCache; ``threads`` defaults to usable cores minus one."""

    def __init__(self, cache: CpuCache, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.cache = cache
        self.bits = cache.bits
        self.group_size = cache.group_size
        self.hidden = int(cache.manifest["hidden"])
        self.runner = _native().MoE(threads or 0)

    @property
    def threads(self) -> int:
        return self.runner.threads

    @property
    def isa(self) -> str:
        return _native().isa()

    @property
    def dense(self) -> dict:
        """The dense linears stored in the CPU cache (name -> cpu_cache.DenseWeight), which
        dense_quant.quantize_dense_linears(stored=...) uses instead of quantizing again."""
        return self.cache.dense

    def __call__(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        layer = self.cache.layers.get(layer_idx)
        if layer is None:
            raise ValueError(f"layer {layer_idx} has no routed experts in the CPU cache")
        x32 = x.detach().to("cpu", torch.float32).contiguous()  # [T, D]
        ids = topk_ids.detach().to("cpu", torch.int64).contiguous()  # [T, K]
        weights = topk_weights.detach().to("cpu", torch.float32).contiguous()  # [T, K]
        out = np.empty((x32.shape[0], self.hidden), dtype=np.float32)  # [T, D]
        self.runner.forward(x32.numpy(), ids.numpy(), weights.numpy(), *layer.arrays(),
                            self.bits, self.group_size, out)
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    def close(self) -> None:
        """Drop the mapped cache (the pages go when the last array does)."""
        self.cache = CpuCache(self.cache.manifest, {})


class NativeLinear:
    """A quantized ``nn.Linear`` without bias for the CPU path (dense weights, output head):
    W [N, K] quantized once into the CPU layout, applied by the native kernels."""

    def __init__(self, weight: torch.Tensor, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE,
                 runner=None):
        qweight, scales = quantize(weight.detach().cpu(), bits, group_size)
        self.qweight, self.scales = qweight.numpy(), scales.numpy()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = weight.shape
        self.runner = runner if runner is not None else _native().MoE(0)

    @classmethod
    def from_quantized(cls, qweight: np.ndarray, scales: np.ndarray, bits: int, group_size: int,
                       in_features: int, runner) -> NativeLinear:
        """A NativeLinear over weights already in the CPU layout (no re-quantization)."""
        layer = cls.__new__(cls)
        layer.qweight, layer.scales = qweight, scales
        layer.bits, layer.group_size = bits, group_size
        layer.out_features, layer.in_features = int(qweight.shape[0]), int(in_features)
        layer.runner = runner
        return layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.detach().reshape(-1, self.in_features).to("cpu", torch.float32).contiguous()  # [T, K]
        out = np.empty((x2.shape[0], self.out_features), dtype=np.float32)  # [T, N]
        self.runner.linear(x2.numpy(), self.qweight, self.scales, self.bits, self.group_size, out)
        y = torch.from_numpy(out).reshape(*x.shape[:-1], self.out_features)
        return y.to(device=x.device, dtype=x.dtype)


def default_cache_dir(model_dir: Path, quant: str, group_size: int) -> Path:
    return engine_cache_dir(model_dir, f"cpu-{quant}-g{group_size}")


def native_expert_backend(model_dir, config, quant: str, cache_dir=None,
                          group_size: int | None = None, threads: int | None = None
                          ) -> NativeExperts:
    """NativeExperts for ``model_dir``; builds the CPU cache first when missing or invalid."""
    if quant not in BITS:
        raise ValueError(f"quant must be one of {tuple(BITS)} for native experts, got {quant!r}")
    if config.expert_bias:  # the kernels compute silu(gate) * up, without biases
        raise UnsupportedModelError(
            f"{config.architecture}'s experts (biases, clamped SwiGLU) are not supported by the "
            f"native {quant} expert kernels; load it with quant='none'")
    model_dir = Path(model_dir)
    if group_size is None:
        group_size = pick_group_size(config.hidden_size, config.moe_intermediate_size, BITS[quant])
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(model_dir, quant, group_size)
    cache = load_or_build(
        lambda: load_cpu_cache(cache_dir, quant=quant, group_size=group_size, model_dir=model_dir),
        lambda: build_cpu_cache(model_dir, cache_dir, quant=quant, group_size=group_size),
        CacheError, f"the CPU {quant} cache in {cache_dir}")
    log.info("native experts: %s g%d, %d layers, isa=%s", quant, group_size, len(cache.layers),
             _native().isa())
    return NativeExperts(cache, threads=threads)


def create_backend(model_dir, config, quant: str, cache_dir=None, threads: int | None = None,
                   group_size: int | None = None) -> NativeExperts:
    """The hook krasisd.engine.engine.load() calls for quant='int8' | 'int4'."""
    return native_expert_backend(model_dir, config, quant, cache_dir, group_size=group_size,
                                 threads=threads)
