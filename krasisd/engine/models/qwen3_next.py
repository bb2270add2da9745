"""Qwen3-Next and Qwen3.5/3.6 MoE: hybrid models whose layers are Gated DeltaNet linear
attention (``layer_types`` "linear_attention", three of every four in the released models) or
gated full attention, each followed by the MoE block with a gated shared expert.

What differs from Qwen3-MoE (qwen3_moe.py), and is defined here:

- RMSNorms store ``weight - 1`` (zero-centred): y = norm(x) * (1 + w), for the layer norms, the
  final norm and the q/k norms;
- gated full attention: ``q_proj`` also yields a per-head output gate, o = W_o (attn *
  sigmoid(gate)); a quarter of each head rotates (partial rotary, as gqa_moe.VariantAttention);
- Gated DeltaNet (below), with a recurrent state [Hv, Dk, Dv] and a causal conv1d state (the
  last kernel - 1 inputs) per layer, held in the cache (krasisd.engine.hybrid_cache);
- the shared expert is one SwiGLU MLP scaled by sigmoid(shared_expert_gate(x)).

Qwen3-Next and Qwen3.5 differ only in how the DeltaNet input projections are stored:
Qwen3-Next fuses them into ``in_proj_qkvz`` and ``in_proj_ba`` grouped by key head, Qwen3.5
keeps ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``. Qwen3.5's multimodal rope
(mrope) is plain rope for text, whose three position ids are equal.

Gated DeltaNet, per value head, with q and k L2-normalised and q scaled by Dk^-1/2, a state
S [Dk, Dv] and, per token t, decay alpha_t = exp(g_t) (g_t = -exp(A_log) * softplus(a_t +
dt_bias) <= 0) and write strength beta_t = sigmoid(b_t):

    S_t = alpha_t * S_{t-1} + k_t (beta_t * (v_t - alpha_t * S_{t-1}^T k_t))^T     (delta rule)
    o_t = S_t^T q_t

then o is RMS-normed per head, gated by silu(z) and projected out. ``recurrent_gated_delta_rule``
computes this token by token (decode); ``chunked_gated_delta_rule`` computes the same in chunks
of 64 tokens with matrix products (prefill), as transformers' torch_chunk_gated_delta_rule.

Legend: T = new tokens, D = hidden, H = query heads, Hkv = key/value heads, Dh = head_dim,
Hk / Hv = DeltaNet key / value heads, Dk / Dv = their head sizes, C = conv channels
(2 * Hk * Dk + Hv * Dv), K = conv kernel, N = chunks, L = chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from krasisd.engine.config import ModelConfig
from krasisd.engine.models.common import CausalLM, DecoderLayer, DenseMLP, RMSNorm, heads_first
from krasisd.engine.models.gqa_moe import VariantAttention
from krasisd.engine.models.moe import SparseMoe

CHUNK_SIZE = 64  # tokens per chunk of the chunked delta rule (transformers' and FLA's)


class ZeroCenteredRMSNorm(RMSNorm):
    """RMSNorm whose stored weight is the offset from one: y = norm(x) * (1 + w), in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm then a SiLU gate: y = w * norm(x) * silu(gate) (DeltaNet's output norm)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
                                ).to(x.dtype)
        return (normed * F.silu(gate.float())).to(x.dtype)


