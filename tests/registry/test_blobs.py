"""Uploaded blobs in the store: checked writes, creates from them, and the daily prune."""

import os
import time

import pytest
from krasis_registry import PullError, Registry
from krasis_registry import blobs as blobs_module


@pytest.fixture
def reg(krasis_home):
    registry = Registry()
    yield registry
    registry.close()


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _upload(reg: Registry, data: bytes, digest: str | None = None) -> None:
    writer = reg.blob_writer(digest or _digest(data))
    for start in range(0, len(data), 3):
        writer.write(data[start:start + 3])
    writer.finish()


def test_blob_written_checked_and_private(reg, krasis_home):
    _upload(reg, b"some bytes")
    assert reg.has_blob(_digest(b"some bytes"))
    assert reg.has_blob(_digest(b"some bytes").replace(":", "-"))  # Ollama's file form
    [path] = (krasis_home / "blobs").iterdir()
    assert path.read_bytes() == b"some bytes" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(PullError, match="digest mismatch"):
        _upload(reg, b"other bytes", _digest(b"not these"))
    assert not reg.has_blob(_digest(b"not these"))
    assert list((krasis_home / "partials" / ".blobs").iterdir()) == []  # nothing left
    writer = reg.blob_writer(_digest(b"x"))
    writer.write(b"half")
    writer.abort()
    assert list((krasis_home / "partials" / ".blobs").iterdir()) == []
    for bad in ("sha256:abc", "md5:" + "0" * 64, "sha256:" + "G" * 64, "../../etc"):
        with pytest.raises(ValueError, match="invalid digest"):
            reg.has_blob(bad)


def test_create_from_blobs_links_and_uses_them_up(reg, tiny_model_dir, krasis_home):
    files = {}
    for path in tiny_model_dir.iterdir():
        _upload(reg, path.read_bytes())
        files[path.name] = _digest(path.read_bytes())
    inodes = {name: (krasis_home / "blobs" / digest.replace(":", "-")).stat().st_ino
              for name, digest in files.items()}
    events = list(reg.create_from_blobs("up", files, build_caches=False, system="s",
                                        options={"num_ctx": 64}))
    assert events[-1] == {"status": "success"}
    shown = reg.show("up")
    assert shown["state"] == "ready" and shown["system"] == "s"
    assert shown["options"] == {"num_ctx": 64}
    for name, inode in inodes.items():  # the blob's inode became the model's file
        assert (reg.model_dir("up") / name).stat().st_ino == inode
    assert not any(reg.has_blob(d) for d in files.values())
    assert not (krasis_home / "partials" / "up").exists()  # no staging folder left
    with pytest.raises(PullError, match="upload it first"):
        reg.create_from_blobs("again", files)


def test_unused_blobs_pruned_after_a_day(krasis_home):
    Registry().close()
    old, fresh = krasis_home / "blobs" / ("sha256-" + "1" * 64), \
        krasis_home / "blobs" / ("sha256-" + "2" * 64)
    for path in (old, fresh):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    day_ago = time.time() - blobs_module.BLOB_MAX_AGE_S - 10
    os.utime(old, (day_ago, day_ago))
    Registry().close()
    assert not old.exists() and fresh.exists()
