"""Expert heat: how often each routed expert is chosen, per MoE layer, and what to do with it.

- ``ExpertHeat`` counts routes on the device where the router runs (an ``index_add_``, no
  host sync, so it also runs inside CUDA graphs); ``as_dict`` / ``take_new`` export
  ``{layer: [count per expert]}``, the shape ``Registry.add_expert_heat`` takes.
- ``HeatRecorder`` wraps any ExpertBackend to count its calls.
- ``calibrate`` routes a small built-in prompt set through the model when no statistics
  exist yet (``heat_for`` reads the registry first and stores what it measured).
- ``replace_experts`` re-plans GPU residency from the current heat when that raises the
  share of routes served by resident experts enough, rebuilds the resident arena and
  reports what it cost (bytes copied, milliseconds).

Legend: L = MoE layers, E = routed experts, T = tokens, K = experts per token.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from krasisd.engine.experts import ExpertBackend

log = logging.getLogger(__name__)

# Varied on purpose (prose, code, maths, dialogue, lists, other languages): routing differs by domain.
CALIBRATION_PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, sold and read across Europe.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])",
    "Solve for x: 3x + 7 = 22. Subtract 7 from both sides to get 3x = 15, then divide by 3.",
    "User: Can you recommend a good book about the ocean?\nAssistant: Sure! Rachel Carson's "
    "'The Sea Around Us' is a classic that mixes science with beautiful writing.",
    "Ingredients: 2 cups flour, 1 teaspoon salt, 3 eggs, 1 cup milk. Whisk, rest for an hour, "
    "then cook thin pancakes in a hot buttered pan.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "La lumière du matin traversait les rideaux pendant que la ville s'éveillait lentement.",
    "Der schnelle braune Fuchs springt über den faulen Hund, und alle lachen darüber.",
    "量子计算利用叠加和纠缠来处理信息，有望解决经典计算机难以处理的问题。",
    "1. Open the terminal.\n2. Run `git status` to see changed files.\n3. Commit with a "
    "clear message.\n4. Push the branch and open a pull request.",
)


class ExpertHeat:
    """Routing counts of every MoE layer, kept on ``device`` as one int64 [L * E] vector."""

    def __init__(self, moe_layers, num_experts: int, device="cpu",
                 initial: dict[int, list[int]] | None = None):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.moe_layers = sorted(int(layer) for layer in moe_layers)
        self.num_experts = num_experts
        self.device = torch.device(device)
        self._start = {layer: i * num_experts for i, layer in enumerate(self.moe_layers)}
        self._row_dev = {layer: torch.tensor(start, device=self.device)
                         for layer, start in self._start.items()}
        self.counts = torch.zeros(len(self.moe_layers) * num_experts, dtype=torch.int64,
                                  device=self.device)  # [L * E]
        self._taken = torch.zeros(self.counts.shape, dtype=torch.int64)  # host copy, exported
        self.initial = check_heat(initial or {}, self.moe_layers, num_experts)

    def layer_counts(self, layer: int) -> torch.Tensor:
        """The int64 [E] view of ``counts`` for ``layer`` (for kernels that count routes)."""
        start = self._start.get(layer)
        if start is None:
            raise KeyError(f"layer {layer} is not a MoE layer")
        return self.counts[start:start + self.num_experts]

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count the experts in ``topk_ids`` [T, K] for ``layer`` (device-side, no sync)."""
        base = self._row_dev.get(layer)
        if base is None:
            raise KeyError(f"layer {layer} is not a MoE layer")
        flat = topk_ids.reshape(-1).to(torch.int64)  # [T*K]
        self.counts.index_add_(0, base + flat, torch.ones_like(flat))

    def _host(self) -> torch.Tensor:
        return self.counts.cpu().view(len(self.moe_layers), self.num_experts)  # [L, E]

    def as_dict(self, include_initial: bool = True) -> dict[int, list[int]]:
        """{layer: [count per expert]}: what was recorded, plus the initial statistics."""
        host = self._host()
        out = {layer: host[i].tolist() for i, layer in enumerate(self.moe_layers)}
        if include_initial:
            for layer, counts in self.initial.items():
                out[layer] = [a + b for a, b in zip(out[layer], counts, strict=True)]
        return out

    def take_new(self) -> dict[int, list[int]]:
        """Counts recorded since the last call (what to add to the registry)."""
        host = self.counts.to("cpu", copy=True)  # [L * E], a snapshot even on the CPU
        new = (host - self._taken).view(len(self.moe_layers), self.num_experts)
        self._taken = host
        return {layer: new[i].tolist() for i, layer in enumerate(self.moe_layers)
                if int(new[i].sum())}

    @property
    def total_routes(self) -> int:
        return int(self.counts.sum())


