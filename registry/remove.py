"""Removing a model: its files, partial downloads, caches and rows, and nothing else."""

import logging
from collections.abc import Callable

from sqlite_utils import Database

from . import records
from .errors import ModelInUse, ModelNotFound
from .locks import FileLock
from .names import ModelRef
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
    records.set_state(db, model_id, "removing")
    store.remove_tree(store.model_dir(ref), "models")
    store.remove_tree(store.partial_dir(ref), "partials")
    store.remove_tree(store.cache_root(ref), "caches")
    db.execute("DELETE FROM models WHERE id = ?", [model_id])
    log.info("removed %s", ref.full)
