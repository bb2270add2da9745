"""Qwen3-Next and Qwen3.5/3.6 MoE (Gated DeltaNet + gated attention hybrids) against
transformers' own classes, on tiny random checkpoints written by save_pretrained, two configs
each; the Qwen3.5 ones in both layouts (the text model's, and the multimodal checkpoint's with
its config under ``text_config``, ``model.language_model.`` names, fused experts, vision and
MTP tensors).

Each is checked in float32 through the torch reference expert backend: logits without a cache,
prefill then decode through the hybrid cache, chunked prefill (several forwards appending to
one cache) against one whole prefill, batched decode over sequences of different lengths, and
greedy output over 32 tokens against transformers' generate. The chunked delta rule is checked
against the recurrent one, and both against transformers' functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from krasisd.engine import load
from krasisd.engine.config import ModelConfig
from krasisd.engine.errors import UnsupportedModelError
from krasisd.engine.hybrid_cache import HybridCache
from krasisd.engine.models.qwen3_next import (
    chunked_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 256
# rms_norm_eps 1e-3 rather than the released 1e-6: see test_native_int8_backend; no EOS token,
# so that greedy runs 32 tokens on both sides without masking one
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=None, pad_token_id=None, num_hidden_layers=4,
              rms_norm_eps=1e-3)

# name -> (transformers class, config kwargs, layout of the saved folder)
VARIANTS = {
    # three linear layers then a full one (full_attention_interval 4), 2 key / 4 value heads,
    # a quarter of each head rotated (transformers' default)
    "next-interval4": ("Qwen3Next", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=True), "plain"),
    # layer types given, a dense layer (mlp_only_layers), no renormalisation, half rotated
    "next-types-dense": ("Qwen3Next", dict(
        hidden_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        intermediate_size=80, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=3,
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, norm_topk_prob=False, mlp_only_layers=[1],
        layer_types=["linear_attention", "full_attention", "linear_attention",
                     "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                         "partial_rotary_factor": 0.5}), "plain"),
    # the multimodal checkpoint's layout, full attention every second layer
    "qwen35-multimodal": ("Qwen3_5Moe", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        full_attention_interval=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                         "mrope_interleaved": True}), "multimodal"),
    # the text model's own layout, the released models' 3:1 pattern
    "qwen35-text": ("Qwen3_5Moe", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=6,
        num_experts_per_tok=3, moe_intermediate_size=64, shared_expert_intermediate_size=64),
        "plain"),
}


def make_hf_model(variant: str, seed: int = 0):
    """A transformers model with random weights: router weights spread wide, zero-centred
    norms near zero (the gated norm near one), decays over a range of memory lengths."""
    prefix, kwargs, _ = VARIANTS[variant]
    config_cls = (transformers.Qwen3_5MoeTextConfig if prefix == "Qwen3_5Moe"
                  else transformers.Qwen3NextConfig)
    config = config_cls(**COMMON, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                param.normal_(1.0, 0.1)
            elif "norm" in name:
                param.normal_(0.0, 0.1)
            elif name.endswith("A_log"):
                param.uniform_(0.05, 2.0).log_()
            elif name.endswith("dt_bias"):
                param.normal_(0.0, 0.5)
            elif name.endswith("conv1d.weight"):
                param.normal_(0.0, 0.4)
            else:
                routing = name.endswith("mlp.gate.weight")
                param.normal_(0.0, 0.5 if routing else 0.08)
    return model


def save_variant(hf_model, variant: str, path: Path) -> Path:
    """save_pretrained plus MTP tensors the engine must ignore; the multimodal layout nests
    the config under ``text_config``, prefixes the names with ``model.language_model.``, adds
    a vision tensor and fuses the experts."""
    hf_model.save_pretrained(path, safe_serialization=True)
    tensors = load_file(path / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    tensors["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(4, 4)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if VARIANTS[variant][2] == "multimodal":
        text = dict(config, model_type="qwen3_5_moe_text", mtp_num_hidden_layers=1)
        text.pop("architectures")
        config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"],
                  "model_type": "qwen3_5_moe", "text_config": text,
                  "vision_config": {"hidden_size": 16, "depth": 1},
                  "tie_word_embeddings": False, "image_token_id": 250}
        tensors = {(name if name.startswith(("lm_head.", "mtp.")) else
                    name.replace("model.", "model.language_model.", 1)): t
                   for name, t in tensors.items()}
        tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(16, 3, 2, 2)
        tensors = fuse_experts(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2))
    return path


def fuse_experts(tensors: dict) -> dict:
    """Per-expert tensors -> the fused layout Qwen3.5's releases use: ``experts.gate_up_proj``
    [E, 2I, D] (gates first) and ``experts.down_proj`` [E, D, I]."""
    prefixes = sorted({name.split(".experts.")[0] for name in tensors
                       if ".experts.0.gate_proj" in name and not name.startswith("mtp.")})
    for prefix in prefixes:
        count = sum(1 for name in tensors if name.startswith(f"{prefix}.experts.")
                    and name.endswith(".gate_proj.weight"))
        proj = {p: [tensors.pop(f"{prefix}.experts.{e}.{p}.weight") for e in range(count)]
                for p in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{prefix}.experts.gate_up_proj"] = torch.cat(
            [torch.stack(proj["gate_proj"]), torch.stack(proj["up_proj"])], dim=1)
        tensors[f"{prefix}.experts.down_proj"] = torch.stack(proj["down_proj"])
    return tensors


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, our engine over the saved folder, the folder)."""
    torch.set_num_threads(1)
    variant = request.param
    hf_model = make_hf_model(variant)
    model_dir = save_variant(hf_model, variant, tmp_path_factory.mktemp(variant))
    engine = load(model_dir, quant="none", device="cpu")
    yield hf_model, engine, model_dir
    engine.close()


