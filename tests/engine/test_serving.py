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
    assert seen["cpu_cache_dir"] == tmp_path / "c" and seen["gpu_cache_dir"] == tmp_path / "g"
    assert seen["quant"] == "int8" and seen["device"] == "cuda"