class GatedAttention(VariantAttention):
    """Full attention with an output gate: ``q_proj`` yields [T, H, 2 * Dh], the query and
    the gate of each head; o = o_proj(attn * sigmoid(gate)). Zero-centred q/k norms, partial
    rotary."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary):
        super().__init__(config, layer_idx, rotary)
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.head_dim,
                                bias=config.attention_bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def prefill(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D], causal over cached + new tokens."""
        num_new = x.shape[0]
        q, gate = self.q_proj(x).view(num_new, self.num_heads, 2 * self.head_dim).chunk(2, -1)
        q = self.rotate(self.q_norm(q), cos, sin)  # [T, H, Dh]
        k = self.k_norm(self.k_proj(x).view(num_new, self.num_kv_heads, self.head_dim))
        k = self.rotate(k, cos, sin)  # [T, Hkv, Dh]
        v = self.v_proj(x).view(num_new, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # [S, Hkv, Dh] each
        mask, is_causal = self.mask(num_new, k.shape[0], x.device)
        out = F.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), attn_mask=mask, is_causal=is_causal,
            scale=self.scale, enable_gqa=True)[0]  # [H, T, Dh]
        out = out.transpose(0, 1).reshape(num_new, -1)  # [T, H*Dh]
        return self.o_proj(out * torch.sigmoid(gate.reshape(num_new, -1)))

    decode = prefill  # one new token needs no mask


