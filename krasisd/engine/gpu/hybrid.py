"""Hybrid decode experts: the routed experts resident on the GPU are computed there, the
others on the CPU with the native kernels, at the same time; the two parts are summed on
the GPU.

Per MoE layer and decode step (``start`` then ``finish``):
1. on the GPU: the router's output and the normed hidden state go to pinned host buffers
   (one hidden-state copy, plus the [T, K] ids and weights), then an event is recorded;
2. a worker thread waits for that event and runs the native kernels over the slots whose
   expert is not resident (the call releases the GIL); meanwhile the caller enqueues the
   resident experts' Triton kernels (and the shared experts), which the GPU runs while the
   CPU computes (when those are one graph replay, the caller enqueues it first and runs
   the CPU part itself, which saves the thread hand-off);
3. ``finish`` joins the worker, copies its [T, D] result back through a pinned buffer (one
   copy) and adds it to the GPU part.
Prompts of ``prefill_min_tokens`` or more go to the streaming prefill backend (GpuExperts).

Resident experts are the GpuExperts placement's (one arena serves prefill and decode).
Slots of non-resident experts are never computed on the GPU: slots are compacted so the
resident ones come first and the kernels stop at their count, all on the device (no host
sync), so the GPU part can be captured in a CUDA graph (krasisd.engine.gpu.graphs).
The CPU part gets every slot of the token, with the resident ones redirected to one of the
token's CPU experts at weight 0, so a step with no resident expert is exactly the CPU path.

Legend: T = tokens, K = experts per token, P = T*K slots, D = hidden, E = experts,
I = expert intermediate, BM = rows per kernel block.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from krasisd.config import DEFAULT_GPU_PREFILL_MIN_TOKENS
from krasisd.engine.experts import SplitExpertBackend
from krasisd.engine.gpu import tuning
from krasisd.engine.gpu.dense_decode import moe_shared
from krasisd.engine.gpu.moe_decode import (
    GEMV_CANDIDATES,
    GemvConfig,
    SharedExperts,
    moe_gemv,
    resident_slots,
)
from krasisd.engine.gpu.moe_triton import (
    SortedRoutes,
    default_config,
    launch_down,
    launch_gate_up,
)
from krasisd.engine.gpu.tuning import KernelTuning

log = logging.getLogger(__name__)

GEMV_MAX_SLOTS = 16  # up to this many routed slots, the matrix-vector kernels (moe_decode)
_DECODE_TUNER = tuning.Tuner("moe_decode", GEMV_CANDIDATES, GemvConfig, tuning.time_graph)


@dataclass
class HostStaging:
    """Pinned host buffers of one token count: what the CPU reads and what it writes."""

    x: torch.Tensor  # [T, D] float32, the normed hidden state
    ids: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K] float32
    out: torch.Tensor  # [T, D] float32, the CPU experts' sum
    out_dev: torch.Tensor  # [T, D] float32 on the device: where ``out`` lands

    def __post_init__(self):  # numpy views of the host buffers, made once (not per layer)
        self.x_np, self.ids_np = self.x.numpy(), self.ids.numpy()
        self.weights_np, self.out_np = self.weights.numpy(), self.out.numpy()


@dataclass
class Pending:
    """A layer between ``start`` and ``finish``."""

    layer: int
    dtype: torch.dtype
    gpu_out: torch.Tensor | None  # [T, D] float32, resident experts' sum
    cpu_job: Future | None
    staging: HostStaging | None


class HybridExperts(SplitExpertBackend):
    """Resident experts on the GPU and the others on the CPU, concurrently."""

    def __init__(self, gpu, cpu, device=None, use_gpu_experts: bool = True,
                 prefill_min_tokens: int = DEFAULT_GPU_PREFILL_MIN_TOKENS,
                 cpu_thread: bool = True, heat=None, tuning: KernelTuning | None = None):
        """``gpu``: a GpuExperts (or None), ``cpu``: a NativeExperts (or None);
        ``prefill_min_tokens``: calls with this many tokens or more stream through ``gpu``
        (EngineOptions.gpu_prefill_min_tokens); ``tuning``: time the matrix-vector tiles
        (None: a fixed tile)."""
        if gpu is None and cpu is None:
            raise ValueError("HybridExperts needs a GPU backend, a CPU backend, or both")
        if prefill_min_tokens < 1:
            raise ValueError(f"prefill_min_tokens must be >= 1, got {prefill_min_tokens}")
        self.gpu, self.cpu = gpu, cpu
        self.device = torch.device(device if device is not None else gpu.device)
        self._cuda = self.device.type == "cuda"
        self.use_gpu_experts = use_gpu_experts and gpu is not None
        self.prefill_min_tokens = prefill_min_tokens
        self.tuning = tuning
        self.gemv_max_slots = GEMV_MAX_SLOTS  # 0: always the grouped kernels
        self.heat = heat
        layers = sorted(gpu.host.layers) if gpu is not None else sorted(cpu.cache.layers)
        self.moe_layers = layers
        self.num_experts = gpu.host.num_experts if gpu is not None else int(
            cpu.cache.manifest["n_experts"])
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="krasis-cpu-experts") if (
            cpu_thread and cpu is not None) else None
        self._staging: dict[int, HostStaging] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self.generation = 0  # bumped when residency changes (captured graphs are stale)
        self.refresh_residency()

    # -- residency ------------------------------------------------------------------------

    def refresh_residency(self) -> None:
        """(Re)read which experts are resident from the GPU backend's placement."""
        num = self.num_experts
        self.generation += 1
        self.resident_np: dict[int, np.ndarray] = {}
        self._resident_dev: dict[int, torch.Tensor] = {}
        self._slot_map: dict[int, torch.Tensor] = {}
        self._gemv_slots: dict[int, torch.Tensor] = {}  # [E] int32, -1 where not resident
        for layer in self.moe_layers:
            ids = self.gpu.plan.resident.get(layer, ()) if self.use_gpu_experts else ()
            mask = np.zeros(num, dtype=bool)
            mask[list(ids)] = True
            if self.cpu is None and not mask.all():
                raise ValueError(f"layer {layer}: {num - int(mask.sum())} experts are not "
                                 "resident on the GPU and there is no CPU backend")
            self.resident_np[layer] = mask
            self._resident_dev[layer] = torch.from_numpy(mask).to(self.device)  # [E] bool
            if mask.any():
                self._slot_map[layer] = self.gpu.resident_slot_map(layer)  # [E] int32 arena slot
                self._gemv_slots[layer] = resident_slots(self._slot_map[layer],
                                                         self._resident_dev[layer])

    def resident_fraction(self) -> float:
        total = len(self.moe_layers) * self.num_experts
        return sum(int(m.sum()) for m in self.resident_np.values()) / total if total else 0.0

    def has_gpu_part(self, layer: int) -> bool:
        return bool(self.resident_np[layer].any())

    def has_cpu_part(self, layer: int) -> bool:
        return not bool(self.resident_np[layer].all())

    # -- the ExpertBackend call -----------------------------------------------------------

    def __call__(self, layer_idx, x, topk_ids, topk_weights):
        """[T, D] -> [T, D]: long prompts stream through GpuExperts, short ones go hybrid."""
        if layer_idx not in self.resident_np:
            raise KeyError(f"layer {layer_idx} has no routed experts")
        if x.shape[0] >= self.prefill_min_tokens and self.gpu is not None:
            if self.heat is not None:
                self.heat.record(layer_idx, topk_ids)
            return self.gpu(layer_idx, x, topk_ids, topk_weights)
        return self.finish(self.start(layer_idx, x, topk_ids, topk_weights))

    def begin_forward(self, num_tokens: int, top_k: int) -> None:
        """Prefill hook (krasisd.engine.gpu.driver): long prompts start their copies early."""
        if self.gpu is not None and num_tokens >= self.prefill_min_tokens:
            self.gpu.begin_forward(num_tokens, top_k)

    def start(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> Pending:
        """Hand the CPU its slots and enqueue the resident experts on the GPU."""
        if self.heat is not None:
            self.heat.record(layer, topk_ids)
        job, staging = None, None
        if self.has_cpu_part(layer):
            staging = self.stage_to_host(layer, x, topk_ids, topk_weights)
            job = self.submit_cpu(layer, staging)
        gpu_out = None
        if self.has_gpu_part(layer):
            gpu_out = self.gpu_part(layer, x, topk_ids, topk_weights)
        return Pending(layer, x.dtype, gpu_out, job, staging)

    def finish(self, pending: Pending) -> torch.Tensor:
        """Join the CPU part and return the [T, D] sum in the activations' dtype."""
        out = pending.gpu_out
        if pending.staging is not None:
            cpu_dev = self.cpu_result(pending)  # [T, D] float32 on the device
            out = cpu_dev if out is None else out + cpu_dev
        return out.to(pending.dtype)

    # -- CPU side -------------------------------------------------------------------------

    def staging(self, num_tokens: int, top_k: int) -> HostStaging:
        """Pinned buffers for ``num_tokens`` (made once, reused every step)."""
        staging = self._staging.get(num_tokens)
        if staging is None:
            hidden, pin = self.cpu.hidden, self._cuda
            staging = HostStaging(
                x=torch.empty(num_tokens, hidden, dtype=torch.float32, pin_memory=pin),
                ids=torch.empty(num_tokens, top_k, dtype=torch.int64, pin_memory=pin),
                weights=torch.empty(num_tokens, top_k, dtype=torch.float32, pin_memory=pin),
                out=torch.empty(num_tokens, hidden, dtype=torch.float32, pin_memory=pin),
                out_dev=torch.empty(num_tokens, hidden, dtype=torch.float32, device=self.device))
            self._staging[num_tokens] = staging
            self._events[num_tokens] = torch.cuda.Event() if self._cuda else None
        return staging

    def stage_to_host(self, layer: int, x, topk_ids, topk_weights) -> HostStaging:
        """Enqueue the device-to-host copies of one layer's CPU inputs (no host sync)."""
        staging = self.staging(x.shape[0], topk_ids.shape[1])
        staging.x.copy_(x, non_blocking=self._cuda)
        staging.ids.copy_(topk_ids, non_blocking=self._cuda)
        staging.weights.copy_(topk_weights, non_blocking=self._cuda)
        return staging

    def submit_cpu(self, layer: int, staging: HostStaging) -> Future | None:
        """Start the CPU experts once the staged copies have landed; None when run inline."""
        event = self.handoff_event(staging)
        if self._pool is None:
            self.run_cpu(layer, staging, event)
            return None
        return self._pool.submit(self.run_cpu, layer, staging, event)

    def handoff_event(self, staging: HostStaging):
        """Record (and return) the event after which the staged copies are on the host."""
        event = self._events[staging.x.shape[0]]
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))
        return event

    def run_cpu(self, layer: int, staging: HostStaging, event) -> None:
        """Worker: wait for the copies, then the native kernels into ``staging.out``."""
        if event is not None:
            event.synchronize()  # releases the GIL
        ids, weights = cpu_slots(staging.ids_np, staging.weights_np, self.resident_np[layer])
        if ids is None:
            staging.out_np.fill(0.0)  # numpy: this thread is outside inference mode
            return
        arrays = self.cpu.cache.layers[layer].arrays()
        self.cpu.runner.forward(staging.x_np, ids, weights, *arrays, self.cpu.bits,
                                self.cpu.group_size, staging.out_np)

    def cpu_result(self, pending: Pending) -> torch.Tensor:
        """Wait for the CPU part and enqueue its copy to the device: [T, D] float32."""
        if pending.cpu_job is not None:
            pending.cpu_job.result()
        staging = pending.staging
        staging.out_dev.copy_(staging.out, non_blocking=self._cuda)
        return staging.out_dev

    # -- GPU side -------------------------------------------------------------------------

    def gpu_part(self, layer: int, x, topk_ids, topk_weights,
                 shared: SharedExperts | None = None) -> torch.Tensor:
        """Resident experts only, with the Triton kernels: [T, D] float32 (sync-free); with
        ``shared`` (from ``shared_experts``, which says for how many slots) the shared
        experts too, in the same launches."""
        if topk_ids.numel() <= self.gemv_max_slots:
            cfg = self._gemv_config(layer, x, topk_ids, topk_weights)
            return self._gemv(layer, x, topk_ids, topk_weights, cfg, shared)
        if shared is not None:
            raise ValueError(f"shared experts run with at most {self.gemv_max_slots} slots")
        cfg = default_config(1.0, self.device.type)
        return self._gpu_part(layer, x, topk_ids, topk_weights, cfg)

    def shared_experts(self, layer: int, mlp, num_slots: int) -> SharedExperts | None:
        """The layer's shared-experts MLP in the form ``gpu_part`` runs beside the resident
        experts, when it can (quantized like them, a layer with resident experts, the
        matrix-vector kernels for ``num_slots`` routed slots); else None."""
        if (self.gpu is None or not self.has_gpu_part(layer)
                or num_slots > self.gemv_max_slots):
            return None
        spec = self.gpu.layout.spec
        return moe_shared(mlp, self.gpu.views, spec.bits, spec.group_size)

    def _gemv(self, layer, x, topk_ids, topk_weights, cfg: GemvConfig,
              shared: SharedExperts | None = None) -> torch.Tensor:
        spec = self.gpu.layout.spec
        return moe_gemv(x.to(torch.bfloat16), self.gpu.views, self._gemv_slots[layer], topk_ids,
                        topk_weights, spec.bits, spec.group_size, cfg, shared)

    def _gpu_part(self, layer, x, topk_ids, topk_weights, cfg) -> torch.Tensor:
        t, k = topk_ids.shape
        if self.resident_np[layer].all():  # nothing to compact: fewer kernels per step
            routes = all_routes(topk_ids, cfg.block_m)
        else:
            on_gpu = self._resident_dev[layer][topk_ids]  # [T, K] bool
            routes = resident_routes(topk_ids, on_gpu, cfg.block_m)
        block_slot = self._slot_map[layer][routes.block_expert.long()]  # [P] int32
        spec, views = self.gpu.layout.spec, self.gpu.views
        inter = views["w2_q"].shape[1] * (8 if spec.bits == 4 else 1)
        xb = x.to(torch.bfloat16).contiguous()  # [T, D]
        h = torch.empty(routes.sorted_ids.numel(), inter, dtype=torch.bfloat16, device=x.device)
        y = torch.zeros(t * k, x.shape[1], dtype=torch.bfloat16, device=x.device)  # [P, D]
        launch_gate_up(xb, views, h, routes, block_slot, spec.bits, spec.group_size, cfg)
        launch_down(h, views, y, topk_weights, routes, block_slot, spec.bits, spec.group_size,
                     cfg)
        return y.view(t, k, -1).sum(dim=1, dtype=torch.float32)  # [T, D]

    def _gemv_config(self, layer, x, topk_ids, topk_weights) -> GemvConfig:
        """The fastest matrix-vector tile for this shape: timed once per machine (CUDA) and
        remembered in the tuning file (krasisd.engine.gpu.tuning).

        A candidate is timed over every layer with resident experts in a row, as a decode step
        runs them: one layer's experts (26 MB at DeepSeek-V2-Lite's shape) fit in the H200's
        50 MB L2, so timing one layer alone rewards tiles that are fast from cache, not from
        memory."""
        if not self._cuda or self.tuning is None:
            return GemvConfig()
        spec = self.gpu.layout.spec
        key = (spec.bits, spec.group_size, x.shape[1], self.gpu.layout.intermediate,
               topk_ids.numel())

        def run(cfg):  # only when timing: later calls find the key remembered
            for each in sorted(self._gemv_slots) or [layer]:
                self._gemv(each, x, topk_ids, topk_weights, cfg)

        return _DECODE_TUNER.pick(key, run, self.tuning, self.device, fallback=GemvConfig())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for backend in (self.gpu, self.cpu):
            if backend is not None:
                backend.close()


