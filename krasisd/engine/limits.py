"""Sanity ceilings on a model folder's ``config.json``, checked before anything is allocated.

A hostile or broken ``config.json`` (``"num_hidden_layers": 1000000000``) must be refused
with a clear message, not followed until the process is killed for memory. Two checks:

- each size field against a ceiling far above any real model (and it must be an integer);
- the parameter count the sizes imply against what the machine can hold at all: its RAM
  plus the capacity of the disk the model lives on, at INT4 (half a byte a parameter, the
  smallest format krasis serves). A real model's own bf16 files are four times that, so a
  model whose files fit on the disk always passes.

Standard library only: the registry (which does not import torch) checks a folder at create
and pull time, and the engine checks again when it reads a config (krasisd/engine/config.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

# field -> ceiling; the largest published models are well below each (e.g. 126 layers,
# hidden size 16,384, 384 routed experts, a vocabulary of 262,144)
FIELD_CEILINGS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65_536,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "n_routed_experts": 4096,
    "num_experts": 4096,
    "num_local_experts": 4096,
    "n_shared_experts": 4096,
    "num_experts_per_tok": 4096,
    "first_k_dense_replace": 1024,
    "vocab_size": 1 << 22,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 65_536,
    "q_lora_rank": 65_536,
    "kv_lora_rank": 65_536,
    "qk_nope_head_dim": 65_536,
    "qk_rope_head_dim": 65_536,
    "v_head_dim": 65_536,
    "n_group": 4096,
    "topk_group": 4096,
    "max_position_embeddings": 1 << 26,
}
NESTED_CONFIGS = ("text_config",)  # multimodal configs nest the text model's (Kimi K2.5)
INT4_BYTES_PER_PARAM = 0.5
SEQUENCE_CEILING = 4096  # entries of list fields such as mlp_only_layers


class ModelLimitError(ValueError):
    """config.json describes a model beyond the ceilings; the message says which and why."""


def check_config_limits(config: dict[str, Any], capacity_bytes: int | None = None) -> int:
    """Refuse a config whose sizes are absurd; return the parameter count it implies.

    ``capacity_bytes``: what the machine can hold (machine_capacity_bytes()); None skips
    that check (the field ceilings are always checked).
    """
    if not isinstance(config, dict):
        raise ModelLimitError("config.json must hold a JSON object")
    nested = [config[key] for key in NESTED_CONFIGS if isinstance(config.get(key), dict)]
    nested_params = max((check_config_limits(c, capacity_bytes) for c in nested), default=0)
    for name, ceiling in FIELD_CEILINGS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLimitError(f"config.json: {name} must be an integer, got {value!r}")
        if not 0 <= value <= ceiling:
            raise ModelLimitError(
                f"config.json: {name} = {value} is outside the sane range [0, {ceiling:,}]; "
                "refusing the model before allocating anything for it")
    for name in ("mlp_only_layers", "eos_token_id"):
        value = config.get(name)
        if isinstance(value, list) and len(value) > SEQUENCE_CEILING:
            raise ModelLimitError(f"config.json: {name} has {len(value):,} entries "
                                  f"(at most {SEQUENCE_CEILING:,})")
    params = max(implied_parameters(config), nested_params)
    if capacity_bytes is not None and params * INT4_BYTES_PER_PARAM > capacity_bytes:
        raise ModelLimitError(
            f"config.json describes a model of about {params:,} parameters "
            f"({params * INT4_BYTES_PER_PARAM / 2**30:,.0f} GiB even at INT4), more than this "
            f"machine can hold ({capacity_bytes / 2**30:,.0f} GiB of memory and disk)")
    return params


def implied_parameters(config: dict[str, Any]) -> int:
    """A lower estimate of the parameter count from the sizes alone (exact ints)."""
    def size(*names: str) -> int:
        for name in names:
            value = config.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0

    layers, hidden = size("num_hidden_layers"), size("hidden_size")
    vocab, dense_width = size("vocab_size"), size("intermediate_size")
    expert_width = size("moe_intermediate_size") or dense_width
    experts = size("n_routed_experts", "num_experts", "num_local_experts")
    shared = size("n_shared_experts")
    dense_layers = min(layers, size("first_k_dense_replace")) if experts else layers
    moe_layers = layers - dense_layers
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    attention = 2 * hidden * hidden  # at least q and o projections
    per_dense = attention + 3 * hidden * dense_width
    per_moe = attention + 3 * hidden * expert_width * (experts + shared)
    return embeddings + dense_layers * per_dense + moe_layers * per_moe


def machine_capacity_bytes(path: str | Path | None = None) -> int:
    """Physical memory plus the total size of the file system holding ``path`` (or the
    current folder): the most any model krasis serves here could occupy."""
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    where = Path(path) if path is not None else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        disk_bytes = shutil.disk_usage(where).total
    except OSError:
        disk_bytes = 0
    return memory_bytes + disk_bytes


def prequantized_error(config: dict) -> str | None:
    """Why the engine refuses a config.json that declares a ``quantization_config`` (FP8,
    MXFP4, compressed-tensors INT4, ...), naming its format; None when it declares none. The
    engine reads float weights only (krasisd.engine.loader) and the registry refuses such a pull
    before downloading it (krasis_registry.modelinfo), both with this message."""
    for where in (config, config.get("text_config")):
        quant = where.get("quantization_config") if isinstance(where, dict) else None
        if not quant:
            continue
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        detail = quant.get("format") if isinstance(quant, dict) else None
        named = f"{method} ({detail})" if isinstance(detail, str) and detail else str(method)
        return ("pre-quantized checkpoints are not supported: config.json declares "
                f"quantization_config with quant_method {named}; krasis reads bf16, fp16 or fp32 "
                "safetensors and quantizes them itself, so use the model's bf16 release")
    return None
