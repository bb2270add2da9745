"""Connection floods: a cap with a quick 503 beyond it, header and body timeouts, and one log
line (no traceback) when accept() runs out of descriptors. Streams are never cut."""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import socket
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(60)

CAP = 4
TIMEOUT_S = 2.0  # header and body timeouts; long enough that a loaded machine is not late
TOKEN_S = 0.002  # the fake engine's time per token (conftest's KRASIS_FAKE_DELAY_S)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def limited(tmp_path_factory, fake_env):
    """A daemon with room for CAP connections, TIMEOUT_S header and body timeouts, and TCP."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    root = tmp_path_factory.mktemp("limited")
    cfg = fake_config(root, max_connections=CAP, header_timeout_s=TIMEOUT_S,
                      body_timeout_s=TIMEOUT_S, host=f"127.0.0.1:{_free_port()}")
    thread = DaemonThread(cfg, FakeRegistry(root / "models")).start()
    yield thread
    thread.close()


def _connect(daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(daemon.socket_path))
    return sock


def _closed_within(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the daemon closes ``sock`` (reading and dropping what it sends)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    while sock.recv(4096):
        pass
    return time.monotonic() - started


def test_connections_beyond_the_cap_get_a_quick_503_and_idle_ones_are_closed(limited):
    idle = [_connect(limited) for _ in range(CAP)]
    try:
        time.sleep(0.2)  # accepted: the daemon now holds CAP connections
        started = time.monotonic()
        with limited.client(timeout_s=5) as http:
            refused = http.get("/api/version")
        assert refused.status_code == 503
        assert "KRASIS_MAX_CONNECTIONS=4" in refused.json()["error"]
        host, port = limited.cfg.tcp_address
        over_tcp = httpx.get(f"http://{host}:{port}/api/version", timeout=5)
        assert over_tcp.status_code == 503  # one cap for every listener
        assert time.monotonic() - started < TIMEOUT_S * 0.8  # refused at once, not queued
        for sock in idle:  # no request came: closed after the header timeout
            assert _closed_within(sock, 5) < TIMEOUT_S * 3
    finally:
        for sock in idle:
            sock.close()
    with limited.client() as http:
        assert http.get("/api/version").status_code == 200  # room again


def test_headers_sent_slowly_are_cut_off(limited):
    sock = _connect(limited)
    try:
        started = time.monotonic()
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n")
        while time.monotonic() - started < 5:  # one header line every 0.2 s, never the end
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                break
            sock.sendall(b"X-Slow: 1\r\n")
        assert sock.recv(4096) == b""  # closed without an answer
        assert TIMEOUT_S * 0.8 < time.monotonic() - started < TIMEOUT_S * 3
    finally:
        sock.close()


def test_body_sent_slowly_gets_408(limited):
    sock = _connect(limited)
    try:
        started = time.monotonic()
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        sock.settimeout(5)
        answer = sock.recv(65536)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert "KRASIS_BODY_TIMEOUT" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert TIMEOUT_S * 0.8 < elapsed < TIMEOUT_S * 3


def test_a_stream_outlives_the_timeouts(limited):
    tokens = int(TIMEOUT_S * 1.5 / TOKEN_S)
    started = time.monotonic()
    with limited.client() as http, http.stream("POST", "/api/generate", json={
            "model": "fake", "prompt": "long", "options": {"num_predict": tokens}}) as response:
        lines = [json.loads(line) for line in response.iter_lines()]
    assert time.monotonic() - started > TIMEOUT_S * 1.3
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == tokens


def test_a_request_over_the_cap_is_answered_once_there_is_room(limited):
    with limited.client() as http:  # one keep-alive connection, used twice
        assert http.get("/api/version").status_code == 200
        assert http.get("/api/tags").status_code == 200


def test_accept_failures_log_one_line_without_traceback(tmp_path, fake_env, caplog):
    """The daemon's process runs out of descriptors: asyncio's accept() fails every second."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    daemon = DaemonThread(fake_config(tmp_path), FakeRegistry(tmp_path / "models")).start()
    caplog.set_level(logging.INFO)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients: list[socket.socket] = []
    try:
        # The test and the daemon share this process's descriptors: room for a few more.
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
        try:
            for _ in range(40):
                try:
                    clients.append(_connect(daemon))
                except OSError:  # EMFILE here too: the rest wait in the listen backlog
                    break
            time.sleep(2.5)  # asyncio retries a failed accept() every second
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for sock in clients:
                sock.close()
        accept_logs = [r for r in caplog.records if "accept" in r.getMessage()]
        assert len(accept_logs) == 1, [r.getMessage() for r in accept_logs]
        assert accept_logs[0].exc_info is None
        assert accept_logs[0].error == "EMFILE"  # the record's one field, not a traceback
        with daemon.client() as http:  # accepting again
            assert http.get("/api/version").status_code == 200
    finally:
        daemon.close()


def test_accept_error_log_counts_what_it_does_not_print(caplog):
    import asyncio
    import errno

    from krasisd.connections import AcceptErrorLog

    async def flood() -> None:
        handler = AcceptErrorLog(interval_s=0.2)
        loop = asyncio.get_running_loop()
        for _ in range(50):
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": OSError(errno.EMFILE, "Too many open files")})
        await asyncio.sleep(0.3)

    caplog.set_level(logging.INFO)
    asyncio.run(flood())
    messages = [(r.getMessage(), getattr(r, "failures", None)) for r in caplog.records]
    assert messages == [("accept() failed; new connections wait", None),
                        ("accept() kept failing", 49)]


def test_limit_settings_are_read_and_bad_values_fall_back(tmp_path, caplog):
    from krasisd.config import load_config

    env = {"KRASIS_HOME": str(tmp_path), "KRASIS_MAX_CONNECTIONS": "100",
           "KRASIS_HEADER_TIMEOUT": "5s", "KRASIS_BODY_TIMEOUT": "2m",
           "KRASIS_KEEP_ALIVE": "99999999999h"}
    cfg = load_config(env)
    assert (cfg.max_connections, cfg.header_timeout_s, cfg.body_timeout_s) == (100, 5.0, 120.0)
    assert cfg.keep_alive_s == float("inf")  # beyond 100 years: forever
    bad = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_MAX_CONNECTIONS": "0",
                       "KRASIS_HEADER_TIMEOUT": "-1", "KRASIS_BODY_TIMEOUT": "1e999"})
    assert (bad.max_connections, bad.header_timeout_s, bad.body_timeout_s) == (2048, 30.0, 60.0)
    warned = {r.setting for r in caplog.records if r.getMessage().startswith("bad setting")}
    assert warned == {"KRASIS_MAX_CONNECTIONS", "KRASIS_HEADER_TIMEOUT", "KRASIS_BODY_TIMEOUT"}


def test_the_cap_leaves_descriptors_for_the_daemon(caplog):
    from krasisd.connections import RESERVED_FDS, connection_cap

    assert connection_cap(2048, 1_048_576) == 2048
    assert connection_cap(2048, 1024) == 1024 - RESERVED_FDS
    assert "lowered" in caplog.text
    assert connection_cap(10, 20) == 1  # never 0: the daemon must still answer
