"""Shared fixtures: every test gets its own KRASIS_HOME and runtime dir."""

import pytest


@pytest.fixture(autouse=True)
def krasis_home(tmp_path, monkeypatch):
    home = tmp_path / "krasis-home"
    home.mkdir()
    monkeypatch.setenv("KRASIS_HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
