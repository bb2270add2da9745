"""Runners that crash while requests queue for them: one runner per model, none orphaned.

The property test drives the scheduler with fake runners through many seeded random
interleavings of requests, kills (the process gone, or its channel broken while the process
lingers), unloads and slow starts and stops. Time is event-loop turns (``sleep(0)``), so a
seed replays the same interleaving. After every step it checks what ``/api/ps`` relies on:
every runner the factory handed over that is alive and was not asked to stop is listed by
``running()``, with at most one such runner per model; after ``close()`` no runner process
is left running.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
from pathlib import Path

import httpx
import pytest

from krasisd.runners import ModelSpec, RunnerDied, RunnerLoadError
from krasisd.scheduler import Hardware, NoRoom, QueueFull, Scheduler

pytestmark = pytest.mark.timeout(60)

SEEDS = range(300)
MODELS = ("a", "b")


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


class CrashRunner:
    """A runner whose process can die (``kill``) or lose its channel (``break_channel``)."""

    pids = itertools.count(5000)

    def __init__(self, spec: ModelSpec, rng: random.Random, num_parallel: int):
        self.spec = spec
        self.rng = rng
        self.num_parallel = num_parallel
        self.pid = next(self.pids)
        self.load_duration_ns = 1
        self.process_running = True  # the OS process exists
        self.channel_open = True
        self.stop_requested = False

    @property
    def alive(self) -> bool:
        return self.process_running and self.channel_open

    def kill(self) -> None:
        self.process_running = False

    def break_channel(self) -> None:
        self.channel_open = False  # the process lingers until stop() kills it

    async def generate(self, request):
        for index in range(request["tokens"]):
            await _turns(self.rng.randint(0, 3))
            if not self.alive:
                raise RunnerDied(f"runner {self.pid} died")
            yield {"type": "chunk", "text": f"t{index}"}
        yield {"type": "done", "text": ""}

    def stop(self):
        """Noted when the scheduler calls it, before the returned coroutine runs."""
        self.stop_requested = True
        return self._stop()

    async def _stop(self) -> None:
        self.channel_open = False
        await _turns(self.rng.randint(0, 4))
        self.process_running = False


class World:
    """One seeded scenario: a scheduler, its fake runners, the requests in flight."""

    def __init__(self, seed: int, load_failure_rate: float = 0.05):
        self.rng = random.Random(seed)
        self.load_failure_rate = load_failure_rate
        self.runners: list[CrashRunner] = []
        self.num_parallel = self.rng.choice([1, 1, 2, 3])
        self.scheduler = Scheduler(self._factory, lambda: Hardware(100),
                                   keep_alive_s=self.rng.choice([60.0, float("inf")]),
                                   max_queue=self.rng.choice([2, 8]),
                                   max_loaded=self.rng.choice([1, 2]), wait_for_room_s=0.02)
        self.tasks: list[asyncio.Task] = []

    async def _factory(self, spec: ModelSpec) -> CrashRunner:
        await _turns(self.rng.randint(0, 5))
        if self.rng.random() < self.load_failure_rate:
            raise RunnerLoadError(f"failed to load {spec.name}: injected")
        runner = CrashRunner(spec, self.rng, self.num_parallel)
        self.runners.append(runner)
        return runner

    async def _request(self, spec: ModelSpec, keep_alive_s) -> None:
        request = {"tokens": self.rng.randint(1, 4)}
        async for _event in self.scheduler.generate(spec, request, keep_alive_s):
            pass

    def live(self) -> list[CrashRunner]:
        return [r for r in self.runners if r.alive and not r.stop_requested]

    def check(self, when: str) -> None:
        listed = {row["pid"]: row["spec"].name for row in self.scheduler.running()}
        for runner in self.live():
            assert listed.get(runner.pid) == runner.spec.name, (
                f"{when}: live runner {runner.pid} of {runner.spec.name} is not in ps "
                f"(ps: {listed})")
        for name in MODELS:
            count = sum(r.spec.name == name for r in self.live())
            assert count <= 1, f"{when}: {count} live runners for {name}"

    async def step(self) -> str:
        action = self.rng.choices(["request", "kill", "break", "unload", "wait"],
                                  weights=[6, 2, 1, 1, 3])[0]
        if action == "request":
            spec = ModelSpec(name=self.rng.choice(MODELS), model_dir=Path("/nonexistent"),
                             size_bytes=10)
            keep_alive_s = self.rng.choice([None, None, None, 0])
            self.tasks.append(asyncio.create_task(self._request(spec, keep_alive_s)))
        elif action in ("kill", "break"):
            victims = [r for r in self.runners if r.alive]
            if victims:
                victim = self.rng.choice(victims)
                victim.kill() if action == "kill" else victim.break_channel()
        elif action == "unload":
            await self.scheduler.unload(self.rng.choice(MODELS))
        await _turns(self.rng.randint(0, 6))
        return action

    async def run(self, steps: int) -> None:
        for index in range(steps):
            action = await self.step()
            self.check(f"after step {index} ({action})")
        results = await asyncio.wait_for(
            asyncio.gather(*self.tasks, return_exceptions=True), 20)
        for result in results:
            if isinstance(result, BaseException):
                assert isinstance(result, (RunnerDied, RunnerLoadError, QueueFull, NoRoom)), \
                    repr(result)
        self.check("after every request ended")
        await asyncio.wait_for(self.scheduler.close(), 20)
        left = [r.pid for r in self.runners if r.process_running]
        assert not left, f"runner processes left after close(): {left}"
        assert not self.scheduler.running()


@pytest.mark.parametrize("chunk", range(3))
def test_one_listed_runner_per_model_under_random_crashes(chunk):
    """300 seeded interleavings (100 per case) of 40 steps each."""
    for seed in SEEDS[chunk::3]:
        try:
            asyncio.run(World(seed).run(steps=40))
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from None


def test_close_while_requests_retry_leaves_no_runner_running():
    """Shutdown in the middle of crashes: requests still retrying start no runner after
    close(), and close() stops the ones it finds, loading ones included."""

    async def scenario(seed: int) -> None:
        world = World(seed)
        for _ in range(world.rng.randint(5, 30)):
            await world.step()
        await asyncio.wait_for(world.scheduler.close(), 10)
        results = await asyncio.wait_for(
            asyncio.gather(*world.tasks, return_exceptions=True), 10)
        await _turns(10)  # stops handed to tasks finish
        for result in results:
            if isinstance(result, BaseException):
                assert isinstance(result, (RunnerDied, RunnerLoadError, QueueFull, NoRoom)), \
                    repr(result)
        left = [r.pid for r in world.runners if r.process_running]
        assert not left, f"seed {seed}: runner processes left after close(): {left}"

    for seed in range(100):
        asyncio.run(scenario(seed))


def test_queued_requests_after_a_kill_start_one_runner():
    """The issue's case: 12 streams on one model, kill -9 while most of them wait."""

    async def main():
        world = World(7, load_failure_rate=0.0)
        world.num_parallel = 1
        world.scheduler = Scheduler(world._factory, lambda: Hardware(100), keep_alive_s=60,
                                    max_queue=16, max_loaded=1)
        spec = ModelSpec(name="a", model_dir=Path("/nonexistent"), size_bytes=10)
        tasks = [asyncio.create_task(world._request(spec, None)) for _ in range(12)]
        while not world.runners:
            await asyncio.sleep(0)
        await _turns(3)
        world.runners[0].kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        world.check("after the 12 streams")
        assert [r.spec.name for r in world.runners] == ["a", "a"]  # one replacement only
        assert sum(isinstance(r, RunnerDied) for r in results) <= 1  # only the one in flight
        await world.scheduler.close()
        assert not any(r.process_running for r in world.runners)

    asyncio.run(main())


