"""Cache builds after a pull or import: progress, states, failures, formats, the real builder."""

import pytest
from fakebuilders import crashing_builder, failing_builder, fast_builder
from krasis_registry import CacheNotReady, PullError, Registry
from krasis_registry import caches as caches_module
from krasis_registry import registry as registry_module
from regtest import REPO_ID


def test_cache_build_progress_and_ready(tiny_model_dir, krasis_home):
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    evs = list(reg.create("m", tiny_model_dir, build_caches=["cpu"]))
    building = [e for e in evs if e["status"] == "building cpu cache"]
    assert [(e["completed"], e["total"]) for e in building] == [(0, 0), (1, 3), (2, 3), (3, 3)]
    assert evs[-1] == {"status": "success"}
    [cache] = reg.show("m")["caches"]
    assert cache["state"] == "ready" and cache["error"] is None
    assert cache["layout_version"] == 1 and len(cache["checksum"]) == 64
    path = reg.cache_dir("m", "cpu", "int4")
    assert cache["size_bytes"] == sum(p.stat().st_size for p in path.iterdir())
    assert path.is_relative_to(krasis_home / "caches")
    # a second pull of a ready model does not rebuild
    assert not any(e["status"] == "building cpu cache"
                   for e in reg.build_caches("m", ["cpu"]))


def test_failed_build_is_recorded_and_cleaned(tiny_model_dir):
    reg = Registry(cache_builders={"cpu": failing_builder}, group_size=128)
    with pytest.raises(PullError, match="cpu cache build failed: the weights do not fit"):
        list(reg.create("m", tiny_model_dir, build_caches=["cpu"]))
    [cache] = reg.show("m")["caches"]
    assert cache["state"] == "failed" and "do not fit" in cache["error"]
    assert not (reg.home / "caches" / "_" / "m" / "latest" / "cpu-int4-g128").exists()
    with pytest.raises(CacheNotReady):
        reg.cache_dir("m")
    assert reg.model_dir("m").is_dir()  # the files stay ready
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert list(reg.build_caches("m"))[-1] == {"status": "success"}
    assert reg.cache_dir("m").is_dir()


def test_builder_process_crash_is_a_failed_build(tiny_model_dir):
    reg = Registry(cache_builders={"cpu": crashing_builder}, group_size=128)
    with pytest.raises(PullError, match="ended without a result .exit code 3"):
        list(reg.create("m", tiny_model_dir, build_caches=["cpu"]))
    [cache] = reg.show("m")["caches"]
    assert cache["state"] == "failed" and "exit code 3" in cache["error"]


def test_gpu_format_built_when_asked_or_with_cuda(tiny_model_dir, monkeypatch):
    reg = Registry(cache_builders={"cpu": fast_builder, "gpu": fast_builder}, group_size=128)
    list(reg.create("m", tiny_model_dir, build_caches=["gpu"]))
    assert sorted(c["format"] for c in reg.show("m")["caches"]) == ["cpu", "gpu"]
    assert reg.cache_dir("m", "gpu").name == "gpu-int4-g128"
    monkeypatch.setattr(caches_module, "cuda_available", lambda: False)
    assert caches_module.formats_to_build(True) == ["cpu"]
    monkeypatch.setattr(caches_module, "cuda_available", lambda: True)
    assert caches_module.formats_to_build(True) == ["cpu", "gpu"]
    assert caches_module.formats_to_build(False) == []
    with pytest.raises(ValueError, match="unknown cache format"):
        caches_module.formats_to_build(["tpu"])


def test_pull_builds_caches_after_download(hub):
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    evs = list(reg.pull(REPO_ID, build_caches=["cpu"]))
    statuses = [e["status"] for e in evs]
    assert statuses.index("writing manifest") < statuses.index("building cpu cache")
    assert reg.cache_dir(REPO_ID).is_dir()


