"""CPU-only load(quant=...) quantizes the dense linears too (krasisd.engine.dense_quant).

Models: small random transformers DeepSeek-V2 (q_lora, MLA) and Qwen3-MoE checkpoints, every
matrix input size a multiple of 64 so that INT4 fits everywhere, weights N(0, 0.08) and a wide
router as in tests/engine/tiny_hf.py (clear routing and argmax margins).

Tolerances, on the relative RMS of the logits' error (||l - l_float|| / ||l_float||): RTN
weights carry ~0.6% (INT8) and ~10% (INT4) relative RMS error per matrix (test_quant), int8
activations ~0.4% more per matrix. These random 3-layer models amplify a perturbation about
five-fold on its way to the logits (attention softmax and top-k routing flips), so measured:
3.6% / 5.4% (INT8, DeepSeek / Qwen3) and 33% / 43% (INT4, INT8 head), the same as with the
rounded weights dequantized into float linears (the rounding, not the kernels). We allow 10%
and 65%, and top-1 agreement of 85% (INT8) and 25% (INT4; chance is 1/128). The native
kernels themselves, against those same rounded weights in float (weight-only), may add only
the activation rounding: measured 2.8-4.7%, allowed 10%; one QuantLinear against its
dequantized weights: 1%.
"""

import krasis_native
import pytest
import torch
from torch import nn

from krasisd.engine import engine as engine_mod
from krasisd.engine.dense_quant import HEAD_BITS, QuantLinear, quantize_dense_linears
from krasisd.engine.quant import dequantize

PROMPT = list(range(3, 30))
REL_TOL = {"int8": 0.10, "int4": 0.65}
TOP1_MIN = {"int8": 0.85, "int4": 0.25}
KERNEL_TOL = 0.10

DEEPSEEK = ("DeepseekV2", dict(
    vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=64,
    q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    topk_method="greedy", routed_scaling_factor=1.0))
QWEN = ("Qwen3Moe", dict(
    vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[1], tie_word_embeddings=False))


def save_model(kind, path):
    import transformers

    prefix, kwargs = kind
    config = getattr(transformers, f"{prefix}Config")(max_position_embeddings=256, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.08 if ".gate." not in name else 0.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["deepseek", "qwen3"])
def model_case(request, tmp_path_factory):
    kind = DEEPSEEK if request.param == "deepseek" else QWEN
    path = save_model(kind, tmp_path_factory.mktemp(request.param))
    reference = engine_mod.load(path, quant="none")
    return path, reference


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().norm() / want.detach().norm())


def dense_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def weight_only_copy(engine) -> None:
    """Swap each QuantLinear for an nn.Linear over its dequantized weights (float activations)."""
    for name, module in dense_linears(engine.model).items():
        if isinstance(module, QuantLinear):
            native = module.native
            # copies: the packed arrays may be read-only memory maps of the cache
            weight = dequantize(torch.from_numpy(native.qweight.copy()),
                                torch.from_numpy(native.scales.copy()),
                                native.bits, native.group_size)  # [N, K]
            linear = nn.Linear(native.in_features, native.out_features, bias=False)
            linear.weight.data = weight.to(engine.dtype)
            parent, _, child = name.rpartition(".")
            setattr(engine.model.get_submodule(parent) if parent else engine.model, child, linear)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_load_quantizes_every_dense_linear(model_case, tmp_path, quant):
    path, reference = model_case
    engine = engine_mod.load(path, quant=quant, cache_dir=tmp_path / "cache", threads=1)
    bits = 8 if quant == "int8" else 4
    linears = dense_linears(engine.model)
    kept = {name for name, m in linears.items() if isinstance(m, nn.Linear)}
    assert kept == {n for n in linears if n.endswith("kv_b_proj")}
    quantized = {name: m for name, m in linears.items() if isinstance(m, QuantLinear)}
    assert len(quantized) >= 3 * 4 + 1  # attention and FFN projections of 3 layers, head
    for name, module in quantized.items():
        assert module.bits == (HEAD_BITS if name == "lm_head" else bits), name
        assert module.native.runner is engine.expert_backend.runner, name

    want = reference.logits(PROMPT)  # [T, V]
    got = engine.logits(PROMPT)
    assert rel_err(got, want) <= REL_TOL[quant]
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= TOP1_MIN[quant]

    weight_only_copy(engine)
    assert rel_err(got, engine.logits(PROMPT)) <= KERNEL_TOL
    engine.close()


def test_int8_greedy_follows_float(model_case, tmp_path):
    path, reference = model_case
    engine = engine_mod.load(path, quant="int8", cache_dir=tmp_path / "cache", threads=1)
    tokens = engine.greedy(PROMPT[:6], max_new_tokens=6)
    assert tokens[:3] == reference.greedy(PROMPT[:6], max_new_tokens=3)
    assert len(tokens) <= 6 and all(0 <= t < engine.config.vocab_size for t in tokens)
    engine.close()


def test_quant_none_keeps_float_linears(model_case):
    _, reference = model_case
    linears = dense_linears(reference.model)
    assert linears and all(type(m) is nn.Linear for m in linears.values())


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_with_bias_matches_dequantized(bits):
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(192, 40, bias=True)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.05, generator=gen)
        linear.bias.normal_(0.0, 1.0, generator=gen)
    model = nn.Sequential(linear)
    assert quantize_dense_linears(model, bits, 128, krasis_native.MoE(1), head_bits=None) == 1
    layer = model[0]
    assert isinstance(layer, QuantLinear) and layer.group_size == 64  # 192 = 3 x 64
    x = torch.randn(3, 192, generator=gen)  # [T, K]
    deq = dequantize(torch.from_numpy(layer.native.qweight), torch.from_numpy(layer.native.scales),
                     bits, 64)  # [N, K]
    want = x @ deq.T + linear.bias  # [T, N]
    assert rel_err(layer(x), want) <= 0.01


def test_unfit_input_size_stays_float_and_bad_bits_raise():
    model = nn.Sequential(nn.Linear(96, 8, bias=False), nn.Linear(8, 8, bias=False))
    assert quantize_dense_linears(model, 4, 128, krasis_native.MoE(1)) == 0  # 96 % 64, 8 % 32
    assert all(type(m) is nn.Linear for m in model)
    with pytest.raises(ValueError, match="bits"):
        quantize_dense_linears(model, 3, 128, krasis_native.MoE(1))
    with pytest.raises(ValueError, match="runner"):
        quantize_dense_linears(model, 8, 128, None)
