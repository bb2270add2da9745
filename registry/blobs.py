"""Uploaded blobs (Ollama's /api/blobs/:digest) and creating a model from them.

A client that creates a model from files on its own side (``ollama create`` with a local
``FROM``) uploads each file as a blob named by its sha256, then asks /api/create for
``files: {name: digest}``. A blob is written to ``partials/.blobs/`` as it arrives, hashed
as written, and moved to ``blobs/sha256-<hex>`` only when its sha256 is the digest it was
sent under. A create links the named blobs into a staging folder and imports that as a
local folder (the same checks and hard links as ``create --from``); the blobs it used are
then deleted (the model's files hold the bytes; a client asks HEAD before it uploads, so
it sends them again for another create). A blob no create used is deleted after
BLOB_MAX_AGE_S, when a registry opens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from .copy import link_or_copy
from .create import import_files
from .errors import PullError
from .names import ModelRef, safe_file_path
from .pipeline import Context
from .space import is_disk_full, storage_full
from .store import FILE_MODE, Store, move_into_place

log = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"sha256[:-]([0-9a-f]{64})")
BLOB_MAX_AGE_S = 24 * 3600
STAGING = "uploaded-files"


def blob_hex(digest: str) -> str:
    """The hex of a 'sha256:<64 hex>' digest (Ollama also writes 'sha256-'); ValueError."""
    match = DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ValueError(f"invalid digest {digest[:80]!r}: expected sha256:<64 hex digits>"
                         if isinstance(digest, str) else "invalid digest: expected a string")
    return match.group(1)


def blob_path(store: Store, digest: str) -> Path:
    return store.home / "blobs" / f"sha256-{blob_hex(digest)}"


class BlobWriter:
    """One upload: write() the bytes as they come, then finish() (checks the sha256 and
    moves the blob into place) or abort(). A full disk is StorageFull."""

    def __init__(self, store: Store, digest: str):
        self.store = store
        self.dest = blob_path(store, digest)
        self.expected = blob_hex(digest)
        parts = store.home / "partials" / ".blobs"
        store.make_private_dir(parts)
        self.part = parts / f"{self.expected}.{secrets.token_hex(4)}.part"
        self._hash = hashlib.sha256()
        self.size_bytes = 0
        self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, FILE_MODE)

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.abort()
            if is_disk_full(exc, self.store.home):
                raise storage_full(exc, self.store.home, "writing a blob") from exc
            raise
        self.size_bytes += len(chunk)

    def finish(self) -> Path:
        os.close(self._fd)
        self._fd = -1
        got = self._hash.hexdigest()
        if got != self.expected:
            self.part.unlink(missing_ok=True)
            raise PullError(f"digest mismatch: the uploaded bytes have sha256:{got}, not the "
                            f"digest in the URL (sha256:{self.expected})")
        self.store.make_private_dir(self.dest.parent)
        move_into_place(self.part, self.dest)
        log.info("stored blob sha256:%s (%d bytes)", self.expected, self.size_bytes)
        return self.dest

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.part.unlink(missing_ok=True)


def checked_files(store: Store, files: dict[str, str]) -> dict[str, Path]:
    """{file name: blob path} for a create from blobs: flat, safe names; blobs present."""
    if not files:
        raise PullError("'files' names no files")
    out = {}
    for name, digest in files.items():
        safe_file_path(name)
        if "/" in name:
            raise PullError(f"refusing file name {name!r}: files of a model are one folder "
                            "(no '/')")
        try:
            path = blob_path(store, digest)
        except ValueError as exc:
            raise PullError(f"file {name!r}: {exc}") from None
        if not path.is_file():
            raise PullError(f"file {name!r}: blob {digest} not found: upload it first "
                            f"(POST /api/blobs/{digest})")
        out[name] = path
    return out


def import_blobs(ctx: Context, ref: ModelRef, blobs: dict[str, Path],
                 defaults: tuple[str | None, dict | None]) -> Iterator[dict]:
    """Link the blobs under their names into a staging folder, import it as a local folder,
    then delete the staging folder and (once the model is made) the blobs."""
    staging = ctx.store.partial_dir(ref) / STAGING
    if staging.exists():
        ctx.store.remove_tree(staging, "partials")
    ctx.store.make_private_dir(staging)
    try:
        for name, path in blobs.items():
            link_or_copy(path, staging / name)
        yield from import_files(ctx, ref, staging, "local", link=True, defaults=defaults,
                                label="the uploaded model")
    finally:
        ctx.store.remove_tree(staging, "partials")
    for path in set(blobs.values()):
        path.unlink(missing_ok=True)


def prune_blobs(store: Store, now: float | None = None) -> None:
    """Delete blobs and blob uploads older than BLOB_MAX_AGE_S (no create used them)."""
    now = time.time() if now is None else now
    for folder in (store.home / "blobs", store.home / "partials" / ".blobs"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            try:
                if entry.is_file() and now - entry.stat().st_mtime > BLOB_MAX_AGE_S:
                    log.info("removing %s: uploaded over a day ago and used by no create",
                             entry.name)
                    entry.unlink()
            except OSError as exc:
                log.warning("cannot remove the old blob %s: %s", entry, exc)
