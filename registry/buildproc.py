"""Run a cache builder in a child process, streaming its progress back.

The daemon never runs model math itself: quantizing tens of GB of weights in its own
process would hold that memory afterwards, and a native fault would take the daemon down.
The child is spawned (no inherited threads or locks), dies with the thread that started it
(PR_SET_PDEATHSIG, so a kill -9 of the registry's process leaves no builder behind), and is
killed when the event stream is closed early. Builders must be importable module-level
functions, since the child imports them by name.
"""

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
REPORTED_EXIT_S = 5.0  # a child that sent its result gets this long to exit by itself


class BuilderCrashed(RuntimeError):
    """The builder process ended without a result (killed, or a native fault)."""


class BuilderFailed(RuntimeError):
    """The builder raised; the message is its error."""


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_main(builder: Callable[..., dict], model_dir: Path, out_dir: Path, quant: str,
                group_size: int, conn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    os.umask(0o077)  # what the builder writes stays private to the daemon's user (store.py)

    def progress(completed: int, total: int) -> None:
        conn.send(("progress", (int(completed), int(total))))

    try:
        manifest = builder(model_dir, out_dir, quant=quant, group_size=group_size,
                           progress=progress)
        conn.send(("done", dict(manifest) if isinstance(manifest, dict) else {}))
    except Exception as exc:  # sent to the parent as text: exceptions need not pickle
        conn.send(("error", str(exc) or type(exc).__name__))
    finally:
        conn.close()


def run_builder(builder: Callable[..., dict], model_dir: Path, out_dir: Path, quant: str,
                group_size: int) -> Iterator[tuple[str, object]]:
    """Yield ("progress", (completed, total)) events, then ("done", manifest)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main, name=f"krasis-cache-build-{out_dir.name}",
        args=(builder, model_dir, out_dir, quant, group_size, sender, os.getpid()))
    process.start()
    sender.close()
    reported = False  # the child sent its result ("done" or "error") and is on its way out
    try:
        while True:
            try:
                kind, value = receiver.recv()
            except EOFError:
                process.join()
                raise BuilderCrashed(
                    f"the builder process ended without a result (exit code {process.exitcode})"
                ) from None
            reported = kind in ("done", "error")
            if kind == "error":
                raise BuilderFailed(value)
            yield kind, value
            if kind == "done":
                return
    finally:
        _stop(process, reported)
        receiver.close()


def _stop(process, reported: bool) -> None:
    """Join the child; kill it first when it has not reported (the stream was closed early),
    or when it reported but does not exit within REPORTED_EXIT_S."""
    if reported:
        process.join(REPORTED_EXIT_S)
    if process.is_alive():
        log.warning("stopping cache build process %s", process.pid)
        process.kill()
    process.join()
