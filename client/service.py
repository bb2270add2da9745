"""`krasis service install`: put the systemd units where systemd looks, never running sudo.

The units come from the ``systemd/`` folder of the source tree (``systemd/user/`` for
``--user``), or from ``<prefix>/share/krasis/systemd`` where a wheel installed them. Their ``ExecStart=`` is rewritten to the ``krasisd`` of this installation, since
where pip puts console scripts depends on how krasis was installed.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .client import KrasisError

UNIT_NAMES = ("krasisd.service", "krasisd.socket")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SERVICE_USER = "krasis"


@dataclass
class InstallPlan:
    """What `service install` writes, and the commands it tells the user to run."""

    user: bool
    target_dir: Path
    exec_start: str
    files: dict[Path, str]
    commands: list[str]
    warnings: list[str]


def source_dir(user: bool) -> Path:
    """The folder holding the unit templates: the source tree's, else installed data files."""
    roots = [Path(__file__).resolve().parent.parent / "systemd",
             Path(sys.prefix) / "share" / "krasis" / "systemd"]
    for root in roots:
        folder = root / "user" if user else root
        if all((folder / name).is_file() for name in UNIT_NAMES):
            return folder
    raise KrasisError(f"the unit files are in none of {', '.join(map(str, roots))}; install "
                      "krasis from its source tree (pip install -e .) to use this command")


def target_dir(user: bool) -> Path:
    """~/.config/systemd/user (honouring XDG_CONFIG_HOME) or /etc/systemd/system."""
    if not user:
        return SYSTEM_UNIT_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def find_krasisd() -> str:
    """The absolute command line that starts this installation's daemon."""
    candidates = [Path(sysconfig.get_path("scripts")) / "krasisd",
                  Path(sys.executable).parent / "krasisd"]
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        candidates.append(Path(sysconfig.get_path("scripts", user_scheme)) / "krasisd")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return _quote(str(path))
    found = shutil.which("krasisd")
    if found:
        return _quote(str(Path(found).absolute()))
    return f"{_quote(sys.executable)} -m krasisd"


def _quote(word: str) -> str:
    return f'"{word}"' if any(c.isspace() for c in word) else word


def render_unit(text: str, exec_start: str) -> str:
    """The unit text with its ExecStart= command replaced (arguments kept)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            args = line[len("ExecStart="):].split(maxsplit=1)[1:]
            line = "ExecStart=" + " ".join([exec_start, *args])
        lines.append(line)
    return "\n".join(lines) + "\n"


def plan_install(user: bool, dest: Path | None = None, krasisd: str | None = None) -> InstallPlan:
    """Work out the files and commands without touching anything."""
    exec_start = krasisd or find_krasisd()
    folder = dest or target_dir(user)
    files = {folder / name: render_unit((source_dir(user) / name).read_text(), exec_start)
             for name in UNIT_NAMES}
    warnings = []
    if not user and exec_start.lstrip('"').startswith(("/home/", "/root/")):
        warnings.append(f"{exec_start} is under a home directory, which the system service "
                        "hides (ProtectHome=yes): install krasis elsewhere, for example in a "
                        "virtual environment under /opt/krasis")
    return InstallPlan(user, folder, exec_start, files, _commands(user), warnings)


def _commands(user: bool) -> list[str]:
    if user:
        return ["systemctl --user daemon-reload",
                "systemctl --user enable --now krasisd.socket   # started on first use",
                "loginctl enable-linger \"$USER\"                # optional: keep it after logout"]
    sudo = "" if os.geteuid() == 0 else "sudo "
    commands = []
    if not _user_exists(SERVICE_USER):
        commands.append(f"{sudo}useradd --system --user-group --home-dir /var/lib/krasis "
                        f"--shell /usr/sbin/nologin {SERVICE_USER}")
    commands += [f"{sudo}usermod -aG {SERVICE_USER} \"$USER\"   # lets you use the socket",
                 f"{sudo}systemctl daemon-reload",
                 f"{sudo}systemctl enable --now krasisd.socket   # started on first use"]
    return commands


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def write_files(plan: InstallPlan) -> None:
    """Write every unit atomically (a temporary file, then a rename), mode 0644."""
    try:
        plan.target_dir.mkdir(parents=True, exist_ok=True)
        for path, text in plan.files.items():
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                os.chmod(tmp_name, 0o644)
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except PermissionError:
        hint = "run `sudo krasis service install`" if not plan.user else "check its permissions"
        raise KrasisError(f"cannot write to {plan.target_dir}: permission denied; {hint}, "
                          "or use --dry-run to see the files") from None
    except OSError as exc:
        raise KrasisError(f"cannot write to {plan.target_dir}: {exc.strerror or exc}") from None
