"""`krasis run`'s interactive session, with Ollama's commands and habits.

Messages go to /api/chat with the whole conversation; answers stream as they come. Input comes
from krasis.line_input (prompt_toolkit on a terminal: pasted text is one message, history is
kept; input() otherwise). ``\"\"\"`` opens a multi-line message (closed by a line ending in
``\"\"\"``); Ctrl+C stops the current answer (the stream is closed, the daemon cancels the
generation, and the unanswered question is dropped from the history) and keeps the session;
Ctrl+D or ``/bye`` ends it.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from .client import Client, KrasisError
from .display import format_show
from .line_input import QUOTES, LineReader, line_reader

# Ollama's runtime options that krasis uses, and how to read their values.
PARAMETER_TYPES: dict[str, Callable[[str], object]] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
    "num_predict": int, "num_ctx": int, "repeat_penalty": float, "repeat_last_n": int,
    "presence_penalty": float, "frequency_penalty": float, "stop": str,
}

HELP = '''Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a different model (starts a new conversation)
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use """ to begin a multi-line message.
'''

HELP_SET = '''Available Commands:
  /set parameter <name> <value>   Set a parameter (/set parameter lists them)
  /set system <string>            Set the system message
  /set format json                Enable JSON mode
  /set noformat                   Disable formatting
  /set verbose                    Show prompt and eval rates after each answer
  /set quiet                      Do not show them
'''

HELP_SHOW = '''Available Commands:
  /show info         Show details for this model
  /show parameters   Show parameters for this session
  /show system       Show the system message
  /show template     Show the prompt template
  /show license      Show the model's license
'''

HELP_SHORTCUTS = '''Available keyboard shortcuts:
  Ctrl + c   Stop the answer being generated (at the prompt: discard the input)
  Ctrl + d   Exit (on an empty line)
  Up/Down    Walk through the input history (kept in $KRASIS_HOME/history)
  Ctrl + r   Search the history
  Pasting    Pasted lines stay one message; Enter sends it
