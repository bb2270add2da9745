"""KRASIS_HOST in Ollama's forms (daemon and client alike), a clear error for a value that
cannot be read, and KRASIS_ALLOWED_HOSTS entries written as URLs or with a port."""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from harness import Proc
from krasis import cli
from krasis.client import Client, KrasisError

from krasisd.app import host_allowed
from krasisd.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(60)

# OLLAMA_HOST's forms: scheme optional, host 127.0.0.1 by default, port 11434 by default.
FORMS = [
    ("http://127.0.0.1:11434", ("127.0.0.1", 11434)),
    ("http://127.0.0.1:11434/", ("127.0.0.1", 11434)),
    ("HTTP://localhost:8080", ("localhost", 8080)),
    (":11434", ("127.0.0.1", 11434)),
    ("127.0.0.1:11434", ("127.0.0.1", 11434)),
    ("127.0.0.1", ("127.0.0.1", 11434)),
    ("localhost", ("localhost", 11434)),
    ("http://localhost", ("localhost", 11434)),
    ("[::1]:9000", ("::1", 9000)),
    ("http://[::1]:9000/", ("::1", 9000)),
    ("::1", ("::1", 11434)),
    (" 127.0.0.1:8000 ", ("127.0.0.1", 8000)),
]

BAD = {
    "https://127.0.0.1:11434": "https:// is not supported",
    "127.0.0.1:abc": "invalid port 'abc'",
    "127.0.0.1:0": "invalid port '0'",
    "localhost:99999": "invalid port '99999'",
    "11434": "for a port alone, write :11434",
    "http://127.0.0.1:11434/api": "a path (/api)",
    "local host:1": "is not a host name",
    "[::1:9000": "write an IPv6 address as [::1]:11434",
    "fe80::zz": "is not an IPv6 address",
}


@pytest.mark.parametrize("value,address", FORMS)
def test_daemon_and_client_read_the_same_forms(tmp_path, monkeypatch, value, address):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_HOST": value})
    assert cfg.tcp_address == address
    monkeypatch.delenv("KRASIS_SOCKET", raising=False)
    monkeypatch.setenv("KRASIS_HOST", value)
    assert Client().tcp == address


@pytest.mark.parametrize("value,reason", sorted(BAD.items()))
def test_an_unreadable_host_is_an_error_not_a_listener_left_off(tmp_path, value, reason):
    with pytest.raises(ConfigError) as raised:
        load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_HOST": value})
    assert f"KRASIS_HOST={value!r}" in str(raised.value) and reason in str(raised.value)
    with pytest.raises(KrasisError) as raised:
        Client(host=value)
    assert reason in str(raised.value)


def test_the_config_file_host_is_read_alike(tmp_path):
    (tmp_path / "config.toml").write_text('host = "http://127.0.0.1:8123/"\n')
    assert load_config({"KRASIS_HOME": str(tmp_path)}).tcp_address == ("127.0.0.1", 8123)
    (tmp_path / "config.toml").write_text('host = "127.0.0.1:none"\n')
    with pytest.raises(ConfigError):
        load_config({"KRASIS_HOME": str(tmp_path)})


def test_off_values_stay_off(tmp_path):
    for value in ("off", "0", "false", "no"):
        assert load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_HOST": value}).host == ""


def test_krasisd_refuses_to_start_with_one_error_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "KRASIS_HOME": str(tmp_path),
           "XDG_RUNTIME_DIR": str(tmp_path / "run"), "KRASIS_HOST": "https://127.0.0.1:11434"}
    done = subprocess.run([sys.executable, "-m", "krasisd"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("krasisd: KRASIS_HOST='https://127.0.0.1:11434' cannot be read")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "run" / "krasis" / "krasisd.sock").exists()


def test_a_port_in_use_is_one_error_line(tmp_path):
    with socket.socket() as holder:  # another server (Ollama, say) on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "KRASIS_HOME": str(tmp_path),
               "XDG_RUNTIME_DIR": str(tmp_path / "run"), "KRASIS_HOST": f"http://:{port}"}
        done = subprocess.run([sys.executable, "-m", "krasisd"], env=env, capture_output=True,
                              text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"krasisd: cannot listen on KRASIS_HOST=127.0.0.1:{port}: the port is in use (Ollama, "
        "or another server, may hold it); choose another, e.g. KRASIS_HOST=:11435")


def test_the_client_names_a_bad_host_in_the_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KRASIS_SOCKET", raising=False)
    monkeypatch.delenv("KRASIS_HOST", raising=False)
    (tmp_path / "krasis-home" / "config.toml").write_text('host = "https://x"\n')
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: KRASIS_HOST='https://x' cannot be read") and "Traceback" not in err


@pytest.mark.parametrize("entry", [
    "host.docker.internal", "host.docker.internal:11434", "http://host.docker.internal:11434/",
    "Host.Docker.Internal", "host.docker.internal.",
])
def test_allowed_hosts_entries_are_host_names(tmp_path, entry):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_ALLOWED_HOSTS": f"{entry},*"})
    assert cfg.allowed_hosts == ["host.docker.internal", "*"]
    daemon = SimpleNamespace(config=load_config({"KRASIS_HOME": str(tmp_path),
                                                 "KRASIS_ALLOWED_HOSTS": entry}),
                             extra_hosts=set())
    for header in ("host.docker.internal:11434", "host.docker.internal",
                   "HOST.DOCKER.INTERNAL:11434", "host.docker.internal.:11434"):
        assert host_allowed(header, daemon), header
    assert not host_allowed("attacker.example:11434", daemon)
    assert not host_allowed("host.docker.internal.attacker.example", daemon)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_url_host_listens_and_an_allowed_docker_host_gets_through(tmp_path, monkeypatch,
                                                                     capsys):
    port = free_port()
    daemon = Proc(tmp_path, KRASIS_HOST=f"http://127.0.0.1:{port}/",
                  KRASIS_ALLOWED_HOSTS=f"host.docker.internal:{port}").wait_ready()
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/api/version", timeout=5).status_code == 200
        docker = httpx.get(base + "/api/tags", timeout=5,
                           headers={"Host": f"host.docker.internal:{port}"})
        assert docker.status_code == 200, docker.text
        foreign = httpx.get(base + "/api/tags", headers={"Host": "attacker.example"}, timeout=5)
        assert foreign.status_code == 403
        monkeypatch.delenv("KRASIS_SOCKET", raising=False)
        monkeypatch.setenv("KRASIS_HOST", f":{port}")
        assert cli.main(["list"]) == 0
        assert capsys.readouterr().out.startswith("NAME")
    finally:
        daemon.stop()
    assert "not a loopback" not in daemon.stderr()
