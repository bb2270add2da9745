"""POST /api/create over TCP and the Unix socket: what a caller may make the daemon read.

Any local user can reach the TCP listener, so over TCP `create` reads only folders under
KRASIS_CREATE_DIRS (none by default), never follows a link out of the folder, and its
errors say nothing about what is inside folders the caller named.
"""

from __future__ import annotations

import shutil
import socket
import stat
from pathlib import Path

import httpx
import pytest
from fakes import fake_config
from harness import DaemonThread
from krasis_registry import Registry
from krasis_registry.create import bundled_dir

SECRET = "TOPSECRET-daemon-user-credentials"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    """A private file of the daemon's user, and model folders that try to reach it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "config.json"  # e.g. ~/.docker/config.json, mode 0600
    secret.write_text('{"auths": {"registry": "' + SECRET + '"}}')
    secret.chmod(0o600)
    (private / "notes-about-project-x.pt").write_bytes(b"\x80\x02")
    allowed = tmp_path / "shared-models"
    good = allowed / "good"
    shutil.copytree(bundled_dir("krasis-tiny"), good)
    linked = allowed / "linked"
    shutil.copytree(good, linked)
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(secret)
    pickled = allowed / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "notes-about-project-x.pt").write_bytes(b"\x80\x02")
    return {"private": private, "allowed": allowed, "good": good, "linked": linked,
            "pickled": pickled, "root": tmp_path}


@pytest.fixture
def serve(layout, fake_env):
    """start(**config) -> (daemon, tcp client, socket client) over a real registry."""
    started = []

    def start(**overrides):
        root = layout["root"] / f"d{len(started)}"
        port = _free_port()
        cfg = fake_config(root, host=f"127.0.0.1:{port}", **overrides)
        thread = DaemonThread(cfg, Registry(cfg.home, quant="none")).start()
        tcp = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        started.append((thread, tcp))
        return thread, tcp, thread.client()

    yield start
    for thread, tcp in started:
        tcp.close()
        thread.close()


def _create(http: httpx.Client, name: str, path: Path) -> httpx.Response:
    return http.post("/api/create", json={"model": name, "path": str(path), "stream": False})


def _assert_refused_without_leak(response: httpx.Response, *forbidden: str) -> str:
    assert response.status_code == 400, response.text
    text = response.text
    for word in (SECRET, "notes-about-project-x", *forbidden):
        assert word not in text
    return response.json()["error"]


def test_tcp_create_is_off_without_create_dirs(layout, serve):
    daemon, tcp, unix = serve()
    folders = [layout[key] for key in ("linked", "private", "pickled", "good")]
    folders.append(layout["root"] / "no-such-folder")
    answers = {_assert_refused_without_leak(_create(tcp, "m", path)).replace(str(path), "<path>")
               for path in folders}
    # one answer whatever the folder holds, or whether it exists at all
    [answer] = answers
    assert "KRASIS_CREATE_DIRS" in answer
    assert tcp.post("/api/show", json={"model": "m"}).status_code == 404
    assert tcp.get("/api/tags").json()["models"] == []


def test_tcp_create_reads_only_create_dirs_and_no_link_out(layout, serve):
    daemon, tcp, unix = serve(create_dirs=[str(layout["allowed"])])
    error = _assert_refused_without_leak(_create(tcp, "m", layout["private"]))
    assert "KRASIS_CREATE_DIRS" in error
    error = _assert_refused_without_leak(_create(tcp, "m", layout["linked"]))
    assert "config.json" in error and "leads outside the folder" in error
    assert tcp.post("/api/show", json={"model": "m"}).status_code == 404
    error = _assert_refused_without_leak(_create(tcp, "m", layout["pickled"]))
    assert "only pickle weights" in error
    # a folder under KRASIS_CREATE_DIRS reached through a link that leaves it is refused too
    (layout["allowed"] / "escape").symlink_to(layout["private"])
    _assert_refused_without_leak(_create(tcp, "m", layout["allowed"] / "escape"))
    good = _create(tcp, "m", layout["good"])
    assert good.status_code == 200 and good.json() == {"status": "success"}
    shown = tcp.post("/api/show", json={"model": "m"}).json()
    assert shown["state"] == "ready" and SECRET not in str(shown)


def test_the_unix_socket_reads_any_folder_but_no_link_out(layout, serve):
    daemon, tcp, unix = serve()
    error = _assert_refused_without_leak(_create(unix, "m", layout["linked"]), "auths")
    assert "leads outside the folder" in error
    assert unix.post("/api/show", json={"model": "m"}).status_code == 404
    # over the owner's socket the errors may name the files: the caller can list them
    assert "notes-about-project-x.pt" in _create(unix, "m", layout["pickled"]).text
    assert _create(unix, "m", layout["good"]).json() == {"status": "success"}
    model_dir = Path(unix.post("/api/show", json={"model": "m"}).json()["path"])
    for path in model_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0 or path.stat().st_nlink > 1


def test_a_link_into_a_hugging_face_cache_blob_is_followed(layout, serve):
    """snapshots/<commit>/ holds links into ../../blobs: the usual Hub cache layout."""
    repo = layout["allowed"] / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for src in layout["good"].iterdir():
        shutil.copyfile(src, blobs / f"blob-{src.name}")
        (snapshot / src.name).symlink_to(Path("../../blobs") / f"blob-{src.name}")
    daemon, tcp, unix = serve(create_dirs=[str(layout["allowed"])])
    assert _create(tcp, "m", snapshot).json() == {"status": "success"}
