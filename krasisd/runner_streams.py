"""Serving an engine that only streams: a plugged-in ``KRASIS_RUNNER_LOADER`` engine (or a test
fake) that is not a krasis Engine has no steps to batch, only
``generate(prompt_ids, options, should_cancel)``, an iterator of GenerationChunks.

:class:`StreamLoop` has the generation loop's surface (``num_ctx``, ``add``, ``has_work``,
``step``) so the runner's engine thread drives both the same way: each step advances each
of up to ``max_batch`` streams by one chunk, on that one thread. Such an engine must honour
``should_cancel`` (it is asked between the runner's steps) and must not block waiting for
other requests. Imports no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from krasisd.engine.loop_options import (
    ContextSpec,
    Emitted,
    LoopOptions,
    LoopStats,
    resolve_num_ctx,
)
from krasisd.engine.options import GenerationChunk


class Stream:
    """One request's chunks from the engine's ``generate``."""

    def __init__(self, chunks: Iterator[GenerationChunk], key=None):
        self.chunks = chunks
        self.key = key


class StreamLoop:
    """Streams waiting and running, advanced one chunk per step."""

    def __init__(self, options: LoopOptions):
        self.options = options
        self.waiting: deque[Stream] = deque()
        self.running: list[Stream] = []
        self.stats = LoopStats()

    def num_ctx(self, requested: int | None) -> int:
        """The request's num_ctx, or DEFAULT_NUM_CTX (such an engine states no limits)."""
        return resolve_num_ctx(requested, ContextSpec(), None)

    def add(self, stream: Stream) -> None:
        self.waiting.append(stream)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Emitted]:
        self.stats.steps += 1
        while self.waiting and len(self.running) < self.options.max_batch:
            self.running.append(self.waiting.popleft())
        out: list[Emitted] = []
        for stream in list(self.running):
            try:
                chunk = next(stream.chunks)
            except StopIteration:
                chunk, error = None, RuntimeError("the engine's stream ended without a final chunk")
            except Exception as exc:  # noqa: BLE001 - this request's failure
                chunk, error = None, exc
            else:
                error = None
            out.append(Emitted(stream, chunk, error))
            if chunk is None or chunk.done:
                self.running.remove(stream)
        return out
