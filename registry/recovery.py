"""What an open does after a crash: finish what a dead process left half-done.

A row counts as abandoned only when nobody holds the model's lock (the kernel releases a
dead process's flock), so a pull or build that is still running elsewhere is left alone.
On a full disk what cannot be written is logged and left for the next open: the registry
still opens, and reads work.

A ready model is checked too: a removal on a full disk deletes files before it can record
anything (remove.py), so a crash there leaves a 'ready' row with files gone. Such a model
becomes 'failed' naming the missing files, and a ready cache whose folder lost bytes is
discarded and marked failed: nothing ready ever points at missing files.
"""

import logging
from pathlib import Path

from sqlite_utils import Database

from . import caches, records
from .locks import FileLock
from .names import parse_name
from .remove import finish_removal
from .space import is_disk_full
from .store import Store, tree_bytes

log = logging.getLogger(__name__)

INTERRUPTED_PULL = "interrupted: pull again to resume (the partial downloads are kept)"


def recover(db: Database, store: Store) -> None:
    """Resolve rows left in pulling, removing or building by a process that died."""
    for model in records.models_in_state(db, "pulling", "removing"):
        _with_free_lock(store, model["name"], lambda m=model: _recover_model(db, store, m))
    for cache in records.caches_in_state(db, "building"):
        _with_free_lock(store, cache["model_name"],
                        lambda c=cache: caches.discard_interrupted(db, store, c))
    for model in records.models_in_state(db, "ready"):
        _with_free_lock(store, model["name"], lambda m=model: _check_ready(db, store, m))


def _with_free_lock(store: Store, full_name: str, action) -> None:
    lock = FileLock(store.lock_path(parse_name(full_name)))
    try:
        if not lock.try_acquire():
            return
    except OSError as exc:  # a lock file that cannot be created on a full disk
        if not is_disk_full(exc, store.home):
            raise
        log.warning("disk full: %s is left as it is until the next open (%s)", full_name, exc)
        return
    try:
        action()
    except Exception as exc:
        if not is_disk_full(exc, store.home):
            raise
        log.warning("disk full: %s is left as it is until the next open (%s)", full_name, exc)
    finally:
        lock.release()


def _recover_model(db: Database, store: Store, model: dict) -> None:
    # Re-read under the lock: another process may have finished it meanwhile.
    current = records.get_model(db, model["name"])
    if current is None or current["state"] not in ("pulling", "removing"):
        return
    if current["state"] == "removing":
        log.warning("finishing the interrupted removal of %s", current["name"])
        finish_removal(db, store, parse_name(current["name"]), current["id"])
        return
    log.warning("pull of %s was interrupted; it resumes on the next pull", current["name"])
    records.set_state(db, current["id"], "failed", INTERRUPTED_PULL)



SHOWN_NAMES = 3


def missing_files(db: Database, store: Store, model: dict) -> list[str]:
    """Paths of the model's file rows that are not on disk at their recorded size."""
    model_dir = store.model_dir(parse_name(model["name"]))
    missing = []
    for row in records.files_of(db, model["id"]):
        path = model_dir / row["path"]
        try:
            whole = path.is_file() and path.stat().st_size == row["size_bytes"]
        except OSError:
            whole = False
        if not whole:
            missing.append(row["path"])
    return missing


def _check_ready(db: Database, store: Store, model: dict) -> None:
    current = records.get_model(db, model["name"])
    if current is None or current["state"] != "ready":
        return
    for cache in records.caches_of(db, current["id"]):
        path = Path(cache["path"]) if cache["path"] else None
        if cache["state"] != "ready" or path is None:
            continue
        if path.is_dir() and tree_bytes(path) >= (cache["size_bytes"] or 0):
            continue
        log.warning("the %s cache of %s lost files; discarded", cache["format"],
                    current["name"])
        if path.is_relative_to(store.home / "caches"):
            store.remove_tree(path, "caches")
        records.fail_cache(db, cache["id"], "its files are missing on disk (a removal that "
                           "could not finish?); it is rebuilt on the next pull")
    missing = missing_files(db, store, current)
    if not missing:
        return
    names = ", ".join(missing[:SHOWN_NAMES]) + (", ..." if len(missing) > SHOWN_NAMES else "")
    error = (f"{len(missing)} of its files are missing or short on disk ({names}), e.g. "
             "deleted by a removal that could not finish: pull it again, or remove it")
    log.warning("%s: %s; marked failed", current["name"], error)
    records.set_state(db, current["id"], "failed", error)
