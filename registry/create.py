"""Local import (`krasis create NAME --from DIR`) and the bundled krasis-tiny model.

Files are hard-linked into the store when the folder is on the same file system, else
copied. A hard link costs no space and no time; it shares the inode, so a tool that
rewrites a source file *in place* would change the store's copy too (the digest recorded
at import then no longer matches). Tools that save models write new files and rename them
(new inodes), which leaves the store's link untouched. The bundled model is always copied.
"""

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from krasisd.engine.cache_files import sha256_file

from . import records
from .download import drop_meta
from .errors import PullError
from .names import ModelRef, safe_file_path
from .pipeline import Context, finish, sweep_model_dir
from .selection import select
from .store import fsync_dir, move_into_place

log = logging.getLogger(__name__)


def bundled_dir(name: str) -> Path:
    """The package-data folder of a bundled model."""
    folder = Path(str(resources.files("krasis_registry") / "bundled" / name))
    if not (folder / "config.json").is_file():
        raise PullError(f"the bundled model {name} is missing from this installation "
                        f"(no config.json in {folder})")
    return folder


def import_files(ctx: Context, ref: ModelRef, from_dir: Path, source: str,
                 link: bool) -> Iterator[dict]:
    """Register the safetensors/json/tokenizer/template files of a local folder as ref."""
    from_dir = Path(from_dir).expanduser()
    if not from_dir.is_dir():
        raise PullError(f"{from_dir} is not a folder")
    paths = select([p.name for p in from_dir.iterdir() if p.is_file()], str(from_dir))
    for path in paths:
        safe_file_path(path)
    row = records.get_model(ctx.db, ref.full)
    if row is not None and row["state"] == "ready":
        if source == "bundled" and row["source"] == "bundled":
            yield {"status": f"{ref.full} is up to date"}
            return
        raise PullError(f"model {ref.full} already exists: remove it first")
    model_id = records.begin_model(ctx.db, ref, source, None, None, None)
    specs = [{"path": p, "size_bytes": (from_dir / p).stat().st_size, "sha256": None,
              "blob_id": None, "etag": None} for p in paths]
    records.sync_files(ctx.db, model_id, specs)
    yield from sweep_model_dir(ctx, ref, model_id)
    model_dir = ctx.store.model_dir(ref)
    model_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        yield from _import_one(ctx, ref, model_id, from_dir / spec["path"], model_dir, link)
    yield from finish(ctx, ref, model_id)


def _import_one(ctx: Context, ref: ModelRef, model_id: int, src: Path, model_dir: Path,
                link: bool) -> Iterator[dict]:
    size_bytes = src.stat().st_size
    sha256 = sha256_file(src)
    event = {"status": f"importing {src.name}", "digest": f"sha256:{sha256}",
             "total": size_bytes}
    yield {**event, "completed": 0}
    dest = model_dir / src.name
    if not (link and _try_link(src, dest)):
        part = ctx.store.partial_dir(ref) / f"{src.name}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, part)
        move_into_place(part, dest)
        drop_meta(part)
    if dest.stat().st_size != size_bytes:
        raise PullError(f"{src} changed while it was imported; import again")
    yield {**event, "completed": size_bytes}
    records.complete_file(ctx.db, model_id, src.name, sha256)


def _try_link(src: Path, dest: Path) -> bool:
    """Hard-link src to dest; False when the file system cannot (another device, no support)."""
    tmp = dest.with_name(f".{dest.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            log.info("cannot hard-link %s (%s): copying", src, exc.strerror)
            return False
        raise
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return True
