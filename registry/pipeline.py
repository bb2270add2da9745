"""Steps shared by pull and create: the per-model lock, finishing a model, its cache builds."""

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlite_utils import Database

from krasisd.engine.cache_files import ENGINE_CACHE_DIR

from . import caches, records
from .caches import Builder
from .errors import ModelInUse, StorageFull
from .locks import FileLock
from .modelinfo import describe, manifest_digest
from .names import ModelRef
from .space import is_disk_full, storage_full
from .store import Store

log = logging.getLogger(__name__)

GIVE_BACK_BYTES = 4 << 20  # of a partial download, so a full disk can record a failure


@dataclass
class Context:
    """What one pull, import or build needs: the store, a connection of its own, the builders."""

    store: Store
    db: Database
    builders: dict[str, Builder] = field(default_factory=dict)
    quant: str = "int4"
    group_size: int | None = None  # None: the group size the engine picks for the model
    cache_formats: tuple[str, ...] = ()  # built after the files (counted by a pull's disk check)


def locked(store: Store, ref: ModelRef, body: Callable[[], Iterator[dict]],
           wait: bool = True) -> Iterator[dict]:
    """Run body holding the model's lock; a second caller waits, then finds the work done."""
    lock = FileLock(store.lock_path(ref))
    if not lock.try_acquire():
        if not wait:
            raise ModelInUse(f"a pull or cache build of {ref.full} is running")
        yield {"status": f"waiting for another pull of {ref.full}"}
        lock.acquire()
    try:
        yield from body()
    finally:
        lock.release()


def guard_failure(ctx: Context, ref: ModelRef, body: Iterator[dict]) -> Iterator[dict]:
    """On an error or a closed stream, a model still 'pulling' becomes 'failed'; re-raise
    (a full disk as StorageFull, whatever step met it)."""
    try:
        yield from body
    except StorageFull as exc:
        _record_failure(ctx, ref, str(exc))
        raise
    except Exception as exc:
        if not is_disk_full(exc, ctx.store.home):
            _record_failure(ctx, ref, str(exc))
            raise
        full = storage_full(exc, ctx.store.home)
        _record_failure(ctx, ref, str(full))
        raise full from exc
    except BaseException:  # a stream closed early (GeneratorExit)
        _record_failure(ctx, ref,
                        "cancelled: pull again to resume (the partial downloads are kept)")
        raise


def _record_failure(ctx: Context, ref: ModelRef, error: str) -> None:
    """Mark a model still 'pulling' as 'failed'. On a full disk (which SQLite needs a few
    pages of to write), the newest partial download gives back its last GIVE_BACK_BYTES
    first: they are fetched again on resume."""
    row = records.get_model(ctx.db, ref.full)
    if row is None or row["state"] != "pulling":
        return
    try:
        records.set_state(ctx.db, row["id"], "failed", error)
        return
    except Exception as exc:
        if not is_disk_full(exc, ctx.store.home) or not give_back(ctx.store.partial_dir(ref)):
            log.error("could not record the failure of %s (%s); the next open marks it "
                      "interrupted", ref.full, exc)
            return
    try:
        records.set_state(ctx.db, row["id"], "failed", error)
    except Exception as exc:  # the original error is the one to raise
        log.error("could not record the failure of %s (%s); the next open marks it "
                  "interrupted", ref.full, exc)


def give_back(partial_dir: Path) -> int:
    """Shorten the most recently written partial download by up to GIVE_BACK_BYTES; the
    bytes given back (0 when there is none). A resume fetches them again."""
    parts = [p for p in partial_dir.glob("*.part") if p.is_file()] \
        if partial_dir.is_dir() else []
    if not parts:
        return 0
    newest = max(parts, key=lambda p: p.stat().st_mtime_ns)
    size_bytes = newest.stat().st_size
    keep_bytes = max(size_bytes - GIVE_BACK_BYTES, 0)
    os.truncate(newest, keep_bytes)
    log.warning("disk full: gave back the last %d bytes of %s so the failure can be recorded",
                size_bytes - keep_bytes, newest)
    return size_bytes - keep_bytes


def sweep_model_dir(ctx: Context, ref: ModelRef, model_id: int) -> Iterator[dict]:
    """Remove what other tools left in the model folder (e.g. *.incomplete, .cache/)."""
    model_dir = ctx.store.model_dir(ref)
    if not model_dir.is_dir():
        return
    known = {f["path"] for f in records.files_of(ctx.db, model_id)}
    for entry in sorted(model_dir.iterdir()):
        if entry.name in known and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == ENGINE_CACHE_DIR:  # the engine's own cache when given none of ours
            continue
        log.warning("removing orphan %s from %s", entry.name, model_dir)
        yield {"status": f"removing orphan {entry.name}"}
        if entry.is_dir() and not entry.is_symlink():
            ctx.store.remove_tree(entry, "models")
            model_dir.mkdir(parents=True, exist_ok=True)
        else:
            entry.unlink()


def finish(ctx: Context, ref: ModelRef, model_id: int) -> Iterator[dict]:
    """Describe the verified files and mark the model ready (only when every file is complete)."""
    yield {"status": "writing manifest"}
    files = records.files_of(ctx.db, model_id)
    model_dir = ctx.store.model_dir(ref)
    for row in files:
        path = model_dir / row["path"]
        if row["state"] != "complete" or not path.is_file() or \
                path.stat().st_size != row["size_bytes"]:
            raise RuntimeError(f"{row['path']} of {ref.full} is not complete on disk")
    info = describe(model_dir)
    size_bytes = sum(row["size_bytes"] for row in files)
    digest = manifest_digest([(row["path"], row["sha256"]) for row in files])
    records.finish_model(ctx.db, model_id, info, size_bytes, digest)


def build_caches(ctx: Context, ref: ModelRef, formats: Iterable[str],
                 rebuild: bool = False) -> Iterator[dict]:
    """Build the missing (or failed) cache formats of a ready model.

    The quantization and group size are caches.pick_quant's (the daemon serves the same):
    ctx.quant, or INT8 when INT4 cannot hold the model's shapes. A ctx.group_size pins the
    layout: ctx.quant at that group size. A model whose shapes fit no quantization gets a
    failed row saying so, and the stream goes on (the model itself is usable). Unquantized
    serving (quant "none") needs no cache: nothing is built."""
    formats = list(formats)
    model = records.get_model(ctx.db, ref.full)
    caches.sweep_cache_orphans(ctx.db, ctx.store, model, ref)
    if ctx.quant == "none" or not formats:
        return
    picked = caches.pick_quant(json.loads(model["config_json"] or "{}"), ctx.quant,
                               ctx.group_size)
    if picked is not None and picked[0] != ctx.quant:
        log.info("%s cannot hold the shapes of %s: building %s", ctx.quant, ref.full, picked[0])
        yield {"status": f"{ctx.quant} cannot hold the model's shapes: using {picked[0]}"}
    ready = {(c["format"], c["quant"], c["group_size"])
             for c in records.caches_of(ctx.db, model["id"]) if c["state"] == "ready"}
    for fmt in formats:
        builder = ctx.builders.get(fmt)
        if builder is None:
            raise ValueError(f"no builder for the {fmt} cache format")
        if picked is None:
            yield caches.record_not_applicable(ctx.db, model, fmt, ctx.quant)
            continue
        records.delete_cache_markers(ctx.db, model["id"], fmt)
        if rebuild or (fmt, *picked) not in ready:
            yield from caches.build(ctx.db, ctx.store, model, ref, fmt, builder, *picked)
