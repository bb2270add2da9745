"""The scheduler with fake runners and a fake hardware probe: queueing, eviction, keep-alive."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from krasisd.runners import ModelSpec, RunnerDied
from krasisd.scheduler import Hardware, NoRoom, QueueFull, Scheduler

pytestmark = pytest.mark.timeout(30)


class FakeRunner:
    """Yields ``tokens`` chunks, waiting on ``gate`` before each when it is set."""

    pids = iter(range(1000, 100000))

    def __init__(self, spec: ModelSpec, gate: asyncio.Event | None, num_parallel=None):
        self.spec = spec
        self.gate = gate
        if num_parallel is not None:
            self.num_parallel = num_parallel
        self.running = 0  # requests inside generate()
        self.most_running = 0
        self.alive = True
        self.pid = next(self.pids)
        self.load_duration_ns = 5
        self.stopped = False

    async def generate(self, request):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            for i in range(request.get("tokens", 2)):
                if self.gate is not None:
                    await self.gate.wait()
                if not self.alive:
                    raise RunnerDied("runner died")
                yield {"type": "chunk", "text": f"t{i}"}
            if "hold" in request:
                await request["hold"].wait()
            yield {"type": "done", "text": ""}
        finally:
            self.running -= 1

    async def stop(self):
        self.alive = False
        self.stopped = True


def spec(name: str, size_bytes: int = 10) -> ModelSpec:
    return ModelSpec(name=name, model_dir=Path("/nonexistent"), size_bytes=size_bytes)


def make(memory_bytes=1000, max_loaded=2, max_queue=4, keep_alive_s=60.0, gate=None,
         num_parallel=None, wait_for_room_s=600.0):
    started: list[FakeRunner] = []

    async def factory(model_spec):
        runner = FakeRunner(model_spec, gate, num_parallel)
        started.append(runner)
        return runner

    scheduler = Scheduler(factory, lambda: Hardware(memory_bytes), keep_alive_s=keep_alive_s,
                          max_queue=max_queue, max_loaded=max_loaded,
                          wait_for_room_s=wait_for_room_s)
    return scheduler, started


async def drain(scheduler, model_spec, keep_alive_s=None, tokens=2):
    return [e async for e in scheduler.generate(model_spec, {"tokens": tokens}, keep_alive_s)]


def test_one_runner_per_model_and_load_duration_once():
    async def main():
        scheduler, started = make()
        first = await drain(scheduler, spec("a"))
        second = await drain(scheduler, spec("a"))
        assert len(started) == 1
        assert first[0]["load_duration"] == 5 and second[0]["load_duration"] == 0
        assert [e["type"] for e in first] == ["chunk", "chunk", "done"]
    asyncio.run(main())


def test_queue_bound_gives_queue_full():
    async def main():
        gate = asyncio.Event()
        scheduler, _ = make(max_queue=2, gate=gate)
        tasks = [asyncio.create_task(drain(scheduler, spec("a")))]
        await asyncio.sleep(0.05)  # loaded; this one runs (blocked on the gate)
        tasks += [asyncio.create_task(drain(scheduler, spec("a"))) for _ in range(2)]
        await asyncio.sleep(0.05)  # two wait
        with pytest.raises(QueueFull, match="KRASIS_MAX_QUEUE"):
            await drain(scheduler, spec("a"))
        gate.set()
        results = await asyncio.gather(*tasks)
        assert all(r[-1]["type"] == "done" for r in results)
        assert len(await drain(scheduler, spec("a"))) == 3  # room again
    asyncio.run(main())


def test_max_loaded_evicts_the_idle_model():
    async def main():
        scheduler, started = make(max_loaded=1)
        await drain(scheduler, spec("a"))
        await drain(scheduler, spec("b"))
        assert started[0].stopped and not started[1].stopped
        assert list(scheduler.loaded) == ["b"]
    asyncio.run(main())


def test_memory_estimate_evicts_and_small_models_share():
    async def main():
        scheduler, started = make(memory_bytes=100, max_loaded=3)
        await drain(scheduler, spec("a", 40))
        await drain(scheduler, spec("b", 40))
        assert sorted(scheduler.loaded) == ["a", "b"]
        await drain(scheduler, spec("c", 50))  # 40 + 40 + 50 > 100: one must go
        assert len(scheduler.loaded) == 2 and "c" in scheduler.loaded
        assert sum(r.stopped for r in started) == 1
    asyncio.run(main())


def test_busy_model_is_not_evicted():
    async def main():
        gate = asyncio.Event()
        scheduler, started = make(max_loaded=1, gate=gate)
        busy = asyncio.create_task(drain(scheduler, spec("a")))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(drain(scheduler, spec("b")))
        await asyncio.sleep(0.1)
        assert not started[0].stopped and len(started) == 1  # b waits for a to go idle
        gate.set()
        await busy
        await second
        assert started[0].stopped and list(scheduler.loaded) == ["b"]
    asyncio.run(main())


def test_keep_alive_expiry_zero_and_forever():
    async def main():
        scheduler, started = make(keep_alive_s=0.1)
        await drain(scheduler, spec("a"))
        assert "a" in scheduler.loaded
        await asyncio.sleep(0.3)
        assert "a" not in scheduler.loaded and started[0].stopped
        await drain(scheduler, spec("b"), keep_alive_s=0)
        assert "b" not in scheduler.loaded
        await drain(scheduler, spec("c"), keep_alive_s=float("inf"))
        await asyncio.sleep(0.3)
        assert "c" in scheduler.loaded
        assert scheduler.running()[0]["expires_in_s"] is None
    asyncio.run(main())


def test_dead_runner_is_replaced():
    async def main():
        scheduler, started = make()
        await drain(scheduler, spec("a"))
        started[0].alive = False  # as if killed while idle
        events = await drain(scheduler, spec("a"))
        assert events[-1]["type"] == "done" and len(started) == 2
    asyncio.run(main())


def test_load_failure_reaches_every_waiter_and_is_not_cached():
    async def main():
        calls = []

        async def failing(model_spec):
            calls.append(model_spec.name)
            await asyncio.sleep(0.05)
            raise RuntimeError("no weights")

        scheduler = Scheduler(failing, lambda: Hardware(100), keep_alive_s=60, max_queue=4,
                              max_loaded=2)
        results = await asyncio.gather(drain(scheduler, spec("a")), drain(scheduler, spec("a")),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results) and calls == ["a"]
        assert not scheduler.loaded
        with pytest.raises(RuntimeError):
            await drain(scheduler, spec("a"))
        assert calls == ["a", "a"]
    asyncio.run(main())


def test_cancelled_waiters_leave_the_queue():
    async def main():
        gate = asyncio.Event()
        scheduler, _ = make(max_queue=1, gate=gate)
        running = asyncio.create_task(drain(scheduler, spec("a")))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(drain(scheduler, spec("a")))
        await asyncio.sleep(0.05)
        assert scheduler.loaded["a"].waiting == 1
        queued.cancel()  # its client went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert scheduler.loaded["a"].waiting == 0 and scheduler.loaded["a"].active == 1
        again = asyncio.create_task(drain(scheduler, spec("a")))  # the slot is free again
        await asyncio.sleep(0.05)
        gate.set()
        assert (await again)[-1]["type"] == "done" and (await running)[-1]["type"] == "done"
        assert scheduler.loaded["a"].active == 0
    asyncio.run(main())


def test_num_parallel_requests_in_flight_the_rest_queue():
    async def main():
        gate = asyncio.Event()
        scheduler, started = make(max_queue=2, gate=gate, num_parallel=3)
        await scheduler.load(spec("a"))  # requests arriving during a load all count as waiting
        tasks = [asyncio.create_task(drain(scheduler, spec("a"))) for _ in range(5)]
        await asyncio.sleep(0.1)
        entry = scheduler.loaded["a"]
        assert started[0].running == 3 and entry.waiting == 2 and entry.active == 5
        with pytest.raises(QueueFull, match="KRASIS_MAX_QUEUE"):
            await drain(scheduler, spec("a"))
        assert scheduler.running()[0]["active"] == 5 and scheduler.is_busy("a")
        gate.set()
        results = await asyncio.gather(*tasks)
        assert all(r[-1]["type"] == "done" for r in results)
        assert started[0].most_running == 3 and len(started) == 1
        assert entry.active == 0 and entry.waiting == 0 and not scheduler.is_busy("a")
    asyncio.run(main())


@pytest.mark.parametrize("reported,expected", [(None, 1), (1, 1), (4, 4), (0, 1), ("4", 1)])
def test_runner_capacity_defaults_to_one(reported, expected):
    async def main():
        gate = asyncio.Event()
        scheduler, started = make(max_queue=8, gate=gate, num_parallel=reported)
        tasks = [asyncio.create_task(drain(scheduler, spec("a"))) for _ in range(6)]
        await asyncio.sleep(0.1)
        assert started[0].running == expected
        gate.set()
        await asyncio.gather(*tasks)
    asyncio.run(main())


def test_a_runner_with_any_request_in_flight_is_busy():
    async def main():
        scheduler, started = make(max_loaded=1, keep_alive_s=0.05, num_parallel=2)
        hold = asyncio.Event()

        async def held():
            return [e async for e in scheduler.generate(spec("a"), {"tokens": 1, "hold": hold})]

        long = asyncio.create_task(held())
        await asyncio.sleep(0.05)
        assert (await drain(scheduler, spec("a")))[-1]["type"] == "done"  # beside the held one
        assert started[0].most_running == 2
        other = asyncio.create_task(drain(scheduler, spec("b")))  # needs a's room
        await asyncio.sleep(0.2)  # longer than keep_alive
        assert not started[0].stopped and "a" in scheduler.loaded and len(started) == 1
        assert scheduler.running()[0]["expires_in_s"] is None and scheduler.is_busy("a")
        hold.set()
        await long
        await other
        assert started[0].stopped and list(scheduler.loaded) == ["b"]
    asyncio.run(main())


def test_load_waits_for_room_at_most_wait_for_room_s():
    async def main():
        gate = asyncio.Event()
        scheduler, started = make(max_loaded=1, gate=gate, wait_for_room_s=0.3)
        busy = asyncio.create_task(drain(scheduler, spec("a")))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        begin_s = loop.time()
        with pytest.raises(NoRoom, match=r"stayed busy for 0\.3 s \(KRASIS_ROOM_TIMEOUT\)"):
            await drain(scheduler, spec("b"))
        assert 0.3 <= loop.time() - begin_s < 5.0
        assert list(scheduler.loaded) == ["a"] and not started[0].stopped  # nothing half-done
        gate.set()
        await busy
        assert (await drain(scheduler, spec("b")))[-1]["type"] == "done"  # room now
        assert started[0].stopped and list(scheduler.loaded) == ["b"]
    asyncio.run(main())


def test_room_freed_within_the_wait_loads_the_model():
    async def main():
        gate = asyncio.Event()
        scheduler, started = make(max_loaded=1, gate=gate, wait_for_room_s=5.0)
        busy = asyncio.create_task(drain(scheduler, spec("a")))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(drain(scheduler, spec("b")))
        await asyncio.sleep(0.2)
        assert not waiting.done() and len(started) == 1
        gate.set()
        await busy
        assert (await waiting)[-1]["type"] == "done"
        assert [r.spec.name for r in started] == ["a", "b"] and started[0].stopped
    asyncio.run(main())


@pytest.mark.parametrize("value, expected_s", [("90s", 90.0), ("2m", 120.0), (None, 600.0)])
def test_room_timeout_bounds_the_wait_for_room(tmp_path, value, expected_s):
    """KRASIS_ROOM_TIMEOUT sets the wait; KRASIS_LOAD_TIMEOUT (the load's bound) does not."""
    from krasisd.config import load_config
    from krasisd.server import build_daemon

    env = {"KRASIS_HOME": str(tmp_path), "KRASIS_LOAD_TIMEOUT": "7s"}
    if value is not None:
        env["KRASIS_ROOM_TIMEOUT"] = value
    cfg = load_config(env)
    assert cfg.room_timeout_s == expected_s and cfg.load_timeout_s == 7.0
    daemon = build_daemon(cfg, registry=object(), runner_factory=lambda s: None,
                          probe=lambda: Hardware(1000))
    assert daemon.scheduler.wait_for_room_s == expected_s
