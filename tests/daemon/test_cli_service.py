"""`krasis service install`: where the units go, what ExecStart= becomes, what it prints."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from krasis import cli, service

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch):
    """The installer must never run anything (no sudo, no systemctl)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"service install ran a command: {args}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_user_install_writes_to_the_config_dir(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code, out, _ = run_cli(monkeypatch, capsys, "service", "install", "--user",
                           "--krasisd", "/opt/krasis/bin/krasisd")
    assert code == 0
    folder = tmp_path / "config" / "systemd" / "user"
    unit = (folder / "krasisd.service").read_text()
    assert "ExecStart=/opt/krasis/bin/krasisd\n" in unit
    source = (REPO / "systemd" / "user" / "krasisd.socket").read_text()
    assert (folder / "krasisd.socket").read_text() == source
    assert (folder / "krasisd.service").stat().st_mode & 0o777 == 0o644
    assert f"wrote {folder / 'krasisd.service'}" in out
    assert "systemctl --user daemon-reload" in out
    assert "systemctl --user enable --now krasisd.socket" in out


def test_system_install_prints_the_root_commands(monkeypatch, capsys, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "service", "install", "--dest", str(tmp_path),
                           "--krasisd", "/usr/local/bin/krasisd")
    assert code == 0
    unit = (tmp_path / "krasisd.service").read_text()
    assert "User=krasis" in unit and "ExecStart=/usr/local/bin/krasisd\n" in unit
    assert "systemctl daemon-reload" in out
    assert "systemctl enable --now krasisd.socket" in out
    assert "systemctl --user" not in out


def test_dry_run_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code, out, _ = run_cli(monkeypatch, capsys, "service", "install", "--user", "--dry-run")
    assert code == 0
    assert not (tmp_path / "config").exists()
    assert "[Service]" in out and "ListenStream=%t/krasis/krasisd.sock" in out
    assert "Then run:" in out


def test_exec_start_is_this_installations_krasisd():
    command = service.find_krasisd()
    assert Path(command.split()[0].strip('"')).is_absolute()
    assert "krasisd" in command


def test_arguments_after_exec_start_are_kept():
    text = "[Service]\nExecStart=/usr/bin/krasisd --flag value\nUser=krasis\n"
    rendered = service.render_unit(text, '"/opt/my env/krasisd"')
    assert 'ExecStart="/opt/my env/krasisd" --flag value\n' in rendered
    assert "User=krasis" in rendered


def test_home_directory_install_warns_for_the_system_service(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "service", "install", "--dest", str(tmp_path),
                           "--krasisd", "/home/me/venv/bin/krasisd")
    assert code == 0
    assert "Warning:" in err and "ProtectHome" in err


def test_unwritable_target_is_one_error_line(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "service", "install", "--dest",
                           str(blocker / "units"))
    assert code == 1
    assert err.startswith("Error: cannot write to ") and err.count("\n") == 1
    assert not list(tmp_path.glob("**/krasisd.service"))
