"""The CPU-format cache: round trip, memory mapping, checksums, format checks and rebuilds."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from krasisd.engine.cpu_cache import CacheError, build_cpu_cache, load_cpu_cache
from krasisd.engine.loader import read_config
from krasisd.engine.native_experts import NativeExperts, native_expert_backend
from krasisd.engine.quant import quantize


@pytest.fixture
def built(tiny_model_dir, tmp_path):
    calls = []
    out_dir = tmp_path / "cpu-int4"
    manifest = build_cpu_cache(tiny_model_dir, out_dir, quant="int4", group_size=64,
                               progress=lambda done, total: calls.append((done, total)))
    return out_dir, manifest, calls


def test_build_writes_manifest_and_reports_progress(built):
    out_dir, manifest, calls = built
    assert calls == [(1, 2), (2, 2)]  # layers 1 and 2 are MoE layers
    on_disk = json.loads((out_dir / "manifest.json").read_text())
    assert on_disk == manifest
    assert (manifest["format"], manifest["bits"], manifest["group_size"]) == ("krasis-cpu-experts", 4, 64)
    assert sorted(manifest["layers"]) == ["1", "2"]
    assert all(len(r["sha256"]) == 64 for r in manifest["layers"].values())
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_round_trip_equals_quantize_and_is_memory_mapped(built, tiny_model_dir):
    out_dir, _, _ = built
    cache = load_cpu_cache(out_dir, quant="int4", group_size=64, model_dir=tiny_model_dir)
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        up3 = f.get_tensor("model.layers.2.mlp.experts.3.up_proj.weight")
        down0 = f.get_tensor("model.layers.1.mlp.experts.0.down_proj.weight")
    q, s = quantize(up3, 4, 64)
    assert np.array_equal(cache.layers[2].up_q[3], q.numpy())
    assert np.array_equal(cache.layers[2].up_s[3], s.numpy())
    q, s = quantize(down0, 4, 64)
    assert np.array_equal(cache.layers[1].down_q[0], q.numpy())
    for arr in cache.layers[1].arrays():
        assert not arr.flags.owndata and not arr.flags.writeable
        assert isinstance(arr.base, np.memmap) or isinstance(arr.base.base, np.memmap)


def _corrupt(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_file_is_caught_by_checksum(built):
    out_dir, _, _ = built
    _corrupt(out_dir / "layer_002.safetensors")
    with pytest.raises(CacheError, match="checksum"):
        load_cpu_cache(out_dir)


def test_full_verify_catches_corruption_even_with_restored_mtime(built):
    out_dir, _, _ = built
    path = out_dir / "layer_001.safetensors"
    stat = path.stat()
    _corrupt(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_cpu_cache(out_dir)  # the quick check trusts an unchanged size, header and mtime
    with pytest.raises(CacheError, match="checksum"):
        load_cpu_cache(out_dir, verify="full")


def test_truncated_file_is_caught(built):
    out_dir, _, _ = built
    path = out_dir / "layer_001.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CacheError, match="truncated"):
        load_cpu_cache(out_dir)


@pytest.mark.parametrize("field,value", [("layout_version", 0), ("format", "other"), ("quant", "int8")])
def test_format_mismatch_is_detected(built, field, value):
    out_dir, manifest, _ = built
    manifest[field] = value
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError):
        load_cpu_cache(out_dir, quant="int4")


def _backend(model_dir, cache_dir):
    return native_expert_backend(model_dir, read_config(model_dir), "int4", cache_dir,
                                 group_size=64, threads=1)


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "layout", "missing"])
def test_factory_rebuilds_a_damaged_cache(built, tiny_model_dir, damage):
    out_dir, manifest, _ = built
    layer_file = out_dir / "layer_002.safetensors"
    if damage == "corrupt":
        _corrupt(layer_file)
    elif damage == "truncate":
        layer_file.write_bytes(layer_file.read_bytes()[:500])
    elif damage == "layout":
        (out_dir / "manifest.json").write_text(json.dumps({**manifest, "layout_version": 99}))
    else:
        layer_file.unlink()
    backend = _backend(tiny_model_dir, out_dir)
    assert isinstance(backend, NativeExperts)
    load_cpu_cache(out_dir, verify="full")  # rebuilt: every checksum holds again
    x = torch.randn(2, 128)
    y = backend(2, x, torch.tensor([[0, 1, 2], [3, 3, 7]]), torch.full((2, 3), 0.3))
    assert y.shape == (2, 128) and bool(torch.isfinite(y).all())


def test_factory_reuses_a_valid_cache(built, tiny_model_dir):
    out_dir, manifest, _ = built
    _backend(tiny_model_dir, out_dir)
    assert json.loads((out_dir / "manifest.json").read_text())["created"] == manifest["created"]


def test_cache_of_other_weights_is_rebuilt(built, tiny_model_dir, tmp_path):
    from native_models import save_tiny_deepseek

    other = tmp_path / "other-model"
    save_tiny_deepseek(other, seed=1)
    out_dir, manifest, _ = built
    with pytest.raises(CacheError, match="fingerprint"):
        load_cpu_cache(out_dir, model_dir=other)
    _backend(other, out_dir)
    assert json.loads((out_dir / "manifest.json").read_text())["created"] != manifest["created"]


def test_bad_quant_or_group_size_is_a_value_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError):
        build_cpu_cache(tiny_model_dir, tmp_path / "c", quant="int3")
    with pytest.raises(ValueError):
        build_cpu_cache(tiny_model_dir, tmp_path / "c", quant="int4", group_size=48)
    assert not (tmp_path / "c").exists()
