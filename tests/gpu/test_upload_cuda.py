"""read_to_device against safetensors' own loader, on a CUDA device."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from krasisd.engine import upload
from krasisd.engine.errors import ModelLoadError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(300, 129, generator=g).bfloat16(),
               "f32": torch.randn(77, generator=g), "ids": torch.arange(1000),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.5)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("staging_bytes", [1 << 20, 4096, 1000])  # one chunk; many; odd sizes
def test_tensors_equal_safetensors_load(tmp_path, monkeypatch, staging_bytes):
    monkeypatch.setattr(upload, "STAGING_BYTES", staging_bytes)
    path = _file(tmp_path)
    expected = load_file(str(path))
    got = upload.read_to_device(path, list(expected), "cuda")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].device.type == "cuda" and got[name].dtype == tensor.dtype
        assert torch.equal(got[name].cpu(), tensor), name


def test_a_subset_and_a_truncated_file(tmp_path):
    path = _file(tmp_path)
    assert set(upload.read_to_device(path, ["ids"], "cuda")) == {"ids"}
    with pytest.raises(ModelLoadError, match="no tensor nope"):
        upload.read_to_device(path, ["nope"], "cuda")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        upload.read_to_device(path, ["big", "f32", "ids", "scalar"], "cuda")


def test_given_its_parsed_header_the_file_is_read_once(tmp_path, monkeypatch):
    path = _file(tmp_path)
    spans = upload.parse_header(path)

    def no_second_read(path_):
        raise AssertionError("the header was read again")

    monkeypatch.setattr(upload, "safetensors_header", no_second_read)
    expected = load_file(str(path))
    got = upload.read_to_device(path, list(expected), "cuda", spans)
    assert all(torch.equal(got[name].cpu(), tensor) for name, tensor in expected.items())
