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


class _FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def cpu_staging(monkeypatch):
    """read_to_device's pipeline on the CPU: tiny staging buffers, CUDA events and streams that
    do nothing (copies into CPU tensors are synchronous)."""
    import contextlib

    from krasisd.engine import upload

    empty = torch.empty
    monkeypatch.setattr(upload, "STAGING_BYTES", 16)
    monkeypatch.setattr(upload, "STAGING_BUFFERS", 2)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: empty(*a, **kw))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeEvent())
    return upload


def _weights(tmp_path):
    tensors = {"a": torch.arange(40, dtype=torch.float32), "b": torch.arange(9, dtype=torch.int64)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_chunks_rotate_through_the_staging_buffers(tmp_path, cpu_staging):
    path, tensors = _weights(tmp_path)
    out = cpu_staging.read_to_device(path, list(tensors), "cpu")
    assert all(torch.equal(out[name], tensor) for name, tensor in tensors.items())


@pytest.mark.timeout(20)
def test_a_failed_read_raises_instead_of_hanging(tmp_path, cpu_staging, monkeypatch):
    path, tensors = _weights(tmp_path)
    pread_exact = cpu_staging._pread_exact

    def fail_first(fd, view, offset, path_):
        if offset == cpu_staging.header_spans(path)["a"].offset:
            raise ModelLoadError("w.safetensors ended early")
        pread_exact(fd, view, offset, path_)

    monkeypatch.setattr(cpu_staging, "_pread_exact", fail_first)
    with pytest.raises(ModelLoadError, match="ended early"):
        cpu_staging.read_to_device(path, list(tensors), "cpu")
