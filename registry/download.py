"""Resumable byte transfer of one file: Range from the bytes on disk, then a checksum.

The partial file `<path>.part` sits in the model's partials folder, next to
`<path>.part.json`, which names the remote file (sha256 or git blob id and size) that the
bytes belong to. A restart continues from the partial's length; bytes on disk are read
back into the hash (once per pull: the retries within a pull keep the hash), never fetched
again. A partial is deleted only when it is known bad:
it belongs to another version of the file, or the finished file failed its checksum (both
logged and reported in the error).
"""

import hashlib
import json
import logging
import os
from collections.abc import Generator
from pathlib import Path

from .errors import PullError
from .hub import Hub, RemoteFile
from .store import make_private_dir

log = logging.getLogger(__name__)

READ_BYTES = 8 << 20


class Incomplete(PullError):
    """The body ended before the file did (the bytes received are kept)."""


class Hashes:
    """sha256 of the content, and git's blob sha1 (`blob <size>\\0` + content) for small files.

    `hashed_bytes` counts the bytes fed in. One Hashes lives across the resumed attempts of
    one pull, so a resume hashes only the bytes it receives; when the partial on disk is not
    the length the hashes saw, the partial is read back from its start instead.
    """

    def __init__(self, remote: RemoteFile):
        self._remote = remote
        self.reset()

    def reset(self) -> None:
        """Forget every byte hashed so far."""
        self.sha256 = hashlib.sha256()
        # git's id is needed only where the hub gives no sha256 (small, non-LFS files)
        header = f"blob {self._remote.size_bytes}\0".encode()
        self.git = None if self._remote.sha256 else hashlib.sha1(header)
        self.hashed_bytes = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)
        self.hashed_bytes += len(data)


def _identity(remote: RemoteFile) -> dict:
    return {"path": remote.path, "size": remote.size_bytes, "sha256": remote.sha256,
            "blob_id": remote.blob_id}


def _discard(part: Path, meta: Path, reason: str) -> None:
    log.warning("discarding partial download %s: %s", part, reason)
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _prepare_partial(part: Path, remote: RemoteFile) -> int:
    """Bytes already on disk that belong to this remote file (0 when starting afresh)."""
    meta = part.with_name(part.name + ".json")
    make_private_dir(part.parent)
    if part.exists():
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != _identity(remote):
            _discard(part, meta, "it belongs to another version of the file")
        elif part.stat().st_size > remote.size_bytes:
            _discard(part, meta, "it is longer than the file")
    if not part.exists():
        meta.write_text(json.dumps(_identity(remote)))
        part.touch()
    return part.stat().st_size


def _hash_existing(part: Path, hashes: Hashes) -> None:
    with open(part, "rb") as handle:
        while block := handle.read(READ_BYTES):
            hashes.update(block)


def _catch_up(part: Path, have_bytes: int, hashes: Hashes) -> None:
    """Bring hashes to the partial's bytes: kept as they are when they saw exactly its length
    (a resume within the same pull), else read back from the start."""
    if hashes.hashed_bytes == have_bytes:
        if have_bytes:
            log.debug("%s: the first %d bytes are hashed already", part, have_bytes)
        return
    hashes.reset()
    _hash_existing(part, hashes)


def transfer(hub: Hub, url: str, remote: RemoteFile, part: Path,
             hashes: Hashes | None = None) -> Generator[int, None, str]:
    """Download remote into part, yielding bytes completed; verify; return its sha256 hex.

    Pass the same `hashes` to every attempt on one file to skip re-reading its partial.
    """
    have_bytes = _prepare_partial(part, remote)
    hashes = Hashes(remote) if hashes is None else hashes
    _catch_up(part, have_bytes, hashes)
    yield have_bytes
    if have_bytes < remote.size_bytes:
        headers = hub.headers()
        if have_bytes:
            headers["Range"] = f"bytes={have_bytes}-"
            log.info("resuming %s at byte %d of %d", remote.path, have_bytes, remote.size_bytes)
        with hub.stream(url, headers) as response:
            if have_bytes and response.status_code == 200:
                log.warning("server ignored Range for %s: starting over", remote.path)
                with open(part, "wb"):
                    pass
                have_bytes = 0
                hashes.reset()
            elif have_bytes:
                _check_content_range(response, have_bytes, remote.path)
            with open(part, "ab") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    hashes.update(chunk)
                    have_bytes += len(chunk)
                    if have_bytes > remote.size_bytes:
                        break
                    yield have_bytes
                handle.flush()
                os.fsync(handle.fileno())
    _verify(part, remote, have_bytes, hashes)
    return hashes.sha256.hexdigest()


def _check_content_range(response, have_bytes: int, path: str) -> None:
    content_range = response.headers.get("Content-Range", "")
    if response.status_code != 206 or not content_range.startswith(f"bytes {have_bytes}-"):
        raise PullError(
            f"the hub answered a resume of {path} at byte {have_bytes} with status "
            f"{response.status_code} and Content-Range {content_range!r}; pull again"
        )


def _verify(part: Path, remote: RemoteFile, have_bytes: int, hashes: Hashes) -> None:
    if have_bytes < remote.size_bytes:
        raise Incomplete(
            f"download of {remote.path} stopped at {have_bytes} of {remote.size_bytes} bytes; "
            "the bytes are kept: pull again to resume"
        )
    meta = part.with_name(part.name + ".json")
    if have_bytes > remote.size_bytes:
        _discard(part, meta, "the server sent more bytes than the file has")
        raise PullError(f"{remote.path}: the hub sent more bytes than listed; pull again")
    if remote.sha256:
        expected, got, kind = remote.sha256, hashes.sha256.hexdigest(), "sha256"
    else:
        expected, got, kind = remote.blob_id, hashes.git.hexdigest(), "git blob id"
    if expected != got:
        _discard(part, meta, f"{kind} mismatch")
        raise PullError(
            f"checksum mismatch for {remote.path}: expected {kind} {expected}, got {got}; "
            "the corrupt download was deleted, pull again"
        )


def matches(path: Path, remote: RemoteFile) -> str | None:
    """sha256 hex of a file on disk when it is exactly the remote file, else None.

    Used for a file that reached the model folder before its row was marked complete (a
    crash between the rename and the database write): checked locally, not fetched again.
    """
    if path.stat().st_size != remote.size_bytes:
        return None
    hashes = Hashes(remote)
    _hash_existing(path, hashes)
    got = hashes.sha256.hexdigest() if remote.sha256 else hashes.git.hexdigest()
    return hashes.sha256.hexdigest() if got == (remote.sha256 or remote.blob_id) else None


def drop_meta(part: Path) -> None:
    part.with_name(part.name + ".json").unlink(missing_ok=True)
