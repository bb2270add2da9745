"""What an open does after a crash: finish what a dead process left half-done.

A row counts as abandoned only when nobody holds the model's lock (the kernel releases a
dead process's flock), so a pull or build that is still running elsewhere is left alone.
On a full disk what cannot be written is logged and left for the next open: the registry
still opens, and reads work.
"""

import logging

from sqlite_utils import Database

from . import caches, records
from .locks import FileLock
from .names import parse_name
from .remove import finish_removal
from .space import is_disk_full
from .store import Store

log = logging.getLogger(__name__)

INTERRUPTED_PULL = "interrupted: pull again to resume (the partial downloads are kept)"


def recover(db: Database, store: Store) -> None:
    """Resolve rows left in pulling, removing or building by a process that died."""
    for model in records.models_in_state(db, "pulling", "removing"):
        _with_free_lock(store, model["name"], lambda m=model: _recover_model(db, store, m))
    for cache in records.caches_in_state(db, "building"):
        _with_free_lock(store, cache["model_name"],
                        lambda c=cache: caches.discard_interrupted(db, store, c))


def _with_free_lock(store: Store, full_name: str, action) -> None:
    lock = FileLock(store.lock_path(parse_name(full_name)))
    if not lock.try_acquire():
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
