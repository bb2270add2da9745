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
from typing import TYPE_CHECKING

import torch

from krasisd.engine.experts import ExpertBackend
from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.placement import PlacementPlan

if TYPE_CHECKING:  # tuning imports Triton, which the grouped_mm path does not need
    from krasisd.engine.gpu.tuning import KernelTuning

log = logging.getLogger(__name__)

IMPLS = ("triton", "grouped_mm")


@dataclass
class _Transfer:
    """A layer's streamed experts copied (or being copied) into one buffer half."""

    layer: int
    half: int
    expert_ids: list[int]  # in slot order from the half's base
    slot_of_expert: torch.Tensor  # [E] int32 on the device
    done: torch.cuda.Event | None
    complete: bool  # every streamed expert of the layer is there


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


class GpuExperts(ExpertBackend):
    """ExpertBackend: resident experts plus double-buffered streaming from pinned memory."""

    def __init__(self, host: HostExperts, plan: PlacementPlan, device, impl: str | None = None,
                 chunk_tokens: int = 8192, full_copy_fraction: float = 0.9, kernel_config=None,
                 time_copies: bool = False, tuning: KernelTuning | None = None):
        """``kernel_config``: the Triton kernels' tile (None: timed per shape with ``tuning``,
        else a fixed tile)."""
        self.device = torch.device(device)
        self.impl = impl or ("triton" if self.device.type == "cuda" else "grouped_mm")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.host, self.plan, self.layout = host, plan, host.layout
        self.chunk_tokens, self.full_copy_fraction = chunk_tokens, full_copy_fraction
        self.kernel_config, self.tuning = kernel_config, tuning
        self.time_copies = time_copies  # keep timing events until take_stats() (benchmarks)
        self.moe_layers = sorted(host.layers)
        self._next_layer = dict(zip(self.moe_layers, self.moe_layers[1:] + [None], strict=True))
        self._cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._build_arena()
        self._pending: dict[int, _Transfer] = {}
        self._current: _Transfer | None = None  # the layer being computed
        self._half_free: list = [None, None]  # event after the last reader of each half
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

    def resident_slot_map(self, layer: int) -> torch.Tensor:
        """[E] int32: the arena slot of each of the layer's resident experts (0 elsewhere)."""
        return self._resident_tensor[layer]

    def _slot_map(self, layer: int, expert_ids: list[int], half: int) -> torch.Tensor:
        slot_of = list(self._resident_slots[layer])
        for i, e in enumerate(expert_ids):
            slot_of[e] = self._buffer_base[half] + i
        slot_of = [s if s >= 0 else 0 for s in slot_of]  # unrouted, uncopied: never read
        return torch.tensor(slot_of, dtype=torch.int32).to(self.device)

    def _copy(self, layer: int, expert_ids: list[int], half: int, first: int, wait_free: bool):
        """Enqueue copies of ``expert_ids`` into slots ``first..`` of ``half``; the done event."""
        host, base = self.host.layers[layer], self._buffer_base[half] + first
        self.stats.bytes_copied += len(expert_ids) * self.layout.expert_bytes
        self.stats.experts_copied += len(expert_ids)
        self.stats.copies += 1
        if not self._cuda:
            self._copy_runs(host, expert_ids, base)
            return None
        timing = self.time_copies
        start, done = torch.cuda.Event(enable_timing=timing), torch.cuda.Event(enable_timing=timing)
        with torch.cuda.stream(self.copy_stream):
            if wait_free and self._half_free[half] is not None:
                self.copy_stream.wait_event(self._half_free[half])  # last reader of this half
            start.record(self.copy_stream)
            self._copy_runs(host, expert_ids, base)
            done.record(self.copy_stream)
        if timing:
            self.stats.timed.append((start, done))
        return done

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

    def _start_transfer(self, layer: int, expert_ids: list[int]) -> _Transfer:
        half = self._next_half
        self._next_half ^= 1
        complete = expert_ids == self._streamed[layer]
        if complete:
            slot_map = self._full_slot_maps[(layer, half)]
        else:  # subset copies come after a host sync on the routing anyway
            slot_map = self._slot_map(layer, expert_ids, half)
        done = self._copy(layer, expert_ids, half, 0, wait_free=True)
        return _Transfer(layer, half, list(expert_ids), slot_map, done, complete)

    def _routed_streamed(self, layer: int, topk_ids: torch.Tensor, skip=()) -> list[int]:
        routed = set(torch.unique(topk_ids).tolist())  # host sync: the subset decides copies
        return [e for e in self._streamed[layer] if e in routed and e not in skip]

    def _extend(self, transfer: _Transfer, topk_ids: torch.Tensor) -> None:
        """A later chunk of the same layer may route to experts the first chunk did not."""
        missing = self._routed_streamed(transfer.layer, topk_ids, set(transfer.expert_ids))
        if not missing:
            return
        first = len(transfer.expert_ids)
        transfer.done = self._copy(transfer.layer, missing, transfer.half, first, wait_free=False)
        transfer.expert_ids += missing
        transfer.slot_of_expert = self._slot_map(transfer.layer, transfer.expert_ids, transfer.half)

    def prefetch(self, layer_idx: int, topk_ids: torch.Tensor | None = None) -> None:
        """Start copying ``layer_idx``'s streamed experts: those ``topk_ids`` route to, or all.

        The model may call it right after routing (subset) or earlier (all).
        """
        if layer_idx in self._pending or not self._streamed.get(layer_idx):
            return
        if self._current is not None and self._current.layer == layer_idx:
            return
        ids = self._streamed[layer_idx]
        if topk_ids is not None:
            ids = self._routed_streamed(layer_idx, topk_ids)
        self._pending[layer_idx] = self._start_transfer(layer_idx, ids)

    def begin_forward(self, num_tokens: int, top_k: int) -> None:
        """Before a forward pass: start the first MoE layer's copy early."""
        self._pending.clear()  # nothing left over from an interrupted pass
        self._current = None
        if self.moe_layers and self._wants_full_copy(num_tokens, top_k):
            self.prefetch(self.moe_layers[0])

    def _wants_full_copy(self, num_tokens: int, top_k: int) -> bool:
        fraction = expected_routed_fraction(num_tokens, top_k, self.host.num_experts)
        return fraction >= self.full_copy_fraction

    def _ensure_layer(self, layer: int, topk_ids: torch.Tensor) -> tuple[_Transfer | None, bool]:
        """The layer's transfer (None: all resident) and whether this is its first call."""
        if not self._streamed.get(layer):
            return None, False
        first_call = self._current is None or self._current.layer != layer
        if first_call:
            transfer = self._pending.pop(layer, None)
            if transfer is None:
                transfer = self._start_transfer(layer, self._routed_streamed(layer, topk_ids))
            self._current = transfer
        elif not self._current.complete:
            self._extend(self._current, topk_ids)
        if self._current.done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._current.done)
        return self._current, first_call

    # -- compute --------------------------------------------------------------------------

    def __call__(self, layer_idx, x, topk_ids, topk_weights):
        """ExpertBackend call: [T, D] activations -> [T, D] weighted sum of routed experts.

        A layer may be called several times in a row (chunks of one prompt); its experts
        stay in their buffer half until the next layer is called.
        """
        if layer_idx not in self.host.layers:
            raise KeyError(f"layer {layer_idx} has no routed experts")
        t, top_k = topk_ids.shape
        transfer, first_call = self._ensure_layer(layer_idx, topk_ids)
        nxt = self._next_layer[layer_idx]
        if (first_call or transfer is None) and nxt is not None and self._wants_full_copy(t, top_k):
            self.prefetch(nxt)
        slot_of_expert = self._resident_tensor[layer_idx] if transfer is None else transfer.slot_of_expert
        out = self._compute(x.to(torch.bfloat16), topk_ids, topk_weights, slot_of_expert)
        if transfer is not None and self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._half_free[transfer.half] = event
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
                              spec.group_size, self.kernel_config, self.tuning)
        from krasisd.engine.gpu.moe_grouped import moe_grouped_mm

        return moe_grouped_mm(x, self.views, slot_of_expert, topk_ids, topk_weights, spec)

    def close(self) -> None:
        """Release the device arena; the backend cannot be called afterwards."""
        self._pending.clear()
        self._current = None
        self.arena, self.views = None, {}
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # -- accounting -----------------------------------------------------------------------

    def take_stats(self) -> StreamStats:
        """Synchronize, return the copy statistics since the last call, and reset them."""
        stats, self.stats = self.stats, StreamStats()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            stats.copy_busy_ms = sum(a.elapsed_time(b) for a, b in stats.timed)
        stats.timed = []
        return stats