def check_heat(heat: dict, moe_layers, num_experts: int) -> dict[int, list[int]]:
    """Validated ``{layer: [count per expert]}`` restricted to ``moe_layers``."""
    out = {}
    for layer, counts in heat.items():
        layer = int(layer)
        if layer not in moe_layers:
            continue
        if len(counts) != num_experts or any(int(c) < 0 for c in counts):
            raise ValueError(f"heat of layer {layer} must be {num_experts} counts >= 0")
        out[layer] = [int(c) for c in counts]
    return out


class HeatRecorder(ExpertBackend):
    """An ExpertBackend around another: records each call's routes in ``heat``, then
    delegates the call and the rest of the contract."""

    def __init__(self, backend: ExpertBackend, heat: ExpertHeat):
        self.backend, self.heat = backend, heat

    def __call__(self, layer_idx, x, topk_ids, topk_weights):
        self.heat.record(layer_idx, topk_ids)
        return self.backend(layer_idx, x, topk_ids, topk_weights)

    def begin_forward(self, num_tokens: int, top_k: int) -> None:
        self.backend.begin_forward(num_tokens, top_k)

    @property
    def dense(self):
        return self.backend.dense

    def close(self) -> None:
        self.backend.close()


def moe_layers_of(config) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def prompt_ids(engine, text: str, max_tokens: int) -> list[int]:
    """Token ids of ``text``: the tokenizer's, or its UTF-8 bytes folded into the vocabulary."""
    if engine.tokenizer is not None:
        ids = engine.tokenizer.encode(text)
    else:
        ids = [b % engine.config.vocab_size for b in text.encode("utf-8")]
    return ids[:max_tokens]


def calibrate(engine, prompts=CALIBRATION_PROMPTS, max_tokens: int = 256) -> dict[int, list[int]]:
    """Route ``prompts`` through the engine (one prefill each) and return the heat."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    config = engine.config
    heat = ExpertHeat(moe_layers_of(config), config.n_routed_experts, engine.device)
    backend = engine.expert_backend
    engine.model.expert_backend = HeatRecorder(backend, heat)
    start = time.perf_counter()
    try:
        for text in prompts:
            ids = prompt_ids(engine, text, max_tokens)
            if ids:
                engine.forward(ids, None)
    finally:
        engine.model.expert_backend = backend
    log.info("expert heat calibrated on %d prompts (%d routes) in %.2f s", len(prompts),
             heat.total_routes, time.perf_counter() - start)
    return heat.as_dict()


def heat_for(registry, name: str, engine) -> dict[int, list[int]]:
    """The stored heat of ``name``; when there is none, calibrate and store it."""
    stored = registry.expert_heat(name)
    if stored and any(sum(c) for c in stored.values()):
        return stored
    measured = calibrate(engine)
    registry.add_expert_heat(name, measured)
    return measured


def hit_rate(heat: dict[int, list[int]], resident: dict[int, tuple[int, ...]]) -> float:
    """Share of routes (by the heat's counts) that land on resident experts."""
    total = hits = 0
    for layer, counts in heat.items():
        total += sum(counts)
        hits += sum(counts[e] for e in resident.get(layer, ()))
    return hits / total if total else 0.0


def replace_experts(hybrid, heat: dict[int, list[int]], min_gain: float = 0.02) -> dict:
    """Re-place the GPU-resident experts of a HybridExperts by ``heat`` if the hit rate rises
    by at least ``min_gain``; returns what happened and what it cost."""
    from krasisd.engine.gpu.placement import plan_placement
    from krasisd.engine.gpu.prefill import GpuExperts

    old = hybrid.gpu
    if old is None:
        raise ValueError("re-placement needs a GPU backend")
    plan = plan_placement(dataclasses.replace(old.plan.request, heat=heat))
    before, after = hit_rate(heat, old.plan.resident), hit_rate(heat, plan.resident)
    report = {"hit_rate_before": before, "hit_rate_after": after, "replaced": False,
              "experts_changed": _changed(old.plan.resident, plan.resident),
              "bytes_copied": 0, "ms": 0.0}
    if after - before < min_gain:
        return report
    start = time.perf_counter()
    hybrid.gpu = None
    old.close()  # frees the old arena before the new one is allocated
    hybrid.gpu = GpuExperts(old.host, plan, old.device, impl=old.impl,
                            chunk_tokens=old.chunk_tokens,
                            full_copy_fraction=old.full_copy_fraction,
                            kernel_config=old.kernel_config, tuning=old.tuning)
    hybrid.refresh_residency()
    if old.device.type == "cuda":
        torch.cuda.synchronize(old.device)
    report.update(replaced=True, bytes_copied=plan.resident_bytes,
                  ms=1e3 * (time.perf_counter() - start))
    log.info("experts re-placed: hit rate %.3f -> %.3f, %d experts changed, %.1f ms",
             before, after, report["experts_changed"], report["ms"])
    return report


def _changed(old: dict, new: dict) -> int:
    layers = set(old) | set(new)
    return sum(len(set(new.get(layer, ())) - set(old.get(layer, ()))) for layer in layers)
