"""Opening the registry database: WAL, foreign keys on every connection, migrations applied once."""

import datetime
import sqlite3
from pathlib import Path

from sqlite_utils import Database

from .locks import FileLock
from .migrations import m

BUSY_TIMEOUT_MS = 30_000


def connect(path: Path) -> Database:
    """A new connection with WAL journaling, enforced foreign keys and a busy timeout."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    db = Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return db


def migrate(db: Database, lock_path: Path) -> None:
    """Apply pending migrations; a file lock keeps two processes from racing on a new database."""
    with FileLock(lock_path):
        m.apply(db)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
