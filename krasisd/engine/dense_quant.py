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

The dense weights are quantized at load time from the (memory-mapped) checkpoint rather than
stored in the CPU cache: round-to-nearest over ~1e9 dense parameters takes seconds, against
minutes for the routed experts, so a second on-disk copy is not worth its space yet.

Legend: T = tokens, N = output features, K = input features, G = group size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from krasisd.engine.native_experts import DEFAULT_GROUP_SIZE, NativeLinear
from krasisd.engine.quant import INT4_UNIT, quantize

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
    """The largest of preferred, 64, 32 that divides in_features (INT4: and 64 divides it)."""
    if bits == 4 and in_features % INT4_UNIT != 0:
        return None
    for group_size in (preferred, 64, 32):
        if group_size <= preferred and in_features % group_size == 0:
            return group_size
    return None


def quantize_linear(linear: nn.Linear, bits: int, group_size: int, runner) -> QuantLinear:
    """RTN-quantize one nn.Linear (in row chunks) into a QuantLinear on ``runner``."""
    weight = linear.weight.detach().cpu()  # [N, K]
    parts = [quantize(weight[r0:r0 + CHUNK_ROWS], bits, group_size)
             for r0 in range(0, weight.shape[0], CHUNK_ROWS)]
    qweight = torch.cat([q for q, _ in parts]).numpy()  # [N, K] int8 or [N, K/2] uint8
    scales = torch.cat([s for _, s in parts]).numpy()  # [N, K/G]
    native = NativeLinear.from_quantized(qweight, scales, bits, group_size, weight.shape[1], runner)
    return QuantLinear(native, linear.bias)


def quantize_dense_linears(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                           runner=None, head_bits: int | None = HEAD_BITS) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except KEEP_FLOAT) by a QuantLinear sharing
    ``runner`` (a krasis_native.MoE); the output head gets ``head_bits`` (None: ``bits``).
    A linear whose input size fits no group size stays in float (logged). Returns the count
    replaced."""
    if bits not in (4, 8) or (head_bits is not None and head_bits not in (4, 8)):
        raise ValueError(f"bits must be 4 or 8, got {bits} (head {head_bits})")
    if runner is None:
        raise ValueError("quantize_dense_linears needs the native runner (krasis_native.MoE)")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FLOAT]
    replaced, weight_bytes = 0, 0
    for name, linear in targets:
        layer_bits = head_bits if name == HEAD_NAME and head_bits is not None else bits
        group = pick_dense_group(linear.in_features, layer_bits, group_size)
        if group is None:
            log.warning("%s: input size %d fits no %d-bit group size; kept in float",
                        name, linear.in_features, layer_bits)
            continue
        quantized = quantize_linear(linear, layer_bits, group, runner)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        weight_bytes += quantized.native.qweight.nbytes + quantized.native.scales.nbytes
        replaced += 1
    log.info("dense linears: %d quantized to INT%d (head INT%d), %.1f MB", replaced, bits,
             head_bits or bits, weight_bytes / 1e6)
    return replaced
