"""A full disk under KRASIS_HOME: recognising it, and the error a user is shown.

Full is ENOSPC or EDQUOT from a file write, SQLite's "database or disk is full"
(SQLITE_FULL), or SQLite's "disk I/O error" while the store's file system has less than
``NEARLY_FULL_BYTES`` free (SQLite reports a failed allocation of its shared-memory file
that way). Anything else is not a full disk and keeps its own error.
"""

import errno
import logging
import shutil
import sqlite3
from pathlib import Path

from .errors import StorageFull

log = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NEARLY_FULL_BYTES = 1 << 20
_SQLITE_FULL = "database or disk is full"
_SQLITE_IO = "disk I/O error"


def free_bytes(home: Path) -> int | None:
    """Bytes free for this user under home; None when it cannot be measured."""
    try:
        return shutil.disk_usage(home).free
    except OSError:
        return None


def disk_full_error(exc: BaseException, home: Path) -> BaseException | None:
    """The exception in exc's chain of explicit causes (``raise ... from``) that says the
    disk under home is full; None when none does."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageFull):
            return exc
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return exc
        if isinstance(exc, sqlite3.OperationalError):
            message = str(exc)
            if _SQLITE_FULL in message:
                return exc
            if _SQLITE_IO in message:
                free = free_bytes(home)
                if free is not None and free < NEARLY_FULL_BYTES:
                    return exc
        exc = exc.__cause__
    return None


def is_disk_full(exc: BaseException, home: Path) -> bool:
    """Whether exc, or one of its explicit causes, says the disk under home is full."""
    return disk_full_error(exc, home) is not None


def storage_full(exc: BaseException, home: Path, doing: str | None = None,
                 then: str = "then try again") -> StorageFull:
    """The error shown for a full disk met while ``doing`` (e.g. "writing model.safetensors";
    by default what the error names); ``then`` says what to do once there is space."""
    cause = disk_full_error(exc, home) or exc
    if isinstance(cause, StorageFull):
        return cause
    if doing is None:
        if isinstance(cause, OSError):
            name = Path(cause.filename).name if cause.filename else ""
            doing = f"writing {name}" if name else "writing to the model store"
        else:
            doing = "writing the registry database"
    detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    free = free_bytes(home)
    left = "" if free is None else f", {free / (1 << 20):.1f} MiB free"
    return StorageFull(f"insufficient storage: {doing} failed under {home} ({detail}{left}); "
                       f"free some space there, {then}")
