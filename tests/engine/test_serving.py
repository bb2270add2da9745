import dataclasses
import inspect

import pytest

from krasisd.engine.serving import load_for_serving, wants_gpu


def _recording_loader(result):
    """A stand-in loader returning ``result``, and the dict its last call's arguments go to."""
    seen = {}

    def fake_load(model_dir, **kwargs):
        seen.update(kwargs, model_dir=model_dir)
        return result

    return fake_load, seen


def test_cpu_device_never_wants_the_gpu():
    assert wants_gpu("cpu") is False


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wants_gpu("auto") is False
    with pytest.raises(ValueError, match="no CUDA GPU"):
        wants_gpu("cuda")


def test_without_a_gpu_serving_loads_the_cpu_engine(monkeypatch, tmp_path):
    import torch

    from krasisd.engine import engine as engine_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_load, seen = _recording_loader("cpu-engine")
    monkeypatch.setattr(engine_mod, "load", fake_load)
    assert load_for_serving(tmp_path, quant="int4", device="auto", cache_dir=tmp_path / "c") \
        == "cpu-engine"
    assert seen["device"] == "cpu" and seen["quant"] == "int4" and seen["cache_dir"] == tmp_path / "c"


def test_on_a_gpu_serving_loads_the_hybrid_engine_from_both_registry_caches(monkeypatch,
                                                                            tmp_path):
    import torch

    from krasisd.engine.gpu import graphs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_load_hybrid, seen = _recording_loader("hybrid-engine")
    monkeypatch.setattr(graphs, "load_hybrid", fake_load_hybrid)
    engine = load_for_serving(tmp_path, quant="int8", device="auto", cache_dir=tmp_path / "c",
                              gpu_cache_dir=tmp_path / "g")
    assert engine == "hybrid-engine"
    options = seen["options"]
    assert options.cache_dir == tmp_path / "c" and options.gpu_cache_dir == tmp_path / "g"
    assert options.quant == "int8" and options.device == "cuda"  # "auto" resolved


def test_the_setting_and_the_hybrid_loader_share_one_list_of_values():
    from krasisd.config import DEFAULT_GPU_DENSE, GPU_DENSE_WEIGHTS
    from krasisd.engine.gpu import graphs

    assert graphs.DENSE_WEIGHTS is GPU_DENSE_WEIGHTS
    assert DEFAULT_GPU_DENSE == "quant"
    assert inspect.signature(graphs.load_hybrid).parameters["dense"].default == DEFAULT_GPU_DENSE
    assert inspect.signature(load_for_serving).parameters["gpu_dense"].default == "quant"


def _hybrid_on_a_gpu(monkeypatch):
    import torch

    from krasisd.engine.gpu import graphs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_load_hybrid, seen = _recording_loader("hybrid-engine")
    monkeypatch.setattr(graphs, "load_hybrid", fake_load_hybrid)
    return seen


@pytest.mark.parametrize("kwargs,dense", [({}, "quant"), ({"gpu_dense": "quant"}, "quant"),
                                          ({"gpu_dense": "bf16"}, "bf16"),
                                          ({"gpu_dense": " BF16 "}, "bf16")])
def test_gpu_dense_becomes_the_hybrid_loaders_dense(monkeypatch, tmp_path, kwargs, dense):
    seen = _hybrid_on_a_gpu(monkeypatch)
    assert load_for_serving(tmp_path, quant="int4", device="auto", **kwargs) == "hybrid-engine"
    assert seen["options"].gpu_dense == dense


def test_cpu_loads_do_not_take_gpu_dense(monkeypatch, tmp_path):
    import torch

    from krasisd.engine import engine as engine_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_load, seen = _recording_loader("cpu-engine")
    monkeypatch.setattr(engine_mod, "load", fake_load)
    for quant, device in (("int4", "cpu"), ("none", "auto")):
        seen.clear()
        assert load_for_serving(tmp_path, quant=quant, device=device, gpu_dense="bf16") \
            == "cpu-engine"
        assert "dense" not in seen and "gpu_dense" not in seen and seen["quant"] == quant


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_bad_gpu_dense_is_refused_before_any_load(monkeypatch, tmp_path, device):
    seen = _hybrid_on_a_gpu(monkeypatch)
    with pytest.raises(ValueError, match="KRASIS_GPU_DENSE.*quant, bf16.*'fp8'"):
        load_for_serving(tmp_path, quant="int4", device=device, gpu_dense="fp8")
    assert seen == {}


def test_every_engine_option_reaches_the_hybrid_loader(monkeypatch, tmp_path):
    """What a runner passes arrives whole: the GPU settings the keywords do not carry too."""
    from krasisd.engine.engine_options import EngineOptions

    seen = _hybrid_on_a_gpu(monkeypatch)
    options = EngineOptions(quant="int8", device="auto", threads=3, cache_dir=tmp_path / "c",
                            vram_budget_bytes=4 << 30, gpu_prefill_min_tokens=200,
                            autotune=False, tuning_dir=tmp_path / "tiles")
    assert load_for_serving(tmp_path, options=options) == "hybrid-engine"
    assert seen["options"] == dataclasses.replace(options, device="cuda")
