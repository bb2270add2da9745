"""Local import (`krasis create NAME --from DIR`) and the bundled krasis-tiny model.

Files are hard-linked into the store when the folder is on the same file system, else
copied. A hard link costs no space and no time; it shares the inode, so a tool that
rewrites a source file *in place* would change the store's copy too (the digest recorded
at import then no longer matches). Tools that save models write new files and rename them
(new inodes), which leaves the store's link untouched. The bundled model is always copied.

What may be read is sources.py's rule (no links out of the folder, KRASIS_CREATE_DIRS over
TCP). Only files owned by the daemon's own user are linked: another user's file would stay
theirs to rewrite in the store. Copies are created 0600 and hashed again as they are
written: a file that changed between the two reads fails the import.
config.json is checked against krasisd.engine.limits before any file is taken.
"""

import dataclasses
import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from krasisd.engine.limits import ModelLimitError, check_config_limits, machine_capacity_bytes

from . import records
from .download import drop_meta
from .errors import PullError
from .names import ModelRef, safe_file_path
from .pipeline import Context, finish, sweep_model_dir
from .selection import select
from .sources import (
    ANY_FOLDER,
    SourceFile,
    SourceFolder,
    SourcePolicy,
    list_files,
    open_file,
    open_folder,
    read_bytes,
)
from .store import FILE_MODE, fsync_dir, move_into_place

CONFIG_LIMIT_BYTES = 16 << 20  # a config.json larger than this is not a model's config
COPY_CHUNK_BYTES = 8 << 20

log = logging.getLogger(__name__)


def bundled_dir(name: str) -> Path:
    """The package-data folder of a bundled model."""
    folder = Path(str(resources.files("krasis_registry") / "bundled" / name))
    if not (folder / "config.json").is_file():
        raise PullError(f"the bundled model {name} is missing from this installation "
                        f"(no config.json in {folder})")
    return folder


def import_files(ctx: Context, ref: ModelRef, from_dir: Path, source: str, link: bool,
                 policy: SourcePolicy = ANY_FOLDER,
                 defaults: tuple[str | None, dict | None] = (None, None),
                 label: str | None = None) -> Iterator[dict]:
    """Register the safetensors/json/tokenizer/template files of a local folder as ref,
    with ``defaults``: its system message and sampling options (records.set_defaults).
    ``label`` names the folder in messages (default: the path as given)."""
    folder = open_folder(from_dir, policy)
    if label is not None:
        folder = dataclasses.replace(folder, label=label)
    paths = select(list_files(folder), folder.label, name_files=folder.reveal_names)
    for path in paths:
        safe_file_path(path)
    check_source_config(folder, ctx.store.home)
    row = records.get_model(ctx.db, ref.full)
    if row is not None and row["state"] == "ready":
        if source == "bundled" and row["source"] == "bundled":
            yield {"status": f"{ref.full} is up to date"}
            return
        raise PullError(f"model {ref.full} already exists: remove it first")
    specs = []
    for path in paths:
        with open_file(folder, path) as src:
            specs.append({"path": path, "size_bytes": src.size_bytes, "sha256": None,
                          "blob_id": None, "etag": None})
    model_id = records.begin_model(ctx.db, ref, source, None, None, None)
    records.set_defaults(ctx.db, model_id, *defaults)
    records.sync_files(ctx.db, model_id, specs)
    yield from sweep_model_dir(ctx, ref, model_id)
    model_dir = ctx.store.model_dir(ref)
    ctx.store.make_private_dir(model_dir)
    for spec in specs:
        with open_file(folder, spec["path"]) as src:
            if src.size_bytes != spec["size_bytes"]:
                raise PullError(f"{src.name} changed while it was imported; import again")
            yield from _import_one(ctx, ref, model_id, src, model_dir, link)
    yield from finish(ctx, ref, model_id)


def check_source_config(folder: SourceFolder, home: Path) -> None:
    """Refuse the folder when config.json's sizes are beyond krasisd.engine.limits (checked
    before any file is taken). A config.json that is not a JSON object is imported and then
    fails the create at describe(), with the model recorded as failed, like any bad file."""
    with open_file(folder, "config.json") as src:
        text = read_bytes(src, CONFIG_LIMIT_BYTES)
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return
    if not isinstance(config, dict):
        return
    try:
        check_config_limits(config, machine_capacity_bytes(home))
    except ModelLimitError as exc:
        raise PullError(f"refusing {folder.label}: {exc}") from exc


def _import_one(ctx: Context, ref: ModelRef, model_id: int, src: SourceFile, model_dir: Path,
                link: bool) -> Iterator[dict]:
    sha256 = _hash_fd(src.fd)
    event = {"status": f"importing {src.name}", "digest": f"sha256:{sha256}",
             "total": src.size_bytes}
    yield {**event, "completed": 0}
    dest = model_dir / src.name
    if not (link and src.uid == os.getuid() and _try_link(src, dest)):
        part = ctx.store.partial_dir(ref) / f"{src.name}.part"
        ctx.store.make_private_dir(part.parent)
        if _copy_fd(src.fd, part) != sha256:
            part.unlink()
            raise PullError(f"{src.name} changed while it was imported; import again")
        move_into_place(part, dest)
        drop_meta(part)  # a pull's note about a partial of the same name
    if dest.stat().st_size != src.size_bytes:
        raise PullError(f"{src.name} changed while it was imported; import again")
    yield {**event, "completed": src.size_bytes}
    records.complete_file(ctx.db, model_id, src.name, sha256)


def _hash_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, COPY_CHUNK_BYTES, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _copy_fd(fd: int, part: Path) -> str:
    """Copy an open file to part (created 0600, never through a link); its sha256."""
    digest = hashlib.sha256()
    part.unlink(missing_ok=True)
    out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  FILE_MODE)
    try:
        offset = 0
        while chunk := os.pread(fd, COPY_CHUNK_BYTES, offset):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
            offset += len(chunk)
    finally:
        os.close(out)
    return digest.hexdigest()


def _try_link(src: SourceFile, dest: Path) -> bool:
    """Hard-link the opened file to dest; False when the file system cannot (another device,
    no support) or when the path no longer names the file that was opened and checked."""
    tmp = dest.with_name(f".{dest.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src.real_path, tmp, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES,
                         errno.ENOENT):
            log.info("cannot hard-link %s (%s): copying", src.name, exc.strerror)
            return False
        raise
    linked = tmp.lstat()
    if (linked.st_dev, linked.st_ino) != src.identity:  # replaced since it was opened
        tmp.unlink()
        log.warning("%s changed while it was linked: copying the opened file", src.name)
        return False
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return True
