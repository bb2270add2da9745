"""The registry's caches reach the runner: the CPU format always, the GPU format when the
registry built one (at pull, on a GPU machine)."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from krasis_registry import CacheNotReady

from krasisd.config import Config
from krasisd.models import ModelCatalog
from krasisd.runner import load_engine
from krasisd.runners import ModelSpec, _runner_argv


class _Registry:
    def __init__(self, root: Path, formats: set[str]):
        self.root, self.formats = root, formats

    def show(self, name):
        caches = [{"format": fmt, "quant": "int4", "group_size": 64, "state": "ready",
                   "path": str(self.root / f"{fmt}-int4"), "updated_at": "2026-01-01"}
                  for fmt in sorted(self.formats)]
        return {"name": "m:latest", "path": str(self.root), "size": 1, "state": "ready",
                "error": None, "caches": caches,
                "config": {"hidden_size": 2048, "moe_intermediate_size": 1408}}


def _catalog(tmp_path, formats):
    return ModelCatalog(_Registry(tmp_path, formats), "int4")


def test_spec_carries_the_gpu_cache_when_the_registry_has_one(tmp_path):
    spec = _catalog(tmp_path, {"cpu", "gpu"})._spec("m")
    assert spec.cache_dir == tmp_path / "cpu-int4"
    assert spec.gpu_cache_dir == tmp_path / "gpu-int4"
    argv = _runner_argv(spec, Config(), fd=3)
    assert argv[argv.index("--gpu-cache-dir") + 1] == str(tmp_path / "gpu-int4")


def test_spec_without_a_gpu_cache_leaves_it_to_the_engine(tmp_path):
    spec = _catalog(tmp_path, {"cpu"})._spec("m")
    assert spec.gpu_cache_dir is None
    assert "--gpu-cache-dir" not in _runner_argv(spec, Config(), fd=3)


def _args(**overrides):
    values = dict(loader="tests.daemon.test_runner_caches:_loader", model_dir="/m",
                  quant="int4", device="cpu", threads=None, cache_dir="/c", gpu_cache_dir=None,
                  gpu_dense="quant")
    values.update(overrides)
    return argparse.Namespace(**values)


def _loader(model_dir, quant, device, threads, cache_dir, **kwargs):
    return {"cache_dir": cache_dir, **kwargs}


def test_runner_passes_the_gpu_cache_only_when_given():
    assert load_engine(_args()) == {"cache_dir": "/c"}  # loaders without the argument work
    assert load_engine(_args(gpu_cache_dir="/g")) == {"cache_dir": "/c", "gpu_cache_dir": "/g"}


def test_spec_defaults_have_no_gpu_cache():
    assert ModelSpec(name="m", model_dir=Path("/m")).gpu_cache_dir is None


def manifest_builder(model_dir, out_dir, quant="int4", group_size=128, progress=None) -> dict:
    """A cache builder (importable by the registry's builder process) that writes its layout."""
    manifest = {"layout_version": 1, "quant": quant, "group_size": group_size}
    Path(out_dir).mkdir(parents=True)
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _model_folder(folder: Path, hidden: int, width: int) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": hidden, "moe_intermediate_size": width}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, hidden)},
              str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("width, quant", [(96, "int8"), (128, "int4")])
def test_daemon_serves_the_cache_the_registry_built(tmp_path, width, quant):
    from krasis_registry import Registry

    registry = Registry(cache_builders={"cpu": manifest_builder})  # int4 asked
    events = list(registry.create("m", _model_folder(tmp_path / "m", 128, width),
                                  build_caches=["cpu"]))
    assert events[-1] == {"status": "success"}
    [row] = registry.show("m")["caches"]
    assert (row["quant"], row["state"]) == (quant, "ready")
    spec = ModelCatalog(registry, "int4")._spec("m")
    assert (spec.quant, spec.cache_dir) == (quant, Path(row["path"]))


def _spec_from_single_calls(registry, name: str) -> ModelSpec:
    """The answer the lookup gave when it asked model_dir, list and cache_dir one by one."""
    model_dir = registry.model_dir(name)
    [item] = [m for m in registry.list() if m["name"] == "m:latest"]

    def cache(fmt):
        try:
            return registry.cache_dir(name, fmt=fmt, quant="int4")
        except CacheNotReady:
            return None

    return ModelSpec(name="m:latest", model_dir=model_dir, size_bytes=item["size"],
                     digest=item["digest"], details=item["details"], quant="int4",
                     cache_dir=cache("cpu"), gpu_cache_dir=cache("gpu"))


@pytest.mark.parametrize("formats", [["cpu", "gpu"], False])
def test_lookup_is_one_registry_connection(tmp_path, monkeypatch, formats):
    from krasis_registry import Registry
    from krasis_registry import registry as registry_module

    registry = Registry(cache_builders={"cpu": manifest_builder, "gpu": manifest_builder})
    folder = _model_folder(tmp_path / "m", 128, 128)
    assert list(registry.create("m", folder, build_caches=formats))[-1]["status"] == "success"
    (registry.model_dir("m") / "config.json").unlink()  # the registry's record is enough
    opened = []
    real_connect = registry_module.connect
    monkeypatch.setattr(registry_module, "connect",
                        lambda path: opened.append(path) or real_connect(path))
    spec = ModelCatalog(registry, "int4")._spec("m")
    assert len(opened) == 1
    assert spec == _spec_from_single_calls(registry, "m")
    assert (spec.cache_dir is not None, spec.gpu_cache_dir is not None) == \
        ("cpu" in (formats or ()), "gpu" in (formats or ()))


def test_lookup_errors_are_the_registry_ones(tmp_path):
    from krasis_registry import ModelNotFound, PullError, Registry

    registry = Registry()
    folder = _model_folder(tmp_path / "broken", 128, 128)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PullError, match="cannot read config.json"):
        list(registry.create("broken", folder, build_caches=False))
    catalog = ModelCatalog(registry, "int4")
    for name in ("absent", "broken"):  # not found; found but not ready
        with pytest.raises(ModelNotFound) as expected:
            registry.model_dir(name)
        with pytest.raises(ModelNotFound) as got:
            catalog._spec(name)
        assert str(got.value) == str(expected.value)
    assert "broken:latest is not ready (failed: cannot read config.json" in str(got.value)
