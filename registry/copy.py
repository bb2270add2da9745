"""Copying a model to a new name (Ollama's /api/copy, and /api/create "from" a model).

The copy shares the source's bytes: every weight file and every ready cache file is
hard-linked into the new model's folders (a store is one file system), so a copy costs no
space and no time. Where a link cannot be made (a file system without hard links, the
inode's link limit) the file is copied, with a log line. The store's files are never
rewritten in place (a pull or a rebuild writes new files and renames them), so the two
models cannot change each other's bytes; removing one leaves the other whole.

The new model gets the source's records (files, digest, config, ready caches) and its
defaults (system message, options), which the caller may replace.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from . import records
from .errors import ModelInUse, ModelNotFound, PullError
from .locks import FileLock
from .names import ModelRef
from .pipeline import Context, finish, sweep_model_dir
from .store import FILE_MODE, fsync_dir

log = logging.getLogger(__name__)

_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)
KEEP = object()  # a default the copy takes from its source


def copy_model(ctx: Context, src: ModelRef, dst: ModelRef, system=KEEP,
               options=KEEP) -> Iterator[dict]:
    """Make dst a copy of the ready model src; progress events. Run under dst's lock.

    ``system`` and ``options`` replace the source's defaults unless KEEP. src's lock is
    held while its files are linked, so it cannot be removed or rebuilt meanwhile (a busy
    source is ModelInUse, never waited for: two copies in opposite directions would wait
    on each other)."""
    lock = FileLock(ctx.store.lock_path(src))
    if not lock.try_acquire():
        raise ModelInUse(f"a pull or cache build of {src.full} is running: copy it later")
    try:
        yield from _copy_locked(ctx, src, dst, system, options)
    finally:
        lock.release()


def _copy_locked(ctx: Context, src: ModelRef, dst: ModelRef, system, options) -> Iterator[dict]:
    source = records.get_model(ctx.db, src.full)
    if source is None or source["state"] != "ready":
        state = "" if source is None else f" (it is {source['state']})"
        raise ModelNotFound(f"model {src.full} not found{state}")
    existing = records.get_model(ctx.db, dst.full)
    if existing is not None and existing["state"] != "failed":
        raise PullError(f"model {dst.full} already exists: remove it first")
    yield {"status": f"copying {src.full} to {dst.full}"}
    model_id = records.begin_model(ctx.db, dst, source["source"], source["repo"],
                                   source["revision"], source["commit_sha"])
    files = records.files_of(ctx.db, source["id"])
    records.sync_files(ctx.db, model_id, [
        {k: f[k] for k in ("path", "size_bytes", "sha256", "blob_id", "etag")} for f in files])
    records.delete_caches(ctx.db, model_id)  # a failed earlier attempt's rows
    yield from sweep_model_dir(ctx, dst, model_id)
    src_dir, dst_dir = ctx.store.model_dir(src), ctx.store.model_dir(dst)
    ctx.store.make_private_dir(dst_dir)
    for row in files:
        yield {"status": f"linking {row['path']}", "digest": f"sha256:{row['sha256']}",
               "total": row["size_bytes"], "completed": 0}
        link_or_copy(src_dir / row["path"], dst_dir / row["path"])
        records.complete_file(ctx.db, model_id, row["path"], row["sha256"], row["etag"])
        yield {"status": f"linking {row['path']}", "digest": f"sha256:{row['sha256']}",
               "total": row["size_bytes"], "completed": row["size_bytes"]}
    for cache in records.caches_of(ctx.db, source["id"]):
        if cache["state"] == "ready":
            yield from _copy_cache(ctx, dst, model_id, cache)
    records.set_defaults(
        ctx.db, model_id, source["system"] if system is KEEP else system,
        _stored_options(source) if options is KEEP else options)
    yield from finish(ctx, dst, model_id)


def _stored_options(row: dict) -> dict | None:
    return json.loads(row["options_json"]) if row["options_json"] else None


def _copy_cache(ctx: Context, dst: ModelRef, model_id: int, cache: dict) -> Iterator[dict]:
    src_path = Path(cache["path"])
    if not src_path.is_dir():
        log.warning("the ready %s cache of the source is missing (%s): the copy builds its "
                    "own", cache["format"], src_path)
        return
    out = ctx.store.cache_dir(dst, cache["format"], cache["quant"], cache["group_size"])
    yield {"status": f"linking the {cache['format']} cache"}
    if out.exists():
        ctx.store.remove_tree(out, "caches")
    link_tree(src_path, out, ctx.store.make_private_dir)
    cache_id = records.begin_cache(ctx.db, model_id, cache["format"], cache["quant"],
                                   cache["group_size"], str(out))
    records.finish_cache(ctx.db, cache_id, cache["layout_version"], cache["size_bytes"],
                         cache["checksum"])


def link_tree(src: Path, dst: Path, make_dir) -> None:
    """Hard-link (else copy) every regular file under src to the same place under dst."""
    make_dir(dst)
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_symlink():
            log.warning("not copying %s: it is a link", entry)
        elif entry.is_dir():
            link_tree(entry, target, make_dir)
        elif entry.is_file():
            link_or_copy(entry, target)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src, or (where no link can be made) a 0600 copy of it."""
    tmp = dst.with_name(f".{dst.name}.copy")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        log.info("cannot hard-link %s (%s): copying it", src, exc.strerror)
        shutil.copyfile(src, tmp, follow_symlinks=False)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
