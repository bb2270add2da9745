"""GPU cache build and load: atomic write, manifest, checksums, bit-exact blobs (CPU only)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from krasisd.engine.config import ModelConfig
from krasisd.engine.gpu.cache import GpuCacheError, build_gpu_cache, load_gpu_cache
from krasisd.engine.gpu.format import LAYOUT_VERSION, QuantSpec
from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2 as TINY_V2
from krasisd.engine.gpu.synthetic import synthetic_expert_weights, synthetic_model


@pytest.fixture
def model_dir(tmp_path):
    config = ModelConfig.from_dict(dict(TINY_V2))
    model = synthetic_model(config, "cpu", torch.bfloat16, seed=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    experts = {}
    for layer in (1, 2, 3):
        gate, up, down = synthetic_expert_weights(config, layer, "cpu", seed=1)
        experts[layer] = (gate.bfloat16(), up.bfloat16(), down.bfloat16())
        for e in range(config.n_routed_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            state[f"{prefix}.gate_proj.weight"] = experts[layer][0][e].clone()
            state[f"{prefix}.up_proj.weight"] = experts[layer][1][e].clone()
            state[f"{prefix}.down_proj.weight"] = experts[layer][2][e].clone()
    folder = tmp_path / "tiny"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_V2))
    return folder, experts


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_build_then_load_gives_the_packed_experts(model_dir, tmp_path, quant):
    folder, experts = model_dir
    seen = []
    out = tmp_path / "cache" / f"gpu-{quant}"
    manifest = build_gpu_cache(folder, out, quant=quant, group_size=32,
                               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert manifest["layout_version"] == LAYOUT_VERSION and manifest["quant"] == quant
    assert sorted(manifest["layers"]) == ["1", "2", "3"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    host = load_gpu_cache(out, quant=quant, group_size=32, model_dir=folder, verify="full")
    expected = HostExperts.from_stacked(
        {k: tuple(t.float() for t in v) for k, v in experts.items()},
        QuantSpec.from_quant(quant, 32), pin=False)
    for layer in (1, 2, 3):
        assert torch.equal(host.layers[layer], expected.layers[layer])


def test_load_rejects_corruption_and_mismatch(model_dir, tmp_path):
    folder, _ = model_dir
    out = tmp_path / "gpu"
    build_gpu_cache(folder, out, quant="int8", group_size=32)
    with pytest.raises(GpuCacheError, match="holds"):
        load_gpu_cache(out, quant="int4")
    with pytest.raises(GpuCacheError, match="group size"):
        load_gpu_cache(out, group_size=64)
    path = out / "layer_002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    load_gpu_cache(out)  # quick check: sizes and headers only
    with pytest.raises(GpuCacheError, match="checksum"):
        load_gpu_cache(out, verify="full")
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(GpuCacheError, match="truncated"):
        load_gpu_cache(out)
    with pytest.raises(GpuCacheError, match="no GPU cache"):
        load_gpu_cache(tmp_path / "absent")


def test_build_rejects_bad_quant_and_keeps_old_cache(model_dir, tmp_path):
    folder, _ = model_dir
    out = tmp_path / "gpu"
    build_gpu_cache(folder, out, quant="int8", group_size=32)
    with pytest.raises(ValueError):
        build_gpu_cache(folder, out, quant="fp8")
    with pytest.raises(ValueError):
        build_gpu_cache(folder, out, quant="int4", group_size=128)  # 32-wide experts
    assert load_gpu_cache(out).layout.spec.bits == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_create_backend_builds_once_then_loads(model_dir, tmp_path, monkeypatch):
    from krasisd.engine.gpu import backend as gpu_backend
    from krasisd.engine.gpu.cache import build_gpu_cache as real_build

    folder, _ = model_dir
    config = ModelConfig.from_dict(dict(TINY_V2))
    builds = []

    def counting_build(*args, **kwargs):
        builds.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(gpu_backend, "build_gpu_cache", counting_build)
    kwargs = dict(cache_dir=tmp_path / "gpu", device="cpu", dense_bytes=1000, max_tokens=64,
                  vram_budget_bytes=1 << 30)
    first = gpu_backend.create_backend(folder, config, "int4", **kwargs)
    second = gpu_backend.create_backend(folder, config, "int4", **kwargs)
    assert len(builds) == 1
    assert first.plan.resident_fraction == 1.0 and second.layout.spec.group_size == 32
    x = torch.randn(3, config.hidden_size)
    ids, w = torch.tensor([[0, 1], [2, 3], [1, 7]]), torch.rand(3, 2)
    assert torch.equal(first(1, x, ids, w), second(1, x, ids, w))


def test_group_size_and_workspace_estimates():
    from krasisd.engine.gpu.backend import pick_group_size, prefill_workspace_bytes

    assert pick_group_size(2048, 1408) == 128 and pick_group_size(64, 32) == 32
    with pytest.raises(ValueError):
        pick_group_size(2048, 1400)
    config = ModelConfig.from_dict(dict(TINY_V2))
    small = prefill_workspace_bytes(config, 100, 8192)
    assert 0 < small < prefill_workspace_bytes(config, 1000, 8192)
    assert prefill_workspace_bytes(config, 1000, 64) < prefill_workspace_bytes(config, 1000, 1000)
    assert prefill_workspace_bytes(config, 100, 64, "grouped_mm") > prefill_workspace_bytes(
        config, 100, 64, "triton")