def test_bundled_model_needs_no_network(tiny_model_dir, monkeypatch):
    # HF_HUB_OFFLINE=1 from the shared conftest stays set: any hub call would fail
    monkeypatch.setattr(registry_module, "bundled_dir", lambda name: tiny_model_dir)
    reg = Registry()
    assert list(reg.pull("krasis-tiny", build_caches=False))[-1] == {"status": "success"}
    shown = reg.show("krasis-tiny")
    assert shown["source"] == "bundled" and shown["repo"] is None
    for src in tiny_model_dir.iterdir():
        dest = reg.model_dir("krasis-tiny") / src.name
        assert dest.read_bytes() == src.read_bytes()
        assert dest.stat().st_ino != src.stat().st_ino  # bundled files are copied
    evs = list(reg.pull("krasis-tiny", build_caches=False))
    assert any("up to date" in e["status"] for e in evs)


def test_real_bundled_krasis_tiny():
    from krasis_registry.create import bundled_dir

    try:
        bundled_dir("krasis-tiny")
    except PullError:
        pytest.skip("registry/bundled/krasis-tiny is not in this checkout yet")
    reg = Registry(quant="int8")
    assert list(reg.pull("krasis-tiny", build_caches=["cpu"]))[-1] == {"status": "success"}
    assert (reg.model_dir("krasis-tiny") / "config.json").is_file()
    assert reg.cache_dir("krasis-tiny", "cpu", "int8").is_dir()


def test_format_that_cannot_fit_the_model_is_skipped_not_fatal(tiny_model_dir):
    reg = Registry(cache_builders={"cpu": failing_builder})  # int4, group size as the engine
    evs = list(reg.create("m", tiny_model_dir, build_caches=["cpu"]))
    assert evs[-1] == {"status": "success"}
    assert any(e["status"].startswith("skipping cpu cache: not built: int4") for e in evs)
    [cache] = reg.show("m")["caches"]
    assert (cache["state"], cache["group_size"]) == ("failed", 0)
    assert "expert width (32)" in cache["error"]
    with pytest.raises(CacheNotReady):
        reg.cache_dir("m", "cpu", "int4")


@pytest.mark.parametrize("hidden, width", [(2048, 1408), (2048, 768), (192, 96), (64, 32),
                                           (96, 96), (4096, 1536), (100, 60)])
@pytest.mark.parametrize("quant, bits", [("int4", 4), ("int8", 8)])
def test_group_size_matches_the_engine(hidden, width, quant, bits):
    native_experts = pytest.importorskip("krasisd.engine.native_experts")
    ours = caches_module.auto_group_size(
        {"hidden_size": hidden, "moe_intermediate_size": width}, quant)
    try:
        engine = native_experts.pick_group_size(hidden, width, bits)
    except ValueError:
        engine = None
    assert ours == engine


def test_real_cpu_cache_builder(tiny_model_dir):
    cpu_cache = pytest.importorskip("krasisd.engine.cpu_cache")
    reg = Registry(quant="int8")  # the tiny model's expert width, 32, sets the group size
    evs = list(reg.create("m", tiny_model_dir, build_caches=["cpu"]))
    assert evs[-1] == {"status": "success"}
    [cache] = reg.show("m")["caches"]
    assert cache["state"] == "ready" and cache["layout_version"] is not None
    path = reg.cache_dir("m", "cpu", "int8", group_size=32)
    loaded = cpu_cache.load_cpu_cache(path, quant="int8", group_size=32,
                                      model_dir=reg.model_dir("m"))
    assert loaded is not None


def test_unquantized_serving_builds_no_cache(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(registry_module, "bundled_dir", lambda name: tiny_model_dir)
    reg = Registry(cache_builders={"cpu": failing_builder}, quant="none")  # must not be called
    assert list(reg.pull("krasis-tiny", build_caches=["cpu"]))[-1] == {"status": "success"}
    assert reg.show("krasis-tiny")["caches"] == []
