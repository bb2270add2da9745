"""kill -9 at the worst moments: mid-download (then resume) and mid-cache-build."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakebuilders import fast_builder
from krasis_registry import CacheNotReady, Registry
from regtest import REPO_ID, subprocess_env

BIG = "model-00002-of-00002.safetensors"
STALL_AT_BYTES = 400_000


def _child(command: str, name: str, env: dict | None = None) -> subprocess.Popen:
    code = "import registry_child; registry_child.main()"
    return subprocess.Popen([sys.executable, "-c", code, command, name],
                            env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_for(predicate, proc: subprocess.Popen | None, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def test_pull_killed_mid_file_resumes_without_refetching(hub, tiny_files, krasis_home):
    hub.stall_after_bytes[BIG] = STALL_AT_BYTES
    part = krasis_home / "partials" / "krasis-test" / "tiny-moe" / "latest" / f"{BIG}.part"
    proc = _child("pull", REPO_ID)
    try:
        _wait_for(lambda: part.is_file() and part.stat().st_size >= STALL_AT_BYTES, proc)
    finally:
        _kill(proc)
    on_disk_bytes = part.stat().st_size
    assert on_disk_bytes == STALL_AT_BYTES == hub.served(BIG)
    first_shard = "model-00001-of-00002.safetensors"
    assert hub.served(first_shard) == len(tiny_files[first_shard])

    hub.stall_after_bytes.clear()
    reg = Registry()
    shown = reg.show(REPO_ID)
    assert shown["state"] == "failed" and "interrupted" in shown["error"]
    assert part.stat().st_size == on_disk_bytes  # the partial survived the restart
    assert list(reg.pull(REPO_ID, build_caches=False))[-1] == {"status": "success"}

    resumed = hub.requests_for(BIG)[-1]
    assert resumed["range"] == f"bytes={on_disk_bytes}-"
    size_bytes = len(tiny_files[BIG])
    assert hub.served(BIG) == size_bytes  # 400,000 before the kill + the rest, nothing twice
    assert hub.served(first_shard) == len(tiny_files[first_shard])
    assert (reg.model_dir(REPO_ID) / BIG).read_bytes() == tiny_files[BIG]
    assert not part.exists()


def test_resume_when_server_ignores_range(hub, tiny_files, krasis_home):
    hub.stall_after_bytes[BIG] = STALL_AT_BYTES
    part = krasis_home / "partials" / "krasis-test" / "tiny-moe" / "latest" / f"{BIG}.part"
    proc = _child("pull", REPO_ID)
    try:
        _wait_for(lambda: part.is_file() and part.stat().st_size >= STALL_AT_BYTES, proc)
    finally:
        _kill(proc)
    hub.stall_after_bytes.clear()
    hub.ignore_range = True
    reg = Registry()
    assert list(reg.pull(REPO_ID, build_caches=False))[-1] == {"status": "success"}
    assert (reg.model_dir(REPO_ID) / BIG).read_bytes() == tiny_files[BIG]


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie waiting to be reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _cache_rows(reg: Registry) -> list[dict]:
    return reg.show(REPO_ID)["caches"]


def test_kill_during_cache_build(hub, tmp_path, krasis_home):
    reg = Registry()
    list(reg.pull(REPO_ID, build_caches=False))
    marker = tmp_path / "building"
    env = {**subprocess_env(), "KRASIS_TEST_MARKER": str(marker)}
    proc = _child("build", REPO_ID, env)
    try:
        _wait_for(marker.exists, proc)
        # a registry opened while the build runs must leave it alone
        assert [c["state"] for c in _cache_rows(Registry())] == ["building"]
    finally:
        _kill(proc)
    _wait_for(lambda: not _alive(int(marker.read_text())), None, timeout_s=10)  # builder died too
    cache_root = krasis_home / "caches" / "krasis-test" / "tiny-moe" / "latest"
    assert (cache_root / "cpu-int4-g128" / "half-written.bin").exists()

    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    [cache] = _cache_rows(reg)
    assert cache["state"] == "failed" and "interrupted" in cache["error"]
    assert not (cache_root / "cpu-int4-g128").exists()
    with pytest.raises(CacheNotReady):
        reg.cache_dir(REPO_ID, "cpu", "int4")
    assert reg.model_dir(REPO_ID).is_dir()  # the model itself stays usable

    evs = list(reg.pull(REPO_ID, build_caches=["cpu"]))
    assert evs[-1] == {"status": "success"}
    [cache] = _cache_rows(reg)
    assert cache["state"] == "ready" and cache["layout_version"] == 1
    path = reg.cache_dir(REPO_ID, "cpu", "int4")
    assert (path / "manifest.json").is_file()
    assert sorted(p.name for p in cache_root.iterdir()) == ["cpu-int4-g128"]  # temp orphan gone
    assert Path(cache["path"]) == path
