"""load(dense_from_cache=True), as the hybrid GPU load asks: the dense linears the CPU cache
stores run from those quantized copies (GpuQuantLinear, here on the CPU through its
dequantizing path), their float weights are never read, and the model answers as the
CPU-only engine over the same stored weights does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from krasisd.engine import engine as engine_module
from krasisd.engine import load, loader

pytest.importorskip("triton")

from krasisd.engine.gpu.dense_decode import GpuQuantLinear  # noqa: E402

PROMPT = [3, 17, 42, 8, 90, 5]


@pytest.fixture
def cache_copy(v2_int8_cache, tmp_path):
    return shutil.copytree(v2_int8_cache[0], tmp_path / "cpu")


@pytest.fixture
def tensors_read(monkeypatch):
    """Names of the checkpoint tensors the loader reads."""
    names, read = set(), loader.read_tensors

    def recording(expected, index, device=None):
        names.update(expected)
        return read(expected, index, device)

    monkeypatch.setattr(loader, "read_tensors", recording)
    return names


def test_the_stored_linears_are_used_and_their_float_weights_never_read(
        v2_model_dir, v2_int8_cache, cache_copy, tensors_read):
    engine = load(v2_model_dir, quant="int8", cache_dir=cache_copy, threads=1,
                  dense_from_cache=True)
    stored = set(v2_int8_cache[1]["dense"])
    swapped = {name for name, m in engine.model.named_modules()
               if isinstance(m, GpuQuantLinear)}
    assert swapped == stored and stored
    assert not {f"{name}.weight" for name in stored} & tensors_read
    assert "model.embed_tokens.weight" in tensors_read  # the rest is read as before
    assert not any(p.is_meta for p in engine.model.parameters())


def test_it_answers_as_the_cpu_only_engine(v2_model_dir, cache_copy):
    ours = load(v2_model_dir, quant="int8", cache_dir=cache_copy, threads=1,
                dense_from_cache=True)
    cpu = load(v2_model_dir, quant="int8", cache_dir=cache_copy, threads=1)
    with torch.inference_mode():
        a = ours.forward(PROMPT).float()
        b = cpu.forward(PROMPT).float()  # INT8 activations in its dense kernels: ~1e-2
    assert ((a - b).norm() / b.norm()).item() < 5e-2
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_without_stored_dense_linears_everything_is_read(v2_model_dir, cache_copy,
                                                         tensors_read, monkeypatch):
    monkeypatch.setattr(engine_module, "_quantize_dense", lambda *args: None)
    manifest = cache_copy / "manifest.json"  # a cache built without its dense linears
    data = json.loads(manifest.read_text())
    data["dense"], data["dense_files"] = {}, {}
    manifest.write_text(json.dumps(data))
    engine = load(v2_model_dir, quant="int8", cache_dir=cache_copy, threads=1,
                  dense_from_cache=True)
    assert not any(isinstance(m, GpuQuantLinear) for m in engine.model.modules())
    assert "model.layers.0.self_attn.o_proj.weight" in tensors_read


def test_skipping_an_unknown_linear_is_refused(v2_model_dir):
    with pytest.raises(ValueError, match="no such linear"):
        loader.load_model(v2_model_dir, skip_linears=["model.layers.0.nothing"])


def test_skipped_weights_stay_on_the_meta_device(v2_model_dir):
    loaded = loader.load_model(v2_model_dir, skip_linears=["lm_head",
                                                           "model.layers.1.self_attn.o_proj"])
    assert loaded.model.lm_head.weight.is_meta
    assert loaded.model.model.layers[1].self_attn.o_proj.weight.is_meta
    assert not loaded.model.model.layers[0].self_attn.o_proj.weight.is_meta