def prompt(length: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (length,), generator=gen).tolist()


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()  # [T, V]


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within TOL of the largest reference logit (float32 throughout)."""
    return (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


def test_the_layers_are_the_configs(pair):
    _, engine, _ = pair
    config = engine.config
    assert config.is_hybrid and "full_attention" in config.layer_types
    kinds = [type(layer.self_attn).__name__ for layer in engine.model.model.layers]
    want = {"qwen3_next": "FusedGatedDeltaNet", "qwen3_5_moe": "GatedDeltaNet"}[config.family]
    assert kinds == [want if kind == "linear_attention" else "GatedAttention"
                     for kind in config.layer_types]


def test_logits_match_transformers(pair):
    """Without a cache, over more than two chunks of the delta rule (64 tokens each)."""
    hf_model, engine, _ = pair
    for length in (24, 150):
        ids = prompt(length)
        ours = engine.logits(ids)
        assert ours.dtype == torch.float32 and ours.shape == (length, VOCAB)
        assert close(ours, hf_logits(hf_model, ids))


def test_prefill_then_decode_matches_transformers(pair):
    hf_model, engine, _ = pair
    ids = prompt(28, seed=2)
    cache = engine.new_cache(32)
    assert isinstance(cache, HybridCache)
    steps = [engine.forward(ids[:9], cache)]
    steps += [engine.forward([token], cache) for token in ids[9:20]]
    steps.append(engine.forward(ids[20:], cache))  # a chunk after a cached prefix
    assert cache.length == 28
    assert close(torch.cat(steps), hf_logits(hf_model, ids))


def test_chunked_prefill_matches_one_whole_prefill(pair):
    """Forwards of 70, 5, 1, 30 and 44 tokens appending to one cache (chunks crossing the
    delta rule's 64-token chunks) give the logits and the next decode steps of one prefill."""
    _, engine, _ = pair
    ids = prompt(150, seed=3)
    whole = engine.new_cache(160)
    whole_last = engine.forward(ids, whole, last_only=True)
    chunked = engine.new_cache(160)
    start = 0
    for size in (70, 5, 1, 30, 44):
        last = engine.forward(ids[start:start + size], chunked, last_only=True)
        start += size
    assert chunked.length == whole.length == 150
    assert close(last, whole_last)
    for token in prompt(4, seed=4):
        assert close(engine.forward([token], chunked), engine.forward([token], whole))


def test_greedy_32_tokens_match_transformers_generate(pair):
    """transformers' generate runs its own cache (recurrent decode, conv state updates)."""
    hf_model, engine, _ = pair
    ids = prompt(6, seed=5)
    saved, engine.eos_token_ids = engine.eos_token_ids, set()
    try:
        ours = engine.greedy(ids, max_new_tokens=32)
    finally:
        engine.eos_token_ids = saved
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False)[0, len(ids):].tolist()
    assert len(ours) == 32 and ours == ref


