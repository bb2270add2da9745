"""Which runner serves a request: find it, start it, queue for it, unload it.

The scheduler only decides; starting processes is the runner factory's job and measuring
the machine is the hardware probe's, both passed in so tests can use fakes:

- ``runner_factory(spec) -> awaitable runner`` with ``.generate(request)`` (an async
  iterator of events), ``.alive``, ``.pid``, ``.load_duration_ns`` and ``async .stop()``;
- ``probe() -> Hardware``, the memory that loaded models may use.

Each runner serves up to ``runner.num_parallel`` requests at once (KRASIS_NUM_PARALLEL,
reported by the runner; 1 when it does not say); the others wait in its queue, which holds
at most ``max_queue`` requests (one more gets :class:`QueueFull`, HTTP 503). A runner with
any request in flight or queued is busy: it is never unloaded to make room or by
keep-alive. Loading a model when ``max_loaded`` models are loaded, or when the memory
estimate does not fit, first unloads the idle model whose keep-alive ends soonest; when
every loaded model is busy the load waits up to ``wait_for_room_s`` for one to become idle
(the daemon passes KRASIS_ROOM_TIMEOUT), then fails with
:class:`NoRoom` (HTTP 503). keep_alive follows Ollama: seconds, ``inf`` keeps the model
forever, 0 unloads it as soon as it is idle.

One runner per model, whatever the order of crashes, queued retries and unloads: a model's
entry is replaced only by the synchronous step that takes the old one out of ``loaded``
(:meth:`Scheduler._retire`), and the old runner is stopped by a tracked task that
:meth:`Scheduler.close` waits for, so every runner process is either listed by
:meth:`Scheduler.running` (``/api/ps``) or being stopped. After ``close()`` starts, no
runner is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from krasisd.config import num_parallel_value
from krasisd.runners import ModelSpec, RunnerDied

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests wait for one model (HTTP 503)."""


class NoRoom(Exception):
    """A model cannot be loaded because every loaded model is busy (HTTP 503)."""


class Stopping(RunnerDied):
    """krasisd is shutting down: no runner is started any more."""


@dataclass
class Hardware:
    """Memory the loaded models may share, in bytes."""

    memory_bytes: int


@dataclass
class Loaded:
    """A model with a runner (or one being started)."""

    spec: ModelSpec
    keep_alive_s: float
    runner: Any = None
    ready: asyncio.Future | None = None
    slots: asyncio.Semaphore | None = None  # one per request in flight; set when ready
    waiting: int = 0  # requests queued, not counting the running ones
    active: int = 0  # requests queued or running
    expires_at: float = math.inf  # time.monotonic() when it unloads, while idle
    timer: asyncio.TimerHandle | None = None
    load_duration_ns: int = 0

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.runner is not None


def runner_capacity(runner) -> int:
    """Requests the runner serves at once: its ``num_parallel``, else 1."""
    try:
        return num_parallel_value(getattr(runner, "num_parallel", 1))
    except ValueError as exc:
        log.warning("runner reports a bad num_parallel; serving one request at a time",
                    extra={"reason": str(exc)})
        return 1


