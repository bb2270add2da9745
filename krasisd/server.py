"""Start-up and shut-down: listeners, the app, systemd notifications, preloading.

Two lock files are held for the daemon's lifetime: ``$KRASIS_HOME/krasisd.lock`` (one
daemon per home, whatever socket it uses: a second one would delete models the first has
loaded) and one next to the Unix socket. A second daemon finds a lock taken and exits with
a clear message, and never touches a live socket; a socket file left by a dead daemon (no
lock holder) is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from krasisd import connections
from krasisd.app import make_app
from krasisd.config import Config, is_loopback
from krasisd.context import Daemon
from krasisd.models import ModelCatalog
from krasisd.runners import ModelSpec, RunnerProcess
from krasisd.scheduler import Hardware, Scheduler

log = logging.getLogger(__name__)


class AlreadyRunning(Exception):
    """Another daemon holds the socket or the home."""


class DaemonLock:
    """An exclusive flock on a lock file, held while the daemon runs; the file says who."""

    def __init__(self, path: Path, busy_message: str, holder_note: str = ""):
        self.path = path
        self.busy_message = busy_message  # the error when another daemon holds it
        self.holder_note = holder_note  # written into the file for the next one's message
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip().replace("\n", ", ")
            os.close(fd)
            raise AlreadyRunning(self.busy_message.format(holder=holder or "unknown")) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n{self.holder_note}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def socket_lock(socket_path: Path) -> DaemonLock:
    """'<socket>.lock': one daemon per socket path."""
    return DaemonLock(socket_path.with_name(socket_path.name + ".lock"),
                      f"another krasisd ({{holder}}) is already serving {socket_path}; stop it "
                      "first (or set KRASIS_SOCKET to another path)")


def home_lock(cfg: Config) -> DaemonLock:
    """'$KRASIS_HOME/krasisd.lock': one daemon per home, whichever socket it serves."""
    return DaemonLock(cfg.home / "krasisd.lock",
                      f"another krasisd ({{holder}}) is already using KRASIS_HOME {cfg.home}; "
                      "stop it first (or set KRASIS_HOME to another folder)",
                      holder_note=f"socket {cfg.socket}\n")


def bind_unix_socket(path: Path, group: str = "") -> socket.socket:
    """Bind the API socket with mode 0600 (0660 and that group when ``group`` is set)."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AlreadyRunning(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise AlreadyRunning(f"another krasisd is already listening on {path}")
        log.info("replacing stale socket", extra={"path": str(path)})
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file is created 0600: never briefly world-writable
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    sock.listen(512)
    return sock


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_tcp(cfg: Config) -> socket.socket | None:
    """The optional TCP listener (KRASIS_HOST)."""
    address = cfg.tcp_address
    if address is None:
        return None
    if not is_loopback(address[0]):
        log.warning("TCP listener on a non-loopback address", extra={"host": cfg.host})
    return socket.create_server(address, backlog=512, reuse_port=False)


def probe_hardware(cfg: Config) -> Hardware:
    """Memory for loaded models: KRASIS_MEMORY_BUDGET, else RAM plus KRASIS_VRAM_BUDGET."""
    if cfg.memory_budget_bytes:
        return Hardware(cfg.memory_budget_bytes)
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(ram_bytes + (cfg.vram_budget_bytes or 0))


def _systemd():
    """krasisd.systemd when present (it is optional for running outside systemd)."""
    try:
        from krasisd import systemd
    except ImportError:
        return None
    return systemd


def build_daemon(cfg: Config, registry: Any = None,
                 runner_factory: Callable[[ModelSpec], Awaitable[Any]] | None = None,
                 probe: Callable[[], Hardware] | None = None) -> Daemon:
    """The daemon's parts; tests pass fakes for the registry, runners or hardware."""
    if registry is None:
        from krasis_registry import Registry

        registry = Registry(home=cfg.home, quant=cfg.quant)
    scheduler = Scheduler(runner_factory or (lambda spec: RunnerProcess.start(spec, cfg)),
                          probe or (lambda: probe_hardware(cfg)), keep_alive_s=cfg.keep_alive_s,
                          max_queue=cfg.max_queue, max_loaded=cfg.max_loaded,
                          wait_for_room_s=cfg.room_timeout_s)
    return Daemon(cfg, ModelCatalog(registry, cfg.quant), scheduler)