def test_batched_decode_gives_each_sequence_its_own_logits(pair):
    """decode_batch (the generation loop's step) over caches of different lengths: each row is
    its sequence's logits, and each cache's states move on by its own token."""
    _, engine, _ = pair
    prompts = [prompt(5, seed=11), prompt(13, seed=12), prompt(70, seed=13)]
    caches = [engine.new_cache(80) for _ in prompts]
    for ids, cache in zip(prompts, caches, strict=True):
        engine.forward(ids, cache)
    tokens = [7, 9, 11]
    for _ in range(2):
        batched = engine.decode_batch(tokens, caches)  # [3, V]
        for row, (ids, token) in enumerate(zip(prompts, tokens, strict=True)):
            ids.append(token)
            assert close(batched[row], engine.logits(ids)[-1])
        tokens = [int(t) for t in batched.argmax(dim=-1)]


def test_bfloat16_load_is_as_close_as_transformers_in_bfloat16(pair):
    """bf16 weights and conv states, float32 delta rule and recurrent states: through the cache,
    no further from the float32 logits than transformers' own model cast to bf16 (DeltaNet's
    per-head output norm magnifies rounding in both, see test_native_int8_backend)."""
    import copy

    hf_model, engine, model_dir = pair
    bf16 = load(model_dir, dtype="bfloat16")
    ids = prompt(40, seed=7)
    assert bf16.dtype == torch.bfloat16
    cache = bf16.new_cache(48)
    assert cache.recurrent_states[0].dtype == torch.float32
    assert cache.conv_states[0].dtype == torch.bfloat16
    steps = torch.cat([bf16.forward(ids[:30], cache)] + [bf16.forward([t], cache)
                                                          for t in ids[30:]])
    ref = engine.logits(ids)
    hf_bf16 = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), ids)

    def error(logits):
        return (logits - ref).abs().amax(dim=-1).median().item()  # over positions

    assert error(steps) <= 1.1 * error(hf_bf16)
    bf16.close()


def test_a_failed_forward_leaves_the_cache_as_it_was(pair):
    _, engine, _ = pair
    ids = prompt(12, seed=6)
    cache = engine.new_cache(16)
    engine.forward(ids[:8], cache)
    states = [s.clone() for s in cache.recurrent_states]
    experts = engine.model.expert_backend
    engine.model.expert_backend = None  # the MoE blocks raise
    try:
        with pytest.raises(RuntimeError):
            engine.forward(ids[8:], cache)
    finally:
        engine.model.expert_backend = experts
    assert cache.length == 8
    assert all(torch.equal(a, b) for a, b in zip(states, cache.recurrent_states, strict=True))
    ref = engine.new_cache(16)
    engine.forward(ids[:8], ref)
    assert close(engine.forward(ids[8:], cache), engine.forward(ids[8:], ref))


def test_cache_keeps_kv_for_full_layers_only_and_no_prefix_blocks(pair):
    _, engine, _ = pair
    config = engine.config
    cache = engine.new_cache(1000)
    linear = config.layer_types.count("linear_attention")
    assert cache.keys.shape[0] == len(config.full_attention_layers) == 4 - linear
    assert len(cache.recurrent_states) == len(cache.conv_states) == linear
    assert cache.capacity < 1000  # grows on the CPU
    engine.forward(prompt(300, seed=8), cache)
    assert cache.capacity >= 300 and cache.length == 300
    assert cache.nbytes > cache.keys.numel() * cache.keys.element_size() * 2
    assert not cache.supports_prefix_blocks
    with pytest.raises(NotImplementedError, match="recurrent states"):
        cache.read_span(0, 16)


