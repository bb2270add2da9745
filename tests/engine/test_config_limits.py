"""config.json sizes are checked before the engine allocates anything for them."""

import json
import shutil
import time
from pathlib import Path

import pytest

from krasisd.engine.config import ModelConfig
from krasisd.engine.errors import ModelLoadError
from krasisd.engine.limits import ModelLimitError, check_config_limits, implied_parameters

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "registry" / "bundled" / "krasis-tiny"
REAL_CONFIGS = sorted((REPO / "bench" / "configs").glob("*.json")) + [TINY / "config.json"]


def tiny_config(**changes) -> dict:
    return {**json.loads((TINY / "config.json").read_text()), **changes}


@pytest.mark.parametrize("changes, match", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is outside"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers must be an integer"),
    ({"hidden_size": 1 << 20}, "hidden_size"),
    ({"n_routed_experts": 10**6}, "n_routed_experts"),
    ({"vocab_size": 10**9}, "vocab_size"),
    ({"moe_intermediate_size": 10**9}, "moe_intermediate_size"),
    ({"intermediate_size": 10**9}, "intermediate_size"),
    ({"mlp_only_layers": list(range(10**5))}, "mlp_only_layers"),
])
def test_sizes_beyond_the_ceilings_are_refused(changes, match):
    with pytest.raises(ModelLimitError, match=match):
        ModelConfig.from_dict(tiny_config(**changes))


def test_a_nested_text_config_is_checked_too():
    nested = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
              "text_config": tiny_config(num_hidden_layers=10**9)}
    with pytest.raises(ModelLimitError, match="num_hidden_layers = 1000000000"):
        check_config_limits(nested)
    nested["text_config"] = tiny_config()
    assert check_config_limits(nested) == implied_parameters(tiny_config())


def test_the_implied_parameter_count_is_checked_against_the_capacity():
    config = tiny_config()
    params = implied_parameters(config)
    assert 0.9 * 3.6e6 < params <= 3.7e6  # a lower estimate of krasis-tiny's 3.6M
    assert ModelConfig.from_dict(config, capacity_bytes=params).num_hidden_layers == 5
    with pytest.raises(ModelLimitError, match="more than this machine can hold"):
        ModelConfig.from_dict(config, capacity_bytes=params // 4)


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.stem)
def test_real_models_pass(path):
    config = json.loads(path.read_text())
    assert check_config_limits(config, capacity_bytes=implied_parameters(config)) > 0
    ModelConfig.from_file(path)


def test_reading_the_folder_refuses_it_before_any_allocation(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    (folder / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=10**9)))
    from krasisd.engine import load

    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="num_hidden_layers = 1000000000 is outside"):
        load(folder, quant="none", device="cpu")
    assert time.monotonic() - started < 10
