"""Exceptions raised by the registry; every message is meant to be shown to a user as is."""


class RegistryError(Exception):
    """Base class of every registry error."""


class InvalidName(RegistryError, ValueError):
    """A model name (or a file path inside a model) that is malformed or could escape the store."""


class ModelNotFound(RegistryError):
    """No model of that name, or the model is not ready."""


class CacheNotReady(RegistryError):
    """No ready cache of that format and quantization for the model."""


class PullError(RegistryError):
    """A pull or an import failed: hub errors, checksums, disk space, unsupported repos."""


class ModelInUse(RegistryError):
    """The model is loaded, or a pull or cache build of it is running."""


class StorageFull(PullError):
    """The disk under KRASIS_HOME is full, or too full for a pull (HTTP 507); the message
    starts with "insufficient storage:"."""
