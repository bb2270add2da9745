"""Kernel tiles chosen by timing, remembered across processes.

Picking a Triton tile times every candidate on the real inputs, which compiles each one:
seconds for the first prompt of a new size in a fresh runner. The winner is written to
``<table_dir>/<device>.json`` (runners: ``$KRASIS_HOME/tuning``, given by the daemon) and read
back by later processes, so only the first process on a machine pays. Kernels tune only when
given a ``KernelTuning`` (EngineOptions.autotune); without one they take fixed tiles. Entries are keyed by kernel family, the candidate list (a change
of candidates in the code makes old entries unused) and the shape key the caller gives.
A missing, unreadable or unwritable file only means timing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelTuning:
    """Autotuning is on: kernels time their candidate tiles once per shape and keep the
    fastest; ``table_dir`` keeps the winners for later processes (None: this process only)."""

    table_dir: Path | None = None


def tuning_for(autotune: bool, table_dir: Path | None) -> KernelTuning | None:
    """The kernels' tuning from EngineOptions' ``autotune`` and ``tuning_dir``."""
    return KernelTuning(table_dir) if autotune else None


def table_path(device: torch.device | str | None = None,
               table_dir: Path | None = None) -> Path | None:
    """The tuning file of this device in ``table_dir`` (None without CUDA or a folder)."""
    if table_dir is None or not torch.cuda.is_available():
        return None
    name = f"{torch.cuda.get_device_name(device)}-triton{triton.__version__}"
    return Path(table_dir) / f"{re.sub(r'[^A-Za-z0-9.]+', '-', name)}.json"


def candidates_id(candidates) -> str:
    """A short fingerprint of a candidate list."""
    return hashlib.sha256(repr(tuple(candidates)).encode()).hexdigest()[:16]


def load(path: Path | None, family: str, candidates, key: tuple, config_type):
    """The stored winner for ``key``, as ``config_type``, or None."""
    return _lookup(_read(path)[0], family, candidates, key, config_type)


def save(path: Path | None, family: str, candidates, key: tuple, config) -> None:
    """Record the winner for ``key`` (read, merge, replace the file atomically)."""
    _write(path, _read(path)[0], family, candidates, key, config)


def _lookup(table: dict, family: str, candidates, key: tuple, config_type):
    entry = table.get(f"{family}/{candidates_id(candidates)}", {}).get(repr(key))
    if entry is None:
        return None
    try:
        return config_type(**entry)
    except TypeError:  # fields changed since it was written
        return None


def _write(path: Path | None, table: dict, family: str, candidates, key: tuple, config) -> None:
    """Merge the winner for ``key`` into ``table`` and replace the file with it atomically."""
    if path is None:
        return
    table.setdefault(f"{family}/{candidates_id(candidates)}", {})[repr(key)] = (
        dataclasses.asdict(config))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False, encoding="utf-8") as handle:
            json.dump(table, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
    except OSError as exc:
        log.warning("could not write kernel tuning to %s: %s", path, exc)


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells whether a file changed since it was read (an atomic replace changes the
    inode): (inode, mtime in ns, size), or None when there is no file."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _read(path: Path | None) -> tuple[dict, tuple[int, int, int] | None]:
    """The table in the file and the file's stamp when it was read."""
    stamp = _stamp(path)
    if stamp is None:
        return {}, None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable kernel tuning file %s: %s", path, exc)
        return {}, stamp
    return (table if isinstance(table, dict) else {}), stamp


class Tuner:
    """Picks the fastest of ``candidates`` for each shape key: once per process from the
    tuning file, or, the first time on a machine, by timing ``run(config)`` with ``timer``
    (``time_events`` or ``time_graph``) and saving the winner."""

    def __init__(self, family: str, candidates, config_type, timer):
        self.family, self.candidates, self.config_type = family, tuple(candidates), config_type
        self.timer = timer
        self._memo: dict[tuple, object] = {}

    def pick(self, key: tuple, run, tuning: KernelTuning, device=None, fallback=None):
        """The tile for ``key``; ``fallback`` when no candidate runs (else RuntimeError)."""
        if key in self._memo:
            return self._memo[key]
        path = table_path(device, tuning.table_dir)
        table, stamp = _read(path)
        best = _lookup(table, self.family, self.candidates, key, self.config_type)
        if best is None:
            best = self._time(run, fallback)
            if _stamp(path) != stamp:  # another process wrote its tiles meanwhile: keep them
                table = _read(path)[0]
            _write(path, table, self.family, self.candidates, key, best)
            log.info("%s tile for %s: %s", self.family, key, best)
        self._memo[key] = best
        return best

    def _time(self, run, fallback):
        best, best_ms = fallback, float("inf")
        for cfg in self.candidates:
            try:
                run(cfg)  # compile and warm up
                ms = self.timer(lambda cfg=cfg: run(cfg))
            except Exception as exc:  # e.g. a tile this device cannot run
                log.debug("%s tile %s failed: %s", self.family, cfg, exc)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best_ms == float("inf"):
            if fallback is None:
                raise RuntimeError(f"no {self.family} kernel configuration ran on this device")
            log.warning("no %s tile could be timed; using %s", self.family, fallback)
        return best


def time_events(run, repeats: int = 3) -> float:
    """Milliseconds per call, between two CUDA events (for calls of a millisecond or more)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def time_graph(run) -> float:
    """Milliseconds per call as replays of a CUDA graph: for calls of a few microseconds,
    whose launches from Python would set the pace (and make candidates look alike)."""
    import triton.testing

    torch.cuda.synchronize()  # the inputs are ready before the side-stream capture
    return triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
