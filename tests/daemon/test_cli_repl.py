"""`krasis run MODEL` on a terminal: the interactive session, driven line by line."""

from __future__ import annotations

import io
import sys

import pytest
import test_cli_fakedaemon as fakes
from krasis import cli


class Terminal(io.StringIO):
    """Typed input: a StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def daemon(monkeypatch):
    yield from fakes.running_daemon(monkeypatch)


def repl(monkeypatch, capsys, lines: list[str], model: str = "krasis-tiny", *flags: str):
    monkeypatch.setattr(sys, "stdin", Terminal("".join(line + "\n" for line in lines)))
    code = cli.main(["run", model, *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SESSION = [
    "hello",
    '"""',
    "line one",
    'line two"""',
    "/set parameter temperature 0.5",
    '/set parameter stop "<|end|>" END',
    "/set parameter bogus 1",
    "/set parameter top_k many",
    "/set system Be brief.",
    "/show parameters",
    "second",
    "/clear",
    "third",
    "/show",
    "/?",
    "/unknown",
    "/bye",
    "never sent",
]


def test_session_keeps_history_and_applies_commands(daemon, monkeypatch, capsys):
    code, out, err = repl(monkeypatch, capsys, SESSION)
    assert code == 0, err
    chats = daemon.bodies("/api/chat")
    assert len(chats) == 4  # "never sent" comes after /bye
    assert chats[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert "options" not in chats[0] and "system" not in chats[0]
    assert chats[1]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "reply 1 to: hello"},
        {"role": "user", "content": "line one\nline two"},
    ]
    assert chats[1]["stream"] is True
    # /set system and /set parameter apply to the next message
    assert chats[2]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chats[2]["messages"][-1] == {"role": "user", "content": "second"}
    assert len(chats[2]["messages"]) == 6
    assert chats[2]["options"] == {"temperature": 0.5, "stop": ["<|end|>", "END"]}
    assert chats[3]["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "third"}]
    assert "reply 1 to: hello" in out and "reply 2 to: line one\nline two" in out
    assert "Couldn't set parameter: unknown parameter 'bogus'" in out
    assert "Couldn't set parameter: top_k needs an integer, got 'many'" in out
    assert "Set system message." in out
    assert "temperature         0.5" in out and '"<|end|>" "END"' in out
    assert "Cleared session context" in out
    assert "architecture" in out and "deepseek2" in out  # /show
    assert "Available Commands:" in out and '"""' in out  # /?
    assert "Unknown command '/unknown'. Type /? for help" in out


def test_clear_forgets_the_conversation_but_not_the_system_message(daemon, monkeypatch, capsys):
    code, _, _ = repl(monkeypatch, capsys, ["/set system S", "one", "/clear", "two"])
    assert code == 0
    last = daemon.bodies("/api/chat")[-1]["messages"]
    assert last == [{"role": "system", "content": "S"}, {"role": "user", "content": "two"}]


def test_interactive_run_loads_the_model_first(daemon, monkeypatch, capsys):
    code, _, _ = repl(monkeypatch, capsys, ["/bye"], "krasis-tiny", "--keepalive", "1h")
    assert code == 0
    assert daemon.bodies("/api/generate") == [
        {"model": "krasis-tiny", "keep_alive": "1h", "stream": False}]
    assert daemon.bodies("/api/chat") == []


def test_end_of_input_exits_cleanly_even_inside_a_multiline_message(daemon, monkeypatch, capsys):
    code, _, _ = repl(monkeypatch, capsys, ["first", '"""', "unfinished"])
    assert code == 0
    assert len(daemon.bodies("/api/chat")) == 1


def test_error_answer_keeps_the_session_and_drops_the_question(daemon, monkeypatch, capsys):
    code, out, err = repl(monkeypatch, capsys, ["FAIL here", "fine"])
    assert code == 0
    assert "Error: the runner for this model crashed" in err
    chats = daemon.bodies("/api/chat")
    assert chats[-1]["messages"] == [{"role": "user", "content": "fine"}]


def test_verbose_mode_prints_rates_after_each_answer(daemon, monkeypatch, capsys):
    code, _, err = repl(monkeypatch, capsys, ["hi", "/set quiet", "again", "/set verbose", "x"],
                        "krasis-tiny", "--verbose")
    assert code == 0
    assert err.count("eval rate:") == 4  # prompt eval rate + eval rate, twice
    assert "20.00 tokens/s" in err


def test_format_json_is_sent_until_noformat(daemon, monkeypatch, capsys):
    code, _, _ = repl(monkeypatch, capsys, ["/set format json", "a", "/set noformat", "b"])
    assert code == 0
    first, second = daemon.bodies("/api/chat")
    assert first["format"] == "json"
    assert "format" not in second


def test_multiline_system_message_and_load(daemon, monkeypatch, capsys):
    lines = ['/set system """You are', "a test.", '"""', "/load slow-missing", "/load krasis-tiny",
             "hi", "/show system"]
    code, out, err = repl(monkeypatch, capsys, lines)
    assert code == 0
    assert "Error: model 'slow-missing' not found" in err
    assert "Loading model 'krasis-tiny'" in out
    chat = daemon.bodies("/api/chat")[0]
    assert chat["messages"][0] == {"role": "system", "content": "You are\na test."}
    assert ">>> You are\na test.\n>>> " in out  # /show system
