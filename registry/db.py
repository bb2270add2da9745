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
    try:
        db = Database(conn)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    except BaseException:
        conn.close()  # e.g. a full disk: no open file left behind
        raise
    return db


def pin(path: Path) -> Database:
    """A connection to hold open while the registry is in use.

    SQLite deletes the -wal and -shm files when the last connection to a database closes,
    and recreates them (allocating disk space) at the next open. While this connection is
    open the files stay, so connections opened later, and every read through them, need no
    new disk space: listing and showing models work on a full disk.
    """
    db = connect(path)
    db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # maps -wal and -shm now
    return db


def migrate(db: Database, lock_path: Path) -> None:
    """Apply pending migrations; a file lock keeps two processes from racing on a new database."""
    with FileLock(lock_path):
        m.apply(db)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
