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

# architectures -> the engine's model family (krasisd.engine.models.build_model)
FAMILIES = {
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
    "Glm4MoeLiteForCausalLM": "deepseek",  # GLM-4.7-Flash: DeepSeek-V3's MLA and routing
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Glm4MoeForCausalLM": "glm4_moe",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "GptOssForCausalLM": "gpt_oss",
    # hybrid: Gated DeltaNet linear attention with gated full attention every few layers
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",  # Qwen3.5 and Qwen3.6 MoE, text model
}
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5_moe")
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# other class names of a supported architecture: Kimi K2 / K2.5 are DeepSeek-V3 text models
# (K2.5's config.json nests the text model's config under ``text_config``)
ARCHITECTURE_ALIASES = {
    "KimiK2ForCausalLM": "DeepseekV3ForCausalLM",
    "KimiK25ForConditionalGeneration": "DeepseekV3ForCausalLM",
    "Kimi_K25ForConditionalGeneration": "DeepseekV3ForCausalLM",
    # Qwen3.5 / 3.6 MoE checkpoints are multimodal: the text model's config is ``text_config``
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}
KIMI_MODEL_TYPES = ("kimi_k2", "kimi_k25")
ROPE_TYPES = ("default", "linear", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid", "topk_softmax")  # topk_softmax: gpt-oss
QK_NORMS = ("none", "head", "projection")  # RMSNorm of q and k: off, per head, whole projection
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")


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
    head_dim: int = 0  # GQA head size; 0 means hidden_size // num_attention_heads
    attention_bias: bool = False
    # GQA variants: q/k norm kind (None: the family's own), rotated share of each head,
    # sliding-window attention (on every layer, or on those ``layer_types`` mark sliding)
    qk_norm: str | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    tie_word_embeddings: bool = False
    # Gated DeltaNet linear attention (the hybrid families' "linear_attention" layers)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # multi-head latent attention (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # mixture of experts
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # one shared expert behind a sigmoid gate (Qwen3-Next)
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
    # gpt-oss experts: clamped SwiGLU (up + 1) * g * sigmoid(alpha * g), g and up clamped at limit
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
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
        self.layer_types = tuple(self.layer_types)
        if self.qk_norm is None:
            self.qk_norm = {"qwen3_moe": "head", "minimax_m2": "projection", "qwen3_next": "head",
                            "qwen3_5_moe": "head"}.get(self.family, "none")
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
        self._check_attention_variants()

    def _check_attention_variants(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError("partial_rotary_factor must be in (0, 1], "
                             f"got {self.partial_rotary_factor}")
        if self.sliding_window is not None and (
                isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be null or a positive integer, "
                             f"got {self.sliding_window!r}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise UnsupportedModelError(f"layer types {unknown} are not supported; "
                                            f"supported: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but no sliding_window")
        if self.swiglu_alpha <= 0 or self.swiglu_limit <= 0:
            raise ValueError("swiglu_alpha and swiglu_limit must be > 0")
        self._check_linear_attention()

    def _check_linear_attention(self) -> None:
        """The hybrid families: every layer typed full or linear attention, and the Gated
        DeltaNet sizes positive, value heads a multiple of key heads."""
        if not self.is_hybrid:
            if "linear_attention" in self.layer_types:
                raise UnsupportedModelError(
                    f"{self.architecture} has no linear attention layers; layer_types says "
                    "linear_attention")
            return
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{self.architecture} needs layer_types naming full_attention or "
                             "linear_attention for each layer")
        if "sliding_attention" in self.layer_types:
            raise UnsupportedModelError(f"{self.architecture} with sliding_attention layers "
                                        "is not supported")
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a "
                             f"multiple of linear_num_key_heads ({self.linear_num_key_heads})")

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
        """``"deepseek"`` (MLA), a GQA family: ``"qwen3_moe"``, ``"mixtral"``, ``"glm4_moe"``,
        ``"minimax_m2"``, ``"gpt_oss"``, or a hybrid one: ``"qwen3_next"``, ``"qwen3_5_moe"``
        (FAMILIES)."""
        return FAMILIES[self.architecture]

    @property
    def is_hybrid(self) -> bool:
        """Gated DeltaNet linear attention layers beside full attention ones (HYBRID_FAMILIES):
        their cache holds recurrent and conv states as well as KV (krasisd.engine.hybrid_cache)."""
        return self.family in HYBRID_FAMILIES

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        """The layers with a KV cache: all but the hybrid families' linear attention ones."""
        return tuple(i for i in range(self.num_hidden_layers)
                     if not self.layer_types or self.layer_types[i] != "linear_attention")

    @property
    def expert_bias(self) -> bool:
        """Whether the routed experts have biases and the clamped SwiGLU (gpt-oss), which only
        the torch reference expert backend computes."""
        return self.family == "gpt_oss"

    def attention_window(self, layer_idx: int) -> int | None:
        """Tokens a query of this layer sees (itself included), or None for all before it."""
        if self.layer_types and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head: MLA's rope part, or the first ``partial_rotary_factor`` of a
        GQA head (as transformers: int(head_dim * factor))."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

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
        if self.family == "qwen3_5_moe":
            return True
        if self.family in ("qwen3_moe", "qwen3_next"):
            return (layer_idx not in self.mlp_only_layers
                    and (layer_idx + 1) % self.decoder_sparse_step == 0)
        return (layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0
                and layer_idx not in self.mlp_only_layers)

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
        raw = text_model_config(raw)
        check_config_limits(raw, capacity_bytes if capacity_bytes is not None
                            else machine_capacity_bytes())
        archs = [ARCHITECTURE_ALIASES.get(a, a) for a in raw.get("architectures") or []]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), archs[0] if archs else None)
        if arch is None:
            raise UnsupportedModelError(
                "config.json names no architecture; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in names and v is not None}
        values["architecture"] = arch
        family = FAMILIES.get(arch)
        values.pop("qk_norm", None)  # set by the family's parser only
        if family not in ("mixtral", "gpt_oss"):  # e.g. Qwen3's unused sliding_window
            values.pop("sliding_window", None)
            values.pop("layer_types", None)
        if family == "qwen3_moe":
            values.update(_qwen3_moe_fields(raw))
        elif family in HYBRID_FAMILIES:
            values.update(_qwen3_next_fields(raw, values))
        elif family in GQA_FIELDS:
            values.update(GQA_FIELDS[family](raw))
        else:
            values.update(_deepseek_fields(raw, arch))
        values.update(_rope_fields(raw))
        if family != "deepseek":
            values["partial_rotary_factor"] = _partial_rotary_factor(
                raw, values, 0.25 if family in HYBRID_FAMILIES else 1.0)
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
    is_v3 = arch != "DeepseekV2ForCausalLM"  # V3, Kimi K2 and GLM-4.7-Flash route alike
    if arch == "Glm4MoeLiteForCausalLM":
        return {**_deepseek_fields(raw, "DeepseekV3ForCausalLM"), **_glm4_moe_lite_layers(raw)}
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


def text_model_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The config of the text model: Kimi K2.5's config.json nests a DeepSeek-V3 config under
    ``text_config``, Qwen3.5/3.6 MoE's a Qwen3_5MoeForCausalLM one (their vision towers are
    not served); other configs are returned as they are."""
    archs = [a for a in raw.get("architectures") or [] if isinstance(a, str)]
    nested = raw.get("text_config")
    aliased = [ARCHITECTURE_ALIASES[a] for a in archs if a in ARCHITECTURE_ALIASES]
    if not isinstance(nested, dict) or not (raw.get("model_type") in KIMI_MODEL_TYPES or aliased):
        return raw
    text = dict(nested)
    text["architectures"] = aliased[:1] or ["DeepseekV3ForCausalLM"]
    for key in ("eos_token_id", "bos_token_id", "torch_dtype", "dtype", "tie_word_embeddings"):
        if text.get(key) is None and raw.get(key) is not None:
            text[key] = raw[key]
    return text


def _qwen3_next_fields(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next and Qwen3.5/3.6 MoE: softmax top-k routing renormalised (always for Qwen3.5),
    one shared expert behind a sigmoid gate, per-head q/k norm; ``layer_types`` (or every
    ``full_attention_interval``-th layer full, the others linear) say which layers are Gated
    DeltaNet. Missing sizes take transformers' defaults, as its classes would load them.
    Multi-token prediction (``mtp_*``) is not used."""
    layers = raw.get("num_hidden_layers")
    kinds = raw.get("layer_types")
    if kinds is None and isinstance(layers, int):
        interval = raw.get("full_attention_interval")
        interval = 4 if interval is None else interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"full_attention_interval must be a positive integer, got {interval!r}")
        kinds = ["linear_attention" if (i + 1) % interval else "full_attention"
                 for i in range(layers)]
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise ValueError(f"layer_types must list a layer type per layer, got {kinds!r}")
    qwen3_5 = FAMILIES.get(values["architecture"]) == "qwen3_5_moe"
    shared = raw.get("shared_expert_intermediate_size", 512) or 0
    return {
        "n_routed_experts": raw.get("num_experts", 512 if not qwen3_5 else 256) or 0,
        "n_shared_experts": 0,  # the gated shared expert is shared_expert_intermediate_size
        "shared_expert_intermediate_size": shared,
        "moe_intermediate_size": raw.get("moe_intermediate_size", 512),
        # Qwen3.5 has no dense layers: intermediate_size is absent and unused there
        "intermediate_size": raw.get("intermediate_size") or (shared if qwen3_5 else 5632),
        "topk_method": "greedy", "scoring_func": "softmax",
        "norm_topk_prob": True if qwen3_5 else bool(raw.get("norm_topk_prob", True)),
        "mlp_only_layers": () if qwen3_5 else tuple(raw.get("mlp_only_layers") or ()),
        "head_dim": raw.get("head_dim") or 256,
        "layer_types": tuple(kinds),
        "linear_num_key_heads": raw.get("linear_num_key_heads", 16),
        "linear_num_value_heads": raw.get("linear_num_value_heads", 32),
        "linear_key_head_dim": raw.get("linear_key_head_dim", 128),
        "linear_value_head_dim": raw.get("linear_value_head_dim", 128),
        "linear_conv_kernel_dim": raw.get("linear_conv_kernel_dim", 4),
        "rope_interleave": False,
    }


