"""What the bench scripts share on their command line: output lines as they come, and
argparse types that turn bad flag values into one-line usage errors instead of tracebacks."""

from __future__ import annotations

import argparse
from pathlib import Path


def log(msg: str) -> None:
    """One line of bench output, flushed at once (benches run for minutes, often piped)."""
    print(msg, flush=True)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of integers of at least 1 (``100,1000``)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in {text!r}: use e.g. 1,4,8")
    return [positive_int(item) for item in items]


def make_dir(parser: argparse.ArgumentParser, path: str | Path, flag: str) -> Path:
    """``path`` as a folder, created with its parents when missing; a usage error from
    ``parser`` when that is impossible (a file is in the way, no permission)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"{flag}: cannot create folder {str(folder)!r}: {exc.strerror or exc}")
    return folder
