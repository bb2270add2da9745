"""Fixtures the engine tests share: one tiny DeepSeek-V2 checkpoint and its CPU cache, built
once per session for every test file that reads them (they only read: a test that damages or
edits a cache works on a copy)."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import make_hf_model, save_hf_model


@pytest.fixture(scope="session")
def v2_model_dir(tmp_path_factory):
    """A saved "v2-group-qlora" checkpoint (MLA with q LoRA, group-limited routing)."""
    torch.set_num_threads(1)
    return save_hf_model(make_hf_model("v2-group-qlora"), tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="session")
def v2_int8_cache(v2_model_dir, tmp_path_factory):
    """(folder, manifest) of the INT8 CPU cache of ``v2_model_dir``, group size 32, with the
    dense linears."""
    from krasisd.engine.cpu_cache import build_cpu_cache

    out_dir = tmp_path_factory.mktemp("caches") / "cpu-int8"
    return out_dir, build_cpu_cache(v2_model_dir, out_dir, quant="int8", group_size=32)
