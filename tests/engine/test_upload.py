"""The safetensors header reader of krasisd.engine.upload (the device copy is in tests/gpu)."""

import pytest
import torch
from safetensors.torch import save_file

from krasisd.engine.errors import ModelLoadError
from krasisd.engine.upload import header_spans


def test_spans_point_at_each_tensors_bytes(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.arange(5, dtype=torch.int64), "c": torch.ones(4, dtype=torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    spans = header_spans(path)
    assert set(spans) == set(tensors)  # __metadata__ is not a tensor
    raw = path.read_bytes()
    for name, tensor in tensors.items():
        span = spans[name]
        assert (span.dtype, span.shape, span.nbytes) == (
            tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())
        stored = torch.frombuffer(bytearray(raw[span.offset:span.offset + span.nbytes]),
                                  dtype=span.dtype).reshape(span.shape)
        assert torch.equal(stored, tensor)


@pytest.mark.parametrize("content", [b"", b"\xff" * 8 + b"{}", b"\x05\0\0\0\0\0\0\0{bad}"])
def test_bad_headers_raise_a_load_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        header_spans(path)


def test_unknown_dtype_is_named(tmp_path):
    path = tmp_path / "odd.safetensors"
    header = b'{"x": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(ModelLoadError, match="F8_E5M2"):
        header_spans(path)
