"""The other MoE path: dequantize the layer's experts to bf16, then ``torch._grouped_mm``.

``torch._grouped_mm(a [M, K] bf16, b [E, K, N] bf16, offs=[E] int32)`` multiplies the rows
``offs[e-1]:offs[e]`` of ``a`` by ``b[e]``; offs are cumulative row ends. The k-major GPU
format dequantizes straight into that ``[E, K, N]`` operand. Costs a bf16 copy of every
routed expert of the layer (E x 3 x I x D x 2 bytes) as workspace.

Legend: T = tokens, K = experts per token, E = experts, D = hidden, I = intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from krasisd.engine.gpu.format import QuantSpec, dequantize_kmajor


def grouped_mm_workspace_bytes(num_experts: int, hidden: int, intermediate: int) -> int:
    """Bytes of the bf16 dequantized experts this path materializes per layer."""
    return num_experts * 3 * hidden * intermediate * 2


def moe_grouped_mm(
    x: torch.Tensor,  # [T, D] bf16
    views: dict[str, torch.Tensor],  # typed arena views [S, ...]
    slot_of_expert: torch.Tensor,  # [E] int64/int32 arena slot of each expert
    topk_ids: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K] float32
    spec: QuantSpec,
) -> torch.Tensor:  # [T, D] bf16
    """Routed experts through dequantization plus two grouped matmuls."""
    t, d = x.shape
    k = topk_ids.shape[1]
    num_experts = slot_of_expert.numel()
    slots = slot_of_expert.to(torch.int64)
    flat = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]; bincount would sync the host
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] cumulative row ends
    token_of_row = order // k  # [T*K]
    xs = x[token_of_row].to(torch.bfloat16)  # [T*K, D]
    w13 = dequantize_kmajor(views["w13_q"][slots], views["w13_s"][slots], spec, torch.bfloat16)
    gate_up = torch._grouped_mm(xs, w13, offs=offs)  # [T*K, 2I]
    del w13
    inter = gate_up.shape[1] // 2
    h = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(torch.bfloat16)
    w2 = dequantize_kmajor(views["w2_q"][slots], views["w2_s"][slots], spec, torch.bfloat16)
    ys = torch._grouped_mm(h, w2, offs=offs).float()  # [T*K, D]
    ys *= topk_weights.reshape(-1)[order].float().unsqueeze(1)
    out = torch.zeros(t, d, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, ys)
    return out.to(torch.bfloat16)
