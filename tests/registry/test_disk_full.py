"""A full disk under KRASIS_HOME, injected: pulls end 'failed' with the reason and keep their
bytes, a failure is recorded even when SQLite cannot write, bookkeeping is dropped, reads
work. (tests/daemon/test_full_disk_daemon.py fills a real small file system.)"""

import builtins
import errno
import sqlite3

import pytest
from krasis_registry import PullError, Registry, StorageFull, pipeline, records
from krasis_registry import download as download_module
from krasis_registry.space import is_disk_full, storage_full
from regtest import REPO_ID


class FullAfter:
    """open() for the download module: a partial opened to append takes ``room_bytes``
    more bytes, then every write fails with ENOSPC."""

    def __init__(self, room_bytes: int):
        self.room_bytes = room_bytes

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        if "a" not in mode:
            return handle
        outer = self

        class Filling:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                if len(data) > outer.room_bytes:
                    handle.write(data[:outer.room_bytes])
                    outer.room_bytes = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                outer.room_bytes -= len(data)
                return handle.write(data)

            def __getattr__(self, name):
                return getattr(handle, name)

        return Filling()


def test_pull_that_fills_the_disk_ends_failed_with_the_reason_then_resumes(hub, krasis_home,
                                                                           monkeypatch):
    """The red-team's case: the pull stayed 'pulling' until a restart."""
    reg = Registry()
    with monkeypatch.context() as patch, \
            pytest.raises(StorageFull, match=r"^insufficient storage: writing model-0") as caught:
        patch.setattr(download_module, "open", FullAfter(200_000), raising=False)
        list(reg.pull(REPO_ID, build_caches=False))
    assert "No space left on device" in str(caught.value)
    assert "pull again to resume" in str(caught.value)
    assert isinstance(caught.value, PullError)  # a pull error still, answered 507 by krasisd
    shown = reg.show(REPO_ID)
    assert shown["state"] == "failed" and shown["error"] == str(caught.value)
    [part] = krasis_home.glob("partials/**/*.part")
    assert part.stat().st_size > 0  # the bytes written before the disk filled are kept

    hub.file_requests.clear()
    assert list(reg.pull(REPO_ID, build_caches=False))[-1] == {"status": "success"}
    resumed = [r for r in hub.file_requests if r.get("range")]
    assert resumed, "the second pull fetched the filled file from byte 0"
    assert reg.show(REPO_ID)["state"] == "ready"


def test_a_failure_is_recorded_when_the_database_is_full_too(hub, krasis_home, monkeypatch):
    """SQLite needs a few pages to write 'failed'; the partial gives them back."""
    monkeypatch.setattr(download_module, "open", FullAfter(300_000), raising=False)
    monkeypatch.setattr(pipeline, "GIVE_BACK_BYTES", 1000)
    real_set_state = records.set_state
    refused = []  # the partial's size when the database refused to record the failure

    def full_once(db, model_id, state, error=None):
        if state == "failed" and not refused:
            [part] = krasis_home.glob("partials/**/*.part")
            refused.append(part.stat().st_size)
            raise sqlite3.OperationalError("database or disk is full")
        return real_set_state(db, model_id, state, error)

    monkeypatch.setattr(records, "set_state", full_once)
    reg = Registry()
    with pytest.raises(StorageFull):
        list(reg.pull(REPO_ID, build_caches=False))
    assert refused, "the failure was not written at all"
    shown = reg.show(REPO_ID)
    assert shown["state"] == "failed" and shown["error"].startswith("insufficient storage")
    [part] = krasis_home.glob("partials/**/*.part")
    assert refused[0] > 1000 and part.stat().st_size == refused[0] - 1000


def test_not_enough_space_before_a_pull_is_insufficient_storage(hub, monkeypatch):
    from krasis_registry import pull as pull_module

    usage = pull_module.shutil.disk_usage

    def tiny_disk(path):
        real = usage(path)
        return type(real)(real.total, real.total - 1000, 1000)

    monkeypatch.setattr(pull_module.shutil, "disk_usage", tiny_disk)
    with pytest.raises(StorageFull, match="^insufficient storage: not enough disk space"):
        list(Registry().pull(REPO_ID, build_caches=False))


def test_expert_heat_on_a_full_disk_is_dropped_and_logged_once(tiny_model_dir, monkeypatch,
                                                                caplog):
    reg = Registry()
    list(reg.create("mine", tiny_model_dir, build_caches=False))
    reg.add_expert_heat("mine", {1: [1] * 8})

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(records, "add_heat", full)
    reg.add_expert_heat("mine", {1: [5] * 8})
    reg.add_expert_heat("mine", {1: [5] * 8})
    assert reg.expert_heat("mine") == {1: [1] * 8}
    warnings = [r for r in caplog.records if "expert heat not stored" in r.getMessage()]
    assert len(warnings) == 1 and "insufficient storage" in warnings[0].getMessage()


def test_a_full_database_on_remove_is_storage_full(tiny_model_dir, monkeypatch):
    reg = Registry()
    list(reg.create("mine", tiny_model_dir, build_caches=False))

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch, pytest.raises(
            StorageFull, match="^insufficient storage: recording the removal of mine:latest "
            r"failed .*database or disk is full.*would free nothing"):
        patch.setattr(records, "set_state", full)
        reg.remove("mine")
    assert reg.show("mine")["state"] == "ready"


@pytest.mark.parametrize("exc, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EIO, "Input/output error"), False),
    (sqlite3.OperationalError("database or disk is full"), True),
    (sqlite3.OperationalError("database is locked"), False),
    (PullError("checksum mismatch"), False),
])
def test_what_counts_as_a_full_disk(tmp_path, exc, full):
    assert is_disk_full(exc, tmp_path) is full
    wrapped = PullError("writing failed")
    wrapped.__cause__ = exc
    assert is_disk_full(wrapped, tmp_path) is full


def test_sqlite_io_error_is_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path,
                                                                           monkeypatch):
    from krasis_registry import space

    io_error = sqlite3.OperationalError("disk I/O error")
    assert not is_disk_full(io_error, tmp_path)  # this test's disk has room: a real I/O error
    monkeypatch.setattr(space, "free_bytes", lambda home: 4096)
    assert is_disk_full(io_error, tmp_path)
    message = str(storage_full(io_error, tmp_path))
    assert message.startswith("insufficient storage: writing the registry database failed")
    assert "disk I/O error" in message and "0.0 MiB free" in message
