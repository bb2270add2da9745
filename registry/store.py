"""Where things live under KRASIS_HOME, and the few file-system moves the registry makes."""

import logging
import os
import shutil
from pathlib import Path

from krasisd.config import default_home  # noqa: F401 (re-exported: one definition)

from .names import ModelRef

log = logging.getLogger(__name__)

DB_NAME = "registry.db"


class Store:
    """Paths of the model store: verified files, partial downloads, caches and locks."""

    def __init__(self, home: Path):
        self.home = Path(home).resolve()
        for sub in ("models", "partials", "caches", "locks"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)

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


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in a folder durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(src: Path, dest: Path) -> None:
    """fsync src, then atomically rename it to dest (creating folders) and fsync the folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(src, dest)
    fsync_dir(dest.parent)


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under path."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