# ---- Gated DeltaNet ---------------------------------------------------------------------


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (FLA's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(q, k, v, g, beta, state):
    """The delta rule token by token (the module's docstring's equations).

    q, k [Hv, T, Dk], v [Hv, T, Dv], g and beta [Hv, T], state [Hv, Dk, Dv], all float32 (q
    and k normalised, q scaled) -> (out [Hv, T, Dv], final state [Hv, Dk, Dv])."""
    outs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[:, None, None]  # alpha_t * S_{t-1}
        predicted = (state * k[:, t, :, None]).sum(dim=1)  # [Hv, Dv]: S^T k_t
        delta = (v[:, t] - predicted) * beta[:, t, None]  # [Hv, Dv]
        state = state + k[:, t, :, None] * delta[:, None, :]  # + k_t delta^T
        outs.append((state * q[:, t, :, None]).sum(dim=1))  # [Hv, Dv]: S_t^T q_t
    return torch.stack(outs, dim=1), state


def chunked_gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = CHUNK_SIZE):
    """The delta rule over chunks of ``chunk_size`` tokens: same arguments and results as
    ``recurrent_gated_delta_rule``, with the sequential loop over chunks instead of tokens.

    Within a chunk, with gamma_i = g_1 + ... + g_i (log of the decay since the chunk's start),
    the delta rule's writes u_i = beta_i (v_i - (decayed state + earlier writes)^T k_i) are a
    unit lower-triangular system (the UT transform):

        (I + A) U = beta V - (beta K * e^gamma) S0,   A_ij = beta_i k_i.k_j e^(gamma_i - gamma_j), j < i

    solved once per chunk for both right-hand sides (W = (I + A)^-1 beta V, P = (I + A)^-1 beta K
    e^gamma, so U = W - P S0). Then, with the state S0 at the chunk's start:

        O = (Q * e^gamma) S0 + ((Q K^T) * e^(gamma_i - gamma_j), j <= i) U
        S = e^gamma_L S0 + (K * e^(gamma_L - gamma))^T U
    """
    num_heads, num_tokens, k_dim = k.shape
    v_dim = v.shape[-1]
    pad = (chunk_size - num_tokens % chunk_size) % chunk_size  # zero tokens change nothing
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # [Hv, N*L, Dk|Dv]
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))  # [Hv, N*L]
    num_chunks = q.shape[1] // chunk_size
    q, k = (x.reshape(num_heads, num_chunks, chunk_size, k_dim) for x in (q, k))  # [Hv, N, L, Dk]
    v = v.reshape(num_heads, num_chunks, chunk_size, v_dim)  # [Hv, N, L, Dv]
    beta = beta.reshape(num_heads, num_chunks, chunk_size, 1)  # [Hv, N, L, 1]
    gamma = g.reshape(num_heads, num_chunks, chunk_size).cumsum(dim=-1)  # [Hv, N, L]

    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(future, float("-inf")).exp()
    # decay [Hv, N, L, L]: e^(gamma_i - gamma_j) for j <= i, 0 above the diagonal
    k_beta = k * beta  # [Hv, N, L, Dk]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # [Hv, N, L, L]; its diagonal is ignored
    writes = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(system, k_beta * gamma.exp()[..., None], upper=False,
                                          unitriangular=True)  # W [Hv, N, L, Dv], P [.., Dk]
    within = (q @ k.transpose(-1, -2)) * decay  # [Hv, N, L, L]
    q_decayed = q * gamma.exp()[..., None]  # [Hv, N, L, Dk]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # [Hv, N, L, Dk]
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # [Hv, N, 1, 1]

    outs = []
    for n in range(num_chunks):
        u = writes[:, n] - reads[:, n] @ state  # [Hv, L, Dv]: U = W - P S0
        outs.append(q_decayed[:, n] @ state + within[:, n] @ u)  # [Hv, L, Dv]
        state = state * chunk_decay[:, n] + k_to_end[:, n].transpose(-1, -2) @ u
    out = torch.cat(outs, dim=1)[:, :num_tokens]  # [Hv, T, Dv]
    return out, state


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet linear attention (Qwen3.5's projections: in_proj_qkv, in_proj_z,
    in_proj_b, in_proj_a); the rule and its equations are in the module's docstring.

    Its cache (krasisd.engine.hybrid_cache.HybridCache) holds the layer's conv state [K-1, C]
    and recurrent state [Hv, Dk, Dv] (float32); without a cache both start at zero."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = config.linear_conv_kernel_dim
        hidden = config.hidden_size
        self._projections(hidden)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=False)  # depthwise, causal: weight [C, 1, K]
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def _projections(self, hidden: int) -> None:
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor):
        """x [T, D] -> (qkv [T, C] in the order q, k, v; z [T, Hv, Dv]; b, a [T, Hv])."""
        z = self.in_proj_z(x).view(x.shape[0], self.num_v_heads, self.head_v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def conv(self, qkv: torch.Tensor, conv_state: torch.Tensor | None):
        """Causal depthwise conv1d then SiLU: qkv [T, C] after the K-1 inputs of ``conv_state``
        [K-1, C] (zeros when None) -> (out [T, C], the new state: the last K-1 inputs)."""
        if conv_state is None:
            conv_state = qkv.new_zeros(self.kernel - 1, self.conv_dim)
        window = torch.cat([conv_state.to(qkv.dtype), qkv])  # [K-1+T, C]
        out = F.conv1d(window.t().unsqueeze(0), self.conv1d.weight.to(qkv.dtype),
                       groups=self.conv_dim)[0]  # [C, T]
        return F.silu(out).t(), window[window.shape[0] - (self.kernel - 1):]

    def prefill(self, x, cos, sin, cache) -> torch.Tensor:
        """x [T, D] -> [T, D]; cos and sin are unused (no rotary here)."""
        num_new = x.shape[0]
        qkv, z, b, a = self.project(x)
        conv_state, state = (None, None) if cache is None else cache.linear_state(self.layer_idx)
        qkv, conv_state = self.conv(qkv, conv_state)  # [T, C]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        repeat = self.num_v_heads // self.num_k_heads  # each key head serves `repeat` value heads
        q = l2norm(q.float().view(num_new, self.num_k_heads, self.head_k_dim))
        k = l2norm(k.float().view(num_new, self.num_k_heads, self.head_k_dim))
        q = q.repeat_interleave(repeat, dim=1).transpose(0, 1) * self.head_k_dim ** -0.5
        k = k.repeat_interleave(repeat, dim=1).transpose(0, 1)  # [Hv, T, Dk] both
        v = v.float().view(num_new, self.num_v_heads, self.head_v_dim).transpose(0, 1)
        beta = b.sigmoid().float().t()  # [Hv, T]
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())).t()
        if state is None:
            state = x.new_zeros(self.num_v_heads, self.head_k_dim, self.head_v_dim,
                                dtype=torch.float32)
        rule = recurrent_gated_delta_rule if num_new == 1 else chunked_gated_delta_rule
        out, state = rule(q, k, v, g, beta, state)  # [Hv, T, Dv], [Hv, Dk, Dv]
        if cache is not None:
            cache.set_linear_state(self.layer_idx, conv_state, state)
        out = self.norm(out.transpose(0, 1).to(x.dtype), z)  # [T, Hv, Dv]
        return self.out_proj(out.reshape(num_new, self.value_dim))

    decode = prefill  # one token takes the recurrent form


