"""`python -m krasisd` as a process: socket, listeners, one daemon per socket, shutdown."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest
from harness import Proc, uds_client

pytestmark = pytest.mark.timeout(60)


def tcp_listen_ports(pid: int) -> set[int]:
    """Ports of TCP sockets in LISTEN state held by process ``pid``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing (the daemon's threads open and close files)
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    daemon = Proc(tmp_path_factory.mktemp("proc")).wait_ready()
    yield daemon
    daemon.stop()


def test_socket_is_0600_and_no_tcp_by_default(proc):
    mode = proc.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert tcp_listen_ports(proc.proc.pid) == set()


def test_process_title_and_effective_config_logged(proc):
    assert Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().split(b"\0")[0] == b"krasisd"
    log = proc.stderr()
    assert 'msg="starting krasisd"' in log and "keep_alive_s=1800.0" in log
    assert f"socket={proc.socket}" in log and "max_queue=512" in log
    assert "msg=request method=GET path=/ status=200 duration_ms=" in log


def test_second_daemon_exits_with_a_clear_message(proc):
    second = Proc(proc.root)
    assert second.proc.wait(20) == 1
    assert "already" in second.stderr() and str(proc.socket) in second.stderr()
    with uds_client(proc.socket) as http:  # the first one still serves
        assert http.get("/api/tags").json() == {"models": []}


def test_second_daemon_on_the_same_home_is_refused_whatever_its_socket(proc, tmp_path):
    home = proc.root / "home"
    second = Proc(tmp_path, KRASIS_HOME=str(home))  # its own runtime dir, so its own socket
    assert second.proc.wait(20) == 1
    message = second.stderr()
    assert f"is already using KRASIS_HOME {home}" in message
    assert f"pid {proc.proc.pid}" in message and str(proc.socket) in message
    assert "Traceback" not in message and not second.socket.exists()
    with uds_client(proc.socket) as http:  # the first one still serves
        assert http.get("/api/tags").status_code == 200


def test_home_lock_is_released_at_shutdown(tmp_path, fake_env):
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    from krasisd.server import AlreadyRunning

    cfg = fake_config(tmp_path)
    first = DaemonThread(cfg, FakeRegistry(tmp_path / "models")).start()
    try:
        other_socket = fake_config(tmp_path, socket=tmp_path / "other.sock")
        with pytest.raises(AlreadyRunning, match="KRASIS_HOME"):
            DaemonThread(other_socket, FakeRegistry(tmp_path / "models")).start()
    finally:
        first.close()
    again = DaemonThread(cfg, FakeRegistry(tmp_path / "models")).start()  # the lock is free
    again.close()


def test_stale_socket_replaced_bad_setting_falls_back_socket_removed_at_exit(tmp_path):
    path = tmp_path / "run" / "krasis" / "krasisd.sock"
    path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a crashed daemon's leftover
    daemon = Proc(tmp_path, KRASIS_MAX_QUEUE="lots", KRASIS_KEEP_ALIVE="5m").wait_ready()
    log = daemon.stderr()
    assert "replacing stale socket" in log
    assert "bad setting" in log and "KRASIS_MAX_QUEUE" in log
    assert "max_queue=512" in log and "keep_alive_s=300.0" in log
    assert daemon.stop() == 0
    assert not path.exists()


def test_tcp_listener_refuses_foreign_host(tmp_path):
    port = free_port()
    daemon = Proc(tmp_path, KRASIS_HOST=f"127.0.0.1:{port}").wait_ready()
    try:
        assert tcp_listen_ports(daemon.proc.pid) == {port}
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/api/version", timeout=5).status_code == 200
        assert httpx.get(base + "/", headers={"Host": f"localhost:{port}"}).status_code == 200
        foreign = httpx.get(base + "/api/tags", headers={"Host": "attacker.example"}, timeout=5)
        assert foreign.status_code == 403 and "attacker.example" in foreign.json()["error"]
        origin = httpx.get(base + "/api/tags", headers={"Origin": "http://attacker.example"})
        assert origin.status_code == 403
        local = httpx.get(base + "/api/tags", headers={"Origin": "http://localhost:3000"})
        assert local.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        daemon.stop()


def test_socket_group_mode_0660(tmp_path):
    import grp

    from krasisd.server import bind_unix_socket

    group = grp.getgrgid(os.getgid()).gr_name
    sock = bind_unix_socket(tmp_path / "s.sock", group)
    try:
        info = (tmp_path / "s.sock").stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()
    finally:
        sock.close()


def test_preload_and_full_queue_gives_503(tmp_path, fake_env):
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    cfg = fake_config(tmp_path, preload=["fake"], max_queue=1, num_parallel=1)
    daemon = DaemonThread(cfg, FakeRegistry(tmp_path / "models")).start()
    try:
        with daemon.client() as http:
            deadline = time.monotonic() + 20
            while not http.get("/api/ps").json()["models"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [m["model"] for m in http.get("/api/ps").json()["models"]] == ["fake:latest"]
            long = {"model": "fake", "prompt": "x", "options": {"num_predict": 100000}}
            statuses = []

            def queued() -> None:
                with daemon.client() as second:
                    statuses.append(second.post("/api/generate", json={
                        **long, "options": {"num_predict": 1}}).status_code)

            waiting = threading.Thread(target=queued)
            with daemon.client() as first, first.stream("POST", "/api/generate", json=long) as r1:
                lines = r1.iter_lines()  # keep the iterator: dropping it closes the stream
                next(lines)  # running
                waiting.start()
                deadline = time.monotonic() + 10
                while not daemon.daemon.scheduler.loaded["fake:latest"].waiting and \
                        time.monotonic() < deadline:
                    time.sleep(0.01)
                refused = http.post("/api/generate", json=long)
                assert refused.status_code == 503
                assert "KRASIS_MAX_QUEUE" in refused.json()["error"]
                refused_v1 = http.post("/v1/completions", json={"model": "fake", "prompt": "x"})
                assert refused_v1.status_code == 503
                assert "KRASIS_MAX_QUEUE" in refused_v1.json()["error"]["message"]
            waiting.join(20)  # the first client left: the queued request runs
            assert statuses == [200]
    finally:
        daemon.close()
