"""The model store is private to the daemon's user whatever the umask, and wherever the
socket lives: folders 0700, the registry database and model files 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from harness import Proc, uds_client
from krasis_registry import Registry
from krasis_registry.create import bundled_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _assert_private(home: Path) -> None:
    assert _mode(home) == 0o700
    for path in home.rglob("*"):
        if path.is_symlink() or path.is_socket():
            continue
        if path.is_dir():
            assert _mode(path) == 0o700, path
        elif path.stat().st_nlink == 1:  # a hard link keeps its source's mode (see create.py)
            assert _mode(path) == 0o600, path


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # the usual desktop umask: new files 0644, folders 0755
    yield
    os.umask(old)


def test_a_daemon_with_xdg_runtime_dir_keeps_its_store_private(tmp_path, loose_umask):
    daemon = Proc(tmp_path, KRASIS_QUANT="none").wait_ready()  # XDG_RUNTIME_DIR is set
    try:
        with uds_client(daemon.socket) as http:
            pulled = http.post("/api/pull", json={"model": "krasis-tiny", "stream": False})
            assert pulled.json() == {"status": "success"}
    finally:
        assert daemon.stop() == 0
    home = tmp_path / "home"
    assert (home / "registry.db").is_file()
    assert any((home / "models").rglob("model.safetensors"))
    _assert_private(home)


def test_imports_are_private_copies_of_private_sources(tmp_path, loose_umask, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    for src in bundled_dir("krasis-tiny").iterdir():
        (source / src.name).write_bytes(src.read_bytes())
        (source / src.name).chmod(0o600)
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(
        OSError(18, "Invalid cross-device link")))  # another file system: copies
    reg = Registry(tmp_path / "home", quant="none")
    assert list(reg.create("m", source))[-1] == {"status": "success"}
    for path in reg.model_dir("m").iterdir():
        assert path.stat().st_nlink == 1 and _mode(path) == 0o600, path
    _assert_private(reg.home)


def test_opening_an_older_store_tightens_it(tmp_path, loose_umask):
    home = tmp_path / "home"
    Registry(home, quant="none")
    for path in [home, *home.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    Registry(home, quant="none")
    _assert_private(home)