class FusedGatedDeltaNet(GatedDeltaNet):
    """Qwen3-Next's Gated DeltaNet: ``in_proj_qkvz`` [2*Hk*Dk + 2*Hv*Dv, D] and ``in_proj_ba``
    [2*Hv, D], whose outputs are grouped by key head: (q [Dk], k [Dk], v [r*Dv], z [r*Dv]) and
    (b [r], a [r]) for each of the Hk key heads, r = Hv / Hk."""

    def _projections(self, hidden: int) -> None:
        self.in_proj_qkvz = nn.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor):
        num_new, groups = x.shape[0], self.num_k_heads
        r = self.num_v_heads // groups
        qkvz = self.in_proj_qkvz(x).view(num_new, groups, -1)  # [T, Hk, 2Dk + 2rDv]
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, r * self.head_v_dim,
                                 r * self.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(num_new, groups, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([q.reshape(num_new, -1), k.reshape(num_new, -1),
                         v.reshape(num_new, -1)], dim=-1)  # [T, C]
        z = z.reshape(num_new, self.num_v_heads, self.head_v_dim)  # [T, Hv, Dv]
        return qkv, z, b.reshape(num_new, -1), a.reshape(num_new, -1)  # b, a [T, Hv]


# ---- layers and model -------------------------------------------------------------------


class SharedExpertMoe(SparseMoe):
    """The MoE block plus one shared expert scaled per token by sigmoid(shared_expert_gate)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.shared_expert: DenseMLP | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, backend) -> torch.Tensor:  # [T, D] -> [T, D]
        out = super().forward(x, backend)
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class LinearAttentionLayer(DecoderLayer):
    """A decoder layer whose token mixer is Gated DeltaNet, named ``linear_attn`` in
    checkpoints; ``self_attn`` returns it for the code all layers share (DecoderLayer's
    prefill and decode, krasisd.engine.batch)."""

    def __init__(self, config: ModelConfig, layer_idx: int, mixer: nn.Module, mlp: nn.Module):
        nn.Module.__init__(self)
        self.layer_idx = layer_idx
        self.linear_attn = mixer
        self.mlp = mlp
        self.is_moe = config.is_moe_layer(layer_idx)

    @property
    def self_attn(self) -> nn.Module:
        return self.linear_attn


class HybridMoeForCausalLM(CausalLM):
    """Qwen3NextForCausalLM and Qwen3_5MoeForCausalLM: per ``layer_types``, a Gated DeltaNet
    or a gated full attention layer, then the shared-expert MoE block (or, for Qwen3-Next's
    ``mlp_only_layers``, a dense SwiGLU MLP); zero-centred norms throughout."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, [])
        eps = config.rms_norm_eps
        self.model.norm = ZeroCenteredRMSNorm(config.hidden_size, eps)
        deltanet = FusedGatedDeltaNet if config.family == "qwen3_next" else GatedDeltaNet
        for idx in range(config.num_hidden_layers):
            if config.is_moe_layer(idx):
                mlp = SharedExpertMoe(config, idx)
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size)
            if config.layer_types[idx] == "linear_attention":
                layer = LinearAttentionLayer(config, idx, deltanet(config, idx), mlp)
            else:
                layer = DecoderLayer(config, idx, GatedAttention(config, idx, self.rotary), mlp)
            layer.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps)
            layer.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps)
            self.model.layers.append(layer)
