"""Where the interactive session's input comes from.

On a terminal: prompt_toolkit, with bracketed paste (a pasted multi-line text is one message,
sent when Enter is pressed), a history kept in ``$KRASIS_HOME/history`` (mode 0600; none with
``KRASIS_NOHISTORY=1``), Emacs-style line editing, and a ``\"\"\"`` block that stays open across
Enter until it is closed. When stdin or stdout is not a terminal device (``krasis run m | tee``,
tests that feed lines): ``input()``, a line at a time.

Both readers raise EOFError at end of input (Ctrl+D on an empty line) and KeyboardInterrupt
on Ctrl+C, which is what the session acts on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol

HISTORY_FILE = "history"
QUOTES = '"""'


class LineReader(Protocol):
    """One read of input: a line, or (on a terminal) a whole pasted or quoted block."""

    ends_line: bool  # whether the cursor is on a fresh line after an interrupted read

    def read(self, prompt: str, continuation: str) -> str: ...


class PlainReader:
    """input(), one line per read (readline editing where Python has it)."""

    ends_line = False  # after Ctrl+C or Ctrl+D the cursor is still on the prompt's line

    def __init__(self) -> None:
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  - gives input() editing and in-session history
            except ImportError:
                pass

    def read(self, prompt: str, continuation: str) -> str:
        return input(prompt)


class TerminalReader:
    """prompt_toolkit: pasted text stays one message; an open \"\"\" block continues on Enter."""

    ends_line = True  # prompt_toolkit leaves the prompt's line when a read ends

    def __init__(self, history_file: Path | None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output import create_output

        bindings = KeyBindings()

        @Condition
        def quote_open() -> bool:
            return self._session.default_buffer.text.count(QUOTES) % 2 == 1

        @bindings.add("enter", filter=quote_open)
        def _(event) -> None:
            event.current_buffer.insert_text("\n")

        output = create_output(stdout=sys.stdout)
        output.enable_cpr = False  # no menus to make room for; some terminals never answer
        history = FileHistory(str(history_file)) if history_file else InMemoryHistory()
        self._session = PromptSession(history=history, key_bindings=bindings, output=output)

    def read(self, prompt: str, continuation: str) -> str:
        return self._session.prompt(prompt, prompt_continuation=continuation)


def history_file(env: dict[str, str] | None = None) -> Path | None:
    """``$KRASIS_HOME/history``, created with mode 0600 (an older file is made 0600 too);
    None when KRASIS_NOHISTORY is set or the file cannot be made (the session still works)."""
    from krasisd.config import default_home

    env = os.environ if env is None else env
    if env.get("KRASIS_NOHISTORY", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    path = default_home(env) / HISTORY_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(path, 0o600)
    except OSError:
        return None
    return path


def on_a_terminal() -> bool:
    """stdin and stdout are both terminal devices (not merely objects that say so)."""
    try:
        return os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def line_reader() -> LineReader:
    """A TerminalReader on a terminal, else a PlainReader."""
    if on_a_terminal():
        try:
            return TerminalReader(history_file())
        except ImportError:
            pass
    return PlainReader()