def _listeners(cfg: Config, lock: DaemonLock) -> tuple[list[socket.socket], bool, set[str]]:
    """(sockets, owns_socket_file, TCP host names): systemd's sockets, else our own."""
    systemd = _systemd()
    passed = systemd.listen_fds() if systemd is not None else []
    if passed:
        names = {str(s.getsockname()[0]).lower() for s in passed if s.family != socket.AF_UNIX}
        tcp = None if names else bind_tcp(cfg)  # KRASIS_HOST beside a passed Unix socket
        if tcp is not None:
            return passed + [tcp], False, {cfg.tcp_address[0].lower()}
        return passed, False, names
    lock.acquire()
    sockets = [bind_unix_socket(cfg.socket, cfg.socket_group)]
    tcp = bind_tcp(cfg)
    if tcp is None:
        return sockets, True, set()
    return sockets + [tcp], True, {cfg.tcp_address[0].lower()}


async def _preload(daemon: Daemon, names: list[str]) -> None:
    systemd = _systemd()
    for name in names:
        if systemd is not None:
            systemd.status(f"loading {name}")
        try:
            spec = await daemon.catalog.spec(name)
            await daemon.scheduler.load(spec, keep_alive_s=None)
            log.info("preloaded", extra={"model": spec.name})
        except Exception as exc:  # noqa: BLE001 - a bad preload must not stop the daemon
            log.error("preload failed", extra={"model": name, "error": str(exc)})
    if systemd is not None:
        systemd.status("ready")


async def serve(cfg: Config, daemon: Daemon | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``stop`` is set)."""
    home = home_lock(cfg)
    home.acquire()  # a second daemon on this KRASIS_HOME stops here
    lock = socket_lock(cfg.socket)
    try:
        sockets, owns_socket, tcp_names = _listeners(cfg, lock)  # or here, for this socket
        try:
            daemon = daemon or build_daemon(cfg)
            daemon.extra_hosts |= tcp_names
            await _run(cfg, daemon, sockets, stop or asyncio.Event())
        finally:
            for sock in sockets:
                sock.close()
            if owns_socket:
                with contextlib.suppress(FileNotFoundError):
                    cfg.socket.unlink()
    finally:
        lock.release()
        home.release()


async def _run(cfg: Config, daemon: Daemon, sockets: list[socket.socket],
               stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests)
            loop.add_signal_handler(signum, stop.set)
    loop.set_exception_handler(connections.AcceptErrorLog())  # no traceback per failed accept()
    # aiohttp's keep-alive timer closes a connection that has no complete request headers
    # (new, or idle between requests) after this long: the header timeout.
    runner = web.AppRunner(make_app(daemon), handler_cancellation=True, access_log=None,
                           keepalive_timeout=cfg.header_timeout_s, logger=connections.HttpServerLog())
    await runner.setup()
    cap = connections.ConnectionCap(connections.connection_cap(
        cfg.max_connections, connections.open_files_limit()))
    systemd = _systemd()
    tasks = []
    try:
        for sock in sockets:
            await connections.CappedSite(runner, sock, cap).start()
            log.info("listening", extra={"address": _address(sock)})
        tasks.append(asyncio.create_task(_preload(daemon, cfg.preload)))
        if systemd is not None:
            systemd.ready("ready")
            tasks.append(asyncio.create_task(systemd.run_watchdog()))
        await stop.wait()
        log.info("shutting down")
        if systemd is not None:
            systemd.stopping()
    finally:
        for task in tasks:
            task.cancel()
        await daemon.scheduler.close()
        await runner.cleanup()
        daemon.catalog.close()


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    return name if isinstance(name, str) else f"{name[0]}:{name[1]}"