'''

HELP_PARAMETERS = "Parameters:\n" + "".join(
    f"  /set parameter {name} <{kind.__name__}>\n" for name, kind in PARAMETER_TYPES.items())


def stream_text(parts: Iterator[dict], out: TextIO, field: str) -> tuple[str, dict | None]:
    """Print streamed text (``response``, or ``message.content`` for chat) as it comes.

    Returns the whole text and the final part (done=True, with the counters). The stream is
    closed on the way out, also when Ctrl+C interrupts it.
    """
    pieces: list[str] = []
    final = None
    try:
        for part in parts:
            text = part.get("message", {}).get("content") if field == "message" \
                else part.get(field)
            if text:
                out.write(text)
                out.flush()
                pieces.append(text)
            if part.get("done"):
                final = part
    finally:
        close = getattr(parts, "close", None)
        if close is not None:
            close()
    return "".join(pieces), final


def _duration(ns: int | float) -> str:
    seconds = ns / 1e9
    if seconds >= 1:
        return f"{seconds:.6g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6g}ms"
    return f"{seconds * 1e6:.6g}µs"


def format_stats(final: dict) -> str:
    """The --verbose block, as ollama prints it."""
    lines = []
    for key, label in (("total_duration", "total duration"), ("load_duration", "load duration")):
        if final.get(key) is not None:
            lines.append(f"{label + ':':<22}{_duration(final[key])}")
    for prefix, label in (("prompt_eval", "prompt eval"), ("eval", "eval")):
        count, duration_ns = final.get(f"{prefix}_count"), final.get(f"{prefix}_duration")
        if count is None:
            continue
        lines.append(f"{label + ' count:':<22}{count} token(s)")
        if duration_ns:
            lines.append(f"{label + ' duration:':<22}{_duration(duration_ns)}")
            lines.append(f"{label + ' rate:':<22}{count / (duration_ns / 1e9):.2f} tokens/s")
    return "\n".join(lines)


class Repl:
    """One interactive conversation with one model."""

    def __init__(self, client: Client, model: str, *, system: str | None = None,
                 options: dict | None = None, format: str | None = None,
                 keep_alive: object = None, verbose: bool = False,
                 out: TextIO | None = None, err: TextIO | None = None,
                 reader: LineReader | None = None):
        self.client = client
        self.model = model
        self.system = system
        self.options = dict(options or {})
        self.format = format
        self.keep_alive = keep_alive
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.messages: list[dict] = []
        self.reader = reader

    def run(self) -> int:
        """Read, answer, repeat, until /bye or end of input; returns the exit code."""
        if self.reader is None:
            self.reader = line_reader()
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.out.write(self._new_line() + "Use Ctrl + d or /bye to exit.\n")
                continue
            if text is None:
                self.out.write(self._new_line())
                return 0
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                if not self.command(text.strip()):
                    return 0
                continue
            self.ask(text)

    def _new_line(self) -> str:
        return "" if self.reader.ends_line else "\n"

    def read_message(self) -> str | None:
        """One message: a line (on a terminal: what was typed or pasted before Enter), or the
        text between \"\"\" marks; None at end of input."""
        try:
            text = self.reader.read(">>> ", "... ")
            if QUOTES not in text:
                return text
            head, _, tail = text.partition(QUOTES)
            if QUOTES in tail:  # closed in what was read: one line, or a terminal's whole block
                body, _, after = tail.partition(QUOTES)
                return (head + body + after).strip("\n")
            lines = [head + tail]
            while True:
                line = self.reader.read("... ", "... ")
                if QUOTES in line:
                    lines.append(line.partition(QUOTES)[0])
                    return "\n".join(lines).strip("\n")
                lines.append(line)
        except EOFError:
            return None

    def ask(self, text: str) -> None:
        """Send one user message and stream the answer; Ctrl+C stops it."""
        self.messages.append({"role": "user", "content": text})
        history = ([{"role": "system", "content": self.system}] if self.system else []) \
            + self.messages
        try:
            parts = self.client.chat(self.model, history, options=self.options or None,
                                     format=self.format, keep_alive=self.keep_alive)
            answer, final = stream_text(parts, self.out, "message")
        except KeyboardInterrupt:
            self.messages.pop()
            self.out.write("\n\n")
            self.out.flush()
            return
        except KrasisError as exc:
            self.messages.pop()
            self.out.write("\n")
            self.err.write(f"Error: {exc}\n")
            return
        self.messages.append({"role": "assistant", "content": answer})
        self.out.write("\n\n" if not answer.endswith("\n") else "\n")
        self.out.flush()
        if self.verbose and final:
            self.err.write(format_stats(final) + "\n\n")

    # -- commands ----------------------------------------------------------------------------

    def command(self, text: str) -> bool:
        """Run one /command; False means leave the session."""
        words = text.split(maxsplit=2)
        name = words[0].lower()
        if name in ("/bye", "/exit"):
            return False
        handler = {"/set": self._set, "/show": self._show, "/clear": self._clear,
                   "/load": self._load, "/?": self._help, "/help": self._help}.get(name)
        if handler is None:
            self.out.write(f"Unknown command '{words[0]}'. Type /? for help\n")
        else:
            handler(text[len(words[0]):].strip())
        return True

    def _help(self, topic: str) -> None:
        pages = {"set": HELP_SET, "/set": HELP_SET, "show": HELP_SHOW, "/show": HELP_SHOW,
                 "shortcut": HELP_SHORTCUTS, "shortcuts": HELP_SHORTCUTS}
        self.out.write(pages.get(topic.lower(), HELP))

    def _clear(self, _: str) -> None:
        self.messages.clear()
        self.out.write("Cleared session context\n")

    def _load(self, name: str) -> None:
        if not name:
            self.out.write("Usage: /load <model>\n")
            return
        try:
            self.client.show(name)
        except KrasisError as exc:
            self.err.write(f"Error: {exc}\n")
            return
        self.model = name
        self.messages.clear()
        self.out.write(f"Loading model '{name}'\n")

    def _set(self, rest: str) -> None:
        words = rest.split(maxsplit=1)
        if not words:
            self.out.write(HELP_SET)
            return
        what, value = words[0].lower(), (words[1] if len(words) > 1 else "")
        if what == "parameter":
            self._set_parameter(value)
        elif what == "system":
            self.system = value.strip().strip('"') or None
            self.out.write("Set system message.\n" if self.system else "Cleared system message.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.out.write(f"Set '{what}' mode.\n")
        elif what == "format" and value.strip() == "json":
            self.format = "json"
            self.out.write("Set format to 'json' mode.\n")
        elif what == "noformat":
            self.format = None
            self.out.write("Disabled format.\n")
        else:
            self.out.write(f"Unknown command '/set {what}'. Type /? set for help\n")

    def _set_parameter(self, text: str) -> None:
        try:
            words = shlex.split(text)
        except ValueError as exc:
            self.out.write(f"Couldn't set parameter: {exc}\n")
            return
        if len(words) < 2:
            self.out.write(HELP_PARAMETERS)
            return
        name, values = words[0], words[1:]
        kind = PARAMETER_TYPES.get(name)
        if kind is None:
            self.out.write(f"Couldn't set parameter: unknown parameter '{name}'\n")
            return
        if name == "stop":
            self.options["stop"] = values
        else:
            try:
                self.options[name] = kind(values[0])
            except ValueError:
                what = "an integer" if kind is int else "a number"
                self.out.write(f"Couldn't set parameter: {name} needs {what}, "
                               f"got '{values[0]}'\n")
                return
        self.out.write(f"Set parameter '{name}' to '{', '.join(values)}'\n")

    def _show(self, rest: str) -> None:
        what = (rest.split() or ["info"])[0].lower()
        if what == "parameters":
            self._show_parameters()
            return
        if what not in ("info", "system", "template", "license"):
            self.out.write(HELP_SHOW)
            return
        if what == "system" and self.system:
            self.out.write(self.system + "\n")
            return
        try:
            info = self.client.show(self.model)
        except KrasisError as exc:
            self.err.write(f"Error: {exc}\n")
            return
        if what == "info":
            self.out.write(format_show(info) + "\n")
        else:
            text = info.get(what) or f"No {what} was specified for this model."
            self.out.write(f"{text}\n")

    def _show_parameters(self) -> None:
        if not self.options:
            self.out.write("No parameters set for this session.\n")
            return
        self.out.write("User defined parameters:\n")
        for name, value in self.options.items():
            shown = " ".join(f'"{v}"' for v in value) if isinstance(value, list) else value
            self.out.write(f"{name:<20}{shown}\n")
