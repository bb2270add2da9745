"""Which dense linears the CPU-only path quantizes, and how (docs/architecture.md, "The placement
model"): the plan that both the CPU cache's builder (krasisd.engine.cpu_cache) and the load-time
fallback (krasisd.engine.dense_quant) follow, so the two quantize the same weights the same way.

Kept in float: ``kv_b_proj`` (absorbed MLA decode reads its weight directly, and prefill uses it
once per cached token), the router (a small float32 matmul) and the embedding (one row read per
token). The output head defaults to INT8 even for INT4 models (llama.cpp's Q4_0 files use Q6_K
there): its error lands directly on the logits.

Legend: N = output features, K = input features, G = group size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from krasisd.engine.quant import DEFAULT_GROUP_SIZE, check_format, largest_group_size, quantize

log = logging.getLogger(__name__)

KEEP_FLOAT = ("kv_b_proj",)  # module names whose weights the model reads directly
HEAD_NAME = "lm_head"
HEAD_BITS = 8  # output head precision on the CPU path, whatever the other weights use
CHUNK_ROWS = 8192  # rows quantized at a time: bounds the float32 temporaries of a large head


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
