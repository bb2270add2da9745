"""The hybrid MoE engine: models, quantized expert backends, sampler.

``from krasisd.engine import load, Engine, EngineOptions``. The names are resolved lazily, so
importing a light submodule (``krasisd.engine.options``) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from krasisd.engine.engine import Engine, load
    from krasisd.engine.engine_options import EngineOptions

__all__ = ["Engine", "EngineOptions", "load"]

_MODULES = {"Engine": "engine", "load": "engine", "EngineOptions": "engine_options"}


def __getattr__(name: str):
    module = _MODULES.get(name)
    if module is not None:
        from importlib import import_module

        return getattr(import_module(f"krasisd.engine.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
