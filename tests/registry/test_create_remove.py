"""Local import (hard link or copy), removal of exactly one model, expert heat."""

import errno
import os

import pytest
from krasis_registry import InvalidName, ModelInUse, ModelNotFound, PullError, Registry
from krasis_registry import create as create_module
from regtest import REPO_ID


def test_create_hard_links_on_same_filesystem(tiny_model_dir, krasis_home):
    reg = Registry()
    evs = list(reg.create("mine", tiny_model_dir, build_caches=False))
    assert evs[-1] == {"status": "success"}
    model_dir = reg.model_dir("mine")
    for src in tiny_model_dir.iterdir():
        dest = model_dir / src.name
        assert dest.read_bytes() == src.read_bytes()
        if os.stat(tiny_model_dir).st_dev == os.stat(krasis_home).st_dev:
            assert dest.stat().st_ino == src.stat().st_ino
    shown = reg.show("mine")
    assert shown["source"] == "local" and shown["state"] == "ready"
    assert shown["architecture"] == "DeepseekV2ForCausalLM"


def test_create_copies_across_filesystems(tiny_model_dir, monkeypatch):
    def no_link(src, dest, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(create_module.os, "link", no_link)
    reg = Registry()
    list(reg.create("copied", tiny_model_dir, build_caches=False))
    for src in tiny_model_dir.iterdir():
        dest = reg.model_dir("copied") / src.name
        assert dest.read_bytes() == src.read_bytes()
        assert dest.stat().st_ino != src.stat().st_ino


def test_create_refuses_bad_folders(tmp_path, tiny_model_dir):
    reg = Registry()
    with pytest.raises(PullError, match="not a folder"):
        list(reg.create("x", tmp_path / "missing", build_caches=False))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(PullError, match="only pickle weights"):
        list(reg.create("x", pickled, build_caches=False))
    with pytest.raises(InvalidName, match="reserved"):
        reg.create("deepseek-v2-lite", tiny_model_dir)
    list(reg.create("x", tiny_model_dir, build_caches=False))
    with pytest.raises(PullError, match="already exists"):
        list(reg.create("x", tiny_model_dir, build_caches=False))


def test_remove_deletes_only_that_model(tiny_model_dir, krasis_home, hub):
    reg = Registry()
    list(reg.create("keep", tiny_model_dir, build_caches=False))
    list(reg.create("keep:other", tiny_model_dir, build_caches=False))
    list(reg.pull(REPO_ID, build_caches=False))
    reg.add_expert_heat("keep:other", {1: [1, 2, 3]})
    kept = {p: p.read_bytes() for p in reg.model_dir("keep").iterdir()}
    reg.remove("keep:other")
    with pytest.raises(ModelNotFound):
        reg.show("keep:other")
    assert {p: p.read_bytes() for p in reg.model_dir("keep").iterdir()} == kept
    assert reg.model_dir(REPO_ID).is_dir()
    assert sorted(m["name"] for m in reg.list()) == ["keep:latest", f"{REPO_ID}:latest"]
    assert all(src.exists() for src in tiny_model_dir.iterdir())  # linked sources untouched
    assert not (krasis_home / "models" / "_" / "keep" / "other").exists()
    reg.remove(REPO_ID)
    assert not (krasis_home / "models" / "krasis-test").exists()
    with pytest.raises(ModelNotFound):
        reg.remove(REPO_ID)


def test_remove_refuses_loaded_model_unless_forced(tiny_model_dir):
    reg = Registry()
    list(reg.create("busy", tiny_model_dir, build_caches=False))
    with pytest.raises(ModelInUse, match="loaded"):
        reg.remove("busy", is_loaded=lambda name: name == "busy:latest")
    assert reg.model_dir("busy").is_dir()
    reg.remove("busy", force=True, is_loaded=lambda name: True)
    with pytest.raises(ModelNotFound):
        reg.model_dir("busy")


def test_interrupted_removal_is_finished_at_open(tiny_model_dir, krasis_home):
    from krasis_registry import records
    from krasis_registry.db import connect

    reg = Registry()
    list(reg.create("gone", tiny_model_dir, build_caches=False))
    db = connect(krasis_home / "registry.db")
    row = records.get_model(db, "gone:latest")
    records.set_state(db, row["id"], "removing")  # as if killed right after this write
    reg = Registry()
    with pytest.raises(ModelNotFound):
        reg.show("gone")
    assert not (krasis_home / "models" / "_" / "gone").exists()


def test_expert_heat_accumulates(tiny_model_dir):
    reg = Registry()
    list(reg.create("hot", tiny_model_dir, build_caches=False))
    assert reg.expert_heat("hot") == {}
    reg.add_expert_heat("hot", {1: [1, 0, 2], 2: [0, 5, 0]})
    reg.add_expert_heat("hot", {1: [1, 1, 1]})
    assert reg.expert_heat("hot") == {1: [2, 1, 3], 2: [0, 5, 0]}
    with pytest.raises(ValueError, match="3 stored"):
        reg.add_expert_heat("hot", {1: [1, 2]})
    assert reg.expert_heat("hot")[1] == [2, 1, 3]


def test_orphans_from_other_tools_cleaned(hub, krasis_home):
    reg = Registry()
    list(reg.pull(REPO_ID, build_caches=False))
    model_dir = reg.model_dir(REPO_ID)
    hf_leftover = model_dir / ".cache" / "huggingface" / "download"
    hf_leftover.mkdir(parents=True)
    (hf_leftover / "abc.incomplete").write_bytes(b"x" * 100)
    (model_dir / "model.safetensors.1a2b.incomplete").write_bytes(b"x" * 100)
    engine_cache = model_dir / ".krasis-cache" / "cpu-int8-g32"
    engine_cache.mkdir(parents=True)
    (engine_cache / "manifest.json").write_text("{}")
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert any(e["status"].startswith("removing orphan") for e in evs)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [".krasis-cache"] + [f["path"] for f in reg.show(REPO_ID)["files"]])
    assert (engine_cache / "manifest.json").is_file()  # the engine's own cache is not an orphan
