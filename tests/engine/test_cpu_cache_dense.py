"""The CPU cache stores the dense linears beside the experts: written once, checked, mapped,
and a cache of the previous format version is rebuilt rather than misread."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from krasisd.engine import dense_quant
from krasisd.engine.cpu_cache import (
    DENSE_OTHER,
    CacheError,
    build_cpu_cache,
    load_cpu_cache,
    read_manifest,
)
from krasisd.engine.loader import read_config
from krasisd.engine.native_experts import native_expert_backend
from krasisd.engine.quant import LAYOUT_VERSION


@pytest.fixture
def model_dir(v2_model_dir):
    return v2_model_dir


@pytest.fixture
def built(v2_int8_cache):
    return v2_int8_cache


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((dst / "manifest.json").read_text())
    for record in [*manifest["layers"].values(), *manifest["dense_files"].values()]:
        record["mtime_ns"] = (dst / record["file"]).stat().st_mtime_ns  # as if built here
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_every_planned_dense_linear_is_stored(built):
    out_dir, manifest = built
    assert manifest["layout_version"] == LAYOUT_VERSION == 2
    linears = manifest["dense"]
    # 24-wide inputs (q_b_proj) fit no group size and kv_b_proj stays float by design
    assert not [n for n in linears if n.endswith(("q_b_proj", "kv_b_proj"))]
    assert "model.layers.0.mlp.down_proj" in linears and "model.layers.2.self_attn.o_proj" in linears
    assert linears["lm_head"] == {"file": DENSE_OTHER, "bits": 8, "group_size": 64,
                                  "out_features": 96, "in_features": 64}
    assert linears["model.layers.1.mlp.shared_experts.down_proj"]["group_size"] == 32
    assert sorted(manifest["dense_files"]) == [f"dense_00{i}.safetensors" for i in range(3)] + [
        DENSE_OTHER]
    assert all(len(r["sha256"]) == 64 for r in manifest["dense_files"].values())


def test_stored_dense_equals_quantize_weight_and_is_mapped(built, model_dir):
    out_dir, manifest = built
    cache = load_cpu_cache(out_dir, quant="int8", group_size=32, model_dir=model_dir)
    assert set(cache.dense) == set(manifest["dense"])
    floats = load_file(model_dir / "model.safetensors")
    for name in ("lm_head", "model.layers.1.self_attn.q_a_proj", "model.layers.0.mlp.down_proj"):
        entry = cache.dense[name]
        qweight, scales = dense_quant.quantize_weight(floats[f"{name}.weight"], entry.bits,
                                                      entry.group_size)
        assert np.array_equal(entry.qweight, qweight) and np.array_equal(entry.scales, scales)
        for arr in (entry.qweight, entry.scales):
            assert not arr.flags.owndata and not arr.flags.writeable


def _save_int4_model(path):
    """A DeepSeek-V2 checkpoint whose experts fit INT4 (hidden 128, expert width 64)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV2Config(
        vocab_size=96, hidden_size=128, intermediate_size=96, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    DeepseekV2ForCausalLM(config).save_pretrained(path)
    return path


def test_int4_cache_keeps_the_head_int8_and_skips_what_int4_cannot_hold(tmp_path):
    model_dir = _save_int4_model(tmp_path / "model")
    build_cpu_cache(model_dir, tmp_path / "c4", quant="int4", group_size=64)
    cache = load_cpu_cache(tmp_path / "c4", quant="int4", model_dir=model_dir)
    assert cache.dense["lm_head"].bits == 8 and cache.dense["lm_head"].qweight.dtype == np.int8
    o_proj = cache.dense["model.layers.1.self_attn.o_proj"]
    assert (o_proj.bits, o_proj.qweight.dtype, o_proj.qweight.shape) == (4, np.uint8, (128, 32))
    assert cache.dense["model.layers.1.mlp.shared_experts.down_proj"].group_size == 64
    # the dense MLP's 96-wide input is no multiple of 64: INT4 cannot hold it, it stays float
    assert "model.layers.0.mlp.down_proj" not in cache.dense
    assert cache.dense["model.layers.0.mlp.up_proj"].bits == 4


def test_cache_without_dense_loads_with_an_empty_table(model_dir, tmp_path):
    manifest = build_cpu_cache(model_dir, tmp_path / "c", quant="int8", group_size=32, dense=False)
    assert manifest["dense"] == {} and manifest["dense_files"] == {}
    assert load_cpu_cache(tmp_path / "c").dense == {}
    assert not list((tmp_path / "c").glob("dense_*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_dense_file_is_detected(built, tmp_path, damage):
    out_dir = _copy(built[0], tmp_path / "c")
    load_cpu_cache(out_dir, verify="full")  # the copy itself is sound
    path = out_dir / "dense_001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-50] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-64]))
    else:
        path.unlink()
    with pytest.raises(CacheError, match="dense_001"):
        load_cpu_cache(out_dir)  # quick check: size, or the changed mtime forces a full hash


def test_flipped_byte_with_the_recorded_mtime_needs_the_full_check(built, tmp_path):
    import os

    out_dir = _copy(built[0], tmp_path / "c")
    path = out_dir / DENSE_OTHER
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_cpu_cache(out_dir)  # the quick check trusts an unchanged size, header and mtime
    with pytest.raises(CacheError, match="checksum mismatch"):
        load_cpu_cache(out_dir, verify="full")


@pytest.mark.parametrize("edit", [
    lambda m: m["dense"]["lm_head"].update(bits=4),
    lambda m: m["dense"]["lm_head"].update(group_size=48),
    lambda m: m["dense"]["lm_head"].update(out_features=95),
    lambda m: m["dense"]["lm_head"].update(file="dense_000.safetensors"),
    lambda m: m["dense"]["lm_head"].pop("in_features"),
    lambda m: m.update(dense=["lm_head"]),
])
def test_dense_manifest_that_does_not_match_its_tensors_is_refused(built, tmp_path, edit):
    out_dir = _copy(built[0], tmp_path / "c")
    manifest = read_manifest(out_dir)
    edit(manifest)
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError):
        load_cpu_cache(out_dir)


def _as_previous_version(model_dir, out_dir):
    """A cache as the previous format wrote it: experts only, layout version 1."""
    build_cpu_cache(model_dir, out_dir, quant="int8", group_size=32, dense=False)
    manifest = read_manifest(out_dir)
    for key in ("dense", "dense_files"):
        del manifest[key]
    manifest["layout_version"] = 1
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_cache_of_the_previous_version_is_rebuilt_with_dense(model_dir, tmp_path):
    out_dir = tmp_path / "old"
    _as_previous_version(model_dir, out_dir)
    with pytest.raises(CacheError, match="layout 1"):
        load_cpu_cache(out_dir)
    backend = native_expert_backend(model_dir, read_config(model_dir), "int8", out_dir,
                                    threads=1)
    assert backend.cache.manifest["layout_version"] == LAYOUT_VERSION
    assert "lm_head" in backend.dense and (out_dir / DENSE_OTHER).is_file()
    load_cpu_cache(out_dir, verify="full")


def test_damaged_dense_file_is_rebuilt_by_the_backend(built, model_dir, tmp_path):
    out_dir = _copy(built[0], tmp_path / "c")
    path = out_dir / "dense_002.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    backend = native_expert_backend(model_dir, read_config(model_dir), "int8", out_dir,
                                    group_size=32, threads=1)
    assert set(backend.dense) == set(built[1]["dense"])
    load_cpu_cache(out_dir, verify="full")


def test_tied_head_is_quantized_from_the_embedding(model_dir, tmp_path):
    from safetensors.torch import save_file

    tied = tmp_path / "tied"
    tied.mkdir()
    weights = load_file(model_dir / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, str(tied / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    build_cpu_cache(tied, tmp_path / "c", quant="int8", group_size=32)
    head = load_cpu_cache(tmp_path / "c").dense["lm_head"]
    qweight, scales = dense_quant.quantize_weight(weights["model.embed_tokens.weight"], 8, 64)
    assert np.array_equal(head.qweight, qweight) and np.array_equal(head.scales, scales)
