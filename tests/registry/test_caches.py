"""Cache builds after a pull or import: progress, states, failures, formats, the real builder."""

import json

import pytest
from fakebuilders import crashing_builder, failing_builder, fast_builder
from krasis_registry import CacheNotReady, ModelNotFound, PullError, Registry, records
from krasis_registry import caches as caches_module
from krasis_registry import registry as registry_module
from krasis_registry.db import connect
from regtest import REPO_ID
from tinymodel import write_tiny_model


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
    shown = reg.show("m")
    [cache] = shown["caches"]
    assert cache["state"] == "failed" and "do not fit" in cache["error"]
    assert not (reg.home / "caches" / "_" / "m" / "latest" / "cpu-int4-g128").exists()
    # a create whose weights the builder cannot read leaves the model failed, not listed
    assert shown["state"] == "failed" and "do not fit" in shown["error"]
    assert reg.list() == []
    with pytest.raises(ModelNotFound, match="not ready .failed: cpu cache build failed"):
        reg.model_dir("m")
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert list(reg.create("m", tiny_model_dir, build_caches=["cpu"]))[-1] == \
        {"status": "success"}
    assert reg.show("m")["state"] == "ready" and reg.cache_dir("m").is_dir()


def test_failed_build_of_a_pull_keeps_the_verified_model_ready(hub):
    reg = Registry(cache_builders={"cpu": failing_builder}, group_size=128)
    with pytest.raises(PullError, match="cpu cache build failed"):
        list(reg.pull(REPO_ID, build_caches=["cpu"]))
    assert reg.model_dir(REPO_ID).is_dir()  # files checked against the hub's digests
    with pytest.raises(CacheNotReady):
        reg.cache_dir(REPO_ID)
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert list(reg.build_caches(REPO_ID))[-1] == {"status": "success"}
    assert reg.cache_dir(REPO_ID).is_dir()


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


@pytest.fixture(scope="session")
def int4_model_dir(tmp_path_factory):
    """The tiny model with an expert width of 64: INT4 holds it."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-int4"), moe_intermediate_size=64)


@pytest.fixture(scope="session")
def unfit_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's files with a config no quantization can hold (width 48)."""
    folder = tmp_path_factory.mktemp("tiny-unfit")
    for src in tiny_model_dir.iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 48}))
    return folder


def _rows(reg, name):
    return [(c["format"], c["quant"], c["group_size"], c["state"])
            for c in reg.show(name)["caches"]]


@pytest.mark.parametrize("hidden, width, wanted, expected", [
    (2048, 1408, "int4", ("int4", 128)),
    (2048, 1408, "int8", ("int8", 128)),
    (64, 32, "int4", ("int8", 32)),  # INT4 needs multiples of 64: INT8 instead
    (192, 96, "int4", ("int8", 32)),
    (64, 48, "int4", None),
    (64, 48, "int8", None),
    (2048, 1408, "none", None),
])
def test_pick_quant_falls_back_from_int4_to_int8(hidden, width, wanted, expected):
    config = {"hidden_size": hidden, "moe_intermediate_size": width}
    assert caches_module.pick_quant(config, wanted) == expected


def test_pull_of_a_model_int4_cannot_hold_builds_one_int8_cache(hub):
    reg = Registry(cache_builders={"cpu": fast_builder})  # int4 asked, group size automatic
    evs = list(reg.pull(REPO_ID, build_caches=["cpu"]))
    assert evs[-1] == {"status": "success"}
    assert any("int4 cannot hold" in e["status"] for e in evs)
    assert _rows(reg, REPO_ID) == [("cpu", "int8", 32, "ready")]
    path = reg.cache_dir(REPO_ID, "cpu", "int8")
    built = json.loads((path / "manifest.json").read_text())
    assert (built["quant"], built["group_size"]) == ("int8", 32)
    with pytest.raises(CacheNotReady):
        reg.cache_dir(REPO_ID, "cpu", "int4")


def test_model_int4_holds_stays_int4(int4_model_dir):
    reg = Registry(cache_builders={"cpu": fast_builder})
    list(reg.create("m", int4_model_dir, build_caches=["cpu"]))
    assert _rows(reg, "m") == [("cpu", "int4", 64, "ready")]