class Scheduler:
    """Per-model runners with keep-alive, eviction and bounded queues."""

    def __init__(self, runner_factory: Callable[[ModelSpec], Awaitable[Any]],
                 probe: Callable[[], Hardware], *, keep_alive_s: float, max_queue: int,
                 max_loaded: int, wait_for_room_s: float = 600.0):
        self._factory = runner_factory
        self._probe = probe
        self.keep_alive_s = keep_alive_s
        self.max_queue = max_queue
        self.max_loaded = max_loaded
        self.wait_for_room_s = wait_for_room_s  # how long a load waits for a busy model
        self.loaded: dict[str, Loaded] = {}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()  # runner starts and stops in progress
        self._closing = False

    # ------------------------------------------------------------ requests

    async def generate(self, spec: ModelSpec, request: dict,
                       keep_alive_s: float | None = None) -> AsyncIterator[dict]:
        """Run ``request`` on the model's runner; the first event has ``load_duration``."""
        for _attempt in range(2):
            entry = await self._enqueue(spec, keep_alive_s)
            holding = False
            try:
                runner = await self._await_runner(entry)
                async with entry.slots:
                    entry.waiting -= 1
                    holding = True
                    if not runner.alive:
                        continue  # died while this request waited: start a fresh one
                    load_ns, entry.load_duration_ns = entry.load_duration_ns, 0
                    async for event in runner.generate(request):
                        yield {**event, "load_duration": load_ns}
                        load_ns = 0
                    return
            finally:
                if not holding:
                    entry.waiting -= 1
                await self._release(entry)
        raise RunnerDied(f"the runner for {spec.name} stopped twice in a row; see the daemon log")

    async def _enqueue(self, spec: ModelSpec, keep_alive_s: float | None) -> Loaded:
        entry = await self._entry(spec, keep_alive_s)
        if entry.waiting >= self.max_queue:
            raise QueueFull(f"server busy: {self.max_queue} requests already wait for "
                            f"{spec.name} (KRASIS_MAX_QUEUE); retry later")
        entry.active += 1
        entry.waiting += 1
        return entry

    async def load(self, spec: ModelSpec, keep_alive_s: float | None = None) -> int:
        """Load the model without generating (Ollama's empty prompt); returns load ns."""
        entry = await self._entry(spec, keep_alive_s)
        entry.active += 1
        try:
            await self._await_runner(entry)
            load_ns, entry.load_duration_ns = entry.load_duration_ns, 0
            return load_ns
        finally:
            await self._release(entry)

    async def _entry(self, spec: ModelSpec, keep_alive_s: float | None) -> Loaded:
        # No await between looking the entry up and replacing it: two requests that find
        # the same dead runner must not start two new ones.
        if self._closing:
            raise Stopping(f"cannot start {spec.name}: krasisd is stopping")
        entry = self.loaded.get(spec.name)
        if entry is not None and entry.runner is not None and not entry.runner.alive:
            log.warning("runner gone; starting a new one", extra={"model": spec.name})
            self._retire(entry)
            entry = None
        if entry is None:
            entry = Loaded(spec, self.keep_alive_s)
            entry.ready = asyncio.get_running_loop().create_future()
            self.loaded[spec.name] = entry
            self._track(self._start(entry))
        if keep_alive_s is not None:
            entry.keep_alive_s = keep_alive_s
        self._cancel_timer(entry)
        return entry

    async def _await_runner(self, entry: Loaded):
        return await asyncio.shield(entry.ready)

    async def _start(self, entry: Loaded) -> None:
        try:
            async with self._load_lock:
                await self._make_room(entry)
                if self._closing:
                    raise Stopping(f"{entry.spec.name} was not started: krasisd is stopping")
                runner = await self._factory(entry.spec)
            if self._closing or self.loaded.get(entry.spec.name) is not entry:
                self._track(runner.stop())
                raise Stopping(f"{entry.spec.name} was not started: krasisd is stopping")
            entry.runner = runner
            entry.slots = asyncio.Semaphore(runner_capacity(entry.runner))
            entry.load_duration_ns = entry.runner.load_duration_ns
            entry.ready.set_result(entry.runner)
        except BaseException as exc:
            if self.loaded.get(entry.spec.name) is entry:
                del self.loaded[entry.spec.name]
            entry.ready.set_exception(exc)
            entry.ready.exception()  # retrieved here, so an unawaited failure is not logged
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _release(self, entry: Loaded) -> None:
        entry.active -= 1
        if entry.active > 0 or self.loaded.get(entry.spec.name) is not entry:
            return
        if entry.runner is not None and not entry.runner.alive:
            await self._drop(entry)
        elif entry.keep_alive_s <= 0:
            await self.unload(entry.spec.name)
        else:
            self._arm_timer(entry)
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------ keep-alive

    def _arm_timer(self, entry: Loaded) -> None:
        self._cancel_timer(entry)
        if math.isinf(entry.keep_alive_s):
            entry.expires_at = math.inf
            return
        entry.expires_at = time.monotonic() + entry.keep_alive_s
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(entry.keep_alive_s, lambda: asyncio.ensure_future(
            self._expire(entry)))

    def _cancel_timer(self, entry: Loaded) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    async def _expire(self, entry: Loaded) -> None:
        if self.loaded.get(entry.spec.name) is entry and entry.idle:
            log.info("keep_alive expired; unloading", extra={"model": entry.spec.name})
            await self.unload(entry.spec.name)

    # ------------------------------------------------------------ room

    async def _make_room(self, new: Loaded) -> None:
        """Unload idle models until ``new`` fits by count and by memory estimate."""
        deadline = time.monotonic() + self.wait_for_room_s
        while not self._fits(new) and not self._closing:
            victim = self._idle_victim(new)
            if victim is not None:
                log.info("unloading idle model to make room", extra={
                    "model": victim.spec.name, "for": new.spec.name})
                await self.unload(victim.spec.name)
                continue
            if not self._others(new):
                return  # nothing else is loaded: try anyway, the engine may place it in RAM
            async with self._changed:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise NoRoom(
                        f"cannot load {new.spec.name}: every loaded model stayed busy for "
                        f"{self.wait_for_room_s:g} s (KRASIS_ROOM_TIMEOUT); try again when a "
                        "request has finished")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining_s)

    def _others(self, new: Loaded) -> list[Loaded]:
        return [e for e in self.loaded.values() if e is not new and e.runner is not None]

    def _fits(self, new: Loaded) -> bool:
        others = self._others(new)
        if len(others) + 1 > self.max_loaded:
            return False
        used_bytes = sum(e.spec.size_bytes for e in others)
        return used_bytes + new.spec.size_bytes <= self._probe().memory_bytes

    def _idle_victim(self, new: Loaded) -> Loaded | None:
        idle = [e for e in self._others(new) if e.idle]
        return min(idle, key=lambda e: e.expires_at) if idle else None

    # ------------------------------------------------------------ unloading

    async def unload(self, name: str) -> bool:
        """Stop the model's runner now (its requests fail); False if it was not loaded."""
        entry = self.loaded.get(name)
        if entry is None or entry.runner is None:
            return False
        await self._drop(entry)
        return True

    async def _drop(self, entry: Loaded) -> None:
        """Take the entry out and wait until its runner has stopped."""
        stopping = self._retire(entry)
        if stopping is not None:
            await asyncio.shield(stopping)  # a cancelled caller does not cancel the stop

    def _retire(self, entry: Loaded) -> asyncio.Task | None:
        """Take the entry out of ``loaded`` now and stop its runner in a tracked task."""
        self._cancel_timer(entry)
        if self.loaded.get(entry.spec.name) is entry:
            del self.loaded[entry.spec.name]
        runner, entry.runner = entry.runner, None
        return None if runner is None else self._track(runner.stop())

    def _track(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def is_loaded(self, name: str) -> bool:
        return name in self.loaded

    def is_busy(self, name: str) -> bool:
        entry = self.loaded.get(name)
        return entry is not None and entry.active > 0

    async def close(self) -> None:
        """Stop every runner (daemon shutdown); loads under way finish, then stop."""
        self._closing = True
        while self.loaded or self._tasks:
            for entry in list(self.loaded.values()):
                if entry.runner is not None:
                    self._retire(entry)
            async with self._changed:
                self._changed.notify_all()  # loads waiting for room give up
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def running(self) -> list[dict]:
        """/api/ps: the models with a live runner."""
        out = []
        for entry in self.loaded.values():
            if entry.runner is None or not entry.runner.alive:
                continue
            expires = entry.expires_at if entry.active == 0 else math.inf
            out.append({"spec": entry.spec, "pid": entry.runner.pid, "active": entry.active,
                        "vram_bytes": getattr(entry.runner, "vram_bytes", 0),
                        "prefix_cache": getattr(entry.runner, "prefix_cache", None),
                        "expires_in_s": expires - time.monotonic()
                        if not math.isinf(expires) else None,
                        "keep_alive_s": entry.keep_alive_s})
        return out
