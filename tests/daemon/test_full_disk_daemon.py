"""krasisd on a full disk: reads and inference on a loaded model keep working, writes answer
507 "insufficient storage: ...", a pull that fills the disk ends 'failed', and a delete
frees the disk.

KRASIS_HOME is a 16 MiB tmpfs filled to the last byte; the test is skipped only where
mounting is not permitted (EPERM).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
MNT_DETACH = 2


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for this test, unmounted at its end."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    libc = _libc()
    if libc.mount(b"tmpfs", bytes(mountpoint), b"tmpfs", 0, b"size=16m,mode=0700") != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM:
            pytest.skip("mounting a tmpfs is not permitted here")
        raise OSError(code, f"mount tmpfs on {mountpoint}: {os.strerror(code)}")
    try:
        yield mountpoint
    finally:
        if libc.umount2(bytes(mountpoint), 0) != 0:
            libc.umount2(bytes(mountpoint), MNT_DETACH)  # still open somewhere: detach it


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Write a file until the file system under folder has only ``leave_bytes`` left."""
    stats = os.statvfs(folder)
    filler = folder / f"filler-{leave_bytes}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if leave_bytes:
            os.write(fd, bytes(stats.f_bavail * stats.f_frsize - leave_bytes))
        else:
            for block_bytes in (1 << 20, 4096, 1):
                try:
                    while True:
                        os.write(fd, bytes(block_bytes))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_disk_reads_work_and_writes_are_507(small_disk, tmp_path, fake_env):
    from fakes import fake_config
    from harness import DaemonThread
    from krasis_registry import Registry

    home = small_disk / "home"
    registry = Registry(home=home, quant="none")
    assert list(registry.pull("krasis-tiny", build_caches=False))[-1] == {"status": "success"}
    thread = DaemonThread(fake_config(tmp_path, home=home, quant="none"), registry).start()
    try:
        with thread.client() as http:
            ask = {"model": "krasis-tiny", "prompt": "hi", "stream": False,
                   "options": {"num_predict": 3, "num_ctx": 2048}}
            assert http.post("/api/generate", json=ask).status_code == 200  # loaded

            fillers = [fill(small_disk, leave_bytes=2 << 20)]  # a pull fills the rest
            pulled = http.post("/api/pull", json={"model": "krasis-tiny:second",
                                                  "stream": False})
            assert pulled.status_code == 507, pulled.text
            assert pulled.json()["error"].startswith("insufficient storage: ")
            assert "No space left on device" in pulled.json()["error"]
            second = http.post("/api/show", json={"model": "krasis-tiny:second"}).json()
            assert second["state"] == "failed" and second["error"] == pulled.json()["error"]

            fillers.append(fill(small_disk))
            assert os.statvfs(small_disk).f_bavail == 0

            tags = http.get("/api/tags")
            assert tags.status_code == 200, tags.text
            assert [m["name"] for m in tags.json()["models"]] == ["krasis-tiny:latest"]
            shown = http.post("/api/show", json={"model": "krasis-tiny"})
            assert shown.status_code == 200, shown.text
            assert [m["model"] for m in http.get("/api/ps").json()["models"]] == \
                ["krasis-tiny:latest"]
            answer = http.post("/api/generate", json=ask)
            assert answer.status_code == 200, answer.text
            assert answer.json()["eval_count"] == 3

            created = http.post("/api/create", json={
                "model": "copy", "path": str(REPO_ROOT / "registry/bundled/krasis-tiny"),
                "stream": False})
            assert created.status_code == 507, created.text
            assert created.json()["error"].startswith("insufficient storage: ")
            # a delete frees the full disk: the model's largest files go before its row
            deleted = http.request("DELETE", "/api/delete", json={"model": "krasis-tiny"})
            assert deleted.status_code == 200, deleted.text
            assert os.statvfs(small_disk).f_bavail > 0
            assert http.get("/api/tags").json()["models"] == []

            for filler in fillers:
                filler.unlink()
            for name in ("krasis-tiny:second", "copy"):
                if name == "copy" and http.post("/api/show", json={"model": name}).is_error:
                    continue
                removed = http.request("DELETE", "/api/delete", json={"model": name})
                assert removed.status_code == 200, removed.text
            assert http.get("/api/tags").json()["models"] == []
    finally:
        thread.close()
        registry.close()
