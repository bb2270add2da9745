"""Progress display for pull and create: the NDJSON events {status, digest, total, completed}.

An event with a ``total`` drives a bar, keyed by its digest (a file) or its status (a cache
build); one without is a status line. On a terminal the bars are tqdm bars; elsewhere (logs,
pipes) each bar prints one line when it completes, so the output stays short and greppable.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from .display import human_bytes


class Progress:
    """Renders pull/create events; call ``update(event)`` for each, then ``close()``."""

    def __init__(self, out: TextIO | None = None, interactive: bool | None = None):
        self.out = out or sys.stderr
        self.interactive = self.out.isatty() if interactive is None else interactive
        self.bars: dict[str, tqdm] = {}
        self.finished: set[str] = set()
        self.last_status: str | None = None

    def update(self, event: dict) -> None:
        """Show one event."""
        status = str(event.get("status", ""))
        total = event.get("total")
        if total:
            self._update_bar(event, status, int(total), int(event.get("completed") or 0))
        elif status and status != self.last_status:
            self._line(status)
        self.last_status = status

    def close(self) -> None:
        """Finish every bar still open."""
        for key in list(self.bars):
            self._close_bar(key)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _update_bar(self, event: dict, status: str, total: int, completed: int) -> None:
        key = str(event.get("digest") or status)
        if key in self.finished:
            return
        is_bytes = bool(event.get("digest"))
        if not self.interactive:
            if completed >= total:
                size = human_bytes(total) if is_bytes else f"{total}/{total}"
                self._line(f"{status}: 100% {size}")
                self.finished.add(key)
            return
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = self._new_bar(status, total, is_bytes)
        if bar.total != total:
            bar.total = total
        bar.update(max(0, min(completed, total)) - bar.n)
        if completed >= total:
            self._close_bar(key)

    def _new_bar(self, status: str, total: int, is_bytes: bool) -> tqdm:
        if is_bytes:
            options = {"unit": "B", "unit_scale": True, "unit_divisor": 1000}
            counts = "{n_fmt}B/{total_fmt}B {rate_fmt}"
        else:
            options = {"unit": ""}
            counts = "{n_fmt}/{total_fmt}"
        return tqdm(total=total, desc=status, file=self.out, leave=True, dynamic_ncols=True,
                    bar_format="{desc} {percentage:3.0f}% |{bar}| " + counts
                    + " [{elapsed}<{remaining}]", **options)

    def _close_bar(self, key: str) -> None:
        bar = self.bars.pop(key, None)
        if bar is not None:
            bar.close()
        self.finished.add(key)

    def _line(self, text: str) -> None:
        if self.bars:
            tqdm.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()
