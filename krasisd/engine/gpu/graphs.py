"""One-token decode steps whose GPU parts replay as CUDA graphs, so batch-1 decode is not
bound by Python and kernel launches.

A step is a fixed program over static buffers: GPU pieces, split where the CPU experts
take over (see krasisd.engine.gpu.hybrid):

    piece: embed, [whole layers...], attention + norm + router + copies to pinned memory +
           an event (layer l), then resident experts + shared experts of layer l
    host:  wait for the event, run the CPU experts of layer l (the GPU meanwhile runs the
           rest of the piece)
    piece: copy the CPU sum back and add, [whole layers...], ... final norm and lm_head

Layers with every routed expert on the GPU (and dense layers) run whole inside a piece, so
with all experts resident a step is one graph. Attention reads a fixed window of the KV
cache (a bucket: a power of two >= the context, masked past the current position), one set
of graphs per bucket, captured on the first step that needs it. The position and token id
live in device buffers filled before each replay. ``use_graphs=False`` runs the same
pieces eagerly over the exact context (the fallback, and the reference in tests).

Legend: D = hidden, H = heads, C = kv_lora_rank, R = rope dims, S = attended positions,
M = cache capacity, Hkv = key/value heads, Dh = head dim, V = vocab.

``HybridEngine`` is the Engine that decodes through these steps; ``load_hybrid`` builds one
from a model folder and its dual-format cache.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from krasisd.config import GPU_DENSE_WEIGHTS as DENSE_WEIGHTS  # load_hybrid's dense values
from krasisd.config import parse_size_bytes
from krasisd.engine.engine import Engine
from krasisd.engine.engine_options import EngineOptions
from krasisd.engine.experts import SplitExpertBackend
from krasisd.engine.gpu import decode_attention as attention
from krasisd.engine.gpu import fused
from krasisd.engine.gpu.driver import sdpa_backends
from krasisd.engine.gpu.hybrid import HybridExperts
from krasisd.engine.heat import ExpertHeat, replace_experts
from krasisd.engine.kv_cache import KVCache, new_kv_cache
from krasisd.engine.loop import decode_one_by_one

log = logging.getLogger(__name__)

MIN_BUCKET = 256


@dataclass
class Piece:
    """GPU work between two host actions, and its graph per bucket once captured."""

    ops: list = field(default_factory=list)  # callables taking the bucket S
    graphs: dict = field(default_factory=dict)  # S -> torch.cuda.CUDAGraph

    def run(self, bucket: int) -> None:
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return
        for op in self.ops:
            op(bucket)


def bucket_for(num_total: int, capacity: int, min_bucket: int = MIN_BUCKET) -> int:
    """The attended window for ``num_total`` cached tokens: a power of two, within capacity."""
    bucket = max(min_bucket, 1 << max(0, num_total - 1).bit_length())
    return min(bucket, capacity)


class DecodeStep:
    """``step(token_id, cache) -> logits [V]``; graphs are bound to the cache's storage, so
    every cache passed must share it (the handles HybridEngine.new_cache hands out do)."""

    def __init__(self, model, cache, use_graphs: bool = True, min_bucket: int = MIN_BUCKET,
                 fused_kernels: bool | None = None):
        self.model = model
        self.cache = copy.copy(cache)  # the storage, not the caller's handle
        self.backend = model.expert_backend
        self.config = model.config
        embed = model.model.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        self.use_graphs = use_graphs and self.device.type == "cuda"
        # Triton kernels for norms, rotary, softmax, routing (krasisd.engine.gpu.fused)
        self.fused = self.device.type == "cuda" if fused_kernels is None else fused_kernels
        self._fused_router = self.fused and fused.fusable_router(self.config)
        self.min_bucket = min_bucket
        self._hybrid = isinstance(self.backend, SplitExpertBackend)
        self.heat = self.backend.heat if self._hybrid else None
        self.generation = self.backend.generation if self._hybrid else 0
        dev, hidden = self.device, self.config.hidden_size
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)  # [1]
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # [1]
        self.x = torch.zeros(1, hidden, dtype=self.dtype, device=dev)  # [1, D] residual
        self.h = torch.zeros_like(self.x)  # [1, D] after attention
        self.normed = torch.zeros_like(self.x)  # [1, D] the experts' input
        self.shared = torch.zeros_like(self.x)  # [1, D] shared experts' output
        self.partial = torch.zeros(1, hidden, dtype=torch.float32, device=dev)  # GPU experts
        k = max(self.config.num_experts_per_tok, 1)
        self.topk_ids = torch.zeros(1, k, dtype=torch.long, device=dev)
        self.topk_weights = torch.zeros(1, k, dtype=torch.float32, device=dev)
        self.logits = torch.zeros(1, self.config.vocab_size, dtype=torch.float32, device=dev)
        half = model.rotary.inv_freq_on(dev).shape[0]  # copied to the device here, once
        self.cos = torch.zeros(1, half, dtype=torch.float32, device=dev)  # [1, R/2]
        self.sin = torch.zeros_like(self.cos)
        self.staging = self.backend.staging(1, k) if (
            self._hybrid and self.backend.cpu is not None) else None
        # recorded inside a graph after the hand-off copies: the host waits for it while the
        # rest of the piece (GPU and shared experts) runs; one replay per layer, not two
        self.handoff = torch.cuda.Event(external=True) if dev.type == "cuda" else None
        layers = list(model.model.layers)
        # the norm each layer's output meets next: the next layer's input norm, or the head's
        self._norm_after = {layer.layer_idx: (layers[i + 1].input_layernorm if i + 1 < len(
            layers) else model.model.norm) for i, layer in enumerate(layers)}
        self._first_layer = layers[0].layer_idx if layers else None
        self.normed_in = torch.zeros_like(self.x)  # [1, D] fused: that norm of self.x
        self.program = self._build_program()
        self._pools: dict[int, object] = {}
        self.graph_failures = 0

    # -- program --------------------------------------------------------------------------

    def _build_program(self) -> list:
        """Pieces and host actions ("cpu", layer) in step order."""
        program, piece = [], Piece([self._embed])
        # shared experts that run inside the resident experts' launches (moe_decode)
        self._folded = {layer.layer_idx: self._fold_shared(layer)
                        for layer in self.model.model.layers}
        for layer in self.model.model.layers:
            piece.ops.append(self._attention_op(layer))
            idx = layer.layer_idx
            if layer.is_moe and self._hybrid and self.backend.has_cpu_part(idx):
                piece.ops += [self._route_op(layer), self._record_handoff,
                              self._gpu_experts_op(layer)]
                program += [piece, ("cpu", idx)]
                piece = Piece([self._merge_op(layer)])
            else:
                piece.ops.append(self._ffn_op(layer))
        piece.ops.append(self._head)
        program.append(piece)
        return program

    def _fold_shared(self, layer):
        """The layer's shared experts in moe_gemv's form, or None (run as an MLP)."""
        if not (self._hybrid and self.fused and layer.is_moe
                and layer.mlp.shared_experts is not None):
            return None
        return self.backend.shared_experts(layer.layer_idx, layer.mlp.shared_experts,
                                           self.topk_ids.numel())

    @torch.inference_mode()
    def __call__(self, token_id: int, cache=None) -> torch.Tensor:
        """Decode one token at the cache's current length; returns float32 logits [V]."""
        cache = cache if cache is not None else self.cache
        if _storage_key(cache) != _storage_key(self.cache):
            raise ValueError("this decode step is bound to another KV cache")
        cache.check_room(1)
        self.ids.fill_(int(token_id))
        self.pos.fill_(cache.length)
        bucket = bucket_for(cache.length + 1, cache.max_tokens, self.min_bucket)
        capture = self.use_graphs and bucket not in self._pools
        self._run(bucket if self.use_graphs else cache.length + 1)
        if capture:
            self._capture(bucket)
        cache.advance(1)
        return self.logits[0].clone()

    def _run(self, bucket: int) -> None:
        """Pieces in order; at each ("cpu", layer) the CPU experts run on this thread once the
        hand-off event has passed, while the GPU works through the rest of the piece."""
        for item in self.program:
            if isinstance(item, Piece):
                item.run(bucket)
            else:
                self.backend.run_cpu(item[1], self.staging, self.handoff)

    def _capture(self, bucket: int) -> None:
        """Record every piece for ``bucket`` (the eager step just run was the warm-up)."""
        pool = torch.cuda.graph_pool_handle()
        self._pools[bucket] = pool
        pieces = [p for p in self.program if isinstance(p, Piece)]
        try:
            for piece in pieces:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    for op in piece.ops:
                        op(bucket)
                piece.graphs[bucket] = graph
        except Exception as exc:  # capture is an optimisation: keep decoding eagerly
            self.graph_failures += 1
            self.use_graphs = False
            for piece in pieces:
                piece.graphs.clear()
            log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
        log.debug("captured %d decode graphs for a %d-token window", len(pieces), bucket)

    # -- ops (each writes static buffers only) --------------------------------------------

    def _embed(self, bucket: int) -> None:
        self.x.copy_(self.model.model.embed_tokens(self.ids))
        self.model.rotary.cos_sin(self.pos, out=(self.cos, self.sin))  # [1, R/2] each

    def _head(self, bucket: int) -> None:
        if self.fused and self._first_layer is not None:  # normed by the last layer's add
            normed = self.normed_in
        else:
            normed = attention.norm(self.model.model.norm, self.x, self.fused)
        self.logits.copy_(self.model.lm_head(normed))

    def _attention_op(self, layer):
        """Attention, its residual add and the post-attention norm: self.h, self.normed."""
        def op(bucket: int) -> None:
            at = attention.Position(self.pos, self.cos, self.sin, bucket)
            if self.fused and layer.layer_idx != self._first_layer:
                normed = self.normed_in  # the previous layer's add normed it
            else:
                normed = attention.norm(layer.input_layernorm, self.x, self.fused)
            attn, idx = layer.self_attn, layer.layer_idx
            if self.config.is_mla:
                out = attention.mla(attn, normed, self.cache.entries[idx], at, self.fused)
            else:
                out = attention.gqa(attn, normed, self.cache.keys[idx], self.cache.values[idx],
                                    at, self.fused)
            post = layer.post_attention_layernorm
            if self.fused:
                fused.rmsnorm(self.x, post.weight, post.eps, self.normed, (out,),
                              residual_out=self.h)
            else:
                self.h.copy_(self.x + out)
                self.normed.copy_(post(self.h))
        return op

    def _ffn_op(self, layer):
        def op(bucket: int) -> None:
            if not layer.is_moe:
                self._add(layer, self.h, self._mlp(layer.mlp, self.normed))
            else:
                self._route(layer)
                idx, shared = layer.layer_idx, self._folded[layer.layer_idx]
                if self._hybrid:
                    out = self.backend.gpu_part(idx, self.normed, self.topk_ids,
                                                self.topk_weights, shared)
                else:
                    out = self.backend(idx, self.normed, self.topk_ids, self.topk_weights)
                self._add(layer, self.h, out, *self._shared(layer))  # out: [1, D]
        return op

    def _route_op(self, layer):
        def op(bucket: int) -> None:
            self._route(layer)
            self.backend.stage_to_host(layer.layer_idx, self.normed, self.topk_ids,
                                       self.topk_weights)
        return op

    def _record_handoff(self, bucket: int) -> None:
        if self.handoff is not None:
            self.handoff.record()

    def _gpu_experts_op(self, layer):
        def op(bucket: int) -> None:
            idx = layer.layer_idx
            if self.backend.has_gpu_part(idx):
                self.partial.copy_(self.backend.gpu_part(idx, self.normed, self.topk_ids,
                                                         self.topk_weights, self._folded[idx]))
            else:
                self.partial.zero_()
            for out in self._shared(layer):
                self.shared.copy_(out)
        return op

    def _merge_op(self, layer):
        def op(bucket: int) -> None:
            staging = self.staging
            staging.out_dev.copy_(staging.out, non_blocking=True)
            shared = (self.shared,) if self._shared_mlp(layer) else ()
            self._add(layer, self.h, self.partial, staging.out_dev, *shared)
        return op

    def _route(self, layer) -> None:
        """Router of the layer over self.normed into self.topk_ids / self.topk_weights."""
        gate = layer.mlp.gate
        if self._fused_router:
            logits = fused.router_logits(self.normed, gate.weight)  # [1, E] float32
            counts = None if self.heat is None else self.heat.layer_counts(layer.layer_idx)
            fused.router_topk(logits, self.config, self.topk_ids, self.topk_weights, counts)
            return
        ids, weights = gate(self.normed)  # [1, K] each
        self.topk_ids.copy_(ids)
        self.topk_weights.copy_(weights)
        if self.heat is not None:
            self.heat.record(layer.layer_idx, self.topk_ids)

    def _mlp(self, mlp, x):
        return fused.swiglu(mlp, x) if self.fused else mlp(x)

    def _shared_mlp(self, layer) -> bool:
        """Whether the layer's shared experts run as their own MLP (not inside the resident
        experts' kernels)."""
        return (layer.is_moe and layer.mlp.shared_experts is not None
                and self._folded[layer.layer_idx] is None)

    def _shared(self, layer) -> tuple:
        """The shared experts' output as a [1, D] delta, or no delta."""
        if self._shared_mlp(layer):
            return (self._mlp(layer.mlp.shared_experts, self.normed),)
        return ()

    def _add(self, layer, base, *deltas) -> None:
        """self.x = base + sum(deltas), rounded once (fused, which also writes the norm that
        comes next into self.normed_in) or per add (torch)."""
        if self.fused:
            norm = self._norm_after[layer.layer_idx]
            fused.rmsnorm(base, norm.weight, norm.eps, self.normed_in, deltas,
                          residual_out=self.x)
            return
        total = deltas[0].float()
        for delta in deltas[1:]:
            total = total + delta.float()
        self.x.copy_(base + total.to(self.dtype))


