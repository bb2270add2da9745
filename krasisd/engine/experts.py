"""The routed-expert interface: every backend (torch reference, native CPU, GPU) plugs in here.

Model code calls ``backend(layer_idx, x, topk_ids, topk_weights)`` and never looks inside.

Legend: T = tokens, D = hidden size, E = routed experts, K = experts per token,
I = expert intermediate size (moe_intermediate_size).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class ExpertBackend(Protocol):
    """Computes the weighted sum of routed experts for one MoE layer."""

    def __call__(
        self,
        layer_idx: int,
        x: torch.Tensor,  # [T, D] activations (model dtype)
        topk_ids: torch.Tensor,  # [T, K] int64 expert ids
        topk_weights: torch.Tensor,  # [T, K] float32 routing weights (already scaled)
    ) -> torch.Tensor:  # [T, D] in x.dtype
        ...


class TorchExperts:
    """Float reference backend: per-layer stacked weights, computed expert by expert.

    ``weights[layer_idx] = (gate [E, I, D], up [E, I, D], down [E, D, I])``.
    """

    def __init__(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.weights = weights

    def __call__(self, layer_idx, x, topk_ids, topk_weights):
        gate, up, down = self.weights[layer_idx]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
        flat_ids = topk_ids.reshape(-1)  # [T*K]
        for expert in torch.unique(flat_ids).tolist():
            token_idx, slot = torch.nonzero(topk_ids == expert, as_tuple=True)  # [n], [n]
            xe = x[token_idx]  # [n, D]
            h = F.silu(xe @ gate[expert].T) * (xe @ up[expert].T)  # [n, I]
            ye = (h @ down[expert].T).float()  # [n, D]
            out.index_add_(0, token_idx, ye * topk_weights[token_idx, slot, None])
        return out.to(x.dtype)
