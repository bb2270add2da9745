"""EngineOptions: one checked object from the daemon's settings, through the runner's command
line, down to the engine; nothing under krasisd/engine reads the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import krasisd.engine
from krasisd import runner
from krasisd.config import Config, load_config
from krasisd.engine.engine_options import EngineOptions
from krasisd.runners import ModelSpec, _runner_argv

ENGINE_DIR = Path(krasisd.engine.__file__).parent
_SPEC = ModelSpec(name="m", model_dir=Path("/m"), cache_dir=Path("/c"))


def test_defaults_and_normalised_values(tmp_path):
    options = EngineOptions(cache_dir=str(tmp_path), gpu_dense=" BF16 ")
    assert options.cache_dir == tmp_path and options.gpu_dense == "bf16"
    assert (EngineOptions().quant, EngineOptions().device) == ("int4", "auto")
    assert EngineOptions().gpu_prefill_min_tokens == 32 and EngineOptions().autotune
    with pytest.raises(AttributeError):
        options.quant = "int8"  # frozen: passed down, never changed on the way


@pytest.mark.parametrize("bad, message", [
    (dict(quant="fp8"), "quant must be one of none, int8, int4"),
    (dict(device="tpu"), "device must be one of auto, cpu, cuda"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(vram_budget_bytes=0), r"vram_budget_bytes \(KRASIS_VRAM_BUDGET\)"),
    (dict(gpu_prefill_min_tokens=0), r"KRASIS_GPU_PREFILL_MIN_TOKENS"),
    (dict(gpu_prefill_min_tokens=True), r"KRASIS_GPU_PREFILL_MIN_TOKENS"),
    (dict(gpu_dense="fp8"), r"KRASIS_GPU_DENSE.*quant, bf16"),
    (dict(autotune="no"), "autotune must be True or False"),
])
def test_bad_values_are_refused_with_the_setting_named(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(**bad)


def _runner_options(cfg: Config, spec: ModelSpec = _SPEC) -> EngineOptions:
    argv = _runner_argv(spec, cfg, fd=3)
    return runner.engine_options(runner._parse_args(argv[argv.index("--fd"):]))


def test_the_daemons_settings_reach_the_engine_through_the_runners_command_line(tmp_path):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_QUANT": "int8",
                       "KRASIS_DEVICE": "cpu", "KRASIS_THREADS": "3",
                       "KRASIS_GPU_DENSE": "bf16", "KRASIS_VRAM_BUDGET": "4GiB",
                       "KRASIS_GPU_PREFILL_MIN_TOKENS": "200", "KRASIS_MOE_AUTOTUNE": "off"})
    spec = ModelSpec(name="m", model_dir=Path("/m"), cache_dir=Path("/c"),
                     gpu_cache_dir=Path("/g"))
    assert _runner_options(cfg, spec) == EngineOptions(
        quant="int8", device="cpu", threads=3, cache_dir="/c", gpu_cache_dir="/g",
        gpu_dense="bf16", vram_budget_bytes=4 << 30, gpu_prefill_min_tokens=200,
        autotune=False, tuning_dir=tmp_path / "tuning")


def test_runner_defaults_are_the_engines(tmp_path):
    options = _runner_options(Config(home=tmp_path))
    assert options == EngineOptions(cache_dir="/c", tuning_dir=tmp_path / "tuning")


def test_the_vram_budget_travels_as_an_argument_not_the_environment(tmp_path, monkeypatch):
    from krasisd.runners import _runner_env

    monkeypatch.delenv("KRASIS_VRAM_BUDGET", raising=False)
    cfg = Config(home=tmp_path, vram_budget_bytes=4 << 30)
    argv = _runner_argv(_SPEC, cfg, fd=3)
    assert argv[argv.index("--vram-budget") + 1] == str(4 << 30)
    assert "KRASIS_VRAM_BUDGET" not in _runner_env(cfg)
    assert "--vram-budget" not in _runner_argv(_SPEC, Config(home=tmp_path), fd=3)


def test_the_built_in_loader_gets_one_options_object(tmp_path, monkeypatch):
    from krasisd.config import DEFAULT_RUNNER_LOADER
    from krasisd.engine import serving

    seen = {}
    monkeypatch.setattr(serving, "load_for_serving",
                        lambda model_dir, **kwargs: seen.update(kwargs) or "engine")
    argv = _runner_argv(_SPEC, Config(home=tmp_path), fd=3)
    args = runner._parse_args(argv[argv.index("--fd"):])
    assert args.loader == DEFAULT_RUNNER_LOADER
    assert runner.load_engine(args) == "engine"
    assert seen == {"options": runner.engine_options(args)}


@pytest.mark.parametrize("value, expected", [("32", 32), ("1", 1), ("0", 32), ("many", 32)])
def test_prefill_threshold_setting(tmp_path, value, expected):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_GPU_PREFILL_MIN_TOKENS": value})
    assert cfg.gpu_prefill_min_tokens == expected


_ENV_READ = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bgetenv\(|\bdefault_home\(")


def test_nothing_under_the_engine_reads_the_environment():
    """Settings are passed down (EngineOptions); only the daemon's config and the runner read
    the environment."""
    readers = [f"{path.relative_to(ENGINE_DIR)}:{number}"
               for path in sorted(ENGINE_DIR.rglob("*.py"))
               for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if _ENV_READ.search(line.split("#")[0])]
    assert readers == []


def test_options_are_made_without_torch():
    """A runner checks its settings before anything heavy is imported."""
    import subprocess
    import sys

    code = ("import sys; from krasisd.engine import EngineOptions; EngineOptions(quant='int8'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_zero_vram_budget_is_a_bad_setting_not_a_runner_that_cannot_start(tmp_path, caplog):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_VRAM_BUDGET": "0"})
    assert cfg.vram_budget_bytes is None and "bad setting" in caplog.text
    assert "--vram-budget" not in _runner_argv(_SPEC, cfg, fd=3)
