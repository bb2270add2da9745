"""Router and sparse MoE block. Routed experts run only through an ExpertBackend.

Legend: T = tokens, D = hidden, E = routed experts, G = expert groups, K = experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import DenseMLP


class Router(nn.Module):
    """Scores experts and picks the top K; named ``gate`` in checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(
            torch.zeros(config.n_routed_experts, config.hidden_size), requires_grad=False
        )
        self.e_score_correction_bias: nn.Parameter | None = None  # noaux_tc routing only
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(config.n_routed_experts), requires_grad=False
            )
        self.bias: nn.Parameter | None = None  # a bias on the logits (gpt-oss's router)
        if config.scoring_func == "topk_softmax":
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)
        self._weight32: tuple[tuple, torch.Tensor] | None = None  # (weight's storage, copy)

    def weight32(self) -> torch.Tensor:
        """The weight [E, D] in float32, converted once rather than at every call."""
        weight = self.weight
        if weight.dtype == torch.float32:
            return weight
        key = (weight.data_ptr(), weight.device)
        if self._weight32 is None or self._weight32[0] != key:
            self._weight32 = (key, weight.float())
        return self._weight32[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, K] int64, topk_weights [T, K] float32)."""
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(x.float(), self.weight32(), bias)  # [T, E]
        if self.config.scoring_func == "topk_softmax":  # gpt-oss: softmax over the top k logits
            top_logits, topk_ids = torch.topk(logits, self.config.num_experts_per_tok, dim=-1)
            return topk_ids, top_logits.softmax(dim=-1)  # [T, K], [T, K]
        scores = logits.sigmoid() if self.config.scoring_func == "sigmoid" else logits.softmax(-1)
        topk_ids = select_experts(self.config, scores, self.e_score_correction_bias)
        return topk_ids, scale_weights(self.config, scores.gather(1, topk_ids))


def select_experts(config: ModelConfig, scores: torch.Tensor, bias: torch.Tensor | None):
    """scores [T, E] -> expert ids [T, K] by greedy, group_limited_greedy or noaux_tc."""
    k, method = config.num_experts_per_tok, config.topk_method
    if method == "greedy":
        return torch.topk(scores, k, dim=-1, sorted=False)[1]
    num_tokens, num_groups = scores.shape[0], config.n_group
    choice = scores if bias is None or method != "noaux_tc" else scores + bias.float()  # [T, E]
    grouped = choice.view(num_tokens, num_groups, -1)  # [T, G, E/G]
    if method == "group_limited_greedy":
        group_scores = grouped.max(dim=-1).values  # [T, G]
        fill = 0.0
    else:  # noaux_tc: a group's score is the sum of its two best experts
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        fill = float("-inf")
    group_idx = torch.topk(group_scores, config.topk_group, dim=-1, sorted=False)[1]  # [T, G']
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, -1)  # [T, E]
    masked = choice.masked_fill(~expert_mask, fill)
    return torch.topk(masked, k, dim=-1, sorted=False)[1]


def weight_rule(config: ModelConfig) -> tuple[bool, float]:
    """(normalise, scale) for the chosen experts' scores.

    DeepSeek-V2 either normalises (norm_topk_prob, K > 1) or scales by routed_scaling_factor,
    as its reference code does; DeepSeek-V3 and Qwen3-MoE normalise then scale.
    """
    if config.architecture == "DeepseekV2ForCausalLM":
        if config.norm_topk_prob and config.num_experts_per_tok > 1:
            return True, 1.0
        return False, float(config.routed_scaling_factor)
    return bool(config.norm_topk_prob), float(config.routed_scaling_factor)


def scale_weights(config: ModelConfig, weights: torch.Tensor) -> torch.Tensor:
    """Normalise and scale the chosen experts' scores [T, K] (float32), by ``weight_rule``."""
    normalise, scale = weight_rule(config)
    if normalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


class SparseMoe(nn.Module):
    """Router + routed experts (through the backend) + optional always-on shared experts."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(config)
        self.shared_experts: DenseMLP | None = None  # always-on experts, when the model has them
        if config.n_shared_experts:
            shared_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = DenseMLP(config.hidden_size, shared_size)

    def forward(self, x: torch.Tensor, backend) -> torch.Tensor:  # [T, D] -> [T, D]
        if backend is None:
            raise RuntimeError("no expert backend is attached to the model")
        topk_ids, topk_weights = self.gate(x)  # [T, K], [T, K]
        out = backend(self.layer_idx, x, topk_ids, topk_weights)  # [T, D]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
