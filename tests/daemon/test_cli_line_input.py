"""The interactive session's input: where history is kept, which reader is used, and how a
terminal's whole blocks (pasted text, a \"\"\" block) become messages."""

from __future__ import annotations

import io
import os
import stat
import sys

import pytest
import test_cli_fakedaemon as fakes
from krasis import line_input
from krasis.client import Client
from krasis.repl import Repl


def test_history_file_is_made_private(krasis_home):
    path = line_input.history_file()
    assert path == krasis_home / "history"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("kept\n")
    os.chmod(path, 0o644)  # an older file, or one copied in: tightened, its lines kept
    assert line_input.history_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "kept\n"


def test_history_file_in_a_new_home_folder(tmp_path):
    home = tmp_path / "new" / "krasis"
    path = line_input.history_file({"KRASIS_HOME": str(home)})
    assert path == home / "history" and path.exists()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_no_history_when_asked_or_when_it_cannot_be_written(tmp_path):
    assert line_input.history_file({"KRASIS_HOME": str(tmp_path), "KRASIS_NOHISTORY": "1"}) \
        is None
    assert not (tmp_path / "history").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert line_input.history_file({"KRASIS_HOME": str(blocker / "krasis")}) is None


def test_only_a_real_terminal_gets_prompt_toolkit(monkeypatch):
    class SaysTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", SaysTerminal("hi\n"))
    assert not line_input.on_a_terminal()
    assert isinstance(line_input.line_reader(), line_input.PlainReader)


class BlockReader:
    """A terminal's reads: each one a whole block, as prompt_toolkit returns it."""

    ends_line = True

    def __init__(self, blocks: list[str]):
        self.blocks = list(blocks)
        self.prompts: list[str] = []

    def read(self, prompt: str, continuation: str) -> str:
        self.prompts.append(prompt)
        if not self.blocks:
            raise EOFError
        block = self.blocks.pop(0)
        if block == "^C":
            raise KeyboardInterrupt
        return block


@pytest.fixture
def daemon(monkeypatch):
    yield from fakes.running_daemon(monkeypatch)


def test_terminal_blocks_are_one_message_each(daemon):
    out = io.StringIO()
    reader = BlockReader(["^C", "pasted one\npasted two", '"""\nquoted one\nquoted two"""',
                          '/set system """\nBe\nbrief."""', "last"])
    code = Repl(Client(), "krasis-tiny", out=out, err=io.StringIO(), reader=reader).run()
    assert code == 0
    chats = daemon.bodies("/api/chat")
    assert [c["messages"][-1]["content"] for c in chats] == [
        "pasted one\npasted two", "quoted one\nquoted two", "last"]
    assert chats[-1]["messages"][0] == {"role": "system", "content": "Be\nbrief."}
    # the terminal reader has left the prompt's line already: no blank line before the hint
    assert out.getvalue().startswith("Use Ctrl + d or /bye to exit.\nreply 1 to: pasted one")
    assert reader.prompts == [">>> "] * 6
