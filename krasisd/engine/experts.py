"""The routed-expert interface: every backend (torch reference, native CPU, GPU) plugs in here.

Model code calls ``backend(layer_idx, x, topk_ids, topk_weights)`` and never looks inside;
the whole contract is ``ExpertBackend``, and a split CPU/GPU backend adds ``SplitExpertBackend``.

Legend: T = tokens, D = hidden size, E = routed experts, K = experts per token,
I = expert intermediate size (moe_intermediate_size).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


class ExpertBackend(ABC):
    """Computes the weighted sum of routed experts for one MoE layer, for model code
    (models/moe.py), the prefill driver (gpu/driver.py) and the engine (load, close).

    Every backend subclasses it and implements ``__call__``; the other methods have
    do-nothing defaults that a backend overrides where it has something to do, so callers
    call them instead of asking whether they exist."""

    @abstractmethod
    def __call__(
        self,
        layer_idx: int,
        x: torch.Tensor,  # [T, D] activations (model dtype)
        topk_ids: torch.Tensor,  # [T, K] int64 expert ids
        topk_weights: torch.Tensor,  # [T, K] float32 routing weights (already scaled)
    ) -> torch.Tensor:  # [T, D] in x.dtype
        ...

    def begin_forward(self, num_tokens: int, top_k: int) -> None:  # noqa: B027 - a no-op
        """Called before a prefill of ``num_tokens`` reaches its first layer: a backend that
        copies weights ahead (the GPU's streaming prefill) starts here."""

    @property
    def dense(self) -> Mapping[str, Any]:
        """The dense linears stored beside the experts (the CPU cache's quantized copies,
        name -> cpu_cache.DenseWeight); none by default."""
        return {}

    def close(self) -> None:  # noqa: B027 - a no-op
        """Release what the backend holds; it is not called afterwards."""


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the expert activation every backend computes."""
    return F.silu(gate) * up


class ClampedSwiGLU:
    """gpt-oss's expert activation: gate clamped above at ``limit``, up within +-limit, then
    (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = alpha, limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class TorchExperts(ExpertBackend):
    """Float reference backend: per-layer stacked weights, computed expert by expert.

    ``weights[layer_idx] = (gate [E, I, D], up [E, I, D], down [E, D, I])``, optionally followed
    by biases ``(gate [E, I], up [E, I], down [E, D])``; ``activation(gate, up)`` is SwiGLU
    unless the model sets another (ClampedSwiGLU for gpt-oss).
    """

    def __init__(self, weights: dict[int, tuple[torch.Tensor, ...]]):
        self.weights = weights
        self.activation = swiglu

    def __call__(self, layer_idx, x, topk_ids, topk_weights):
        gate, up, down, *biases = self.weights[layer_idx]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
        flat_ids = topk_ids.reshape(-1)  # [T*K]
        for expert in torch.unique(flat_ids).tolist():
            token_idx, slot = torch.nonzero(topk_ids == expert, as_tuple=True)  # [n], [n]
            xe = x[token_idx]  # [n, D]
            g, u = xe @ gate[expert].T, xe @ up[expert].T  # [n, I] each
            if biases:
                g, u = g + biases[0][expert], u + biases[1][expert]
            ye = self.activation(g, u) @ down[expert].T  # [n, D]
            if biases:
                ye = ye + biases[2][expert]
            out.index_add_(0, token_idx, ye.float() * topk_weights[token_idx, slot, None])
        return out.to(x.dtype)


class SplitExpertBackend(ExpertBackend):
    """An ExpertBackend whose layers run partly on the GPU (resident experts) and partly on
    the CPU at the same time (krasisd.engine.gpu.hybrid.HybridExperts): what the decode step
    (gpu/graphs.py) and expert re-placement (heat.py) call between the two halves.

    ``heat`` counts the routes (an ExpertHeat, or None when nothing is counted); ``generation``
    changes whenever the resident experts change, so decode graphs captured before are stale;
    ``cpu`` is the CPU half (an ExpertBackend, or None when every expert is resident)."""

    heat: Any = None
    generation: int = 0
    cpu: ExpertBackend | None = None

    @abstractmethod
    def has_gpu_part(self, layer: int) -> bool:
        """Whether some of the layer's experts are resident on the GPU."""

    @abstractmethod
    def has_cpu_part(self, layer: int) -> bool:
        """Whether some of the layer's experts run on the CPU."""

    @abstractmethod
    def gpu_part(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, shared: Any = None) -> torch.Tensor:
        """The resident experts' share of the layer: [T, D] float32 (no host sync)."""

    @abstractmethod
    def shared_experts(self, layer: int, mlp: torch.nn.Module, num_slots: int) -> Any:
        """The layer's shared experts in the form ``gpu_part`` runs beside the resident
        experts, or None where they run as their own MLP."""

    @abstractmethod
    def staging(self, num_tokens: int, top_k: int) -> Any:
        """The pinned host buffers (inputs and output of the CPU half) for a token count."""

    @abstractmethod
    def stage_to_host(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor) -> Any:
        """Enqueue the copies of the CPU half's inputs to ``staging``'s buffers."""

    @abstractmethod
    def run_cpu(self, layer: int, staging: Any, event: Any) -> None:
        """Wait for ``event`` (the staged copies), then the CPU half into ``staging.out``."""