# ------------------------------------------------------------------ real runner processes

def _live_runner_pids() -> set[int]:
    """Runner processes this test process started (the daemon runs on a thread of it).

    A runner names itself ``krasis-runner MODEL`` once started; before, its command line
    is ``python -m krasisd.runner ...``.
    """
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        is_runner = b"krasisd.runner" in cmdline or cmdline.startswith(b"krasis-runner")
        if int(ppid) == os.getpid() and state != "Z" and is_runner:
            pids.add(int(entry.name))
    return pids


async def _stream(socket_path: Path, index: int, num_predict: int = 20) -> list[dict]:
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                 timeout=30) as http:
        async with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": f"stream {index}",
                "options": {"num_predict": num_predict, "num_ctx": 2048}}) as response:
            return [json.loads(line) async for line in response.aiter_lines()]


def test_kill_9_with_queued_streams_leaves_every_runner_in_ps(tmp_path, fake_env):
    """12 streams on one runner serving one at a time; kill -9 while 11 wait."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    thread = DaemonThread(fake_config(tmp_path, num_parallel=1),
                          FakeRegistry(tmp_path / "models")).start()
    try:
        with thread.client() as http:
            assert http.post("/api/generate", json={"model": "fake"}).status_code == 200
            [first_pid] = [m["pid"] for m in http.get("/api/ps").json()["models"]]

            async def streams_with_a_kill():
                entry = thread.daemon.scheduler.loaded["fake:latest"]
                # the first stream holds the runner (10 s of tokens) until the kill ...
                tasks = [asyncio.create_task(_stream(thread.socket_path, 0, num_predict=5000))]
                while entry.active < 1:
                    await asyncio.sleep(0.005)
                # ... so the other 11 wait in its queue
                tasks += [asyncio.create_task(_stream(thread.socket_path, i))
                          for i in range(1, 12)]
                while entry.waiting < 11:
                    await asyncio.sleep(0.005)
                os.kill(first_pid, signal.SIGKILL)
                return await asyncio.gather(*tasks)

            results = asyncio.run(asyncio.wait_for(streams_with_a_kill(), 30))
            assert "SIGKILL" in results[0][-1]["error"]  # the one in flight fails
            assert all(r[-1].get("done") is True for r in results[1:])  # the queued ones run
            listed = {m["pid"] for m in http.get("/api/ps").json()["models"]}
            assert len(listed) == 1 and first_pid not in listed
            assert _live_runner_pids() == listed
    finally:
        thread.close()
    assert not _live_runner_pids()


def test_a_runner_whose_channel_closes_is_killed_if_it_lingers():
    """Not alive (so not in ps) must mean not running: a runner that drops its channel and
    stays up is killed once ``exit_wait_s`` has passed."""
    from krasisd.runners import RunnerProcess

    async def main():
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        parent, child = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        runner = RunnerProcess(ModelSpec(name="a", model_dir=Path("/nonexistent")), proc,
                               reader, writer, 0, exit_wait_s=0.2)
        try:
            child.close()  # the runner's end of the channel goes away; the process stays
            await asyncio.wait_for(proc.wait(), 5)
            assert proc.returncode == -signal.SIGKILL and not runner.alive
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await runner.stop()

    asyncio.run(main())
