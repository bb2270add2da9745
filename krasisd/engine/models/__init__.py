"""Model definitions in plain torch: DeepSeek-V2/V3 and Kimi K2 (MLA); Qwen3-MoE, Mixtral,
GLM-4.5 MoE, MiniMax-M2 and gpt-oss (GQA); Qwen3-Next and Qwen3.5/3.6 MoE (Gated DeltaNet
hybrids)."""

from __future__ import annotations

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import CausalLM


def build_model(config: ModelConfig) -> CausalLM:
    """An empty model for the config (build under ``torch.device("meta")`` to skip allocation)."""
    if config.family == "qwen3_moe":
        from krasisd.engine.models.qwen3_moe import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(config)
    if config.family in ("mixtral", "glm4_moe", "minimax_m2"):
        from krasisd.engine.models.gqa_moe import GqaMoeForCausalLM

        return GqaMoeForCausalLM(config)
    if config.is_hybrid:  # Qwen3-Next, Qwen3.5/3.6 MoE: Gated DeltaNet + gated attention
        from krasisd.engine.models.qwen3_next import HybridMoeForCausalLM

        return HybridMoeForCausalLM(config)
    if config.family == "gpt_oss":
        from krasisd.engine.models.gpt_oss import GptOssForCausalLM

        return GptOssForCausalLM(config)
    from krasisd.engine.models.deepseek import DeepseekForCausalLM

    return DeepseekForCausalLM(config)


__all__ = ["CausalLM", "build_model"]