def _glm4_moe_lite_layers(raw: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.7-Flash names each layer's MLP in ``mlp_layer_types`` ("dense" or "sparse";
    transformers' default: the first dense, the others sparse) instead of
    ``first_k_dense_replace``."""
    kinds = raw.get("mlp_layer_types")
    layers = raw.get("num_hidden_layers")
    if kinds is None and isinstance(layers, int):
        kinds = ["dense"] + ["sparse"] * (layers - 1)
    if not isinstance(kinds, list) or any(k not in ("dense", "sparse") for k in kinds):
        raise ValueError(f"mlp_layer_types must list 'dense' or 'sparse' per layer, got {kinds!r}")
    if len(kinds) != layers:
        raise ValueError(f"mlp_layer_types has {len(kinds)} entries for {layers} layers")
    return {"first_k_dense_replace": 0, "moe_layer_freq": 1,
            "mlp_only_layers": tuple(i for i, kind in enumerate(kinds) if kind == "dense")}


def _mixtral_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Mixtral: softmax over all experts, top-k renormalised; experts as wide as
    ``intermediate_size``; sliding-window attention on every layer when set."""
    return {
        "n_routed_experts": raw.get("num_local_experts", 0) or 0,
        "moe_intermediate_size": raw.get("intermediate_size"),
        "n_shared_experts": 0, "topk_method": "greedy", "scoring_func": "softmax",
        "norm_topk_prob": True, "routed_scaling_factor": 1.0, "qk_norm": "none",
        "rope_interleave": False,
    }


def _glm4_moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.5/4.6/4.7: DeepSeek-V3's router (sigmoid, correction bias, groups) over GQA with
    partial rotary and optional per-head q/k norm."""
    return {
        "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "n_group": raw.get("n_group") or 1, "topk_group": raw.get("topk_group") or 1,
        "qk_norm": "head" if raw.get("use_qk_norm") else "none", "rope_interleave": False,
    }


def _minimax_m2_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """MiniMax-M2: sigmoid scores plus correction bias choose the top k (no groups), their
    scores renormalised; q/k RMSNorm over the whole projection; experts of width
    ``intermediate_size``."""
    return {
        "n_routed_experts": raw.get("num_local_experts", 0) or 0,
        "moe_intermediate_size": raw.get("intermediate_size"),
        "n_shared_experts": 0, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "qk_norm": "projection", "rope_interleave": False,
    }


def _gpt_oss_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: a biased router whose top-k logits are softmaxed; experts with biases and the
    clamped SwiGLU; attention with biases and sinks, sliding and full layers alternating."""
    return {
        "n_routed_experts": raw.get("num_local_experts", 0) or 0,
        "moe_intermediate_size": raw.get("intermediate_size"),
        "n_shared_experts": 0, "topk_method": "greedy", "scoring_func": "topk_softmax",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "qk_norm": "none",
        "rope_interleave": False,
        "layer_types": tuple(raw.get("layer_types") or ()),
        "swiglu_alpha": float(raw.get("swiglu_alpha", 1.702)),
        "swiglu_limit": float(raw.get("swiglu_limit", 7.0)),
    }


GQA_FIELDS = {"mixtral": _mixtral_fields, "glm4_moe": _glm4_moe_fields,
              "minimax_m2": _minimax_m2_fields, "gpt_oss": _gpt_oss_fields}


def _partial_rotary_factor(raw: dict[str, Any], values: dict[str, Any],
                           default: float = 1.0) -> float:
    """The rotated share of a GQA head: ``partial_rotary_factor`` at the top level or in the
    rope parameters, or MiniMax-M2's ``rotary_dim`` over ``head_dim``; else ``default`` (the
    hybrid Qwen families rotate a quarter, as transformers assumes for them)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = factor if factor is not None else raw.get("partial_rotary_factor")
    if factor is None and raw.get("rotary_dim"):
        head_dim = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
        factor = raw["rotary_dim"] / head_dim
    return float(factor) if factor is not None else default


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
