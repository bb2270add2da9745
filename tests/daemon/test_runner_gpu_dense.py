"""KRASIS_GPU_DENSE reaches the hybrid loader: daemon setting -> runner command line ->
load_for_serving -> load_hybrid(options=EngineOptions(gpu_dense=...))."""

from pathlib import Path

import pytest

from krasisd import runner
from krasisd.config import Config, load_config
from krasisd.runners import ModelSpec, _runner_argv

_SPEC = ModelSpec(name="m", model_dir=Path("/m"), cache_dir=Path("/c"))


def _runner_args(cfg: Config, loader: str):
    """The runner's parsed command line, as the daemon would start it with ``cfg``."""
    argv = _runner_argv(_SPEC, cfg, fd=3)
    argv[argv.index("--loader") + 1] = loader
    return runner._parse_args(argv[argv.index("--fd"):])


def _recording_loader(model_dir, quant, device, threads, cache_dir, **kwargs):
    return {"model_dir": model_dir, "quant": quant, **kwargs}


def _without_gpu_dense(model_dir, quant, device, threads, cache_dir):
    return "plain-engine"


_RECORDING = "tests.daemon.test_runner_gpu_dense:_recording_loader"


@pytest.mark.parametrize("value", ["quant", "bf16"])
def test_the_runner_is_started_with_the_setting(tmp_path, value):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_GPU_DENSE": value})
    argv = _runner_argv(_SPEC, cfg, fd=3)
    assert argv[argv.index("--gpu-dense") + 1] == value
    assert _runner_args(cfg, _RECORDING).gpu_dense == value


def test_the_default_is_quant_everywhere(tmp_path):
    assert Config(home=tmp_path).gpu_dense == "quant"
    assert load_config({"KRASIS_HOME": str(tmp_path)}).gpu_dense == "quant"
    assert runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m"]).gpu_dense \
        == "quant"


def test_loaders_get_gpu_dense_only_when_it_is_not_the_default(tmp_path):
    """bf16 reaches the loader; the default is left to the loader's own default, so a
    plugged-in loader without the argument keeps working."""
    bf16 = runner.load_engine(_runner_args(Config(home=tmp_path, gpu_dense="bf16"), _RECORDING))
    assert bf16 == {"model_dir": "/m", "quant": "int4", "gpu_dense": "bf16"}
    quant = runner.load_engine(_runner_args(Config(home=tmp_path), _RECORDING))
    assert "gpu_dense" not in quant
    plain = "tests.daemon.test_runner_gpu_dense:_without_gpu_dense"
    assert runner.load_engine(_runner_args(Config(home=tmp_path), plain)) == "plain-engine"


@pytest.mark.parametrize("value", ["quant", "bf16"])
def test_the_setting_reaches_the_hybrid_loader(tmp_path, monkeypatch, value):
    import torch

    from krasisd.config import DEFAULT_RUNNER_LOADER
    from krasisd.engine.gpu import graphs

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(graphs, "load_hybrid",
                        lambda model_dir, **kwargs: seen.update(kwargs) or "hybrid-engine")
    cfg = Config(home=tmp_path, quant="int8", device="auto", gpu_dense=value)
    assert runner.load_engine(_runner_args(cfg, DEFAULT_RUNNER_LOADER)) == "hybrid-engine"
    options = seen["options"]  # the runner's EngineOptions, whole
    assert options.gpu_dense == value and options.quant == "int8"
    assert options.cache_dir == Path("/c")
