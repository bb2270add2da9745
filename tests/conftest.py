"""Shared fixtures: every test gets its own KRASIS_HOME and runtime dir."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. This must be decided before
# any test module imports a kernel: @triton.jit reads the variable when the kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def krasis_home(tmp_path, monkeypatch):
    home = tmp_path / "krasis-home"
    home.mkdir()
    monkeypatch.setenv("KRASIS_HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
