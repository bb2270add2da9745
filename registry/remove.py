"""Removing a model: its files, partial downloads, caches and rows, and nothing else.

A removal first marks the row 'removing' (a crash midway is finished at the next open).
On a full disk that write can fail: SQLite needs a few free pages. Then the model's largest
files that free space when deleted (not those hard-linked elsewhere, e.g. into a copy) are
deleted one at a time, largest first, until the write succeeds, so `krasis rm` can free a
full disk. Between such a deletion and the write the row still says 'ready'; an open finds
a ready model with missing files and marks it failed (recovery.check_ready_models), so no
crash leaves a ready row whose files are gone.
"""

import logging
import os
from collections.abc import Callable
from pathlib import Path

from sqlite_utils import Database

from . import records
from .errors import ModelInUse, ModelNotFound
from .locks import FileLock
from .names import ModelRef
from .space import is_disk_full, storage_full
from .store import Store

log = logging.getLogger(__name__)


def remove_model(db: Database, store: Store, ref: ModelRef, force: bool,
                 is_loaded: Callable[[str], bool]) -> None:
    """Delete one model; refuse while it is loaded (unless force) or while it is being pulled."""
    row = records.get_model(db, ref.full)
    if row is None:
        raise ModelNotFound(f"model {ref.full} not found")
    if not force and is_loaded(ref.full):
        raise ModelInUse(f"model {ref.full} is loaded: stop it first, or remove with force")
    lock = FileLock(store.lock_path(ref))
    if not lock.try_acquire():
        raise ModelInUse(f"a pull or cache build of {ref.full} is running")
    try:
        finish_removal(db, store, ref, row["id"])
    finally:
        lock.release()


def finish_removal(db: Database, store: Store, ref: ModelRef, model_id: int) -> None:
    """Mark 'removing', delete the folders, then the rows; a crash midway is finished at open."""
    current = db.execute("SELECT state FROM models WHERE id = ?", [model_id]).fetchone()
    if current is not None and current[0] != "removing":
        _mark_removing(db, store, ref, model_id)
    store.remove_tree(store.model_dir(ref), "models")
    store.remove_tree(store.partial_dir(ref), "partials")
    store.remove_tree(store.cache_root(ref), "caches")
    db.execute("DELETE FROM models WHERE id = ?", [model_id])
    log.info("removed %s", ref.full)


def _state_write_error(db: Database, store: Store, model_id: int) -> Exception | None:
    """Write 'removing': None once written, the error when the disk is full (others raise)."""
    try:
        records.set_state(db, model_id, "removing")
        return None
    except Exception as exc:
        if not is_disk_full(exc, store.home):
            raise
        return exc


def _mark_removing(db: Database, store: Store, ref: ModelRef, model_id: int) -> None:
    """Write 'removing'; on a full disk, delete the model's largest files (those whose
    deletion frees space) one by one until the write succeeds."""
    first = _state_write_error(db, store, model_id)
    if first is None:
        return
    freed_bytes = 0
    for size_bytes, path in freeing_files(store, ref):
        log.warning("disk full: deleting %s (%.1f MiB) of %s so its removal can be recorded",
                    path, size_bytes / (1 << 20), ref.full)
        path.unlink(missing_ok=True)
        freed_bytes += size_bytes
        error = _state_write_error(db, store, model_id)
        if error is None:
            return
        first = error
    if freed_bytes:
        then = (f"then remove {ref.full} again (its {freed_bytes / (1 << 20):.1f} MiB of files "
                "that free space are deleted already: it is marked failed at the next open)")
    else:
        then = (f"then remove {ref.full} again (deleting its files would free nothing: they "
                "are hard links shared with other models or folders)")
    raise storage_full(first, store.home, f"recording the removal of {ref.full}", then) \
        from first


def freeing_files(store: Store, ref: ModelRef) -> list[tuple[int, Path]]:
    """(bytes, path) of the model's files whose deletion frees space (their only link),
    largest first: its weights, partial downloads and cache files."""
    found = []
    for root in (store.model_dir(ref), store.partial_dir(ref), store.cache_root(ref)):
        if not root.is_dir():
            continue
        for folder, _dirs, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.lstat()
                except OSError:
                    continue
                if path.is_file() and not path.is_symlink() and stat.st_nlink == 1 \
                        and stat.st_size > 0:
                    found.append((stat.st_blocks * 512 or stat.st_size, path))
    found.sort(key=lambda item: item[0], reverse=True)
    return found

