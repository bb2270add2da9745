"""Tensors of a safetensors file straight onto a CUDA device, through pinned staging buffers.

A few threads ``pread`` the file into page-locked buffers (the kernel copies from the page
cache) while the device copies the filled ones asynchronously: one pass over the bytes, no
host-side tensors, no pageable copies. On the GPU machine 2.62 GB of dense weights reached
the device in 0.24 s in a fresh process with the page cache warm (0.17-0.19 s again in the
same process).

The header is the safetensors layout: an 8-byte little-endian length, then a JSON object of
``name -> {dtype, shape, data_offsets}`` with offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from krasisd.engine.cache_files import HEADER_LEN_BYTES, safetensors_header
from krasisd.engine.errors import ModelLoadError

STAGING_BYTES = 32 << 20  # per buffer: large reads, small pinned allocations
STAGING_BUFFERS = 4
READ_THREADS = 4
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class Span:
    """Where one tensor's bytes lie in its file."""

    offset: int  # from the start of the file
    nbytes: int
    dtype_name: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype; ValueError for one that cannot be read here."""
        dtype = DTYPES.get(self.dtype_name)
        if dtype is None:
            raise ValueError(f"dtype {self.dtype_name} is not one of {', '.join(DTYPES)}")
        return dtype


def parse_header(path: Path) -> dict[str, Span]:
    """Tensor name -> Span, from one read of the file's header; every span checked against
    the file's size and, for the dtypes in DTYPES, against its shape. ModelLoadError for a file
    that is not safetensors or is cut short."""
    try:
        raw = safetensors_header(path)
        base, size = HEADER_LEN_BYTES + len(raw), path.stat().st_size
        spans = {}
        for name, info in json.loads(raw).items():
            if name == "__metadata__":
                continue
            spans[name] = span = _span(name, info, base)
            if span.offset + span.nbytes > size:
                raise ValueError(f"the file is truncated: {name} ends past its end")
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path.name}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"corrupt safetensors file {path.name}: {exc}") from exc
    return spans


def _span(name: str, info: dict, base: int) -> Span:
    start, end = (int(offset) for offset in info["data_offsets"])
    shape = tuple(int(dim) for dim in info["shape"])
    if not 0 <= start <= end or min(shape, default=0) < 0:
        raise ValueError(f"tensor {name} has data_offsets {[start, end]}, shape {list(shape)}")
    span = Span(base + start, end - start, str(info["dtype"]), shape)
    dtype = DTYPES.get(span.dtype_name)  # others are checked by whoever reads them
    needed_bytes = span.nbytes if dtype is None else math.prod(shape) * dtype.itemsize
    if span.nbytes != needed_bytes:
        raise ValueError(f"tensor {name} holds {span.nbytes} bytes, its {span.dtype_name} "
                         f"shape {list(shape)} needs {needed_bytes}")
    return span


def header_spans(path: Path) -> dict[str, Span]:
    """parse_header, refusing a file with any tensor of a dtype not in DTYPES."""
    spans = parse_header(path)
    for name, span in spans.items():
        _dtype(name, span, path)
    return spans


def _dtype(name: str, span: Span, path: Path) -> torch.dtype:
    try:
        return span.dtype
    except ValueError as exc:
        raise ModelLoadError(f"{path.name}: tensor {name}: {exc}") from None


def read_to_device(path: Path, names, device: torch.device | str,
                   spans: dict[str, Span] | None = None) -> dict[str, torch.Tensor]:
    """``names`` of ``path`` as tensors on the CUDA ``device`` (their stored dtype);
    ``spans``: the file's parsed header when the caller has it (else it is read here)."""
    device = torch.device(device)
    spans = header_spans(path) if spans is None else spans
    missing = [n for n in names if n not in spans]
    if missing:
        raise ModelLoadError(f"{path.name} has no tensor {missing[0]}")
    size = path.stat().st_size
    out, chunks = {}, []  # chunks: (tensor name, offset in the tensor, file offset, bytes)
    for name in sorted(names, key=lambda n: spans[n].offset):  # file order: sequential reads
        span = spans[name]
        if span.offset + span.nbytes > size:
            raise ModelLoadError(f"{path.name} is truncated: {name} ends past the file's end")
        out[name] = torch.empty(span.shape, dtype=_dtype(name, span, path), device=device)
        for start in range(0, span.nbytes, STAGING_BYTES):
            chunks.append((name, start, span.offset + start,
                           min(STAGING_BYTES, span.nbytes - start)))
    if chunks:
        _stream(path, chunks, out, device)
    return out


def _stream(path: Path, chunks: list, out: dict, device: torch.device) -> None:
    """Read ``chunks`` into rotating pinned buffers on worker threads; copy each to its tensor
    on the device as soon as it is read (in order, on the current stream)."""
    nbuf = min(STAGING_BUFFERS, len(chunks))
    buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
               for _ in range(nbuf)]
    views = [memoryview(b.numpy()) for b in buffers]
    copied = [torch.cuda.Event() for _ in range(nbuf)]  # a buffer's last copy is done
    recorded = [threading.Event() for _ in range(len(chunks))]  # chunk i's copy is queued
    fd, futures = os.open(path, os.O_RDONLY), []

    def fill(i: int) -> None:
        _, _, file_offset, nbytes = chunks[i]
        if i >= nbuf:  # wait until the copy out of this buffer (chunk i - nbuf) has run
            recorded[i - nbuf].wait()
            copied[i % nbuf].synchronize()
        _pread_exact(fd, views[i % nbuf][:nbytes], file_offset, path)

    try:
        with torch.cuda.device(device), ThreadPoolExecutor(READ_THREADS) as pool:
            try:
                futures += [pool.submit(fill, i) for i in range(len(chunks))]
                stream = torch.cuda.current_stream(device)
                for i, (name, start, _, nbytes) in enumerate(chunks):
                    futures[i].result()
                    dst = out[name].view(-1).view(torch.uint8)[start:start + nbytes]
                    dst.copy_(buffers[i % nbuf][:nbytes], non_blocking=True)
                    copied[i % nbuf].record(stream)
                    recorded[i].set()
                stream.synchronize()
            except BaseException:
                # inside the pool's block: its exit waits for the readers, so those blocked on
                # a buffer must be let go first
                for future in futures:
                    future.cancel()
                for flag in recorded:
                    flag.set()
                raise
    finally:
        os.close(fd)


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ModelLoadError(f"{path.name} ended early at byte {offset + done}")
        done += got
