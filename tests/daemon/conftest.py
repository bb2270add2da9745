"""Daemon test fixtures: one in-process krasisd per module, serving the fake engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def fake_env():
    """Runner processes import tests/daemon/fake_engine.py; tokens take 2 ms."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "KRASIS_FAKE_DELAY_S")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), saved["PYTHONPATH"]]))
    os.environ["KRASIS_FAKE_DELAY_S"] = "0.002"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fake_env):
    """A real daemon (server, scheduler, runner processes) over a fake registry and engine."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    root = tmp_path_factory.mktemp("krasisd")
    registry = FakeRegistry(root / "models")
    thread = DaemonThread(fake_config(root), registry).start()
    yield thread
    thread.close()
