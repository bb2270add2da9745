"""What a client may see of an internal error: one short line, no stack, no library paths.

A runner's or a library's failure text (a torch error's C++ frames, a traceback, the file
it came from) says how the daemon is installed and helps no client; the daemon's log keeps
the whole text. Messages the daemon writes for users pass through unchanged.
"""

from __future__ import annotations

import re

MAX_CHARS = 300
# Source and library files (/usr/lib/.../libc10.so, .../site-packages/torch/nn/x.py:12).
_CODE_PATH = re.compile(r"(?:/[\w.+@-]+)+\.(?:py|pyx|so(?:\.\d+)*|c|cc|cpp|cu|h|hpp)\b(?::\d+)?")
_INSTALL_PATH = re.compile(r"\S*(?:site-packages|dist-packages)/\S*")


def client_message(text: str) -> str:
    """The first line of ``text``, with code and install paths cut out, at most MAX_CHARS."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = _INSTALL_PATH.sub("<internal>", _CODE_PATH.sub("<internal>", line))
    return line if len(line) <= MAX_CHARS else line[:MAX_CHARS] + "..."


def error_message(exc: BaseException) -> str:
    """The text a client sees for an exception: client_message, or the type's name."""
    return client_message(str(exc)) or type(exc).__name__
