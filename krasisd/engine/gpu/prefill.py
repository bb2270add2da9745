"""Streaming prefill of MoE layers: ``GpuExperts``, an ExpertBackend for long prompts on the GPU.

Resident experts live in a device arena for good; the others sit in pinned host memory and
are copied, on a dedicated copy stream, into one half of a double buffer in the same arena:
- when a layer is called with a long prompt, the next MoE layer's streamed experts are
  copied into the other half while this layer computes (and the next attention runs);
- when few tokens are routed (expected union of routed experts below ``full_copy_fraction``
  of the experts), only the experts the prompt routes to are copied, on demand;
- resident experts are never copied.
Tokens go through the expert kernels ``chunk_tokens`` at a time, so the expert activations
of a long prompt never exist all at once.

Legend: T = tokens, K = experts per token, E = experts, D = hidden, S = arena slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.placement import PlacementPlan

log = logging.getLogger(__name__)

IMPLS = ("triton", "grouped_mm")


@dataclass
class _Transfer:
    """One copy of a layer's streamed experts into one buffer half."""

    half: int
    expert_ids: list[int]
    slot_of_expert: torch.Tensor  # [E] int32 on the device
    done: torch.cuda.Event | None
    start: torch.cuda.Event | None


@dataclass
class StreamStats:
    """Copies since the last reset: bytes, count, and time the copy stream was busy."""

    bytes_copied: int = 0
    experts_copied: int = 0
    copies: int = 0
    copy_busy_ms: float = 0.0
    timed: list = field(default_factory=list, repr=False)  # (start, done) events


def expected_routed_fraction(num_tokens: int, top_k: int, num_experts: int) -> float:
    """Fraction of experts a prompt of ``num_tokens`` reaches under uniform routing."""
    return 1.0 - (1.0 - top_k / num_experts) ** num_tokens


