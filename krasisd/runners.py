"""The daemon's side of a runner process: start it, talk to it, notice when it dies.

The runner (``python -m krasisd.runner``) gets one end of a socket pair; both sides speak
JSON lines. Daemon -> runner: ``{"type": "generate", "id", ...request}``,
``{"type": "cancel", "id"}``. Runner -> daemon: ``{"type": "ready", "pid", "vram_bytes",
"num_parallel"}`` or ``{"type": "load_error", "error"}`` once, then per request
``{"type": "chunk", "id", "text", "token_id", "logprob"}`` ... and ``{"type": "done", "id",
counters}`` or ``{"type": "error", "id", "status", "error"}``. With a prefix cache, ready
and done also carry ``"prefix_cache"`` (its bytes, blocks, hit_rate, ...; kept for
/api/ps) and done ``"prompt_eval_cached_count"``.

Up to ``num_parallel`` requests (``--num-parallel``, KRASIS_NUM_PARALLEL; a ready message
without it means 1) are in flight on one channel at once: their events interleave and are
routed by ``id``, and a cancel stops only the request it names.

A runner that exits (a crash, ``kill -9``, an out-of-memory kill) fails the requests in
flight on it with :class:`RunnerDied`; the scheduler then starts a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from krasisd.config import Config

log = logging.getLogger(__name__)

_LINE_LIMIT_BYTES = 1 << 20


class RunnerDied(Exception):
    """The runner process exited while requests were in flight."""


class RunnerLoadError(Exception):
    """The runner could not load the model; the message says why."""


class RunnerRequestError(Exception):
    """The runner refused or failed one request (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ModelSpec:
    """What the scheduler knows of a model before loading it."""

    name: str
    model_dir: Path
    size_bytes: int = 0
    digest: str = ""
    details: dict = field(default_factory=dict)
    cache_dir: Path | None = None  # the registry's CPU-format cache
    quant: str | None = None  # None: KRASIS_QUANT
    gpu_cache_dir: Path | None = None  # the registry's GPU-format cache, when it built one
    system: str | None = None  # the model's default system message (/api/create)
    options: dict = field(default_factory=dict)  # its default sampling options (/api/create)


def describe_exit(returncode: int | None) -> str:
    """'killed by SIGKILL' / 'exit status 1'."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class RunnerProcess:
    """One runner process holding one model, serving up to ``num_parallel`` requests."""

    def __init__(self, spec: ModelSpec, proc: asyncio.subprocess.Process,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 load_duration_ns: int, exit_wait_s: float = 5.0):
        self.spec = spec
        self.exit_wait_s = exit_wait_s  # after its channel closes, how long it may take to exit
        self.proc = proc
        self.load_duration_ns = load_duration_ns
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue] = {}
        self._stopping = False
        self.vram_bytes = 0
        self.num_parallel = 1
        self.prefix_cache: dict | None = None  # the runner's last prefix-cache counters
        self._read_task = asyncio.create_task(self._read_loop())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self._read_task.done()

    @classmethod
    async def start(cls, spec: ModelSpec, cfg: Config) -> RunnerProcess:
        """Spawn the runner and wait until its engine is loaded (or fails to load)."""
        started_ns = time.monotonic_ns()
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *_runner_argv(spec, cfg, child.fileno()), pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env=_runner_env(cfg))
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=_LINE_LIMIT_BYTES)
        log.info("runner starting", extra={"model": spec.name, "pid": proc.pid})
        try:
            first = await asyncio.wait_for(reader.readline(), cfg.load_timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            await _kill(proc)
            writer.close()
            raise RunnerLoadError(f"loading {spec.name} took longer than "
                                  f"{cfg.load_timeout_s:.0f} s (KRASIS_LOAD_TIMEOUT)") from None
        message = json.loads(first) if first else {}
        if message.get("type") != "ready":
            writer.close()
            returncode = await proc.wait()
            reason = message.get("error") or f"runner exited during load ({describe_exit(returncode)})"
            raise RunnerLoadError(f"failed to load {spec.name}: {reason}")
        load_ns = time.monotonic_ns() - started_ns
        log.info("runner ready", extra={"model": spec.name, "pid": proc.pid,
                                        "load_ms": load_ns // 1_000_000})
        runner = cls(spec, proc, reader, writer, load_ns)
        runner.vram_bytes = int(message.get("vram_bytes") or 0)
        runner.num_parallel = max(1, int(message.get("num_parallel") or 1))
        runner.prefix_cache = message.get("prefix_cache")
        return runner

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Run one request: yields chunk events and ends with the done event."""
        if not self.alive:
            raise RunnerDied(f"runner for {self.spec.name} is not running")
        request_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request_id] = queue
        finished = False
        try:
            self._send({"type": "generate", "id": request_id, **request})
            while True:
                event = await queue.get()
                kind = event.get("type")
                if kind == "died":
                    finished = True
                    raise RunnerDied(event["error"])
                if kind == "error":
                    finished = True
                    raise RunnerRequestError(int(event.get("status", 500)), event["error"])
                finished = kind == "done"
                yield event
                if finished:
                    return
        finally:
            self._pending.pop(request_id, None)
            if not finished and self.alive:
                self._send({"type": "cancel", "id": request_id})

    def _send(self, message: dict) -> None:
        self._writer.write(json.dumps(message).encode() + b"\n")

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                event = json.loads(line)
                if isinstance(event.get("prefix_cache"), dict):  # also a cancelled one's
                    self.prefix_cache = event["prefix_cache"]
                queue = self._pending.get(event.get("id"))
                if queue is not None:
                    queue.put_nowait(event)
        except (ConnectionError, ValueError) as exc:
            log.warning("runner channel broken", extra={"model": self.spec.name, "error": str(exc)})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proc.wait(), self.exit_wait_s)
        if self.proc.returncode is None and not self._stopping:
            # Without its channel the runner can serve nothing, and the scheduler no longer
            # lists it: it must not live on unseen, holding the model's memory.
            log.error("runner channel closed but the process did not exit; killing it",
                      extra={"model": self.spec.name, "pid": self.pid})
            await _kill(self.proc)
        reason = describe_exit(self.proc.returncode)
        if self._stopping:
            message = f"{self.spec.name} was unloaded (the daemon is stopping or made room)"
        else:
            message = (f"the runner for {self.spec.name} stopped unexpectedly ({reason}); "
                       "retry the request")
            log.error("runner exited", extra={"model": self.spec.name, "pid": self.pid,
                                              "reason": reason, "requests": len(self._pending)})
        for queue in self._pending.values():
            queue.put_nowait({"type": "died", "error": message})

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the runner to exit (closing its channel), then terminate, then kill."""
        self._stopping = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._writer.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            await _kill(self.proc)
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        log.info("runner stopped", extra={"model": self.spec.name, "pid": self.pid})


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _runner_env(cfg: Config) -> dict[str, str]:
    """The daemon's environment (the engine's settings travel as arguments, _runner_argv)."""
    return dict(os.environ)


def _runner_argv(spec: ModelSpec, cfg: Config, fd: int) -> list[str]:
    argv = [sys.executable, "-m", "krasisd.runner", "--fd", str(fd), "--model", spec.name,
            "--model-dir", str(spec.model_dir), "--loader", cfg.runner_loader,
            "--quant", spec.quant or cfg.quant, "--device", cfg.device, "--log-format", cfg.log_format,
            "--log-level", cfg.log_level, "--num-parallel", str(cfg.num_parallel),
            "--gpu-dense", cfg.gpu_dense,
            "--gpu-prefill-min-tokens", str(cfg.gpu_prefill_min_tokens),
            "--moe-autotune", "on" if cfg.moe_autotune else "off",
            "--tuning-dir", str(cfg.home / "tuning")]
    if cfg.vram_budget_bytes is not None:
        argv += ["--vram-budget", str(cfg.vram_budget_bytes)]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    if cfg.kv_budget_bytes is not None:
        argv += ["--kv-budget-bytes", str(cfg.kv_budget_bytes)]
    if cfg.prefill_chunk_tokens is not None:
        argv += ["--prefill-chunk-tokens", str(cfg.prefill_chunk_tokens)]
    if cfg.prefix_cache_bytes is not None:
        argv += ["--prefix-cache-bytes", str(cfg.prefix_cache_bytes)]
    if spec.cache_dir is not None:
        argv += ["--cache-dir", str(spec.cache_dir)]
    if spec.gpu_cache_dir is not None:
        argv += ["--gpu-cache-dir", str(spec.gpu_cache_dir)]
    return argv
