"""The decode step's fused Triton kernels against the torch code they replace (in Triton's
CPU interpreter here, on the GPU in tests/gpu)."""

import dataclasses

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.gpu import fused
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, synthetic_model
from krasisd.engine.models.common import DenseMLP, RMSNorm, RotaryEmbedding
from krasisd.engine.models.moe import Router

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16


def _close(got, want, atol=1e-2, rtol=2.5e-2):
    """Two bf16 roundings apart at most (Triton's CPU interpreter truncates where the GPU
    rounds to nearest)."""
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def _rmsnorm_reference(x, weight, eps, deltas=()):
    """The torch code ``fused.rmsnorm`` replaces: (residual, normed)."""
    residual = x
    for delta in deltas:
        residual = (residual.float() + delta.float()).to(x.dtype)
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)
    return residual, norm(residual)


@pytest.mark.parametrize("deltas", [0, 1, 3])
@pytest.mark.parametrize("dim", [192, 2048, 300])
def test_rmsnorm_with_residual_deltas(deltas, dim):
    gen = torch.Generator().manual_seed(dim + deltas)
    x = torch.randn(2, dim, generator=gen).to(DEVICE, BF16)
    parts = tuple(torch.randn(2, dim, generator=gen).to(DEVICE, dtype)
                  for dtype in (torch.float32, BF16, torch.float32)[:deltas])
    weight = (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE, BF16)
    residual, normed = torch.empty_like(x), torch.empty_like(x)
    fused.rmsnorm(x, weight, 1e-6, normed, parts, residual_out=residual if deltas else None)
    want_res, want_norm = _rmsnorm_reference(x, weight, 1e-6, parts)
    if deltas:
        _close(residual, want_res)
    _close(normed, want_norm)


def test_residual_add_alone():
    x = torch.randn(1, 64).to(DEVICE, BF16)
    delta = torch.randn(1, 64).to(DEVICE)
    out = torch.empty_like(x)
    fused.rmsnorm(x, None, 1e-6, None, (delta,), residual_out=out)
    _close(out, x.float() + delta)


def test_silu_mul_and_fused_gate_up_match_the_mlp():
    torch.manual_seed(0)
    mlp = DenseMLP(64, 96).to(DEVICE, BF16)
    x = torch.randn(3, 64).to(DEVICE, BF16)
    want = mlp(x)
    got = fused.swiglu(mlp, x)
    _close(got, want)
    assert mlp.gate_proj.weight.data_ptr() == fused.fuse_gate_up(mlp).data_ptr()
    _close(mlp(x), want)  # the views still compute the same MLP


@pytest.mark.parametrize("interleave", [True, False])
def test_mla_prep_matches_the_attention_code(interleave):
    config = ModelConfig.from_dict(dict(TINY_DEEPSEEK_V2))
    config = dataclasses.replace(config, rope_interleave=interleave)  # V2 always interleaves
    model = synthetic_model(config, DEVICE, BF16, seed=3)
    attn = model.model.layers[0].self_attn
    rotary = RotaryEmbedding(config)
    x = torch.randn(1, config.hidden_size).to(DEVICE, BF16)
    pos = torch.tensor([5], device=DEVICE)
    cos, sin = rotary.cos_sin(pos)  # [1, R/2]
    q_nope, q_rope = attn.query(x, cos, sin)  # [1, H, N], [1, H, R]
    want_entry = attn.latent(x, cos, sin)[0]  # [C + R]
    w_uk, _ = attn.absorbed_weights()
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)[:, 0]  # [H, C]
    want_q = torch.cat([q_latent, q_rope[0]], dim=-1)  # [H, C + R]

    heads, latent = q_latent.shape
    q = attn.q_proj(x).view(heads, -1)  # [H, N + R]
    kv = attn.kv_a_proj_with_mqa(x)[0]  # [C + R]
    cache = torch.zeros(8, want_entry.numel(), dtype=BF16, device=DEVICE)
    q_full = torch.empty(heads, latent + config.qk_rope_head_dim, dtype=BF16, device=DEVICE)
    fused.mla_prep(q, q_latent.contiguous(), kv, cos[0].contiguous(), sin[0].contiguous(),
                   attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, pos, cache, q_full,
                   interleave)
    _close(q_full, want_q)
    _close(cache[5], want_entry)
    assert cache[:5].abs().sum() == 0 and cache[6:].abs().sum() == 0


@pytest.mark.parametrize("span", [8, 256, 3000])
def test_masked_softmax_stops_at_the_position(span):
    scores = torch.randn(4, span).to(DEVICE, BF16)
    last = span // 2
    probs = torch.empty_like(scores)
    fused.masked_softmax(scores, torch.tensor([last], device=DEVICE), 0.3, probs)
    masked = (scores.float() * 0.3)
    masked[:, last + 1 :] = float("-inf")
    _close(probs, masked.softmax(-1), atol=2e-3)
    assert probs[:, last + 1 :].abs().sum() == 0


@pytest.mark.parametrize("name,overrides", [
    ("v2-plain", dict(norm_topk_prob=False, routed_scaling_factor=2.5)),
    ("v2-norm", dict(norm_topk_prob=True)),
    ("v3-sigmoid", dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                        scoring_func="sigmoid", norm_topk_prob=True, topk_method="greedy",
                        routed_scaling_factor=2.0)),
])
def test_router_topk_matches_the_router(name, overrides):
    config = ModelConfig.from_dict(dict(TINY_DEEPSEEK_V2, n_routed_experts=20,
                                        num_experts_per_tok=6, **overrides))
    assert fused.fusable_router(config)
    router = Router(config).to(DEVICE)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(3, config.hidden_size, device=DEVICE)
    want_ids, want_weights = router(x)
    ids = torch.empty(3, 6, dtype=torch.long, device=DEVICE)
    weights = torch.empty(3, 6, device=DEVICE)
    counts = torch.zeros(20, dtype=torch.int64, device=DEVICE)
    logits = fused.router_logits(x.bfloat16(), router.weight.bfloat16())  # bf16 as stored
    _close(logits, x.bfloat16().float() @ router.weight.bfloat16().float().T, atol=1e-4,
           rtol=1e-5)
    fused.router_topk(fused.router_logits(x, router.weight), config, ids, weights, counts)
    assert torch.equal(counts.cpu(), torch.bincount(ids.reshape(-1).cpu(), minlength=20))
    want_ids, order = want_ids.sort(dim=-1)
    ids, got_order = ids.sort(dim=-1)
    assert torch.equal(ids, want_ids)
    _close(weights.gather(1, got_order), want_weights.gather(1, order), atol=1e-5, rtol=1e-5)

