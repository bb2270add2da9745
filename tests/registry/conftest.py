"""Fixtures: a tiny random model, the stand-in hub serving it, a Registry pointed at both."""

import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakehub import FakeHub, Repo  # noqa: E402
from regtest import REPO_ID  # noqa: E402
from tinymodel import repo_files, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="session")
def tiny_files(tiny_model_dir) -> dict[str, bytes]:
    return repo_files(tiny_model_dir)


@pytest.fixture
def hub(tiny_files, tmp_path, monkeypatch):
    """The stand-in hub with REPO_ID; huggingface_hub is pointed at it and is online."""
    server = FakeHub()
    repo = Repo()
    repo.add_commit(tiny_files)
    server.repos[REPO_ID] = repo
    url = server.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH",
                        str(tmp_path / "hf-home" / "token"))
    yield server
    server.stop()