def test_a_new_choice_replaces_an_old_not_applicable_row(tiny_model_dir):
    reg = Registry(cache_builders={"cpu": fast_builder})
    list(reg.create("m", tiny_model_dir, build_caches=False))
    db = connect(reg.store.db_path)
    caches_module.record_not_applicable(db, records.get_model(db, "m:latest"), "cpu", "int4")
    db.close()
    assert _rows(reg, "m") == [("cpu", "int4", 0, "failed")]
    list(reg.build_caches("m", ["cpu"]))
    assert _rows(reg, "m") == [("cpu", "int8", 32, "ready")]


def test_format_that_cannot_fit_the_model_is_skipped_not_fatal(unfit_model_dir):
    reg = Registry(cache_builders={"cpu": failing_builder})  # int4, group size as the engine
    evs = list(reg.create("m", unfit_model_dir, build_caches=["cpu"]))
    assert evs[-1] == {"status": "success"}
    assert any(e["status"].startswith("skipping cpu cache: not built: int4 or int8")
               for e in evs)
    [cache] = reg.show("m")["caches"]
    assert (cache["state"], cache["group_size"]) == ("failed", 0)
    assert "expert width (48)" in cache["error"]
    for quant in ("int4", "int8"):
        with pytest.raises(CacheNotReady):
            reg.cache_dir("m", "cpu", quant)


@pytest.mark.parametrize("hidden, width", [(2048, 1408), (2048, 768), (192, 96), (64, 32),
                                           (96, 96), (4096, 1536), (100, 60)])
@pytest.mark.parametrize("quant, bits", [("int4", 4), ("int8", 8)])
def test_group_size_matches_the_engine(hidden, width, quant, bits):
    from krasisd.engine import native_experts  # ours: a broken import fails, never skips
    ours = caches_module.auto_group_size(
        {"hidden_size": hidden, "moe_intermediate_size": width}, quant)
    try:
        engine = native_experts.pick_group_size(hidden, width, bits)
    except ValueError:
        engine = None
    assert ours == engine


@pytest.mark.parametrize("model, quant, group_size", [("tiny", "int8", 32),
                                                      ("int4", "int4", 64)])
def test_real_cpu_cache_builder(tiny_model_dir, int4_model_dir, model, quant, group_size):
    from krasisd.engine import cpu_cache  # ours: a broken import fails, never skips
    reg = Registry()  # int4 asked: the tiny model's expert width, 32, needs int8
    folder = tiny_model_dir if model == "tiny" else int4_model_dir
    evs = list(reg.create("m", folder, build_caches=["cpu"]))
    assert evs[-1] == {"status": "success"}
    [cache] = reg.show("m")["caches"]
    assert (cache["quant"], cache["group_size"]) == (quant, group_size)
    assert cache["state"] == "ready" and cache["layout_version"] is not None
    path = reg.cache_dir("m", "cpu", quant, group_size=group_size)
    loaded = cpu_cache.load_cpu_cache(path, quant=quant, group_size=group_size,
                                      model_dir=reg.model_dir("m"))
    assert loaded is not None


def test_unquantized_serving_builds_no_cache(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(registry_module, "bundled_dir", lambda name: tiny_model_dir)
    reg = Registry(cache_builders={"cpu": failing_builder}, quant="none")  # must not be called
    assert list(reg.pull("krasis-tiny", build_caches=["cpu"]))[-1] == {"status": "success"}
    assert reg.show("krasis-tiny")["caches"] == []


def test_a_pull_without_caches_says_nothing_of_formats(hub):
    reg = Registry(cache_builders={"cpu": failing_builder})  # must not be called
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert evs[-1] == {"status": "success"}
    assert not any("cannot hold" in e["status"] for e in evs)
    assert reg.show(REPO_ID)["caches"] == []


def test_unquantized_serving_still_sweeps_orphan_cache_folders(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(registry_module, "bundled_dir", lambda name: tiny_model_dir)
    reg = Registry(cache_builders={"cpu": fast_builder})
    list(reg.pull("krasis-tiny", build_caches=["cpu"]))
    built = reg.cache_dir("krasis-tiny", "cpu", reg.show("krasis-tiny")["caches"][0]["quant"])
    cache_root = built.parent
    orphan = cache_root / "left-by-a-crash"
    orphan.mkdir()
    plain = Registry(cache_builders={"cpu": failing_builder}, quant="none")
    assert list(plain.build_caches("krasis-tiny", ["cpu"]))[-1] == {"status": "success"}
    assert not orphan.exists() and built.is_dir()
