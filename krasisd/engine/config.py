"""One flat, validated model configuration parsed from a Hugging Face ``config.json``.

Both RoPE spellings real checkpoints use are accepted: the legacy ``rope_scaling`` dict
(with ``type``) plus a top-level ``rope_theta``, and the newer ``rope_parameters`` dict
(with ``rope_type`` and ``rope_theta`` inside).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from krasisd.engine.errors import UnsupportedModelError
from krasisd.engine.limits import check_config_limits, machine_capacity_bytes

SUPPORTED_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM")
ROPE_TYPES = ("default", "linear", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass
class ModelConfig:
    """Everything the engine needs to know about a model's shapes, routing and rope."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    moe_intermediate_size: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    head_dim: int = 0  # GQA head size (Qwen3-MoE); 0 means hidden_size // num_attention_heads
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # multi-head latent attention (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # mixture of experts
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    # rotary position embedding
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    rope_interleave: bool = False  # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...
    # tokens and storage
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        self.eos_token_ids = tuple(self.eos_token_ids)
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.rope_original_max_position_embeddings == 0:
            self.rope_original_max_position_embeddings = self.max_position_embeddings
        self._check_sizes()
        self._check_routing()
        self._check_rope()

    def _check_sizes(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "max_position_embeddings"]
        if self.is_mla:
            positive += ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        else:
            positive += ["head_dim"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be null or > 0, got {self.q_lora_rank}")
        if not self.is_mla and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (silu)")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    def _check_routing(self) -> None:
        if self.n_routed_experts == 0:
            return
        if self.moe_intermediate_size <= 0:
            raise ValueError("moe_intermediate_size must be > 0 for a model with routed experts")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, {self.n_routed_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be in {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.moe_layer_freq < 1 or self.decoder_sparse_step < 1:
            raise ValueError("moe_layer_freq and decoder_sparse_step must be >= 1")
        if self.topk_method != "greedy":
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must split evenly into "
                    f"n_group ({self.n_group}) groups"
                )
            per_group = self.n_routed_experts // self.n_group
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError("num_experts_per_tok exceeds the experts in the selected groups")
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ValueError("noaux_tc needs at least 2 experts per group")

    def _check_rope(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.rope_dim % 2:
            raise ValueError(f"the rotary dimension must be even, got {self.rope_dim}")
        if self.rope_theta <= 0 or self.rope_factor <= 0:
            raise ValueError("rope_theta and the rope factor must be > 0")

    # ---- derived values -------------------------------------------------------------

    @property
    def family(self) -> str:
        """``"deepseek"`` (MLA) or ``"qwen3_moe"`` (GQA)."""
        return "qwen3_moe" if self.architecture == "Qwen3MoeForCausalLM" else "deepseek"

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def kv_cache_width(self) -> int:
        """Values cached per token per layer: the MLA latent, or K and V of all KV heads."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """Softmax scale; DeepSeek folds the YaRN ``mscale_all_dim`` factor in twice."""
        scale = self.qk_head_dim**-0.5
        if self.is_mla and self.rope_type != "default" and self.rope_mscale_all_dim:
            mscale = yarn_get_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether a layer has routed experts (else it has a dense SwiGLU MLP)."""
        if self.n_routed_experts == 0:
            return False
        if self.family == "qwen3_moe":
            return (layer_idx not in self.mlp_only_layers
                    and (layer_idx + 1) % self.decoder_sparse_step == 0)
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ---- parsing --------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Parse a ``config.json``; raises ValueError for bad JSON or bad values (sizes beyond
        krasisd.engine.limits' ceilings or the machine's capacity included)."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, capacity_bytes=machine_capacity_bytes(Path(path).parent))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], capacity_bytes: int | None = None) -> ModelConfig:
        """Map a Hugging Face config dict onto the flat fields.

        The sizes are checked first (krasisd.engine.limits.ModelLimitError, a ValueError):
        each against its ceiling, and the parameter count they imply against
        ``capacity_bytes`` (default: this machine's memory plus the current folder's disk).
        """
        check_config_limits(raw, capacity_bytes if capacity_bytes is not None
                            else machine_capacity_bytes())
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), archs[0] if archs else None)
        if arch is None:
            raise UnsupportedModelError(
                "config.json names no architecture; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in names and v is not None}
        values["architecture"] = arch
        if arch == "Qwen3MoeForCausalLM":
            values.update(_qwen3_moe_fields(raw))
        else:
            values.update(_deepseek_fields(raw, arch))
        values.update(_rope_fields(raw))
        eos = raw.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
        values["eos_token_ids"] = tuple(eos_list)
        values.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
        values["torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"config.json is missing a required field: {exc}") from exc


def _deepseek_fields(raw: dict[str, Any], arch: str) -> dict[str, Any]:
    is_v3 = arch == "DeepseekV3ForCausalLM"
    return {
        "q_lora_rank": raw.get("q_lora_rank"),
        "topk_method": raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy"),
        "scoring_func": raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax"),
        "n_group": raw.get("n_group") or 1,
        "topk_group": raw.get("topk_group") or 1,
        # DeepSeek-V2 always rotates interleaved pairs; V3 checkpoints say so (default true)
        "rope_interleave": bool(raw.get("rope_interleave", True)) if is_v3 else True,
    }


def _qwen3_moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen3-MoE with use_sliding_window=true is not supported")
    return {
        "n_routed_experts": raw.get("num_experts", raw.get("num_local_experts", 0)) or 0,
        "n_shared_experts": 0,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "mlp_only_layers": tuple(raw.get("mlp_only_layers") or ()),
        "rope_interleave": False,
    }


def _rope_fields(raw: dict[str, Any]) -> dict[str, Any]:
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    max_pos = raw.get("max_position_embeddings") or 4096
    original = (params.get("original_max_position_embeddings")
                or raw.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original if rope_type == "yarn" else 1.0
    out = {
        "rope_type": rope_type,
        "rope_theta": float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0),
        "rope_factor": float(factor),
        "rope_original_max_position_embeddings": int(original),
        "rope_beta_fast": float(params.get("beta_fast") or 32.0),
        "rope_beta_slow": float(params.get("beta_slow") or 1.0),
        "rope_mscale": float(params.get("mscale") or 0.0),
        "rope_mscale_all_dim": float(params.get("mscale_all_dim") or 0.0),
        "rope_truncate": bool(params.get("truncate", True)),
    }
    if params.get("attention_factor") is not None:
        out["rope_attention_factor"] = float(params["attention_factor"])
    return out


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention magnitude correction for a context stretched by ``scale``."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
