"""The krasis command on a real terminal (pexpect): Ctrl+C, Ctrl+D, pasted text, history,
progress bars."""

from __future__ import annotations

import os
import stat
import sys

import pexpect
import pytest
import test_cli_fakedaemon as fakes

TIMEOUT_S = 20
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # what a terminal sends around a paste
UP = "\x1b[A"
PROMPT = ">>>"  # prompt_toolkit moves the cursor past the prompt's trailing space


@pytest.fixture
def daemon(monkeypatch):
    yield from fakes.running_daemon(monkeypatch)


def spawn(*argv: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "krasis.cli", *argv], env=dict(os.environ),
                         encoding="utf-8", timeout=TIMEOUT_S, dimensions=(24, 120))


def paste(child: pexpect.spawn, text: str) -> None:
    """Send text as a terminal pastes it: in bracketed-paste marks only when the program turned
    that mode on (ESC [ ? 2004 h) before its prompt, else as typed lines."""
    asked = "\x1b[?2004h" in child.before
    child.send(PASTE_START + text + PASTE_END if asked else text)


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_ctrl_c_stops_the_answer_and_keeps_the_session(daemon):
    child = spawn("run", "slow")
    child.expect_exact(PROMPT)
    child.sendline("count forever")
    child.expect_exact("tick tick")
    child.sendintr()
    child.expect_exact(PROMPT)
    assert daemon.cancelled.wait(5), "the daemon did not see the stream closed"
    child.sendline("/bye")
    assert finish(child) == 0


def test_ctrl_c_at_the_prompt_then_ctrl_d_exits(daemon):
    child = spawn("run", "krasis-tiny")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact(PROMPT)
    child.sendline("hi")
    child.expect_exact("reply 1 to: hi")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0


def test_ctrl_c_in_a_one_shot_answer_exits_130(daemon):
    child = spawn("run", "slow", "go")
    child.expect_exact("tick")
    child.sendintr()
    assert finish(child) == 130
    assert daemon.cancelled.wait(5)


def test_pasted_lines_are_one_message(daemon, tmp_path, monkeypatch):
    # Whatever the readline build or its configuration says (readline's own bracketed paste is
    # off in some distributions and absent from libedit): the session reads the paste itself.
    (tmp_path / "inputrc").write_text("set enable-bracketed-paste off\n")
    monkeypatch.setenv("INPUTRC", str(tmp_path / "inputrc"))
    child = spawn("run", "krasis-tiny")
    child.expect_exact(PROMPT)
    paste(child, "first line\nsecond line\nthird line")
    child.send("\r")
    child.expect_exact("reply 1 to: first line")
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.sendline("quoted one")
    child.sendline('quoted two"""')
    child.expect_exact("reply 2 to: quoted one")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    sent = [body["messages"][-1]["content"] for body in daemon.bodies("/api/chat")]
    assert sent == ["first line\nsecond line\nthird line", "quoted one\nquoted two"]


def test_history_is_kept_between_sessions(daemon, krasis_home):
    child = spawn("run", "krasis-tiny")
    child.expect_exact(PROMPT)
    child.sendline("remember me")
    child.expect_exact("reply 1 to: remember me")
    child.expect_exact(PROMPT)
    child.sendline("/show parameters")
    child.expect_exact("No parameters set")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    history = krasis_home / "history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "remember me" in history.read_text()
    child = spawn("run", "krasis-tiny")
    child.expect_exact(PROMPT)
    child.send(UP + UP + "\r")  # the message before /show
    child.expect_exact("reply 1 to: remember me")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    sent = [body["messages"][-1]["content"] for body in daemon.bodies("/api/chat")]
    assert sent == ["remember me", "remember me"]


def test_pull_draws_progress_bars_on_a_terminal(daemon):
    child = spawn("pull", "fresh")
    output = child.read()
    child.close()
    assert child.exitstatus == 0
    assert "pulling model.safetensors 100%" in output
    assert "2.00MB/2.00MB" in output
    assert "building cpu cache 100%" in output and "4/4" in output
    assert output.rstrip().endswith("success")
