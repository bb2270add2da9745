"""The hybrid MoE engine: models, quantized expert backends, sampler.

``from krasisd.engine import load, Engine``. The names are resolved lazily, so importing a
light submodule (``krasisd.engine.options``) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from krasisd.engine.engine import Engine, load

__all__ = ["Engine", "load"]


def __getattr__(name: str):
    if name in __all__:
        from krasisd.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
