"""Removing a model on a full disk: the write of 'removing' fails, so the model's largest
files are deleted first (freeing space), then the removal is recorded and finished; a ready
model whose files are partly gone is never left 'ready' (an open marks it failed).

Injected like test_disk_full.py (records.set_state refuses while the "disk" is full), and on
a real, filled tmpfs where mounting is permitted (skipped only on EPERM, always unmounted).
"""

import ctypes
import errno
import os
import sqlite3
from pathlib import Path

import pytest
from fakebuilders import fast_builder
from krasis_registry import ModelNotFound, Registry, StorageFull, records
from regtest import REPO_ID, REPO_ROOT


class FullUntilFreed:
    """records.set_state for 'removing' that fails like SQLite on a full disk until at
    least ``need_bytes`` of the model's files are gone; records what was on disk at each
    try."""

    def __init__(self, monkeypatch, model_dir: Path, need_bytes: int):
        self.real = records.set_state
        self.model_dir = model_dir
        self.total = self._bytes()
        self.need_bytes = need_bytes
        self.tries: list[set[str]] = []
        monkeypatch.setattr(records, "set_state", self)

    def _bytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_dir.iterdir() if p.is_file()) \
            if self.model_dir.is_dir() else 0

    def __call__(self, db, model_id, state, error=None):
        if state == "removing":
            self.tries.append({p.name for p in self.model_dir.iterdir()})
            if self.total - self._bytes() < self.need_bytes:
                raise sqlite3.OperationalError("database or disk is full")
        return self.real(db, model_id, state, error)


def _pulled(hub) -> tuple[Registry, Path, list[tuple[int, str]]]:
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert list(reg.pull(REPO_ID, build_caches=["cpu"]))[-1] == {"status": "success"}
    model_dir = reg.model_dir(REPO_ID)
    sizes = sorted(((p.stat().st_size, p.name) for p in model_dir.iterdir()), reverse=True)
    return reg, model_dir, sizes


def test_remove_on_a_full_disk_deletes_the_largest_file_first_then_finishes(hub, krasis_home,
                                                                            monkeypatch):
    reg, model_dir, sizes = _pulled(hub)
    largest_bytes, largest = sizes[0]
    full = FullUntilFreed(monkeypatch, model_dir, need_bytes=1)
    reg.remove(REPO_ID)  # before: StorageFull (507), nothing freed
    assert len(full.tries) == 2, full.tries
    assert full.tries[1] == full.tries[0] - {largest}  # only the largest went before the write
    assert largest.endswith(".safetensors") and largest_bytes > 500_000  # a shard
    with pytest.raises(ModelNotFound):
        reg.show(REPO_ID)
    assert not model_dir.exists()
    assert not list((krasis_home / "caches").rglob("*.bin"))
    assert Registry().list() == []


def test_files_are_deleted_largest_first_until_the_write_succeeds(hub, monkeypatch):
    reg, model_dir, sizes = _pulled(hub)
    full = FullUntilFreed(monkeypatch, model_dir, need_bytes=sizes[0][0] + 1)
    reg.remove(REPO_ID)
    assert len(full.tries) == 3
    assert full.tries[2] == full.tries[0] - {sizes[0][1], sizes[1][1]}
    with pytest.raises(ModelNotFound):
        reg.show(REPO_ID)


def test_a_disk_that_stays_full_leaves_a_failed_model_never_a_ready_one(hub, krasis_home,
                                                                         monkeypatch):
    """The write never succeeds (as if killed between the deletions and the write): the
    open after marks the model failed, naming the files that are gone, and its cache."""
    reg, model_dir, sizes = _pulled(hub)
    with monkeypatch.context() as patch, pytest.raises(
            StorageFull, match=rf"^insufficient storage: recording the removal of {REPO_ID}:"
            rf"latest failed .*then remove {REPO_ID}:latest again") as caught:
        FullUntilFreed(patch, model_dir, need_bytes=1 << 60)
        reg.remove(REPO_ID)
    assert "marked failed at the next open" in str(caught.value)
    assert not any(p.is_file() for p in model_dir.iterdir())  # every freeing file went
    reopened = Registry()
    shown = reopened.show(REPO_ID)
    assert shown["state"] == "failed"
    assert shown["error"].startswith(
        f"{len(sizes)} of its files are missing or short on disk (config.json, ")
    assert shown["error"].endswith("pull it again, or remove it")
    assert [c["state"] for c in shown["caches"]] == ["failed"]
    assert "missing on disk" in shown["caches"][0]["error"]
    assert reopened.list() == []
    with pytest.raises(ModelNotFound):
        reopened.model_dir(REPO_ID)
    reopened.remove(REPO_ID)  # now there is room: the failed model goes
    with pytest.raises(ModelNotFound):
        reopened.show(REPO_ID)


