"""File helpers shared by the CPU- and GPU-format caches and the loader: checksums, atomic
replacement, safetensors headers."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

HASH_CHUNK_BYTES = 8 << 20
HEADER_LEN_BYTES = 8  # the little-endian size in front of a safetensors header
MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is not plausible
# where the engine keeps caches it builds itself (no cache folder given) inside a model folder
ENGINE_CACHE_DIR = ".krasis-cache"


def engine_cache_dir(model_dir, name: str) -> Path:
    """``model_dir/.krasis-cache/name``: a cache the engine finds or builds on its own."""
    return Path(model_dir) / ENGINE_CACHE_DIR / name


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (after its 8-byte little-endian length); the
    tensors' data starts at ``HEADER_LEN_BYTES + len(header)``. ValueError for an implausible
    header."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(HEADER_LEN_BYTES), "little")
        if size <= 0 or size > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: implausible safetensors header size {size}")
        header = handle.read(size)
    if len(header) != size:
        raise ValueError(f"{path.name}: file ends inside its header")
    return header


def sha256_file(path: Path) -> str:
    """Hex sha256 of a whole file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Put new_dir at out_dir; an old out_dir is moved aside first, then removed."""
    old_dir = None
    if out_dir.exists():
        old_dir = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old_dir)
    os.replace(new_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


@contextlib.contextmanager
def building_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` to build a cache in: it replaces ``out_dir`` when
    the block ends, and is removed instead when the block (or the replacement) fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def load_or_build(load: Callable[[], T], build: Callable[[], object],
                  invalid: type[Exception], what: str) -> T:
    """``load()``; when it raises ``invalid`` (missing, stale, corrupt), ``build()`` once and
    load again. A cache is never used half-built: builds replace the folder atomically."""
    try:
        return load()
    except invalid as exc:
        log.info("building %s (%s)", what, exc)
        build()
        return load()
