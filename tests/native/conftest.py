"""Fixtures for the native CPU expert tests: a tiny random DeepSeek-V2 checkpoint."""

import pytest
from native_models import save_tiny_deepseek


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-deepseek")
    save_tiny_deepseek(path)
    return path
