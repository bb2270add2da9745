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

    def model_dir(self, name):
        return self.root

    def list(self):
        return [{"name": "m:latest", "size": 1}]

    def cache_dir(self, name, fmt="cpu", quant="int4"):
        if fmt in self.formats:
            return self.root / f"{fmt}-{quant}"
        raise CacheNotReady(f"no {fmt} cache")


def _catalog(tmp_path, formats):
    (tmp_path / "config.json").write_text('{"hidden_size": 2048, "moe_intermediate_size": 1408}')
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
                  quant="int4", device="cpu", threads=None, cache_dir="/c", gpu_cache_dir=None)
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