class GpuExperts:
    """ExpertBackend: resident experts plus double-buffered streaming from pinned memory."""

    def __init__(self, host: HostExperts, plan: PlacementPlan, device, impl: str | None = None,
                 chunk_tokens: int = 8192, full_copy_fraction: float = 0.9, kernel_config=None):
        self.device = torch.device(device)
        self.impl = impl or ("triton" if self.device.type == "cuda" else "grouped_mm")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.host, self.plan, self.layout = host, plan, host.layout
        self.chunk_tokens, self.full_copy_fraction = chunk_tokens, full_copy_fraction
        self.kernel_config = kernel_config
        self.moe_layers = sorted(host.layers)
        self._next_layer = dict(zip(self.moe_layers, self.moe_layers[1:] + [None], strict=True))
        self._cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._build_arena()
        self._pending: dict[int, _Transfer] = {}
        self._half_free: list = [None, None]
        self._last_transfer: list[_Transfer | None] = [None, None]
        self._next_half = 0
        self.stats = StreamStats()

    def _build_arena(self) -> None:
        num_experts = self.host.num_experts
        slots = self.plan.num_resident + self.plan.buffer_slots
        self.arena = torch.empty(slots, self.layout.expert_bytes, dtype=torch.uint8,
                                 device=self.device)  # [S, expert_bytes]
        self.views = self.layout.views(self.arena)
        self._resident_slots: dict[int, list[int]] = {}
        self._streamed: dict[int, list[int]] = {}
        next_slot = 0
        for layer in self.moe_layers:
            ids = list(self.plan.resident.get(layer, ()))
            slot_of = [-1] * num_experts
            for e in ids:
                slot_of[e] = next_slot
                self.arena[next_slot].copy_(self.host.layers[layer][e])
                next_slot += 1
            self._resident_slots[layer] = slot_of
            self._streamed[layer] = [e for e in range(num_experts) if slot_of[e] < 0]
        half = self.plan.buffer_slots // 2
        self._buffer_base = (next_slot, next_slot + half)
        self._buffer_half_slots = half
        need = max((len(s) for s in self._streamed.values()), default=0)
        if need > half:
            raise ValueError(f"buffer half of {half} slots cannot hold {need} streamed experts")
        self._resident_tensor = {layer: self._slot_map(layer, [], 0) for layer in self.moe_layers}
        self._full_slot_maps = {  # built once: a device copy of a host list synchronizes
            (layer, half): self._slot_map(layer, self._streamed[layer], half)
            for layer in self.moe_layers for half in (0, 1) if self._streamed[layer]
        }

    # -- copies ---------------------------------------------------------------------------

    def _slot_map(self, layer: int, expert_ids: list[int], half: int) -> torch.Tensor:
        slot_of = list(self._resident_slots[layer])
        for i, e in enumerate(expert_ids):
            slot_of[e] = self._buffer_base[half] + i
        slot_of = [s if s >= 0 else 0 for s in slot_of]  # unrouted, uncopied: never read
        return torch.tensor(slot_of, dtype=torch.int32).to(self.device)

    def _issue_copy(self, layer: int, expert_ids: list[int]) -> _Transfer:
        half = self._next_half
        self._next_half ^= 1
        if expert_ids == self._streamed[layer]:
            slot_map = self._full_slot_maps[(layer, half)]
        else:  # subset copies come after a host sync on the routing anyway
            slot_map = self._slot_map(layer, expert_ids, half)
        host, base = self.host.layers[layer], self._buffer_base[half]
        start = done = None
        if self._cuda:
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                if self._half_free[half] is not None:
                    self.copy_stream.wait_event(self._half_free[half])
                start.record(self.copy_stream)
                self._copy_runs(host, expert_ids, base)
                done.record(self.copy_stream)
            self.stats.timed.append((start, done))
        else:
            self._copy_runs(host, expert_ids, base)
        self.stats.bytes_copied += len(expert_ids) * self.layout.expert_bytes
        self.stats.experts_copied += len(expert_ids)
        self.stats.copies += 1
        transfer = _Transfer(half, expert_ids, slot_map, done, start)
        self._last_transfer[half] = transfer
        return transfer

    def _copy_runs(self, host: torch.Tensor, expert_ids: list[int], base: int) -> None:
        """One copy per run of consecutive expert ids (they land in consecutive slots)."""
        i = 0
        while i < len(expert_ids):
            j = i + 1
            while j < len(expert_ids) and expert_ids[j] == expert_ids[j - 1] + 1:
                j += 1
            first = expert_ids[i]
            dst = self.arena[base + i : base + j]
            dst.copy_(host[first : first + (j - i)], non_blocking=self._cuda)
            i = j

    def prefetch(self, layer_idx: int, topk_ids: torch.Tensor | None = None) -> None:
        """Start copying ``layer_idx``'s streamed experts: those ``topk_ids`` route to, or all."""
        if layer_idx in self._pending or not self._streamed.get(layer_idx):
            return
        streamed = self._streamed[layer_idx]
        if topk_ids is not None:
            routed = set(torch.unique(topk_ids).tolist())  # host sync: the subset decides copies
            streamed = [e for e in streamed if e in routed]
        self._pending[layer_idx] = self._issue_copy(layer_idx, streamed)

    def begin_forward(self, num_tokens: int, top_k: int) -> None:
        """Optional hook before a forward pass: start the first MoE layer's copy early."""
        self._pending.clear()  # nothing left over from an interrupted pass
        if self.moe_layers and self._wants_full_copy(num_tokens, top_k):
            self.prefetch(self.moe_layers[0])

    def _wants_full_copy(self, num_tokens: int, top_k: int) -> bool:
        fraction = expected_routed_fraction(num_tokens, top_k, self.host.num_experts)
        return fraction >= self.full_copy_fraction

    def _ensure_layer(self, layer: int, topk_ids: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        if not self._streamed.get(layer):
            return self._resident_tensor[layer], None
        if layer not in self._pending:
            self.prefetch(layer, topk_ids)
        transfer = self._pending.pop(layer)
        if transfer.done is not None:
            torch.cuda.current_stream(self.device).wait_event(transfer.done)
        return transfer.slot_of_expert, transfer.half

    # -- compute --------------------------------------------------------------------------

    def __call__(self, layer_idx, x, topk_ids, topk_weights):
        """ExpertBackend call: [T, D] activations -> [T, D] weighted sum of routed experts."""
        if layer_idx not in self.host.layers:
            raise KeyError(f"layer {layer_idx} has no routed experts")
        t, top_k = topk_ids.shape
        slot_of_expert, half = self._ensure_layer(layer_idx, topk_ids)
        nxt = self._next_layer[layer_idx]
        if nxt is not None and self._wants_full_copy(t, top_k):
            self.prefetch(nxt)
        out = self._compute(x.to(torch.bfloat16), topk_ids, topk_weights, slot_of_expert)
        if half is not None and self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._half_free[half] = event
        return out.to(x.dtype)

    def _compute(self, x, topk_ids, topk_weights, slot_of_expert) -> torch.Tensor:
        outs = []
        for s in range(0, x.shape[0], self.chunk_tokens):
            e = s + self.chunk_tokens
            outs.append(self._compute_chunk(x[s:e], topk_ids[s:e], topk_weights[s:e],
                                            slot_of_expert))
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, D]

    def _compute_chunk(self, x, topk_ids, topk_weights, slot_of_expert) -> torch.Tensor:
        spec = self.layout.spec
        if self.impl == "triton":
            from krasisd.engine.gpu.moe_triton import moe_triton

            return moe_triton(x, self.views, slot_of_expert, topk_ids, topk_weights, spec.bits,
                              spec.group_size, self.kernel_config)
        from krasisd.engine.gpu.moe_grouped import moe_grouped_mm

        return moe_grouped_mm(x, self.views, slot_of_expert, topk_ids, topk_weights, spec)

    # -- accounting -----------------------------------------------------------------------

    def take_stats(self) -> StreamStats:
        """Synchronize, return the copy statistics since the last call, and reset them."""
        stats, self.stats = self.stats, StreamStats()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            stats.copy_busy_ms = sum(a.elapsed_time(b) for a, b in stats.timed)
        stats.timed = []
        return stats
