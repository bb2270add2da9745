"""The builder child process: one that sent its result is left to exit by itself; one that
has not (the stream closed early), or that does not exit in time, is killed."""

import multiprocessing.context
import time

import fakebuilders
import pytest
from krasis_registry import buildproc
from krasis_registry.buildproc import BuilderFailed, run_builder

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def children(monkeypatch) -> dict[str, list]:
    """Kills of builder processes, and the exit codes they ended with."""
    seen: dict[str, list] = {"killed": [], "exitcodes": []}
    process_class = multiprocessing.context.SpawnProcess
    kill, join = process_class.kill, process_class.join

    def recording_kill(self):
        seen["killed"].append(self.pid)
        kill(self)

    def recording_join(self, timeout=None):
        join(self, timeout)
        if self.exitcode is not None:
            seen["exitcodes"].append(self.exitcode)

    monkeypatch.setattr(process_class, "kill", recording_kill)
    monkeypatch.setattr(process_class, "join", recording_join)
    return seen


def _run(builder, tmp_path):
    return run_builder(builder, tmp_path, tmp_path / "cache" / "out", "int8", 32)


def test_finished_builder_is_not_killed(tmp_path, monkeypatch, children):
    monkeypatch.setenv("KRASIS_TEST_LINGER_S", "0.5")
    events = _run(fakebuilders.lingering_builder, tmp_path)
    kinds = []
    for kind, _value in events:
        kinds.append(kind)
        if kind == "done":
            events.close()  # the consumer stops at the result, while the child still exits
    assert kinds == ["progress"] * 3 + ["done"]
    assert children["killed"] == [] and children["exitcodes"][-1] == 0
    assert (tmp_path / "cache" / "out" / "manifest.json").is_file()


def test_failed_builder_is_not_killed(tmp_path, monkeypatch, children):
    monkeypatch.setenv("KRASIS_TEST_LINGER_S", "0.5")
    with pytest.raises(BuilderFailed, match="do not fit the format"):
        list(_run(fakebuilders.lingering_failing_builder, tmp_path))
    assert children["killed"] == [] and children["exitcodes"][-1] == 0


def test_reported_builder_that_does_not_exit_is_killed(tmp_path, monkeypatch, children):
    monkeypatch.setenv("KRASIS_TEST_LINGER_S", "30")
    monkeypatch.setattr(buildproc, "REPORTED_EXIT_S", 0.3)
    begin_s = time.monotonic()
    with pytest.raises(BuilderFailed):
        list(_run(fakebuilders.lingering_failing_builder, tmp_path))
    assert time.monotonic() - begin_s < 10
    assert len(children["killed"]) == 1 and children["exitcodes"][-1] < 0


def test_stream_closed_before_the_result_kills_the_builder(tmp_path, monkeypatch, children):
    monkeypatch.setenv("KRASIS_TEST_MARKER", str(tmp_path / "marker"))
    events = _run(fakebuilders.slow_builder, tmp_path)
    assert next(events)[0] == "progress"
    begin_s = time.monotonic()
    events.close()
    assert time.monotonic() - begin_s < buildproc.REPORTED_EXIT_S  # no wait for a result
    assert len(children["killed"]) == 1 and children["exitcodes"][-1] < 0
