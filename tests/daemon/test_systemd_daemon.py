"""The real krasisd under systemd's protocols: socket activation, READY=1, watchdog, stop.

systemd itself is not running here; `systemd-socket-activate` passes the listening socket
exactly as systemd does (LISTEN_FDS=1, LISTEN_PID, fd 3) and the test plays NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from krasis.client import Client

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
KRASISD = Path(sys.executable).parent / "krasisd"
START_TIMEOUT_S = 90  # two shared cores: importing the daemon can take a while
pytestmark = [
    pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is missing"),
    pytest.mark.skipif(not KRASISD.is_file(), reason="the krasisd console script is missing"),
]


@pytest.fixture
def short_dir():
    folder = Path(tempfile.mkdtemp(prefix="krasis-sd-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def notify(short_dir):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify"))
    yield sock
    sock.close()


def wait_for_message(sock: socket.socket, wanted: str, timeout_s: float) -> list[str]:
    """Every datagram until one has the line ``wanted``; fails after timeout_s."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.splitlines():
            return seen
    raise AssertionError(f"no {wanted!r} within {timeout_s} s; got {seen}")


def daemon_env(short_dir: Path, home: Path, notify: socket.socket, **extra: str) -> dict:
    env = {**os.environ, "KRASIS_HOME": str(home), "KRASIS_SOCKET": str(short_dir / "d.sock"),
           "NOTIFY_SOCKET": notify.getsockname(), "HF_HUB_OFFLINE": "1", **extra}
    env.pop("KRASIS_HOST", None)
    env.pop("KRASIS_PRELOAD", None)
    return env


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_socket_activated_daemon_serves_and_notifies(short_dir, tmp_path, notify):
    env = daemon_env(short_dir, tmp_path / "home", notify, WATCHDOG_USEC="1000000")
    sock_path = Path(env["KRASIS_SOCKET"])
    passed = ["KRASIS_HOME", "KRASIS_SOCKET", "NOTIFY_SOCKET", "WATCHDOG_USEC", "HF_HUB_OFFLINE",
              "PATH", "HOME"]
    command = [SOCKET_ACTIVATE, "-l", str(sock_path),
               *(arg for name in passed for arg in ("-E", name)), str(KRASISD)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = Client(socket_path=sock_path)
        version = client.version()  # the first connection makes systemd-socket-activate exec
        assert version and isinstance(version, str)
        assert client.list() == []
        wait_for_message(notify, "READY=1", START_TIMEOUT_S)
        wait_for_message(notify, "WATCHDOG=1", 5)  # every WATCHDOG_USEC / 2
    finally:
        code = stop(proc)
    stderr = proc.stderr.read().decode()
    assert code == 0, stderr
    assert "socket activation: received 1 socket(s)" in stderr
    assert "Traceback" not in stderr


def test_krasis_serve_binds_its_socket_and_says_ready(short_dir, tmp_path, notify):
    env = daemon_env(short_dir, tmp_path / "home", notify)
    proc = subprocess.Popen([sys.executable, "-m", "krasis.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_message(notify, "READY=1", START_TIMEOUT_S)
        result = subprocess.run([sys.executable, "-m", "krasis.cli", "ps"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CACHE", "UNTIL"]
        code = stop(proc)
        assert "STOPPING=1" in "\n".join(wait_for_message(notify, "STOPPING=1", 10))
    finally:
        if proc.poll() is None:
            stop(proc)
    assert code == 0, proc.stderr.read().decode()
    assert not Path(env["KRASIS_SOCKET"]).exists()  # krasisd removes the socket it made
