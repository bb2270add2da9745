"""Reading a local folder for `create` without reading anything outside it.

`create` runs as the daemon's user, on a folder named by whoever reached the API. So:

- `SourcePolicy` says which folders may be read at all: any folder (the daemon's own user
  over its 0600 socket, and the Python API), or only those under `KRASIS_CREATE_DIRS`
  (always over TCP, where any local user can connect; none when the setting is unset).
  A folder outside them is refused before the file system is asked anything about it, so
  the refusal says nothing about what exists there;
- every file taken must resolve (links followed) to a place inside the folder, or inside
  the `blobs/` of a Hugging Face cache repo when the folder is one of its `snapshots/`
  (those are links into `../../blobs`), and inside the allowed folder when there is one;
- files are opened with O_NOFOLLOW on their resolved path, and the path of the opened
  file (`/proc/self/fd`) is checked again, so a link swapped in meanwhile is not followed;
  only regular files are read;
- with `reveal_names` off (over TCP) errors do not list the folder's files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import PullError

CREATE_DIRS_SETTING = "KRASIS_CREATE_DIRS"


@dataclass(frozen=True)
class SourcePolicy:
    """Which folders `create` may read, and whether its errors may name their files."""

    allowed_dirs: tuple[Path, ...] | None = None  # None: any folder
    reveal_names: bool = True

    @classmethod
    def for_transport(cls, over_tcp: bool, create_dirs: list[str] | None) -> SourcePolicy:
        """KRASIS_CREATE_DIRS when set (both transports); else any folder over the Unix
        socket and none over TCP."""
        if create_dirs is not None:
            dirs = tuple(Path(d) for d in create_dirs)
        else:
            dirs = () if over_tcp else None
        return cls(allowed_dirs=dirs, reveal_names=not over_tcp)


ANY_FOLDER = SourcePolicy()  # the Python API and the daemon's own socket without the setting


@dataclass(frozen=True)
class SourceFolder:
    """A checked folder: its resolved path and the places its files may resolve to."""

    path: Path
    label: str  # the folder as the caller named it, for messages
    roots: tuple[Path, ...]
    reveal_names: bool


def open_folder(from_dir: str | Path, policy: SourcePolicy) -> SourceFolder:
    """Check the folder against the policy; resolve it."""
    label = str(from_dir)
    given = Path(from_dir).expanduser()
    real = Path(os.path.realpath(given))
    allowed = None
    if policy.allowed_dirs is not None:
        allowed = next((Path(os.path.realpath(d)) for d in policy.allowed_dirs
                        if real.is_relative_to(os.path.realpath(d))), None)
        if allowed is None:
            if not policy.allowed_dirs:
                raise PullError(f"create cannot read {label}: creating models from folders "
                                f"is off for this connection (set {CREATE_DIRS_SETTING} to "
                                "the folders it may read)")
            raise PullError(f"create cannot read {label}: it may read only folders under "
                            f"{CREATE_DIRS_SETTING}")
    if not real.is_dir():
        raise PullError(f"{label} is not a folder")
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append(real.parent.parent / "blobs")  # a Hugging Face cache snapshot
    if allowed is not None:
        roots = [r for r in roots if r.is_relative_to(allowed)]
    return SourceFolder(real, label, tuple(roots), policy.reveal_names)


def list_files(folder: SourceFolder) -> list[str]:
    """Names of the folder's top-level entries that are (or lead to) files."""
    try:
        return sorted(p.name for p in folder.path.iterdir() if p.is_file())
    except OSError as exc:
        raise PullError(f"cannot list {folder.label}: {exc.strerror}") from exc


@dataclass(frozen=True)
class SourceFile:
    """An open regular file of a source folder."""

    fd: int
    name: str
    real_path: str  # the resolved path it was opened by
    size_bytes: int
    uid: int
    identity: tuple[int, int]  # (st_dev, st_ino)


@contextmanager
def open_file(folder: SourceFolder, name: str) -> Iterator[SourceFile]:
    """Open one file of the folder for reading; refuse one that leads outside it."""
    real = os.path.realpath(folder.path / name)
    _check_inside(folder, name, real)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise PullError(f"cannot read {name} in {folder.label}: {exc.strerror}") from exc
    try:
        _check_inside(folder, name, os.readlink(f"/proc/self/fd/{fd}"))
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PullError(f"{name} in {folder.label} is not a regular file")
        yield SourceFile(fd, name, real, info.st_size, info.st_uid, (info.st_dev, info.st_ino))
    finally:
        os.close(fd)


def _check_inside(folder: SourceFolder, name: str, real: str) -> None:
    if not any(Path(real).is_relative_to(root) for root in folder.roots):
        raise PullError(f"{name} in {folder.label} is a link that leads outside the folder; "
                        "copy the file into the folder instead")


def read_bytes(source: SourceFile, limit_bytes: int) -> bytes:
    """The whole file (small files only: config.json), refusing one over limit_bytes."""
    if source.size_bytes > limit_bytes:
        raise PullError(f"{source.name} is {source.size_bytes:,} bytes (at most {limit_bytes:,})")
    chunks, total = [], 0
    while chunk := os.pread(source.fd, 1 << 20, total):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit_bytes:
            raise PullError(f"{source.name} is larger than {limit_bytes:,} bytes")
    return b"".join(chunks)
