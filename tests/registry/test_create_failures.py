"""A create or pull that fails leaves no model marked ready: corrupt weights, absurd sizes."""

import json
import shutil
import struct
import time

import pytest
from fakehub import Repo
from krasis_registry import ModelNotFound, PullError, Registry
from krasis_registry.create import bundled_dir

EXPERT = "model.layers.1.mlp.experts.0.gate_proj.weight"


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(bundled_dir("krasis-tiny"), out)
    return out


def _header(path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length]), data


def _write_header(path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _assert_failed_not_listed(reg: Registry, name: str, match: str) -> None:
    shown = reg.show(name)
    assert shown["state"] == "failed" and match in shown["error"]
    assert reg.list() == []
    with pytest.raises(ModelNotFound, match="not ready"):
        reg.model_dir(name)


def test_truncated_weights_fail_the_create(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    reg = Registry(quant="none")
    with pytest.raises(PullError, match="not a valid safetensors file.*truncated"):
        list(reg.create("m", folder))
    _assert_failed_not_listed(reg, "m:latest", "truncated")


@pytest.mark.parametrize("change, match", [
    (lambda h: h[EXPERT].update(data_offsets=[0, 1 << 40]), "past the file's"),
    (lambda h: h[EXPERT].update(data_offsets=[9, 1]), "bad data offsets"),
    (lambda h: h[EXPERT].update(shape=[128, 193]), "should take"),
    (lambda h: h[EXPERT].update(shape="big"), "bad shape"),
])
def test_a_header_that_does_not_describe_the_file_fails_the_create(folder, change, match):
    weights = folder / "model.safetensors"
    length, header, data = _header(weights)
    change(header)
    _write_header(weights, header, data[8 + length:])
    reg = Registry(quant="none")
    with pytest.raises(PullError, match=match):
        list(reg.create("m", folder))
    _assert_failed_not_listed(reg, "m:latest", match)


def test_weights_the_cache_builder_cannot_read_leave_the_model_failed(folder):
    """A whole file whose tensor has the wrong shape for the config: only the real builder
    finds out; the model must not stay ready (each request would start a failing runner)."""
    weights = folder / "model.safetensors"
    length, header, data = _header(weights)
    header[EXPERT]["shape"] = header[EXPERT]["shape"][::-1]  # same bytes, wrong layout
    _write_header(weights, header, data[8 + length:])
    reg = Registry(quant="int8")
    with pytest.raises(PullError, match="cpu cache build failed"):
        list(reg.create("m", folder, build_caches=["cpu"]))
    _assert_failed_not_listed(reg, "m:latest", "cpu cache build failed")
    shutil.copyfile(bundled_dir("krasis-tiny") / "model.safetensors", weights)
    assert list(reg.create("m", folder, build_caches=False))[-1] == {"status": "success"}
    assert reg.show("m")["state"] == "ready"


@pytest.mark.parametrize("sizes, match", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is outside"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers must be an integer"),
    ({"vocab_size": -1}, "vocab_size = -1 is outside"),
    ({"num_hidden_layers": 1000, "hidden_size": 65536, "n_routed_experts": 4096,
      "moe_intermediate_size": 1 << 20}, "more than this machine can hold"),
])
def test_absurd_sizes_are_refused_before_anything_is_taken(folder, sizes, match):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **sizes}))
    reg = Registry(quant="int8")
    started = time.monotonic()
    with pytest.raises(PullError, match=match):
        list(reg.create("m", folder))
    assert time.monotonic() - started < 5
    with pytest.raises(ModelNotFound, match="not found"):  # no row, no files
        reg.show("m")
    assert not any((reg.home / "models").iterdir())


def test_a_pull_of_absurd_sizes_is_not_ready(hub, folder):
    config = json.loads((folder / "config.json").read_text())
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["config.json"] = json.dumps({**config, "num_hidden_layers": 10**9}).encode()
    repo = Repo()
    repo.add_commit(files)
    hub.repos["evil-org/layers"] = repo
    reg = Registry(quant="int8")
    with pytest.raises(PullError, match="num_hidden_layers = 1000000000 is outside"):
        list(reg.pull("evil-org/layers"))
    _assert_failed_not_listed(reg, "evil-org/layers:latest", "num_hidden_layers")
