"""krasisd.systemd: sd_notify datagrams, the watchdog, and socket activation (LISTEN_FDS)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from krasisd import systemd

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(SOCKET_ACTIVATE is None,
                                           reason="systemd-socket-activate is not installed")


@pytest.fixture
def short_dir():
    """A short folder for AF_UNIX paths (107 bytes at most)."""
    folder = Path(tempfile.mkdtemp(prefix="krasis-sd-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def notify_socket(short_dir, monkeypatch):
    """A datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_reaches_the_notify_socket(notify_socket):
    assert systemd.ready("listening on /run/krasis/krasisd.sock") is True
    assert receive(notify_socket) == "READY=1\nSTATUS=listening on /run/krasis/krasisd.sock"


@pytest.mark.parametrize(("send", "expected"), [
    (lambda: systemd.status("loading\nbig-model"), "STATUS=loading big-model"),
    (systemd.watchdog, "WATCHDOG=1"),
    (systemd.stopping, "STOPPING=1"),
    (lambda: systemd.notify("RELOADING=1"), "RELOADING=1"),
])
def test_each_message(notify_socket, send, expected):
    assert send() is True
    assert receive(notify_socket) == expected


def test_abstract_namespace_address(monkeypatch):
    name = f"krasis-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready() is True
        assert sock.recv(100) == b"READY=1"


def test_outside_systemd_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.watchdog() is False


def test_a_dead_notify_socket_is_not_an_error(short_dir, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone"))
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False


def test_unset_environment_hides_the_socket_from_children(notify_socket):
    assert systemd.notify("READY=1", unset_environment=True) is True
    assert "NOTIFY_SOCKET" not in os.environ


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", "self", 30.0),
    ("500000", "", 0.5),
    ("30000000", "1", None),  # another process is watched
    ("0", "", None),
    ("soon", "", None),
    ("", "", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval_s() == expected


def test_run_watchdog_pings_at_half_the_interval(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: pings every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(systemd.run_watchdog())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run_for(0.35))
    pings = []
    notify_socket.settimeout(0.5)
    while True:
        try:
            pings.append(receive(notify_socket))
        except TimeoutError:
            break
    assert 2 <= pings.count("WATCHDOG=1") <= 5  # at 0, 0.1, 0.2, 0.3 s on an idle machine


def test_run_watchdog_returns_when_not_watched(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(systemd.run_watchdog(), timeout=1))


def test_listen_fds_ignores_another_process(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_listen_fds_without_activation(monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_fds() == []


ACTIVATED = textwrap.dedent("""
    import json, os, socket
    from krasisd.systemd import listen_fds
    sockets = listen_fds()
    report = {
        "count": len(sockets),
        "family": int(sockets[0].family),
        "type": int(sockets[0].type),
        "name": sockets[0].getsockname(),
        "env_left": [v for v in ("LISTEN_PID", "LISTEN_FDS") if v in os.environ],
        "inheritable": os.get_inheritable(sockets[0].fileno()),
    }
    conn, _ = sockets[0].accept()
    conn.sendall(json.dumps(report).encode())
    conn.close()
""")


def connect_with_retry(path: Path, timeout_s: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_socket_activate
def test_listen_fds_takes_the_socket_from_systemd_socket_activate(short_dir):
    path = short_dir / "activated.sock"
    program = short_dir / "activated.py"
    program.write_text(ACTIVATED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([SOCKET_ACTIVATE, "-l", str(path), "-E", "PYTHONPATH",
                             sys.executable, str(program)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with connect_with_retry(path) as sock:
            sock.settimeout(30)
            report = json.loads(sock.makefile("rb").read())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert report == {"count": 1, "family": int(socket.AF_UNIX), "type": int(socket.SOCK_STREAM),
                      "name": str(path), "env_left": [], "inheritable": False}
