"""How an engine is loaded and run: one frozen object, built once and passed down.

A runner builds ``EngineOptions`` from its command line (krasisd.runner, the daemon's
settings of krasisd.config) and ``load_for_serving`` hands it to the loaders, which pass what
each part needs to placement, backends, tuners and kernels. Nothing below reads the
environment. This module imports no torch, so the daemon and the runner's argument parsing
stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from krasisd.config import (
    DEFAULT_GPU_DENSE,
    DEFAULT_GPU_PREFILL_MIN_TOKENS,
    DEVICES,
    QUANTS,
    gpu_dense_value,
)


@dataclass(frozen=True)
class EngineOptions:
    """The settings of one engine load; see docs/settings.md for the daemon's names.

    - ``quant``: routed-expert format, one of QUANTS; ``device``: one of DEVICES;
    - ``threads``: CPU threads of the torch ops and native kernels (None: the default);
    - ``cache_dir``, ``gpu_cache_dir``: the CPU- and GPU-format caches (None: inside the
      model folder);
    - ``gpu_dense``: where hybrid loads take the dense linears from (GPU_DENSE_WEIGHTS);
    - ``vram_budget_bytes``: GPU memory the engine may use (None: free memory minus a margin);
    - ``gpu_prefill_min_tokens``: prompts from this length stream their experts through the
      GPU; shorter ones take the decode path;
    - ``autotune``: time the GPU kernels' tiles per shape (off: fixed tiles);
    - ``tuning_dir``: where timed tiles are kept for later processes (None: not kept).
    """

    quant: str = "int4"
    device: str = "auto"
    threads: int | None = None
    cache_dir: Path | None = None
    gpu_cache_dir: Path | None = None
    gpu_dense: str = DEFAULT_GPU_DENSE
    vram_budget_bytes: int | None = None
    gpu_prefill_min_tokens: int = DEFAULT_GPU_PREFILL_MIN_TOKENS
    autotune: bool = True
    tuning_dir: Path | None = None

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _positive_or_none("threads", self.threads)
        _positive_or_none("vram_budget_bytes (KRASIS_VRAM_BUDGET)", self.vram_budget_bytes)
        if _not_int(self.gpu_prefill_min_tokens) or self.gpu_prefill_min_tokens < 1:
            raise ValueError("gpu_prefill_min_tokens (KRASIS_GPU_PREFILL_MIN_TOKENS) must be a "
                             f"positive integer, got {self.gpu_prefill_min_tokens!r}")
        if not isinstance(self.autotune, bool):
            raise ValueError(f"autotune must be True or False, got {self.autotune!r}")
        object.__setattr__(self, "gpu_dense", gpu_dense_value(self.gpu_dense))
        for name in ("cache_dir", "gpu_cache_dir", "tuning_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _positive_or_none(name: str, value) -> None:
    if value is not None and (_not_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
