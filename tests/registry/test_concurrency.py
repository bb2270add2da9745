"""Two pulls of one model at once share one download; a pull blocks removal."""

import threading

import pytest
from conftest import REPO_ID
from krasis_registry import ModelInUse, Registry


def test_two_concurrent_pulls_share_one_download(hub, tiny_files):
    hub.chunk_delay_s = 0.05
    barrier = threading.Barrier(2)
    results: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def pull(slot: int) -> None:
        try:
            reg = Registry()
            barrier.wait(10)
            results[slot] = list(reg.pull(REPO_ID, build_caches=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [r[-1] for r in results.values()] == [{"status": "success"}] * 2
    waited = [r for r in results.values() if r[0]["status"].startswith("waiting for another")]
    assert len(waited) == 1
    assert any("up to date" in e["status"] for e in waited[0])
    for path, data in tiny_files.items():
        if hub.requests_for(path):
            assert hub.served(path) == len(data), path  # each byte fetched once
            assert len(hub.requests_for(path)) == 1


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
