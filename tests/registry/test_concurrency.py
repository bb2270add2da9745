"""Two pulls of one model at once share one download; a pull blocks removal."""

import json
import subprocess
import sys
import threading
import time

import pytest
from krasis_registry import ModelInUse, Registry
from regtest import REPO_ID, subprocess_env


def test_two_concurrent_pulls_share_one_download(hub, tiny_files, krasis_home):
    big = "model-00002-of-00002.safetensors"
    hub.stall_after_bytes[big] = 100_000  # the first pull holds the lock mid-file
    part = krasis_home / "partials" / "krasis-test" / "tiny-moe" / "latest" / f"{big}.part"
    results: dict[str, list[dict]] = {"first": [], "second": []}
    errors: list[BaseException] = []

    def pull(slot: str) -> None:
        try:
            for event in Registry().pull(REPO_ID, build_caches=False):
                results[slot].append(event)
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=pull, args=("first",))
    first.start()
    _wait(lambda: part.is_file() and part.stat().st_size >= 100_000)
    second = threading.Thread(target=pull, args=("second",))
    second.start()
    _wait(lambda: bool(results["second"]))
    assert results["second"][0]["status"] == f"waiting for another pull of {REPO_ID}:latest"
    hub.stall_after_bytes.clear()
    first.join(60)
    second.join(60)
    assert not errors
    assert results["first"][-1] == results["second"][-1] == {"status": "success"}
    assert any("up to date" in e["status"] for e in results["second"])
    for path, data in tiny_files.items():
        if hub.requests_for(path):
            assert hub.served(path) == len(data), path  # each byte fetched once
            assert len(hub.requests_for(path)) == 1


def test_a_pull_in_another_process_waits_then_reuses(hub, tiny_files, krasis_home):
    big = "model-00002-of-00002.safetensors"
    hub.stall_after_bytes[big] = 100_000
    part = krasis_home / "partials" / "krasis-test" / "tiny-moe" / "latest" / f"{big}.part"
    first_events: list[dict] = []
    first = threading.Thread(
        target=lambda: first_events.extend(Registry().pull(REPO_ID, build_caches=False)))
    first.start()
    _wait(lambda: part.is_file() and part.stat().st_size >= 100_000)
    code = "import registry_child; registry_child.main()"
    child = subprocess.Popen([sys.executable, "-c", code, "pull", REPO_ID],
                             env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        waiting = json.loads(child.stdout.readline())
        assert waiting["status"] == f"waiting for another pull of {REPO_ID}:latest"
        hub.stall_after_bytes.clear()
        first.join(60)
        child_events = [json.loads(line) for line in child.stdout]
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert first_events[-1] == child_events[-1] == {"status": "success"}
    assert hub.served(big) == len(tiny_files[big])
    assert len(hub.requests_for(big)) == 1


def _wait(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_remove_refused_while_pulling(hub):
    hub.chunk_delay_s = 0.05
    reg = Registry()
    events = reg.pull(REPO_ID, build_caches=False)
    next(events)  # holds the model's lock from here on
    next(events)
    with pytest.raises(ModelInUse, match="running"):
        Registry().remove(REPO_ID)
    assert list(events)[-1] == {"status": "success"}
    Registry().remove(REPO_ID)


def test_closing_a_pull_stream_early_marks_it_cancelled(hub):
    hub.chunk_delay_s = 0.05
    reg = Registry()
    events = reg.pull(REPO_ID, build_caches=False)
    while not next(events)["status"].startswith("pulling model-"):
        pass
    events.close()
    shown = reg.show(REPO_ID)
    assert shown["state"] == "failed" and "cancelled" in shown["error"]
    assert list(Registry().pull(REPO_ID, build_caches=False))[-1] == {"status": "success"}