class HybridEngine(Engine):
    """An Engine whose one-token forwards run as DecodeSteps (CUDA graphs on the GPU).

    ``new_cache`` hands out pooled KV storage when a previous cache of enough capacity is no
    longer referenced, so a new request replays the graphs already captured for it.
    """

    POOLED_CACHES = 2  # caches kept for reuse, with their graphs; plan_sequences raises it
    grow_kv_caches = False  # a DecodeStep binds to its cache's storage

    def __init__(self, *args, use_graphs: bool = True, fused_kernels: bool | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.expert_backend, SplitExpertBackend):
            raise TypeError("HybridEngine needs a SplitExpertBackend (HybridExperts), got "
                            f"{type(self.expert_backend).__name__}")
        self.use_graphs = use_graphs
        self.fused_kernels = fused_kernels  # None: on CUDA (see DecodeStep)
        self._pool: list[tuple[KVCache, weakref.ref]] = []  # (storage, its current handle)
        self._steps: dict[int, DecodeStep] = {}  # id(storage) -> DecodeStep
        # one per sequence decoding at once: each keeps its KV memory and its graphs
        self.pooled_caches = self.POOLED_CACHES

    def new_cache(self, max_tokens: int) -> KVCache:
        """An empty cache for ``max_tokens`` tokens (reusing free pooled storage)."""
        for i, (storage, handle) in enumerate(self._pool):
            if handle() is None and storage.max_tokens >= max_tokens:
                cache = copy.copy(storage)  # shares the tensors, own length
                cache.reset()
                self._pool[i] = (storage, weakref.ref(cache))
                return cache
        cache = super().new_cache(max_tokens)
        if len(self._pool) < self.pooled_caches:
            self._pool.append((copy.copy(cache), weakref.ref(cache)))
        return cache

    @torch.inference_mode()
    def forward(self, input_ids, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """As Engine.forward; one token with a cache goes through the decode step, and
        prefill attention prefers cuDNN among the fused SDPA backends (driver.sdpa_backends)."""
        token = _single_token(input_ids) if cache is not None else None
        if token is None:
            prefer = sdpa_backends() if self.device.type == "cuda" else contextlib.nullcontext()
            with prefer:
                return super().forward(input_ids, cache, last_only=last_only)
        if not 0 <= token < self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return self._step_for(cache)(token, cache)[None, :]  # [1, V]

    def decode_batch(self, token_ids: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of B sequences: [B, V]. They run one by one through the graph
        path for now: batched eager steps (batched_decode) measured slower than one-token
        graph replays on the GPU (8 streams: 110 vs 349 tok/s)."""
        return decode_one_by_one(self, token_ids, caches)

    def plan_sequences(self, max_sequences: int) -> None:
        """Keep a pooled cache (and its graphs) for each sequence decoding at once."""
        self.pooled_caches = max(self.pooled_caches, max_sequences)

    def _step_for(self, cache: KVCache) -> DecodeStep:
        key = _storage_key(cache)
        step = self._steps.get(key)
        if step is None or step.generation != self.expert_backend.generation:
            if len(self._steps) >= self.pooled_caches + 1:
                self._steps.clear()
            step = DecodeStep(self.live_model(), cache, use_graphs=self.use_graphs,
                              fused_kernels=self.fused_kernels)
            self._steps[key] = step
        return step

    @property
    def graph_failures(self) -> int:
        """Graph captures that failed in the live decode steps (they decode eagerly)."""
        return sum(step.graph_failures for step in self._steps.values())

    def close(self) -> None:
        """Drop the decode steps (their graphs and buffers), then as Engine.close."""
        self._steps.clear()
        self._pool.clear()
        super().close()

    def rebalance(self, min_gain: float = 0.02) -> dict:
        """Re-place GPU experts by the heat recorded so far (call between requests)."""
        backend = self.expert_backend
        if backend.heat is None:
            raise ValueError("this engine records no expert heat")
        return replace_experts(backend, backend.heat.as_dict(), min_gain=min_gain)


def _single_token(input_ids) -> int | None:
    """The id when ``input_ids`` holds exactly one token (read on the host), else None."""
    if isinstance(input_ids, int | list | tuple):
        flat = [input_ids] if isinstance(input_ids, int) else list(input_ids)
        return int(flat[0]) if len(flat) == 1 and isinstance(flat[0], int) else None
    ids = torch.as_tensor(input_ids)
    return int(ids.reshape(-1)[0]) if ids.numel() == 1 else None


def _storage_key(cache: KVCache) -> int:
    return cache.storage_key()


def linear_attention_architecture(model_dir) -> str | None:
    """The architecture of a model with Gated DeltaNet layers (Qwen3-Next, Qwen3.5/3.6 MoE),
    which the hybrid engine's decode graphs and kernels do not compute yet; None for others
    and for a folder whose config cannot be read (the load reports that itself)."""
    from pathlib import Path

    from krasisd.engine.errors import ModelLoadError
    from krasisd.engine.loader import read_config

    try:
        config = read_config(Path(model_dir))
    except ModelLoadError:
        return None
    return config.architecture if config.is_hybrid else None


def refuse_hybrid_attention(model_dir) -> None:
    """UnsupportedModelError, naming the architecture, for a model with Gated DeltaNet layers."""
    from krasisd.engine.errors import UnsupportedModelError

    architecture = linear_attention_architecture(model_dir)
    if architecture is not None:
        raise UnsupportedModelError(
            f"{architecture} (Gated DeltaNet linear attention) is not supported by the hybrid "
            "GPU engine; the CPU engine serves it")


def load_hybrid(model_dir, quant: str = "int4", device: str = "cuda", threads: int | None = None,
                budget=None, max_tokens: int = 8192, heat: dict | None = None,
                use_gpu_experts: bool = True, use_graphs: bool = True, cpu_cache_dir=None,
                gpu_cache_dir=None, dense: str = "quant",
                options: EngineOptions | None = None) -> HybridEngine:
    """Load ``model_dir`` for hybrid decode from the dual-format cache (building what is
    missing once); ``engine.load_times_s`` says where the load time went.

    The settings are ``options`` (what runners pass, through load_for_serving) or, without
    it, the keywords: ``budget`` is the VRAM budget in bytes or a size such as "16GiB";
    ``dense``: "quant" runs the dense linears from the CPU cache's quantized copies (the
    CPU-only path's weights; krasisd.engine.gpu.dense_decode), "bf16" from the checkpoint."""
    from krasisd.engine.engine import load
    from krasisd.engine.gpu.backend import create_backend
    from krasisd.engine.gpu.dense_decode import set_tuning
    from krasisd.engine.gpu.synthetic import dense_bytes
    from krasisd.engine.gpu.tuning import tuning_for

    refuse_hybrid_attention(model_dir)

    if options is None:
        if dense not in DENSE_WEIGHTS:
            raise ValueError(f"dense must be one of {DENSE_WEIGHTS}, got {dense!r}")
        options = EngineOptions(
            quant=quant, device=device, threads=threads, cache_dir=cpu_cache_dir,
            gpu_cache_dir=gpu_cache_dir, gpu_dense=dense,
            vram_budget_bytes=None if budget is None else parse_size_bytes(budget))
    kernel_tuning = tuning_for(options.autotune, options.tuning_dir)
    from_cache = options.gpu_dense == "quant"
    times, start = {}, time.perf_counter()
    base = load(model_dir, quant=options.quant, device=options.device, threads=options.threads,
                cache_dir=options.cache_dir, dtype=torch.bfloat16, dense_from_cache=from_cache)
    if from_cache and not base.expert_backend.dense:
        log.info("the CPU cache holds no quantized dense linears: they stay in bf16")
    set_tuning(base.model, kernel_tuning)
    device = base.device  # "auto" resolved
    times["dense_and_cpu_cache"] = time.perf_counter() - start
    kv_bytes = new_kv_cache(base.config, max_tokens, torch.bfloat16, "meta").nbytes
    gpu = create_backend(model_dir, base.config, options.quant, cache_dir=options.gpu_cache_dir,
                         device=device, dense_bytes=dense_bytes(base.model),
                         kv_cache_bytes=kv_bytes, max_tokens=max_tokens,
                         vram_budget_bytes=options.vram_budget_bytes, heat=heat,
                         tuning=kernel_tuning)
    times["gpu_cache_and_placement"] = time.perf_counter() - start - times["dense_and_cpu_cache"]
    backend = HybridExperts(gpu, base.expert_backend, device,
                            use_gpu_experts=use_gpu_experts,
                            prefill_min_tokens=options.gpu_prefill_min_tokens,
                            heat=ExpertHeat(sorted(gpu.host.layers), gpu.host.num_experts,
                                            device),
                            tuning=kernel_tuning)
    engine = HybridEngine(base.config, base.model, backend, base.tokenizer, base.eos_token_ids,
                          base.model_dir, use_graphs=use_graphs)
    engine.load_times_s = times
    log.info("hybrid engine ready in %.2f s: %.0f%% of routed experts on the GPU",
             time.perf_counter() - start, 100 * backend.resident_fraction())
    return engine
