"""Putting the GPU expert backend together: cache, budget, placement plan, GpuExperts.

``create_backend`` is the hook an engine load with ``device="cuda"`` and a quantized
format calls, the GPU twin of ``native_experts.create_backend``.

Legend: T = tokens, C = tokens per FFN chunk, K = experts per token, D = hidden,
I = expert intermediate, E = experts, H = heads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from krasisd.engine.cache_files import engine_cache_dir, load_or_build
from krasisd.engine.gpu.cache import GpuCacheError, build_gpu_cache, load_gpu_cache
from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.moe_grouped import grouped_mm_workspace_bytes
from krasisd.engine.gpu.placement import PlacementRequest, plan_placement, resolve_vram_budget
from krasisd.engine.gpu.prefill import GpuExperts
from krasisd.engine.quant import pick_group_size

if TYPE_CHECKING:  # tuning imports Triton
    from krasisd.engine.gpu.tuning import KernelTuning

log = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 8192
BF16_BYTES = 2


def prefill_workspace_bytes(config, max_tokens: int, chunk_tokens: int, impl: str = "triton") -> int:
    """Activation bytes of one prefill pass: attention over T tokens, the FFN over C."""
    t, c = max_tokens, min(chunk_tokens, max_tokens)
    d, k = config.hidden_size, config.num_experts_per_tok
    inter, num = config.moe_intermediate_size, config.n_routed_experts
    heads, v_dim = config.num_attention_heads, config.v_head_dim or config.qk_head_dim
    head_bytes = heads * (3 * config.qk_head_dim + 2 * v_dim + config.qk_nope_head_dim)
    attention = t * head_bytes * BF16_BYTES  # q, k, cat copies, v, kv, out
    hidden = 4 * t * d * BF16_BYTES  # x, normed x, attention out, residual
    dense_mlp = 3 * c * config.intermediate_size * BF16_BYTES
    shared = 3 * c * inter * max(config.n_shared_experts, 1) * BF16_BYTES
    moe = c * k * (inter + d) * BF16_BYTES + num * 64 * inter * BF16_BYTES + c * d * 4
    if impl == "grouped_mm":
        moe += grouped_mm_workspace_bytes(num, d, inter) + c * k * (d + 2 * inter) * BF16_BYTES
    return attention + hidden + max(dense_mlp, shared + moe)


def gpu_experts_for(host: HostExperts, config, device, budget_bytes: int, dense_bytes: int,
                    kv_cache_bytes: int, max_tokens: int, heat=None, impl: str | None = None,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, time_copies: bool = False,
                    tuning: KernelTuning | None = None) -> GpuExperts:
    """Plan the budget for prompts up to ``max_tokens`` and build the backend."""
    impl = impl or ("triton" if torch.device(device).type == "cuda" else "grouped_mm")
    workspace_bytes = prefill_workspace_bytes(config, max_tokens, chunk_tokens, impl)
    request = PlacementRequest(
        budget_bytes=budget_bytes, dense_bytes=dense_bytes, kv_cache_bytes=kv_cache_bytes,
        workspace_bytes=workspace_bytes, expert_bytes=host.layout.expert_bytes,
        moe_layers=tuple(sorted(host.layers)), num_experts=host.num_experts, heat=heat)
    plan = plan_placement(request)
    log.info("gpu placement: %s", plan.summary())
    return GpuExperts(host, plan, device, impl=impl, chunk_tokens=chunk_tokens,
                      time_copies=time_copies, tuning=tuning)


def default_gpu_cache_dir(model_dir: Path, quant: str, group_size: int) -> Path:
    return engine_cache_dir(model_dir, f"gpu-{quant}-g{group_size}")


def create_backend(model_dir, config, quant: str, cache_dir=None, device="cuda",
                   dense_bytes: int = 0, kv_cache_bytes: int = 0, max_tokens: int = 8192,
                   vram_budget_bytes: int | None = None, heat=None, impl: str | None = None,
                   group_size: int | None = None, tuning: KernelTuning | None = None
                   ) -> GpuExperts:
    """GpuExperts for ``model_dir``: loads the GPU cache (building it when missing or stale)
    and places experts within ``vram_budget_bytes`` (None: free memory minus a margin)."""
    if group_size is None:  # the CPU cache's rule too, so both formats group alike
        group_size = pick_group_size(config.hidden_size, config.moe_intermediate_size)
    cache_dir = Path(cache_dir) if cache_dir else default_gpu_cache_dir(model_dir, quant, group_size)
    host = load_or_build(
        lambda: load_gpu_cache(cache_dir, quant=quant, group_size=group_size, model_dir=model_dir),
        lambda: build_gpu_cache(model_dir, cache_dir, quant=quant, group_size=group_size),
        GpuCacheError, f"the GPU {quant} cache in {cache_dir}")
    device = torch.device(device)
    free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62
    # the dense weights are already on the device: what they hold counts as available
    budget_bytes = resolve_vram_budget(free_bytes + dense_bytes, vram_budget_bytes)
    return gpu_experts_for(host, config, device, budget_bytes, dense_bytes, kv_cache_bytes,
                           max_tokens, heat=heat, impl=impl, tuning=tuning)
