"""Each checkpoint's safetensors header is read and parsed once per load: the loader's index
carries the parsed spans, and the reads straight to a GPU use them. The CUDA branch runs here
on the CPU, through upload's real pipeline with stand-ins for the CUDA events and streams."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from krasisd.engine import loader, upload
from krasisd.engine.errors import ModelLoadError


class _FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def two_files(v2_model_dir, tmp_path):
    """The tiny checkpoint split over two safetensors files."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes((v2_model_dir / "config.json").read_bytes())
    tensors = load_file(v2_model_dir / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, model_dir / "part-a.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, model_dir / "part-b.safetensors")
    return model_dir


@pytest.fixture
def header_reads(monkeypatch):
    """File name -> how often its safetensors header was read."""
    reads, read = Counter(), upload.safetensors_header

    def counting(path):
        reads[path.name] += 1
        return read(path)

    monkeypatch.setattr(upload, "safetensors_header", counting)
    return reads


@pytest.fixture
def cuda_on_the_cpu(monkeypatch):
    """load_model's CUDA branch with upload's pipeline copying into CPU tensors: small staging
    buffers, no pinned memory, CUDA events and streams that do nothing."""
    empty = torch.empty
    monkeypatch.setattr(upload, "STAGING_BYTES", 4096)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: empty(*a, **kw))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeEvent())
    to_device = upload.read_to_device
    monkeypatch.setattr(loader, "read_to_device",
                        lambda path, names, device, spans=None: to_device(path, names, "cpu",
                                                                           spans))

    def no_safe_open(*args, **kwargs):
        raise AssertionError("the CUDA branch opened a checkpoint with safetensors")

    monkeypatch.setattr(loader, "safe_open", no_safe_open)
    return torch.device("cuda")


def test_a_cuda_load_reads_each_header_once(two_files, header_reads, cuda_on_the_cpu):
    loaded = loader.load_model(two_files, device=cuda_on_the_cpu)
    assert header_reads == {"part-a.safetensors": 1, "part-b.safetensors": 1}
    stored = {**load_file(two_files / "part-a.safetensors"),
              **load_file(two_files / "part-b.safetensors")}
    state = loaded.model.state_dict()
    assert all(torch.equal(state[name], stored[name]) for name in state)
    experts = {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight": weights[p][e]
               for layer, weights in loaded.expert_weights.items()
               for p, proj in enumerate(loader.EXPERT_PROJS) for e in range(len(weights[p]))}
    assert len(state) + len(experts) == len(stored)
    assert all(torch.equal(experts[name], stored[name]) for name in experts)


def test_a_cpu_load_reads_each_header_once(two_files, header_reads):
    loader.load_model(two_files)  # the tensors themselves through safetensors' mapping
    assert header_reads == {"part-a.safetensors": 1, "part-b.safetensors": 1}


def test_the_index_holds_the_spans_the_upload_reads(two_files):
    index = loader.read_headers(loader.weight_files(two_files))
    for path in loader.weight_files(two_files):
        spans = upload.header_spans(path)
        assert {n: i.span for n, i in index.items() if i.path == path} == spans
    info = index["model.embed_tokens.weight"]
    assert (info.dtype, info.shape) == ("F32", (96, 64))


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-1000], "truncated"),
    (lambda data: data[:8] + b"\x00garbage{{{{{{{{" + data[24:], "corrupt safetensors file"),
])
def test_a_damaged_file_fails_at_the_header_on_both_paths(two_files, damage, message,
                                                          cuda_on_the_cpu):
    path = two_files / "part-b.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelLoadError, match=f"{message}.*part-b|part-b.*{message}"):
        loader.read_headers(loader.weight_files(two_files))


def test_a_span_that_disagrees_with_its_shape_is_refused(tmp_path):
    header = b'{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ModelLoadError, match="odd.safetensors.*holds 8 bytes"):
        upload.parse_header(path)
