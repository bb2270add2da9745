"""One group-size rule for both expert formats: the CPU cache (native_experts) and the GPU cache
(gpu.backend) pick the same group for a model, one that both formats' kernels accept."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from krasisd.engine import native_experts, quant
from krasisd.engine.gpu import backend as gpu_backend
from krasisd.engine.gpu.format import ExpertLayout, QuantSpec

# the published configs of the supported architectures, as the benches use them
CONFIG_DIR = Path(__file__).resolve().parents[2] / "bench" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))


class Chosen(Exception):
    """Raised by the patched cache loaders, carrying the group size the factory chose."""


@pytest.fixture
def chosen_groups(monkeypatch):
    """Patch both cache loaders to report the group size their factory asks for."""

    def report(out_dir, quant=None, group_size=None, model_dir=None, **_):
        raise Chosen(group_size)

    monkeypatch.setattr(native_experts, "load_cpu_cache", report)
    monkeypatch.setattr(gpu_backend, "load_gpu_cache", report)

    def groups(config, quant_name, group_size=None):
        found = []
        for factory in (native_experts.create_backend, gpu_backend.create_backend):
            with pytest.raises(Chosen) as caught:
                factory("unused-model-dir", config, quant_name, cache_dir="unused-cache-dir",
                        group_size=group_size)
            found.append(caught.value.args[0])
        return found

    return groups


def _shape(hidden: int, width: int) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=hidden, moe_intermediate_size=width, expert_bias=False)


def _both_formats_accept(hidden: int, width: int, bits: int, group: int) -> None:
    for size in (hidden, width):
        quant.check_format(bits, group, size)  # the CPU kernels
    ExpertLayout(hidden, width, QuantSpec(bits, group))  # the GPU kernels


def test_real_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"deepseek-v2-lite.json", "qwen3-30b-a3b.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("quant_name", ["int4", "int8"])
def test_real_configs_get_one_group_in_both_formats(path, quant_name, chosen_groups):
    raw = json.loads(path.read_text())
    hidden, width = raw["hidden_size"], raw["moe_intermediate_size"]
    cpu_group, gpu_group = chosen_groups(_shape(hidden, width), quant_name)
    assert cpu_group == gpu_group == 128  # 2048 x 1408 and 2048 x 768
    _both_formats_accept(hidden, width, quant.BITS[quant_name], cpu_group)


@pytest.mark.parametrize("hidden, width, group, int4_on_cpu", [
    (2048, 1408, 128, True), (4096, 1536, 128, True), (320, 192, 64, True), (192, 96, 32, False),
    (64, 32, 32, False), (96, 160, 32, False), (5120, 1344, 64, True), (128, 64, 64, True)])
def test_odd_widths_get_one_group_in_both_formats(hidden, width, group, int4_on_cpu,
                                                  chosen_groups):
    assert chosen_groups(_shape(hidden, width), "int8") == [group, group]
    _both_formats_accept(hidden, width, 8, group)
    if int4_on_cpu:
        assert chosen_groups(_shape(hidden, width), "int4") == [group, group]
        _both_formats_accept(hidden, width, 4, group)
        return
    # INT4 on the CPU needs 64-wide units: a clear error there; the GPU format (8 nibbles per
    # word) still takes the shared group
    with pytest.raises(ValueError, match="multiples of 64"):
        native_experts.create_backend("unused", _shape(hidden, width), "int4", cache_dir="unused")
    with pytest.raises(Chosen) as caught:
        gpu_backend.create_backend("unused", _shape(hidden, width), "int4", cache_dir="unused")
    assert caught.value.args[0] == group


@pytest.mark.parametrize("hidden, width", [(2048, 1400), (96, 48), (48, 48), (100, 60), (0, 64)])
def test_a_model_no_rule_fits_is_a_clear_value_error(hidden, width, chosen_groups):
    # 48 = 3 x 16: the GPU kernels alone would take group 16, the CPU kernels cannot
    for bits in (None, 4, 8):
        with pytest.raises(ValueError, match="fit no group size"):
            quant.pick_group_size(hidden, width, bits)
    for factory in (native_experts.create_backend, gpu_backend.create_backend):
        with pytest.raises(ValueError, match="fit no group size"):
            factory("unused", _shape(hidden, width), "int8", cache_dir="unused")


def test_explicit_group_size_is_kept(chosen_groups):
    assert chosen_groups(_shape(2048, 1408), "int4", group_size=64) == [64, 64]
    assert chosen_groups(_shape(2048, 1408), "int8", group_size=32) == [32, 32]


def test_every_caller_uses_the_one_rule():
    assert native_experts.pick_group_size is quant.pick_group_size
    assert gpu_backend.pick_group_size is quant.pick_group_size
    assert quant.pick_group_size(2048, 1408) == quant.pick_group_size(2048, 1408, 4) == 128


def test_bad_bits_is_a_value_error():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quant.pick_group_size(2048, 1408, 3)


@pytest.mark.parametrize("in_features, bits, preferred, expected", [
    (2048, 4, 128, 128), (1408, 8, 128, 128), (192, 8, 128, 64), (96, 8, 128, 32),
    (96, 4, 128, None), (24, 8, 128, None), (512, 8, 256, 256), (2048, 8, 64, 64)])
def test_dense_group_follows_the_same_sizes(in_features, bits, preferred, expected):
    from krasisd.engine.dense_plan import pick_dense_group

    assert pick_dense_group(in_features, bits, preferred) == expected
