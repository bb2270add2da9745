"""Quantized dense linears for the CPU-only path (docs/architecture.md, "The placement model").

With no GPU, every dense weight (attention projections, shared experts, dense MLP layers,
output head) is read from RAM on every decoded token; in bf16 they outweigh the routed experts
about four to one for DeepSeek-V2-Lite. ``quantize_dense_linears`` swaps each ``nn.Linear`` of
a loaded model for a ``QuantLinear`` run by the native kernels, on the expert backend's thread
pool, in the same INT4/INT8 group-wise layout as the experts (krasisd.engine.quant).

Which linears, at which bits and group size: krasisd.engine.dense_plan.

The CPU cache (krasisd.engine.cpu_cache) stores the quantized dense linears beside the experts,
built by the same ``dense_plan`` and ``quantize_weight`` (krasisd.engine.dense_plan); a load passes them as
``stored`` and nothing is quantized again (docs/architecture.md: "a load never quantizes again"). Without
``stored`` (or for a linear the cache lacks) the weights are quantized at load time.

Legend: T = tokens, N = output features, K = input features, G = group size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from krasisd.engine.dense_plan import HEAD_BITS, dense_plan, quantize_weight
from krasisd.engine.native_experts import NativeLinear
from krasisd.engine.quant import DEFAULT_GROUP_SIZE

log = logging.getLogger(__name__)

class QuantLinear(nn.Module):
    """A drop-in for ``nn.Linear`` over a NativeLinear (plus the float bias, when there is one)."""

    def __init__(self, native: NativeLinear, bias: torch.Tensor | None = None):
        super().__init__()
        self.native = native
        self.in_features, self.out_features = native.in_features, native.out_features
        self.bits, self.group_size = native.bits, native.group_size
        if bias is None:
            self.bias = None
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        y = self.native(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


def quantize_linear(linear: nn.Linear, bits: int, group_size: int, runner) -> QuantLinear:
    """RTN-quantize one nn.Linear (in row chunks) into a QuantLinear on ``runner``."""
    qweight, scales = quantize_weight(linear.weight, bits, group_size)
    native = NativeLinear.from_quantized(qweight, scales, bits, group_size, linear.in_features,
                                         runner)
    return QuantLinear(native, linear.bias)


def _from_stored(entry, linear: nn.Linear, bits: int, group_size: int, runner
                 ) -> QuantLinear | None:
    """A QuantLinear over a cached entry (cpu_cache.DenseWeight) when it is exactly what the
    plan asks for, else None."""
    if entry is None or (entry.bits, entry.group_size, entry.in_features) != (
            bits, group_size, linear.in_features) or entry.qweight.shape[0] != linear.out_features:
        return None
    native = NativeLinear.from_quantized(entry.qweight, entry.scales, bits, group_size,
                                         linear.in_features, runner)
    return QuantLinear(native, linear.bias)


def quantize_dense_linears(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                           runner=None, head_bits: int | None = HEAD_BITS,
                           stored: dict | None = None) -> int:
    """Replace every ``nn.Linear`` of ``dense_plan`` by a QuantLinear sharing ``runner`` (a
    krasis_native.MoE). ``stored`` (name -> cpu_cache.DenseWeight, e.g. NativeExperts.dense)
    supplies weights already quantized; the others are quantized now. Returns the count
    replaced."""
    if runner is None:
        raise ValueError("quantize_dense_linears needs the native runner (krasis_native.MoE)")
    stored = stored or {}
    from_cache, weight_bytes = 0, 0
    plan = dense_plan(model, bits, group_size, head_bits)
    for name, linear, layer_bits, group in plan:
        quantized = _from_stored(stored.get(name), linear, layer_bits, group, runner)
        if quantized is None:
            quantized = quantize_linear(linear, layer_bits, group, runner)
        else:
            from_cache += 1
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        weight_bytes += quantized.native.qweight.nbytes + quantized.native.scales.nbytes
    if stored and from_cache < len(plan):
        log.warning("dense linears: %d of %d not in the CPU cache, quantized at load",
                    len(plan) - from_cache, len(plan))
    log.info("dense linears: %d INT%d (head INT%d), %d from the CPU cache, %.1f MB", len(plan),
             bits, head_bits or bits, from_cache, weight_bytes / 1e6)
    return len(plan)