def test_pull_after_a_partial_loss_brings_the_model_back(hub, krasis_home):
    reg, model_dir, sizes = _pulled(hub)
    (model_dir / sizes[0][1]).unlink()  # as a removal killed after its first deletion
    reopened = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert reopened.show(REPO_ID)["state"] == "failed"
    hub.file_requests.clear()
    assert list(reopened.pull(REPO_ID, build_caches=["cpu"]))[-1] == {"status": "success"}
    assert [r["path"] for r in hub.file_requests] == [sizes[0][1]]  # only what was lost
    shown = reopened.show(REPO_ID)
    assert shown["state"] == "ready"
    assert [c["state"] for c in shown["caches"]] == ["ready"]


def test_an_open_leaves_whole_models_and_caches_alone(hub, krasis_home):
    reg, model_dir, sizes = _pulled(hub)
    before = reg.show(REPO_ID)
    after = Registry().show(REPO_ID)
    assert after["state"] == "ready" and after["caches"] == before["caches"]


def test_a_lost_cache_file_fails_only_the_cache(hub, krasis_home):
    reg, model_dir, sizes = _pulled(hub)
    [cache] = reg.show(REPO_ID)["caches"]
    next(Path(cache["path"]).glob("layer3.bin")).unlink()
    shown = Registry().show(REPO_ID)
    assert shown["state"] == "ready"
    assert [c["state"] for c in shown["caches"]] == ["failed"]
    assert not Path(cache["path"]).exists()


def test_linked_files_free_nothing_and_are_kept(tiny_model_dir, monkeypatch):
    """A create on the same file system hard-links its files: deleting them frees nothing,
    so they are kept, and the model stays ready and whole."""
    reg = Registry()
    list(reg.create("linked", tiny_model_dir, build_caches=False))
    model_dir = reg.model_dir("linked")
    if any(p.stat().st_nlink == 1 for p in model_dir.iterdir()):
        pytest.skip("the import copied (no hard links on this file system)")
    with monkeypatch.context() as patch, pytest.raises(
            StorageFull, match="deleting its files would free nothing: they are hard links"):
        FullUntilFreed(patch, model_dir, need_bytes=1)
        reg.remove("linked")
    assert Registry().show("linked")["state"] == "ready"
    assert {p.name for p in model_dir.iterdir()} == {p.name for p in tiny_model_dir.iterdir()
                                                     if p.is_file()}


def test_other_errors_on_remove_are_not_treated_as_a_full_disk(hub, monkeypatch):
    reg, model_dir, sizes = _pulled(hub)

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(records, "set_state", locked)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        reg.remove(REPO_ID)
    assert sorted((p.stat().st_size, p.name) for p in model_dir.iterdir()) == sorted(sizes)


# a real full file system

MNT_DETACH = 2


@pytest.fixture
def small_disk(tmp_path):
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", bytes(mountpoint), b"tmpfs", 0, b"size=16m,mode=0700") != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM:
            pytest.skip("mounting a tmpfs is not permitted here")
        raise OSError(code, f"mount tmpfs on {mountpoint}: {os.strerror(code)}")
    try:
        yield mountpoint
    finally:
        if libc.umount2(bytes(mountpoint), 0) != 0:
            libc.umount2(bytes(mountpoint), MNT_DETACH)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block_bytes in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(block_bytes))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_remove_frees_a_really_full_disk(small_disk):
    home = small_disk / "home"
    reg = Registry(home=home, quant="none")
    assert list(reg.pull("krasis-tiny", build_caches=False))[-1] == {"status": "success"}
    assert list(reg.pull("krasis-tiny:second", build_caches=False))[-1] == \
        {"status": "success"}
    _fill(small_disk)
    assert os.statvfs(small_disk).f_bavail == 0
    with pytest.raises(StorageFull):  # the disk is really full: a write fails
        list(reg.create("more", REPO_ROOT / "registry/bundled/krasis-tiny",
                        build_caches=False))
    reg.remove("krasis-tiny:second")
    assert [m["name"] for m in reg.list()] == ["krasis-tiny:latest"]
    assert os.statvfs(small_disk).f_bavail > 0
    assert not (home / "models" / "_" / "krasis-tiny" / "second").exists()
    reg.close()
    reopened = Registry(home=home, quant="none")
    assert [m["name"] for m in reopened.list()] == ["krasis-tiny:latest"]
    assert reopened.show("krasis-tiny")["state"] == "ready"
    reopened.close()
