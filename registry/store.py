"""Where things live under KRASIS_HOME, and the few file-system moves the registry makes.

The store is private to the daemon's user, whatever the umask: folders 0700, files 0600
(the registry database and its -wal/-shm, files moved into place). Opening a store made by
an older version tightens its top folders and database.
"""

import logging
import os
import shutil
import stat
from pathlib import Path

from krasisd.config import default_home  # noqa: F401 (re-exported: one definition)

from .names import ModelRef

log = logging.getLogger(__name__)

DB_NAME = "registry.db"
DIR_MODE = 0o700
FILE_MODE = 0o600
SUBDIRS = ("models", "partials", "caches", "locks")


class Store:
    """Paths of the model store: verified files, partial downloads, caches and locks."""

    def __init__(self, home: Path):
        self.home = Path(home).resolve()
        self.make_private_dir(self.home)
        for sub in SUBDIRS:
            self.make_private_dir(self.home / sub)
        self._make_private_db()

    def make_private_dir(self, path: Path) -> None:
        make_private_dir(path)

    def _make_private_db(self) -> None:
        """registry.db created 0600 before SQLite opens it (its -wal and -shm files take
        the database's mode); existing ones set to 0600."""
        fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        os.close(fd)
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = self.db_path.with_name(DB_NAME + suffix)
            if path.exists():
                _chmod_own(path, FILE_MODE)

    @property
    def db_path(self) -> Path:
        return self.home / DB_NAME

    def model_dir(self, ref: ModelRef) -> Path:
        return self._inside(self.home / "models", ref)

    def partial_dir(self, ref: ModelRef) -> Path:
        return self._inside(self.home / "partials", ref)

    def cache_root(self, ref: ModelRef) -> Path:
        return self._inside(self.home / "caches", ref)

    def cache_dir(self, ref: ModelRef, fmt: str, quant: str, group_size: int) -> Path:
        return self.cache_root(ref) / f"{fmt}-{quant}-g{group_size}"

    def lock_path(self, ref: ModelRef) -> Path:
        return self.home / "locks" / ("%".join(ref.parts) + ".lock")

    def global_lock_path(self) -> Path:
        return self.home / "locks" / "registry.lock"

    def _inside(self, root: Path, ref: ModelRef) -> Path:
        path = root.joinpath(*ref.parts).resolve()
        if not path.is_relative_to(root.resolve()):
            raise ValueError(f"model path {path} escapes {root}")
        return path

    def remove_tree(self, path: Path, root_name: str) -> None:
        """Delete one model's folder and prune empty parents up to the top folder."""
        root = self.home / root_name
        if path.exists():
            log.info("removing %s", path)
            shutil.rmtree(path)
        parent = path.parent
        while parent != root and parent.is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def make_private_dir(path: Path) -> None:
    """Create path and its missing parents with mode 0700 (whatever the umask); an existing
    folder of ours at path is set to 0700 too."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
    _chmod_own(path, DIR_MODE)
    for folder in missing:
        _chmod_own(folder, DIR_MODE)  # mkdir's mode is filtered by the umask


def _chmod_own(path: Path, mode: int) -> None:
    """chmod a file or folder of ours that is not a link; others' files are left alone. A
    file system without Unix modes (vfat, some network mounts) gets a warning, not an error."""
    info = path.lstat()
    if info.st_uid == os.getuid() and not stat.S_ISLNK(info.st_mode) and \
            stat.S_IMODE(info.st_mode) != mode:
        log.info("setting mode %o on %s", mode, path)
        try:
            os.chmod(path, mode)
        except OSError as exc:
            log.warning("cannot make %s private (mode %o): %s", path, mode, exc.strerror)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in a folder durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(src: Path, dest: Path) -> None:
    """fsync src, set it to 0600, then atomically rename it to dest (creating missing
    folders 0700) and fsync the folder."""
    if not dest.parent.is_dir():
        make_private_dir(dest.parent)
    with open(src, "rb+") as handle:
        try:
            os.fchmod(handle.fileno(), FILE_MODE)
        except OSError as exc:  # a file system without Unix modes
            log.warning("cannot make %s private (mode %o): %s", src, FILE_MODE, exc.strerror)
        os.fsync(handle.fileno())
    os.replace(src, dest)
    fsync_dir(dest.parent)


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under path."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
