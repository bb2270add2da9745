"""The unit files in systemd/ pass `systemd-analyze verify`, as `krasis service install` writes them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from krasis import service

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing")
REPO = Path(__file__).resolve().parents[2]


def verify(folder: Path, user: bool, runtime_dir: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify on both units; --user needs an existing XDG_RUNTIME_DIR."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify",
               str(folder / "krasisd.service"), str(folder / "krasisd.socket")]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime_dir),
                               "HOME": str(runtime_dir)})


def installed(tmp_path: Path, user: bool) -> Path:
    """The units as `krasis service install` renders them, ExecStart= an existing program."""
    plan = service.plan_install(user, dest=tmp_path / "units", krasisd=sys.executable)
    service.write_files(plan)
    return plan.target_dir


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_pass_verify(tmp_path, user):
    result = verify(installed(tmp_path, user), user, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_verify_catches_a_misspelled_directive(tmp_path):
    folder = installed(tmp_path, user=False)
    unit = folder / "krasisd.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    result = verify(folder, False, tmp_path / "run")
    assert "Unknown key 'ProtectSytem'" in result.stderr


def test_verify_catches_a_missing_program(tmp_path):
    folder = installed(tmp_path, user=False)
    unit = folder / "krasisd.service"
    lines = [("ExecStart=/nonexistent/krasisd" if line.startswith("ExecStart=") else line)
             for line in unit.read_text().splitlines()]
    unit.write_text("\n".join(lines) + "\n")
    result = verify(folder, False, tmp_path / "run")
    assert result.returncode != 0
    assert "/nonexistent/krasisd" in result.stderr


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_system_units_carry_the_promised_settings():
    service_unit = unit_settings(REPO / "systemd" / "krasisd.service")
    socket_unit = unit_settings(REPO / "systemd" / "krasisd.socket")
    for key, value in [("Type", "notify"), ("NotifyAccess", "main"), ("User", "krasis"),
                       ("StateDirectory", "krasis"), ("RuntimeDirectory", "krasis"),
                       ("RuntimeDirectoryPreserve", "yes"), ("Restart", "on-failure"),
                       ("RestartPreventExitStatus", "2"),
                       ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")]:
        assert service_unit[key] == [value], key
    assert "KRASIS_HOME=/var/lib/krasis" in service_unit["Environment"]
    assert "KRASIS_SOCKET=/run/krasis/krasisd.sock" in service_unit["Environment"]
    assert service_unit["WatchdogSec"]
    assert socket_unit["ListenStream"] == ["/run/krasis/krasisd.sock"]
    assert socket_unit["SocketMode"] == ["0660"] and socket_unit["SocketGroup"] == ["krasis"]


def test_user_units_use_the_runtime_dir():
    service_unit = unit_settings(REPO / "systemd" / "user" / "krasisd.service")
    socket_unit = unit_settings(REPO / "systemd" / "user" / "krasisd.socket")
    assert socket_unit["ListenStream"] == ["%t/krasis/krasisd.sock"]
    assert service_unit["RestartPreventExitStatus"] == ["2"]  # a bad setting is not retried
    assert socket_unit["SocketMode"] == ["0600"]
    assert "KRASIS_SOCKET=%t/krasis/krasisd.sock" in service_unit["Environment"]
    assert service_unit["Type"] == ["notify"]
    assert "User" not in service_unit
