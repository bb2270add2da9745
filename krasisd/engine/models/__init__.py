"""Model definitions in plain torch: DeepSeek-V2/V3 (MLA) and Qwen3-MoE (GQA)."""

from __future__ import annotations

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import CausalLM


def build_model(config: ModelConfig) -> CausalLM:
    """An empty model for the config (build under ``torch.device("meta")`` to skip allocation)."""
    if config.family == "qwen3_moe":
        from krasisd.engine.models.qwen3_moe import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(config)
    from krasisd.engine.models.deepseek import DeepseekForCausalLM

    return DeepseekForCausalLM(config)


__all__ = ["CausalLM", "build_model"]