# ---- the delta rule ---------------------------------------------------------------------


def _rule_inputs(heads=3, tokens=150, k_dim=8, v_dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(heads, tokens, k_dim, generator=gen)) * k_dim ** -0.5
    k = l2norm(torch.randn(heads, tokens, k_dim, generator=gen))
    v = torch.randn(heads, tokens, v_dim, generator=gen)
    g = -torch.rand(heads, tokens, generator=gen) * 0.3  # log decays <= 0
    beta = torch.rand(heads, tokens, generator=gen)
    state = torch.randn(heads, k_dim, v_dim, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("tokens", [1, 63, 64, 150])
def test_chunked_delta_rule_equals_the_recurrent_one(tokens):
    q, k, v, g, beta, state = _rule_inputs(tokens=tokens)
    out_r, state_r = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    out_c, state_c = chunked_gated_delta_rule(q, k, v, g, beta, state)
    assert out_c.shape == out_r.shape == (3, tokens, 6)
    assert (out_c - out_r).abs().max() < 1e-4 and (state_c - state_r).abs().max() < 1e-4
    if tokens > 5:  # a split anywhere, carrying the state, changes nothing
        out_a, mid = chunked_gated_delta_rule(q[:, :5], k[:, :5], v[:, :5], g[:, :5],
                                              beta[:, :5], state)
        out_b, end = chunked_gated_delta_rule(q[:, 5:], k[:, 5:], v[:, 5:], g[:, 5:],
                                              beta[:, 5:], mid)
        assert (torch.cat([out_a, out_b], 1) - out_r).abs().max() < 1e-4
        assert (end - state_r).abs().max() < 1e-4


def test_delta_rules_match_transformers_functions():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    q, k, v, g, beta, state = _rule_inputs(tokens=100)
    raw_q = q / q.norm(dim=-1, keepdim=True)  # transformers normalises and scales itself
    args = [x.transpose(0, 1)[None] for x in (raw_q, k, v, g, beta)]  # [1, T, H, ...]
    ref_out, ref_state = hf.torch_chunk_gated_delta_rule(
        *args[:3], g=args[3], beta=args[4], initial_state=state[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = chunked_gated_delta_rule(q, k, v, g, beta, state)
    assert (out - ref_out[0].transpose(0, 1)).abs().max() < 1e-4
    assert (final - ref_state[0]).abs().max() < 1e-4
    ref_out, _ = hf.torch_recurrent_gated_delta_rule(
        *args[:3], g=args[3], beta=args[4], initial_state=state[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, _ = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    assert (out - ref_out[0].transpose(0, 1)).abs().max() < 1e-4


# ---- configuration ----------------------------------------------------------------------

# the fields that matter of the released config.json files, as they spell them
QWEN3_NEXT_80B = dict(
    architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", hidden_size=2048,
    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    num_experts=512, num_experts_per_tok=10, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], full_attention_interval=4, linear_conv_kernel_dim=4,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=32, partial_rotary_factor=0.25, rope_theta=10000000,
    rope_scaling=None, max_position_embeddings=262144, vocab_size=151936, rms_norm_eps=1e-06,
    tie_word_embeddings=False, torch_dtype="bfloat16", eos_token_id=151645)
QWEN35_35B = dict(
    architectures=["Qwen3_5MoeForConditionalGeneration"], model_type="qwen3_5_moe",
    tie_word_embeddings=False, image_token_id=248056, vision_config={"depth": 27},
    text_config=dict(
        model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 10,
        full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
        mtp_num_hidden_layers=1, max_position_embeddings=262144, vocab_size=248320,
        rms_norm_eps=1e-06, dtype="bfloat16", eos_token_id=248044,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000,
                         "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                         "mrope_interleaved": True}))


def test_released_configs_parse():
    nxt = ModelConfig.from_dict(QWEN3_NEXT_80B, capacity_bytes=1 << 50)
    assert (nxt.family, nxt.rope_dim, nxt.qk_norm, nxt.n_routed_experts, nxt.norm_topk_prob,
            nxt.shared_expert_intermediate_size) == ("qwen3_next", 64, "head", 512, True, 512)
    assert nxt.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
    assert len(nxt.full_attention_layers) == 12 and all(map(nxt.is_moe_layer, range(48)))
    q35 = ModelConfig.from_dict(QWEN35_35B, capacity_bytes=1 << 50)
    assert (q35.architecture, q35.family, q35.rope_dim, q35.n_routed_experts,
            q35.num_experts_per_tok, q35.linear_num_value_heads, q35.eos_token_ids) == (
        "Qwen3_5MoeForCausalLM", "qwen3_5_moe", 64, 256, 8, 32, (248044,))
    assert q35.full_attention_layers == tuple(range(3, 40, 4)) and q35.norm_topk_prob


@pytest.mark.parametrize(("change", "message"), [
    (dict(linear_num_value_heads=24), "multiple of linear_num_key_heads"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim must be a positive integer"),
    (dict(layer_types=["linear_attention"] * 47), "layer_types"),
    (dict(layer_types=["linear_attention", "sliding_attention"] * 24, sliding_window=8),
     "sliding_attention"),
    (dict(full_attention_interval=0), "full_attention_interval"),
])
def test_bad_linear_attention_fields_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(dict(QWEN3_NEXT_80B, **change), capacity_bytes=1 << 50)


def test_linear_layers_are_refused_for_other_families():
    with pytest.raises(UnsupportedModelError, match="no linear attention layers"):
        ModelConfig.from_dict(dict(
            architectures=["GptOssForCausalLM"], vocab_size=64, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"]), capacity_bytes=1 << 40)


def test_the_kv_budget_counts_full_attention_layers_only():
    from krasisd.engine.kv_cache import kv_bytes_per_token

    config = ModelConfig.from_dict(QWEN3_NEXT_80B, capacity_bytes=1 << 50)
    assert kv_bytes_per_token(config, torch.bfloat16) == 12 * 2 * 2 * 256 * 2


def test_the_deltanet_states_count_against_the_kv_budget(pair):
    """A sequence's states are held whatever its length: the engine declares their bytes
    (equal to a cache's states), num_ctx leaves room for them, and admission counts them."""
    from krasisd.engine.generate import Generation
    from krasisd.engine.loop import GenerationLoop
    from krasisd.engine.loop_options import ContextLimitError, LoopOptions
    from krasisd.engine.options import SamplingOptions

    _, engine, _ = pair
    spec = engine.context_spec()
    cache = engine.new_cache(16)
    states = cache.conv_states + cache.recurrent_states
    assert spec.state_bytes_per_sequence == sum(t.numel() * t.element_size() for t in states) > 0
    # room for one sequence of 40 tokens and its states, not for two
    budget = spec.sequence_bytes(40)
    loop = GenerationLoop(engine, LoopOptions(max_batch=2, kv_budget_bytes=budget), spec)
    assert loop.num_ctx(40) == 40
    with pytest.raises(ContextLimitError, match="num_ctx 41 needs"):
        loop.num_ctx(41)  # the states take the room of their bytes' worth of tokens
    options = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=2, num_ctx=20)
    first = Generation(engine, prompt(8, seed=3), options, key=0)
    second = Generation(engine, prompt(8, seed=4), options, key=1)
    loop.add(first)
    loop.add(second)
    loop.step()  # 2 x 20 tokens of KV fit, 2 x (20 tokens + states) do not
    assert loop.running == [first] and list(loop.waiting) == [second]


# ---- serving: the generation loop, the native INT8 backend, a GPU machine ---------------


def test_generation_loop_with_a_prefix_cache_serves_and_stores_nothing(pair):
    """Two sequences decoding together and prefilled in 8-token chunks, with the prefix cache
    on: each answers as greedy does alone, and no blocks are kept (recurrent states)."""
    from krasisd.engine.generate import Generation
    from krasisd.engine.loop import GenerationLoop, LoopOptions
    from krasisd.engine.options import SamplingOptions

    _, engine, _ = pair
    saved, engine.eos_token_ids = engine.eos_token_ids, set()
    options = LoopOptions(max_batch=2, prefill_chunk_tokens=8, prefix_cache_bytes=1 << 24,
                          prefix_block_tokens=4)
    loop = GenerationLoop(engine, options, engine.context_spec())
    prompts = [prompt(21, seed=20), prompt(21, seed=20)[:17] + [5, 6]]
    try:
        for _ in range(2):  # the second round would reuse blocks, if any were kept
            sampling = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=6,
                                       num_ctx=64)
            generations = [Generation(engine, p, sampling) for p in prompts]
            for generation in generations:
                loop.add(generation)
            tokens = {id(g): [] for g in generations}
            while loop.has_work():
                for emitted in loop.step():
                    assert emitted.error is None, emitted.error
                    if not emitted.chunk.done:
                        tokens[id(emitted.generation)].append(emitted.chunk.token_id)
            for generation, ids in zip(generations, prompts, strict=True):
                assert tokens[id(generation)] == engine.greedy(ids, max_new_tokens=6)
    finally:
        engine.eos_token_ids = saved
    stats = loop.prefix_stats()
    assert stats["blocks"] == 0 and stats["hit_tokens"] == 0


def test_native_int8_backend(pair, tmp_path):
    """quant='int8': the CPU cache built from the folder (MTP and vision tensors left out)
    runs the experts and the dense linears in INT8, close to the float logits."""
    hf_model, _, model_dir = pair
    int8 = load(model_dir, quant="int8", threads=1, cache_dir=tmp_path / "cpu")
    assert type(int8.expert_backend).__name__ == "NativeExperts"
    ids = prompt(16, seed=7)
    ref = hf_logits(hf_model, ids)
    full = int8.logits(ids)
    # 4-8% of the top logit at a typical position: DeltaNet's per-head RMSNorm of its output
    # magnifies the rounding of the projections when a head's output is near zero (at the first
    # token it is (q.k) beta v, whose sign a small error can flip), which random models this
    # small often have; rms_norm_eps 1e-3 (COMMON) bounds that magnification. With every linear
    # back in float the INT8 engine's logits are the float ones exactly.
    per_position = (full - ref).abs().amax(dim=-1)  # [T]
    assert 0 < per_position.median().item() < 0.1 * ref.abs().max().item()
    cache = int8.new_cache(16)
    steps = [int8.forward(ids[:6], cache)] + [int8.forward([t], cache) for t in ids[6:]]
    # one-token steps run other native kernels than the 16-token forward: their rounding
    # differs, magnified as above
    assert (torch.cat(steps) - full).abs().max().item() < 0.02 * ref.abs().max().item()
    int8.close()


def test_a_gpu_runner_serves_these_on_the_cpu_engine(pair, tmp_path, monkeypatch):
    """load_hybrid refuses Gated DeltaNet models naming the architecture; load_for_serving
    then loads them on the CPU engine."""
    from krasisd.engine import serving
    from krasisd.engine.gpu.graphs import load_hybrid

    _, engine, model_dir = pair
    with pytest.raises(UnsupportedModelError, match=f"{engine.config.architecture}.*hybrid GPU"):
        load_hybrid(model_dir, quant="int8")
    monkeypatch.setattr(serving, "wants_gpu", lambda device: True)
    served = serving.load_for_serving(model_dir, quant="int8", device="auto", threads=1,
                                      cache_dir=tmp_path / "cpu")
    assert served.device.type == "cpu" and isinstance(served.new_cache(8), HybridCache)
    served.close()
