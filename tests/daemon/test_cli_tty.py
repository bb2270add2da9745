"""The krasis command on a real terminal (pexpect): Ctrl+C, Ctrl+D, progress bars."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest
import test_cli_fakedaemon as fakes

TIMEOUT_S = 20


@pytest.fixture
def daemon(monkeypatch):
    yield from fakes.running_daemon(monkeypatch)


def spawn(*argv: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "krasis.cli", *argv], env=dict(os.environ),
                         encoding="utf-8", timeout=TIMEOUT_S, dimensions=(24, 120))


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_ctrl_c_stops_the_answer_and_keeps_the_session(daemon):
    child = spawn("run", "slow")
    child.expect_exact(">>> ")
    child.sendline("count forever")
    child.expect_exact("tick tick")
    child.sendintr()
    child.expect_exact(">>> ")
    assert daemon.cancelled.wait(5), "the daemon did not see the stream closed"
    child.sendline("/bye")
    assert finish(child) == 0


def test_ctrl_c_at_the_prompt_then_ctrl_d_exits(daemon):
    child = spawn("run", "krasis-tiny")
    child.expect_exact(">>> ")
    child.sendintr()
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact(">>> ")
    child.sendline("hi")
    child.expect_exact("reply 1 to: hi")
    child.expect_exact(">>> ")
    child.sendeof()
    assert finish(child) == 0


def test_ctrl_c_in_a_one_shot_answer_exits_130(daemon):
    child = spawn("run", "slow", "go")
    child.expect_exact("tick")
    child.sendintr()
    assert finish(child) == 130
    assert daemon.cancelled.wait(5)


def test_pull_draws_progress_bars_on_a_terminal(daemon):
    child = spawn("pull", "fresh")
    output = child.read()
    child.close()
    assert child.exitstatus == 0
    assert "pulling model.safetensors 100%" in output
    assert "2.00MB/2.00MB" in output
    assert "building cpu cache 100%" in output and "4/4" in output
    assert output.rstrip().endswith("success")
