"""Copying a model to a new name: shared bytes (hard links), its own records and defaults."""

import errno
import os

import pytest
from fakebuilders import fast_builder
from krasis_registry import InvalidName, ModelInUse, ModelNotFound, PullError, Registry
from krasis_registry import copy as copy_module
from krasis_registry.locks import FileLock
from krasis_registry.names import parse_name


@pytest.fixture
def reg(krasis_home):
    registry = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    yield registry
    registry.close()


def test_copy_links_files_and_caches(reg, tiny_model_dir):
    list(reg.create("orig", tiny_model_dir, build_caches=["cpu"], system="be terse",
                    options={"temperature": 0.2, "stop": ["END"]}))
    events = list(reg.copy("orig", "dup:v2"))
    assert events[-1] == {"status": "success"}
    src, dst = reg.show("orig"), reg.show("dup:v2")
    assert dst["state"] == "ready" and dst["name"] == "dup:v2"
    assert dst["digest"] == src["digest"] and dst["size"] == src["size"]
    assert dst["config"] == src["config"]
    assert dst["system"] == "be terse"
    assert dst["options"] == {"temperature": 0.2, "stop": ["END"]}
    src_dir, dst_dir = reg.model_dir("orig"), reg.model_dir("dup:v2")
    assert src_dir != dst_dir
    names = sorted(p.name for p in src_dir.iterdir())
    assert names == sorted(p.name for p in dst_dir.iterdir())
    for name in names:  # the same inode: no space taken
        assert (dst_dir / name).stat().st_ino == (src_dir / name).stat().st_ino
    src_cache, dst_cache = reg.cache_dir("orig"), reg.cache_dir("dup:v2")
    assert src_cache != dst_cache
    for path in src_cache.rglob("*"):
        if path.is_file():
            twin = dst_cache / path.relative_to(src_cache)
            assert twin.stat().st_ino == path.stat().st_ino
    assert [c["checksum"] for c in dst["caches"]] == [c["checksum"] for c in src["caches"]]
    # each stands alone: removing the source leaves the copy whole
    reg.remove("orig")
    assert reg.show("dup:v2")["state"] == "ready"
    assert all((dst_dir / name).is_file() for name in names)
    assert reg.cache_dir("dup:v2").is_dir()
    assert [m["name"] for m in reg.list()] == ["dup:v2"]


def test_copy_replaces_defaults_when_given(reg, tiny_model_dir):
    list(reg.create("base", tiny_model_dir, build_caches=False, system="one"))
    list(reg.copy("base", "derived", system="two", options={"num_ctx": 256}))
    assert reg.show("derived")["system"] == "two"
    assert reg.show("derived")["options"] == {"num_ctx": 256}
    list(reg.copy("base", "cleared", system=None))
    assert reg.show("cleared")["system"] is None
    assert reg.show("base")["system"] == "one" and reg.show("base")["options"] == {}


def test_copy_refusals(reg, tiny_model_dir):
    list(reg.create("a", tiny_model_dir, build_caches=False))
    list(reg.create("b", tiny_model_dir, build_caches=False))
    with pytest.raises(ModelNotFound, match="missing"):
        list(reg.copy("missing", "c"))
    with pytest.raises(PullError, match="already exists"):
        list(reg.copy("a", "b"))
    with pytest.raises(PullError, match="onto itself"):
        reg.copy("a", "a:latest")
    with pytest.raises(InvalidName, match="reserved"):
        reg.copy("a", "krasis-tiny")
    with pytest.raises(InvalidName):
        reg.copy("a", "../escape")
    lock = FileLock(reg.store.lock_path(parse_name("a")))
    assert lock.try_acquire()  # as a pull or cache build of the source holds it
    try:
        with pytest.raises(ModelInUse, match="copy it later"):
            list(reg.copy("a", "c"))
    finally:
        lock.release()
    with pytest.raises(ModelNotFound):  # nothing was recorded
        reg.show("c")
    list(reg.copy("a", "c"))
    assert reg.show("c")["state"] == "ready"


def test_copy_without_hard_links_copies(reg, tiny_model_dir, monkeypatch):
    list(reg.create("src", tiny_model_dir, build_caches=False))

    def no_link(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(copy_module.os, "link", no_link)
    list(reg.copy("src", "plain"))
    for path in reg.model_dir("src").iterdir():
        twin = reg.model_dir("plain") / path.name
        assert twin.read_bytes() == path.read_bytes()
        assert twin.stat().st_ino != path.stat().st_ino
        assert twin.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(reg.model_dir("plain"))) == sorted(os.listdir(reg.model_dir("src")))
