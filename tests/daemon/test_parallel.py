"""KRASIS_NUM_PARALLEL end to end with the fake engine: requests on one model run at the same
time on one runner (their streams advance in the same steps of its engine thread), each gets
its own answer, a cancel stops only its request, 1 serializes."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory, fake_env):
    """A daemon serving two requests at once per runner, one more may wait."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    root = tmp_path_factory.mktemp("parallel")
    thread = DaemonThread(fake_config(root, num_parallel=2, max_queue=1),
                          FakeRegistry(root / "models")).start()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def serial(tmp_path_factory, fake_env):
    """A daemon with KRASIS_NUM_PARALLEL=1: one request at a time per runner."""
    from fakes import FakeRegistry, fake_config
    from harness import DaemonThread

    root = tmp_path_factory.mktemp("serial")
    thread = DaemonThread(fake_config(root, num_parallel=1), FakeRegistry(root / "models")).start()
    yield thread
    thread.close()


async def _timed_stream(socket_path, prompt: str, num_predict: int) -> tuple[list[dict], list]:
    """(lines, the monotonic time each line arrived)."""
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                 timeout=20) as http:
        async with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": prompt,
                "options": {"num_predict": num_predict}}) as response:
            lines, times = [], []
            async for line in response.aiter_lines():
                lines.append(json.loads(line))
                times.append(time.monotonic())
            return lines, times


def _streams(daemon, prompts: list[str], num_predict: int) -> list[tuple[list[dict], list]]:
    async def run_all():
        return await asyncio.gather(*(_timed_stream(daemon.socket_path, p, num_predict)
                                      for p in prompts))

    return asyncio.run(asyncio.wait_for(run_all(), 25))


def _warm(daemon) -> None:
    with daemon.client() as http:
        assert http.post("/api/generate", json={"model": "fake", "prompt": "",
                                                "keep_alive": "5m"}).status_code == 200


def test_requests_run_at_the_same_time_with_their_own_answers(parallel):
    _warm(parallel)
    results = _streams(parallel, ["first", "second"], num_predict=20)
    for (lines, _), prompt in zip(results, ["first", "second"], strict=True):
        assert "error" not in lines[-1], lines[-1]
        assert lines[0]["response"] == f"[<user>{prompt}<assistant>]"
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 20
    (_, first), (_, second) = results
    assert first[0] < second[-1] and second[0] < first[-1]  # the streams overlap
    with parallel.client() as http:
        assert [m["model"] for m in http.get("/api/ps").json()["models"]] == ["fake:latest"]


def test_num_parallel_1_serves_one_after_the_other(serial):
    _warm(serial)
    results = _streams(serial, ["one", "two"], num_predict=25)
    assert all(lines[-1].get("eval_count") == 25 for lines, _ in results)
    (_, first), (_, second) = sorted(results, key=lambda r: r[1][0])
    assert first[-1] <= second[0]  # no overlap: the second waited for the first


def test_cancel_of_one_request_leaves_the_other(parallel):
    marker = parallel.registry.models["fake:latest"] / "cancelled"
    marker.unlink(missing_ok=True)
    _warm(parallel)
    outcome: dict = {}

    def survivor() -> None:
        outcome["lines"], _ = _streams(parallel, ["survivor"], num_predict=150)[0]

    keeper = threading.Thread(target=survivor)
    with parallel.client() as http:
        with http.stream("POST", "/api/generate", json={
                "model": "fake", "prompt": "leaver", "options": {"num_predict": 100000}}) as r:
            lines = r.iter_lines()
            assert "leaver" in json.loads(next(lines))["response"]
            keeper.start()
            time.sleep(0.1)  # both are generating
        deadline = time.monotonic() + 10  # the client left: only its request is cancelled
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists()
    keeper.join(20)
    final = outcome["lines"][-1]
    assert final["done_reason"] == "length" and final["eval_count"] == 150, final
    assert "survivor" in outcome["lines"][0]["response"]


def test_queue_counts_only_the_waiting_requests(parallel):
    _warm(parallel)
    long = {"model": "fake", "prompt": "x", "options": {"num_predict": 100000}}
    entry = parallel.daemon.scheduler.loaded["fake:latest"]
    with parallel.client() as a, parallel.client() as b, \
            a.stream("POST", "/api/generate", json=long) as ra, \
            b.stream("POST", "/api/generate", json=long) as rb:
        first, second = ra.iter_lines(), rb.iter_lines()
        next(first), next(second)  # both run: num_parallel=2
        assert entry.waiting == 0 and entry.active == 2
        statuses: list[int] = []

        def queued() -> None:
            with parallel.client() as c:
                statuses.append(c.post("/api/generate", json={
                    **long, "options": {"num_predict": 1}}).status_code)

        waiter = threading.Thread(target=queued)
        waiter.start()
        deadline = time.monotonic() + 10
        while not entry.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        with parallel.client() as http:
            refused = http.post("/api/generate", json=long)
            assert refused.status_code == 503 and "KRASIS_MAX_QUEUE" in refused.json()["error"]
            assert http.get("/api/ps").json()["models"][0]["expires_at"]  # /api/ps still answers
    waiter.join(20)  # the two clients left: the queued request runs
    assert statuses == [200]
