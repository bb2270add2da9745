"""The VRAM budget and where routed experts live: a pure function, no GPU needed.

The budget is spent in order: dense weights, KV cache, activation workspace, two layers
of streaming buffers (double buffering), then routed experts, hottest first. When all
experts fit beside the first three, no streaming buffers are needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_MARGIN_BYTES = 1 << 30  # left free for the CUDA context, cuDNN/cuBLAS workspaces
DEFAULT_MARGIN_FRACTION = 0.05


class PlacementError(ValueError):
    """The VRAM budget cannot hold what the GPU path needs at the least."""


def default_vram_budget(free_bytes: int) -> int:
    """What is free minus a margin (the larger of 1 GiB and 5 %)."""
    margin_bytes = max(DEFAULT_MARGIN_BYTES, int(free_bytes * DEFAULT_MARGIN_FRACTION))
    return max(0, free_bytes - margin_bytes)


def resolve_vram_budget(free_bytes: int, budget_bytes: int | None = None) -> int:
    """The budget: ``budget_bytes`` (EngineOptions.vram_budget_bytes, KRASIS_VRAM_BUDGET)
    capped at what is free, or by default what is free minus a margin."""
    if budget_bytes is None:
        return default_vram_budget(free_bytes)
    if budget_bytes <= 0:
        raise ValueError(f"the VRAM budget must be positive, got {budget_bytes}")
    if budget_bytes > free_bytes:
        log.warning("vram budget %d bytes exceeds free memory %d; using free", budget_bytes,
                    free_bytes)
        return free_bytes
    return budget_bytes


@dataclass(frozen=True)
class PlacementRequest:
    """Everything the plan needs to know, in bytes and counts."""

    budget_bytes: int
    dense_bytes: int  # attention, norms, embeddings, shared experts, dense MLPs (bf16)
    kv_cache_bytes: int
    workspace_bytes: int  # activations of one prefill chunk
    expert_bytes: int  # one routed expert in the GPU format
    moe_layers: tuple[int, ...]
    num_experts: int
    heat: dict[int, list[int]] | None = None  # layer -> routed count per expert

    def __post_init__(self):
        for name in ("budget_bytes", "dense_bytes", "kv_cache_bytes", "workspace_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.expert_bytes <= 0 or self.num_experts <= 0:
            raise ValueError("expert_bytes and num_experts must be positive")


@dataclass(frozen=True)
class PlacementPlan:
    """Resident experts per layer and the bytes of each use of the budget."""

    request: PlacementRequest
    resident: dict[int, tuple[int, ...]]  # layer -> sorted resident expert ids
    buffer_slots: int  # expert slots of the streaming double buffer (both halves)
    notes: list[str] = field(default_factory=list)

    @property
    def num_resident(self) -> int:
        return sum(len(ids) for ids in self.resident.values())

    @property
    def resident_fraction(self) -> float:
        total = len(self.request.moe_layers) * self.request.num_experts
        return self.num_resident / total if total else 1.0

    @property
    def resident_bytes(self) -> int:
        return self.num_resident * self.request.expert_bytes

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_slots * self.request.expert_bytes

    @property
    def used_bytes(self) -> int:
        r = self.request
        fixed = r.dense_bytes + r.kv_cache_bytes + r.workspace_bytes
        return fixed + self.buffer_bytes + self.resident_bytes

    def streamed(self, layer: int) -> tuple[int, ...]:
        """Expert ids of ``layer`` that live in pinned host memory."""
        resident = set(self.resident.get(layer, ()))
        return tuple(e for e in range(self.request.num_experts) if e not in resident)

    def summary(self) -> dict:
        r = self.request
        return {
            "budget_bytes": r.budget_bytes, "dense_bytes": r.dense_bytes,
            "kv_cache_bytes": r.kv_cache_bytes, "workspace_bytes": r.workspace_bytes,
            "buffer_bytes": self.buffer_bytes, "resident_bytes": self.resident_bytes,
            "resident_experts": self.num_resident,
            "resident_fraction": round(self.resident_fraction, 4),
        }


def _expert_order(req: PlacementRequest) -> list[tuple[int, int]]:
    """(layer, expert) pairs, hottest first; without heat, layers take turns by expert id."""
    heat = req.heat or {}
    pairs = [(layer, e) for layer in req.moe_layers for e in range(req.num_experts)]

    def key(pair):
        layer, e = pair
        counts = heat.get(layer)
        count = counts[e] if counts is not None and e < len(counts) else 0
        return (-count, e, layer)

    return sorted(pairs, key=key)


def plan_placement(req: PlacementRequest) -> PlacementPlan:
    """Spend the budget: dense, KV, workspace, streaming buffers, then hottest experts."""
    fixed_bytes = req.dense_bytes + req.kv_cache_bytes + req.workspace_bytes
    total_experts = len(req.moe_layers) * req.num_experts
    if fixed_bytes + total_experts * req.expert_bytes <= req.budget_bytes:
        resident = {layer: tuple(range(req.num_experts)) for layer in req.moe_layers}
        return PlacementPlan(req, resident, 0, ["all routed experts resident"])
    full_buffer_slots = 2 * req.num_experts if req.moe_layers else 0
    floor_bytes = fixed_bytes + full_buffer_slots * req.expert_bytes
    if floor_bytes > req.budget_bytes:
        raise PlacementError(
            f"VRAM budget {req.budget_bytes} bytes is below the {floor_bytes} bytes the GPU path "
            f"needs (dense {req.dense_bytes}, KV {req.kv_cache_bytes}, workspace "
            f"{req.workspace_bytes}, two streamed layers {full_buffer_slots * req.expert_bytes})"
        )
    free_slots = (req.budget_bytes - floor_bytes) // req.expert_bytes
    chosen: dict[int, list[int]] = {layer: [] for layer in req.moe_layers}
    for layer, e in _expert_order(req)[:free_slots]:
        chosen[layer].append(e)
    resident = {layer: tuple(sorted(ids)) for layer, ids in chosen.items()}
    max_streamed = max(req.num_experts - len(ids) for ids in resident.values())
    notes = [f"{free_slots} expert slots after dense, KV, workspace and buffers"]
    return PlacementPlan(req, resident, 2 * max_streamed, notes)
