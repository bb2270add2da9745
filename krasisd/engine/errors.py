"""Engine exceptions: every failure a user can cause maps to one of these, with a message."""

from __future__ import annotations


class KrasisEngineError(Exception):
    """Base class of the engine's own errors."""


class ModelLoadError(KrasisEngineError):
    """A model folder could not be loaded (missing or corrupt files, bad config, wrong shapes)."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture (or a feature of it) is not implemented by this engine."""