_ALL_ROUTES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def all_routes(topk_ids: torch.Tensor, block_m: int) -> SortedRoutes:
    """One kernel row block per slot, in slot order (every expert resident): [P * BM] rows."""
    t, k = topk_ids.shape
    p, device = t * k, topk_ids.device
    key = (p, block_m, device)
    if key not in _ALL_ROUTES:  # made once per shape, outside any graph capture
        sorted_ids = torch.full((p, block_m), p, dtype=torch.int32, device=device)
        sorted_ids[:, 0] = torch.arange(p, dtype=torch.int32, device=device)
        num_rows = torch.full((1,), p * block_m, dtype=torch.int32, device=device)
        _ALL_ROUTES[key] = (sorted_ids.reshape(-1), num_rows)
    sorted_ids, num_rows = _ALL_ROUTES[key]
    block_expert = topk_ids.reshape(-1).to(torch.int32)  # [P]
    return SortedRoutes(sorted_ids, block_expert, num_rows, p, k, block_m)


def resident_routes(topk_ids: torch.Tensor, on_gpu: torch.Tensor, block_m: int) -> SortedRoutes:
    """One kernel row block per slot, resident slots first; the kernels stop after them.

    Built with cumsum and scatter only, so no host sync and fixed shapes: [P * BM] rows.
    """
    t, k = topk_ids.shape
    p = t * k
    flat_on = on_gpu.reshape(-1)  # [P] bool
    num_on = flat_on.sum()  # [] device scalar
    rank_on = torch.cumsum(flat_on, 0) - 1  # [P]
    rank_off = num_on + torch.cumsum(~flat_on, 0) - 1  # [P]
    dest = torch.where(flat_on, rank_on, rank_off)  # [P] position of each slot
    slots = torch.arange(p, device=topk_ids.device)
    order = torch.empty_like(slots).scatter_(0, dest, slots)  # [P] slot at each position
    sorted_ids = torch.full((p, block_m), p, dtype=torch.int32, device=topk_ids.device)
    sorted_ids[:, 0] = order.to(torch.int32)
    block_expert = topk_ids.reshape(-1)[order].to(torch.int32)  # [P]
    num_rows = (num_on * block_m).to(torch.int32).reshape(1)
    return SortedRoutes(sorted_ids.reshape(-1), block_expert, num_rows, p, k, block_m)


def cpu_slots(ids: np.ndarray, weights: np.ndarray, resident: np.ndarray):
    """The CPU's view of [T, K] routes: resident slots get weight 0 and one of the token's
    CPU experts (so no extra expert is read); (None, None) when every slot is resident."""
    if not resident.any():  # the usual decode case: every slot is the CPU's, no bookkeeping
        return ids, weights
    on_cpu = ~resident[ids]  # [T, K]
    if not on_cpu.any():
        return None, None
    if on_cpu.all():
        return ids, weights
    fallback = ids[on_cpu][0]
    first = on_cpu.argmax(axis=1)  # [T]
    own = ids[np.arange(ids.shape[0]), first]
    row_fill = np.where(on_cpu.any(axis=1), own, fallback)  # [T]
    ids = np.ascontiguousarray(np.where(on_cpu, ids, row_fill[:, None]))
    weights = np.ascontiguousarray(np.where(on_cpu, weights, 0.0).astype(np.float32))
    return ids, weights

