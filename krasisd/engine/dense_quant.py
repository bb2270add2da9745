"""Quantized dense linears for the CPU-only path (DESIGN.md, "The engine's placement model").

With no GPU, every dense weight (attention projections, shared experts, dense MLP layers,
output head) is read from RAM on every decoded token; in bf16 they outweigh the routed experts
about four to one for DeepSeek-V2-Lite. ``quantize_dense_linears`` swaps each ``nn.Linear`` of
a loaded model for a ``QuantLinear`` run by the native kernels, on the expert backend's thread
pool, in the same INT4/INT8 group-wise layout as the experts (krasisd.engine.quant).

Kept in float: ``kv_b_proj`` (absorbed MLA decode reads its weight directly, and prefill uses it
once per cached token), the router (a small float32 matmul) and the embedding (one row read per
token). The output head defaults to INT8 even for INT4 models (llama.cpp's Q4_0 files use Q6_K
there): its error lands directly on the logits.

The CPU cache (krasisd.engine.cpu_cache) stores the quantized dense linears beside the experts,
built by the same ``dense_plan`` and ``quantize_weight`` as here; a load passes them as
``stored`` and nothing is quantized again (DESIGN.md: "a load never re-quantizes"). Without
``stored`` (or for a linear the cache lacks) the weights are quantized at load time.

Legend: T = tokens, N = output features, K = input features, G = group size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from krasisd.engine.native_experts import NativeLinear
from krasisd.engine.quant import DEFAULT_GROUP_SIZE, check_format, largest_group_size, quantize

log = logging.getLogger(__name__)

KEEP_FLOAT = ("kv_b_proj",)  # module names whose weights the model reads directly
HEAD_NAME = "lm_head"
HEAD_BITS = 8  # output head precision on the CPU path, whatever the other weights use
CHUNK_ROWS = 8192  # rows quantized at a time: bounds the float32 temporaries of a large head


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


def pick_dense_group(in_features: int, bits: int, preferred: int = DEFAULT_GROUP_SIZE) -> int | None:
    """``preferred`` when it fits in_features, else the largest smaller group size of the shared
    rule (quant.largest_group_size); None when none fits."""
    try:
        check_format(bits, preferred, in_features)
        return preferred
    except ValueError:
        return largest_group_size((in_features,), bits, preferred)


def dense_plan(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
               head_bits: int | None = HEAD_BITS) -> list[tuple[str, nn.Linear, int, int]]:
    """(name, linear, bits, group size) of every ``nn.Linear`` the CPU path quantizes: all but
    KEEP_FLOAT, the head at ``head_bits`` (None: ``bits``). A linear whose input size fits no
    group size stays in float (logged). Works on a model built on the meta device too."""
    if bits not in (4, 8) or (head_bits is not None and head_bits not in (4, 8)):
        raise ValueError(f"bits must be 4 or 8, got {bits} (head {head_bits})")
    plan = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in KEEP_FLOAT:
            continue
        layer_bits = head_bits if name == HEAD_NAME and head_bits is not None else bits
        group = pick_dense_group(module.in_features, layer_bits, group_size)
        if group is None:
            log.warning("%s: input size %d fits no %d-bit group size; kept in float",
                        name, module.in_features, layer_bits)
            continue
        plan.append((name, module, layer_bits, group))
    return plan


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """RTN-quantize W [N, K] in row chunks: (qweight [N, K] int8 or [N, K/2] uint8,
    scales [N, K/G] float32), as numpy arrays."""
    weight = weight.detach().cpu()  # [N, K]
    parts = [quantize(weight[r0:r0 + CHUNK_ROWS], bits, group_size)
             for r0 in range(0, weight.shape[0], CHUNK_ROWS)]
    qweight = torch.cat([q for q, _ in parts]).numpy()  # [N, K] or [N, K/2]
    scales = torch.cat([s for _, s in parts]).numpy()  # [N, K/G]
    return qweight, scales


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
