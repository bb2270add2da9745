"""Run a real krasisd (server, app, scheduler, runner processes) in a thread of the test."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from krasisd.config import Config
from krasisd.server import build_daemon, serve


class DaemonThread:
    """The daemon's event loop on a thread; ``close()`` stops it like SIGTERM would."""

    def __init__(self, cfg: Config, registry, **build_kwargs):
        self.cfg = cfg
        self.registry = registry
        self.build_kwargs = build_kwargs
        self.daemon = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="krasisd")

    @property
    def socket_path(self) -> Path:
        return self.cfg.socket

    def start(self, timeout_s: float = 20.0) -> DaemonThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._error is not None:
                raise self._error
            if self.daemon is not None and _connectable(self.cfg.socket):
                return self
            time.sleep(0.02)
        raise TimeoutError("krasisd did not start listening")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        daemon = build_daemon(self.cfg, registry=self.registry, **self.build_kwargs)
        self.daemon = daemon
        await serve(self.cfg, daemon, self._stop)

    def call(self, coro, timeout_s: float = 10.0):
        """Run a coroutine on the daemon's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("krasisd did not stop")

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return uds_client(self.cfg.socket, timeout_s)


def uds_client(path: Path, timeout_s: float = 30.0) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                        base_url="http://localhost", timeout=timeout_s)


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


class Proc:
    """A krasisd process with its own home and runtime dir; stderr goes to a file."""

    def __init__(self, root: Path, **env):
        self.root = root
        self.socket = root / "run" / "krasis" / "krasisd.sock"
        self.log = root / f"krasisd-{len(list(root.glob('krasisd-*.log')))}.log"
        full_env = {**os.environ, "KRASIS_HOME": str(root / "home"),
                    "XDG_RUNTIME_DIR": str(root / "run"), "KRASIS_LOG_LEVEL": "info", **env}
        full_env.pop("KRASIS_SOCKET", None)
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "krasisd"], env=full_env,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def wait_ready(self, timeout_s: float = 20) -> Proc:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                with uds_client(self.socket, 2) as http:
                    if http.get("/").status_code == 200:
                        return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(self.stderr())

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


def ollama_over_socket(socket_path: Path):
    """The official ollama client, talking to a daemon's Unix socket."""
    import httpx
    import ollama

    return ollama.Client(host="http://localhost", timeout=30,
                         transport=httpx.HTTPTransport(uds=str(socket_path)))


def openai_over_socket(socket_path: Path):
    """The official openai client, talking to a daemon's Unix socket (no retries)."""
    import httpx
    import openai

    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=30)
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http,
                         max_retries=0)
